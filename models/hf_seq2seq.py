"""Hugging Face interchange for the encoder-decoders: T5 <-> T5ForConditionalGeneration, BART <->
BartForConditionalGeneration (dispatched from ``models/hf.py``).

| family | transformers class          | what the mapping does                                                   |
|--------|-----------------------------|-------------------------------------------------------------------------|
| t5     | T5ForConditionalGeneration  | names; the position-bias table lives in block 0 of each stack; v1.0 (tied head, d_model**-0.5) and v1.1 (own lm_head, unscaled, gated GELU) |
| bart   | BartForConditionalGeneration| names; position tables keep BART's 2 offset rows; final_logits_bias is (1, V) there |

An untied T5 (v1.1) is written with ``tie_word_embeddings: false`` and its own ``lm_head.weight``.
transformers 5's T5Config sets ``tie_word_embeddings`` back to true, but reads the false as "do not scale the
decoder output" and keeps a checkpoint's lm_head that differs from the shared table untied (it warns that
both are present), so the loaded model gives our logits.

The decoder starts from the pad id for T5 and from ``</s>`` for BART
(``decoder_start_token_id``, set from the tokenizer by ``save_hf``).
"""
from __future__ import annotations

from typing import Any

import torch

from models.bart import BartConfig
from models.hf import HFError
from models.t5 import T5Config

HF_CLASSES = {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}

# config.json values transformers leaves out when they equal the class defaults.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
               num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj="relu", tie_word_embeddings=True),
    "bart": dict(vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                 encoder_attention_heads=16, decoder_layers=12, decoder_ffn_dim=4096, decoder_attention_heads=16,
                 d_model=1024, activation_function="gelu", init_std=0.02, scale_embedding=False),
}


def family_of(cfg) -> str | None:
    return "t5" if isinstance(cfg, T5Config) else "bart" if isinstance(cfg, BartConfig) else None


def hf_class(cfg) -> str:
    return HF_CLASSES[family_of(cfg)]


def decoder_start(config: dict) -> dict:
    """config.json ids the decoder starts from: T5 the pad id, BART ``</s>``."""
    key = {"t5": "pad_token_id", "bart": "eos_token_id"}.get(config.get("model_type"))
    return {"decoder_start_token_id": config[key]} if key and key in config else {}


# ----------------------------------------------------------------------------- names


def t5_names(cfg: T5Config) -> dict[str, str]:
    """Our state-dict key -> HF's, for every tensor."""
    names = {"shared.weight": "shared.weight"}
    ff = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    for stack in ("encoder", "decoder"):
        names[f"{stack}.relative_bias.weight"] = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        names[f"{stack}.final_norm.weight"] = f"{stack}.final_layer_norm.weight"
        for i in range(cfg.n_layers):
            p, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            subs = [("self_attn", "self_norm", "0.SelfAttention", "0.layer_norm")]
            if stack == "decoder":
                subs.append(("cross_attn", "cross_norm", "1.EncDecAttention", "1.layer_norm"))
            for attn, norm, their_attn, their_norm in subs:
                names.update({f"{p}{attn}.{w}.weight": f"{h}{their_attn}.{w}.weight" for w in "qkvo"})
                names[f"{p}{norm}.weight"] = f"{h}{their_norm}.weight"
            j = len(subs)
            names.update({f"{p}ff.{w}.weight": f"{h}{j}.DenseReluDense.{w}.weight" for w in ff})
            names[f"{p}ff_norm.weight"] = f"{h}{j}.layer_norm.weight"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def bart_names(cfg: BartConfig) -> dict[str, str]:
    names = {"shared.weight": "model.shared.weight"}
    for stack in ("encoder", "decoder"):
        s = f"model.{stack}."
        names[f"{stack}.positions.weight"] = s + "embed_positions.weight"
        pairs = [("norm_embedding", "layernorm_embedding")]
        for i in range(cfg.n_layers):
            p, h = f"{stack}.layers.{i}.", f"layers.{i}."
            subs = [("self_attn", "self_norm", "self_attn", "self_attn_layer_norm")]
            if stack == "decoder":
                subs.append(("cross_attn", "cross_norm", "encoder_attn", "encoder_attn_layer_norm"))
            for attn, norm, their_attn, their_norm in subs:
                pairs += [(f"{p}{attn}.{w}", f"{h}{their_attn}.{w}_proj") for w in "qkv"]
                pairs += [(f"{p}{attn}.o", f"{h}{their_attn}.out_proj"), (f"{p}{norm}", f"{h}{their_norm}")]
            pairs += [(f"{p}fc1", f"{h}fc1"), (f"{p}fc2", f"{h}fc2"), (f"{p}ff_norm", f"{h}final_layer_norm")]
        for ours, theirs in pairs:
            ours = ours if ours.startswith(stack) else f"{stack}.{ours}"
            names[f"{ours}.weight"], names[f"{ours}.bias"] = s + theirs + ".weight", s + theirs + ".bias"
    return names


# ----------------------------------------------------------------------------- ours -> HF


def to_hf(cfg, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF state dict) of a t5 or bart model (``hf_class`` has accepted it)."""
    if isinstance(cfg, T5Config):
        out = {theirs: sd[ours] for ours, theirs in t5_names(cfg).items()}
        config = dict(architectures=[HF_CLASSES["t5"]], model_type="t5", vocab_size=cfg.vocab_size,
                      d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_layers,
                      num_decoder_layers=cfg.n_layers, num_heads=cfg.n_heads,
                      relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
                      dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, initializer_factor=1.0,
                      feed_forward_proj="gated-gelu" if cfg.gated else "relu", is_encoder_decoder=True,
                      tie_word_embeddings=cfg.tie_embeddings)
        return config, out
    if cfg.norm_eps != 1e-5:
        raise HFError(f"bart: transformers' BART uses LayerNorm eps 1e-5, the model has {cfg.norm_eps}")
    out = {theirs: sd[ours] for ours, theirs in bart_names(cfg).items()}
    out["final_logits_bias"] = sd["final_logits_bias"][None]                              # (1, V)
    config = dict(architectures=[HF_CLASSES["bart"]], model_type="bart", vocab_size=cfg.vocab_size,
                  d_model=cfg.d_model, encoder_layers=cfg.n_layers, decoder_layers=cfg.n_layers,
                  encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                  encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function="gelu",
                  max_position_embeddings=cfg.seq_len, scale_embedding=False, dropout=cfg.dropout,
                  attention_dropout=0.0, activation_dropout=0.0, init_std=cfg.init_std, is_encoder_decoder=True,
                  tie_word_embeddings=True)
    return config, out


# ----------------------------------------------------------------------------- HF -> ours


def _take(sd: dict, names: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    missing = [theirs for theirs in names.values() if theirs not in sd]
    if missing:
        raise HFError(f"{what}: the weights have no {missing[0]}")
    return {ours: sd[theirs] for ours, theirs in names.items()}


def from_hf(model_type: str, config: dict, sd: dict[str, torch.Tensor]) -> tuple[str, Any, dict]:
    """(family, our config, our state dict) of a T5 or BART transformers checkpoint."""
    c = {**HF_DEFAULTS[model_type], **config}
    if model_type == "t5":
        proj = c["feed_forward_proj"]
        if proj not in ("relu", "gated-gelu") or c.get("num_decoder_layers") not in (None, c["num_layers"]):
            raise HFError(f"t5: only relu or gated-gelu MLPs and equal encoder and decoder depths map onto our T5 "
                         f"(got {proj}, {c['num_layers']} and {c.get('num_decoder_layers')} layers)")
        tied = bool(c["tie_word_embeddings"])                            # v1.0: tied and rescaled
        if not tied and "lm_head.weight" not in sd:
            raise HFError("t5: tie_word_embeddings is false and the weights have no lm_head.weight")
        if tied != (proj == "relu"):
            raise HFError("t5: our T5 pairs the tied head with a relu MLP (v1.0) and an untied head with gated-gelu "
                         "(v1.1)")
        cfg = T5Config(vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["num_layers"],
                       n_heads=c["num_heads"], d_ff=c["d_ff"], tie_embeddings=tied,
                       d_kv=None if c["d_kv"] * c["num_heads"] == c["d_model"] else c["d_kv"],
                       num_buckets=c["relative_attention_num_buckets"],
                       max_distance=c["relative_attention_max_distance"], dropout=0.0,
                       norm_eps=c["layer_norm_epsilon"])
        return "t5", cfg, _take(sd, t5_names(cfg), "t5")
    if c["activation_function"] != "gelu" or c["scale_embedding"] or c["encoder_layers"] != c["decoder_layers"] or \
            c["encoder_attention_heads"] != c["decoder_attention_heads"] or c["encoder_ffn_dim"] != c["decoder_ffn_dim"]:
        raise HFError("bart: only gelu, unscaled embeddings and encoder and decoder of one shape map onto our BART")
    sd = {(k if k.startswith(("model.", "final_logits_bias", "lm_head.")) else f"model.{k}"): v for k, v in sd.items()}
    cfg = BartConfig(vocab_size=c["vocab_size"], seq_len=c["max_position_embeddings"], d_model=c["d_model"],
                     n_layers=c["encoder_layers"], n_heads=c["encoder_attention_heads"], d_ff=c["encoder_ffn_dim"],
                     dropout=0.0, init_std=c["init_std"])
    out = _take(sd, bart_names(cfg), "bart")
    bias = sd.get("final_logits_bias")
    out["final_logits_bias"] = bias.reshape(-1) if bias is not None else torch.zeros(cfg.vocab_size)
    return "bart", cfg, out
