"""ELECTRA's discriminator as a Hugging Face ``ElectraForPreTraining`` folder (dispatched from ``models/hf.py``).

After pre-training the discriminator is the model kept (the paper fine-tunes
it; the generator is thrown away), so the export holds the shared
embeddings, the discriminator's blocks and its replaced-token head. HF's
ELECTRA layer is BERT's (post-LN, exact GELU), so the names map one to one;
the embeddings are at the discriminator's width, so there is no
``embeddings_project``. ``ElectraForPreTraining``'s logits are ours,
``Electra.discriminator_logits``.

Import reads such a folder back (ours, or one transformers wrote: an
``ElectraForPreTraining``, or a bare ``ElectraModel`` without the RTD head).
The folder has no generator, so the imported model's generator is sized by
the paper's ratio (a quarter of the discriminator's width, 64-wide heads)
and keeps its fresh initialisation, as does the RTD head when the folder has
none: ``FRESH_ON_IMPORT``. Fine-tuning never reads either; further
pre-training trains the generator from scratch beside the imported
discriminator. Refused with one line: a generator folder
(``ElectraForMaskedLM``) and ELECTRA-Small's factorised embeddings
(``embedding_size`` smaller than ``hidden_size``, behind a projection our
model does not have).
"""
from __future__ import annotations

import torch

from models.electra import ElectraConfig

BLOCK_NAMES = (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
               ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
               ("norm1", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
               ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm"))
"""Our encoder block's linear and LayerNorm names -> HF's ``ElectraLayer``'s."""


FRESH_ON_IMPORT = ("gen_project.", "gen_blocks.", "gen_head.", "disc_head.")
"""Our parameters an imported folder may lack: they keep the model's initialisation (``workers.weights``)."""

HF_DEFAULTS = dict(vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12,
                   num_attention_heads=4, intermediate_size=1024, hidden_act="gelu", max_position_embeddings=512,
                   type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.02,
                   position_embedding_type="absolute")
"""transformers' ``ElectraConfig`` defaults: config.json leaves out what equals them."""


def _linear(out: dict, sd: dict, theirs: str, ours: str) -> None:
    out[f"{theirs}.weight"] = sd[f"{ours}.weight"]
    out[f"{theirs}.bias"] = sd[f"{ours}.bias"]


def electra_to_hf(cfg: ElectraConfig, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our ELECTRA config and state dict -> (config.json dict, ``ElectraForPreTraining`` state dict)."""
    out = {"electra.embeddings.word_embeddings.weight": sd["embeddings.word.weight"],
           "electra.embeddings.position_embeddings.weight": sd["embeddings.position.weight"]}
    if cfg.type_vocab_size:
        out["electra.embeddings.token_type_embeddings.weight"] = sd["embeddings.token_type.weight"]
    else:  # HF always has a segment table: one zero row adds nothing
        out["electra.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.d_model)
    _linear(out, sd, "electra.embeddings.LayerNorm", "embeddings.norm")
    for i in range(cfg.n_layers):
        for ours, theirs in BLOCK_NAMES:
            _linear(out, sd, f"electra.encoder.layer.{i}.{theirs}", f"disc_blocks.{i}.{ours}")
    _linear(out, sd, "discriminator_predictions.dense", "disc_head.dense")
    _linear(out, sd, "discriminator_predictions.dense_prediction", "disc_head.prediction")
    config = dict(architectures=["ElectraForPreTraining"], model_type="electra", vocab_size=cfg.vocab_size,
                  embedding_size=cfg.d_model, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
                  max_position_embeddings=cfg.seq_len, type_vocab_size=max(1, cfg.type_vocab_size),
                  layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
                  attention_probs_dropout_prob=cfg.dropout, initializer_range=cfg.init_std,
                  position_embedding_type="absolute", tie_word_embeddings=True)
    return config, out


def generator_size(d_model: int) -> dict[str, int]:
    """A fresh generator for an imported discriminator: a quarter of its width, 64-wide heads, 4x MLP."""
    width = max(1, d_model // 4)
    heads = max(1, width // 64)
    width -= width % heads
    return {"gen_d_model": width, "gen_n_heads": heads, "gen_d_ff": 4 * width}


def electra_from_hf(config: dict, sd: dict[str, torch.Tensor]) -> tuple[ElectraConfig, dict[str, torch.Tensor]]:
    """(config.json dict, HF discriminator state dict) -> (our config, our state dict without the generator);
    HFError (from ``models.hf``) for what does not map."""
    from models.hf import HFError, _need, _strip, _unlinear

    c = {**HF_DEFAULTS, **config}
    if any(k.startswith(("generator_predictions.", "generator_lm_head.")) for k in sd):
        raise HFError("electra: this folder holds ELECTRA's generator (ElectraForMaskedLM); import the "
                      "discriminator (ElectraForPreTraining), the model ELECTRA keeps")
    if c["hidden_act"] not in ("gelu", "gelu_python"):
        raise HFError(f"electra: hidden_act {c['hidden_act']} is not supported (our encoders use exact gelu)")
    if c["position_embedding_type"] != "absolute":
        raise HFError(f"electra: position_embedding_type {c['position_embedding_type']} is not supported; "
                      "only absolute")
    d = c["hidden_size"]
    if c["embedding_size"] != d:
        raise HFError(f"electra: embedding_size {c['embedding_size']} differs from hidden_size {d} (ELECTRA-Small's "
                      "factorised embeddings); only discriminators with embeddings at their own width import")
    sd = _strip(sd, "electra")
    types = c["type_vocab_size"]
    type_table = _need(sd, "electra.embeddings.token_type_embeddings.weight", "electra")
    if types == 1 and not type_table.any():
        types = 0                                                     # our export's one zero row
    cfg = ElectraConfig(vocab_size=c["vocab_size"], seq_len=c["max_position_embeddings"], d_model=d,
                        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                        d_ff=c["intermediate_size"], type_vocab_size=types, dropout=0.0,
                        norm_eps=c["layer_norm_eps"], init_std=c["initializer_range"], **generator_size(d))
    out = {"embeddings.word.weight": _need(sd, "electra.embeddings.word_embeddings.weight", "electra"),
           "embeddings.position.weight": _need(sd, "electra.embeddings.position_embeddings.weight", "electra")}
    if types:
        out["embeddings.token_type.weight"] = type_table
    pairs = [("embeddings.norm", "electra.embeddings.LayerNorm")]
    pairs += [(f"disc_blocks.{i}.{ours}", f"electra.encoder.layer.{i}.{theirs}")
              for i in range(cfg.n_layers) for ours, theirs in BLOCK_NAMES]
    if "discriminator_predictions.dense.weight" in sd:
        pairs += [("disc_head.dense", "discriminator_predictions.dense"),
                  ("disc_head.prediction", "discriminator_predictions.dense_prediction")]
    for ours, theirs in pairs:
        _unlinear(out, sd, ours, theirs, "electra")
    return cfg, out
