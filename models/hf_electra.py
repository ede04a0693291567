"""ELECTRA's discriminator as a Hugging Face ``ElectraForPreTraining`` folder (dispatched from ``models/hf.py``).

After pre-training the discriminator is the model kept (the paper fine-tunes
it; the generator is thrown away), so the export holds the shared
embeddings, the discriminator's blocks and its replaced-token head. HF's
ELECTRA layer is BERT's (post-LN, exact GELU), so the names map one to one;
the embeddings are at the discriminator's width, so there is no
``embeddings_project``. ``ElectraForPreTraining``'s logits are ours,
``Electra.discriminator_logits``.
"""
from __future__ import annotations

import torch

from models.electra import ElectraConfig

BLOCK_NAMES = (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
               ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
               ("norm1", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
               ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm"))
"""Our encoder block's linear and LayerNorm names -> HF's ``ElectraLayer``'s."""


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
