"""The decoder's config (``models.transformer.Decoder``), presets, and its parameter and FLOP counts.

Plain Python, no torch: validating a spec builds the config (so its
invariants are checked at submit), and the scaling-law planner counts
parameters and FLOPs, without importing torch. ``models.transformer`` imports
every name here.

A config is a family's style switches (``FAMILIES``: gpt2, llama, palm), a
preset's sizes (``PRESETS``, the GPT-3 ladder of ``models/gpt3.py``
included) and explicit overrides, put together by ``decoder_config``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from models.gpt3 import GPT3_PRESETS
from models.moe_config import SwitchConfig


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 320
    """Rows of the token embedding (the tokenizer's vocab, padded)."""
    seq_len: int = 128
    """Longest sequence the model sees; sizes the learned position table."""
    d_model: int = 96
    """Residual stream width."""
    n_layers: int = 3
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads: None = n_heads (MHA), 1 = multi-query, else grouped-query."""
    d_ff: int | None = None
    """MLP hidden width; None = 4*d_model (GELU) or 8/3*d_model rounded to 32 (SwiGLU)."""
    norm: str = "rmsnorm"
    """'layernorm' (GPT-2) or 'rmsnorm' (LLaMA/PaLM)."""
    mlp: str = "swiglu"
    """'gelu' (GPT-2) or 'swiglu' (LLaMA/PaLM)."""
    pos: str = "rope"
    """'learned' absolute positions (GPT-2) or 'rope' rotary embeddings."""
    parallel_block: bool = False
    """PaLM's x + attn(norm(x)) + mlp(norm(x)) instead of two sequential sublayers."""
    bias: bool = False
    """Biases in linear layers and norms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    dropout: float = 0.0
    """Dropout on attention output, MLP output and embeddings."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-5
    """Epsilon inside LayerNorm/RMSNorm."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual projections get std/sqrt(2*n_layers)."""
    moe: Any = None
    """A ``models.moe_config.SwitchConfig`` to use Switch layers in place of some MLPs, or None."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"pos must be 'learned' or 'rope', got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        d = dict(d)
        if d.get("moe") is not None and isinstance(d["moe"], dict):
            d["moe"] = SwitchConfig(**d["moe"])
        return cls(**d)


# Style switches per family; sizes come from PRESETS.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", parallel_block=False, bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", parallel_block=False, bias=False, tie_embeddings=False),
    "palm": dict(norm="rmsnorm", mlp="swiglu", pos="rope", parallel_block=True, bias=False, tie_embeddings=True,
                 n_kv_heads=1),
}

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=3, n_heads=4, seq_len=128),       # ~0.3M params, for tests
    "mini": dict(d_model=128, n_layers=4, n_heads=4, seq_len=128),      # ~0.8M
    "small": dict(d_model=256, n_layers=4, n_heads=8, seq_len=256),     # ~3M
    "medium": dict(d_model=512, n_layers=8, n_heads=8, seq_len=512),    # ~25M
    "base": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024),   # GPT-2 small sized
    "large": dict(d_model=1024, n_layers=24, n_heads=16, seq_len=1024),  # GPT-2 medium sized
    **GPT3_PRESETS,                                                      # gpt3-small ... gpt3-175b (models/gpt3.py)
}


def decoder_config(family: str, preset: str | None = None, **overrides: Any) -> DecoderConfig:
    """Family style + preset sizes + explicit overrides (None values are ignored)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown decoder family {family!r}; choose one of {sorted(FAMILIES)}")
    fields: dict[str, Any] = dict(FAMILIES[family])
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset[:40]!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return DecoderConfig(**fields)


# ----------------------------------------------------------------------------- counting


def param_counts(cfg: DecoderConfig) -> dict[str, int]:
    """Exact parameter counts, by formula (tests check them against the module).

    ``non_embedding`` leaves out the token embedding, the learned position table
    and an untied output projection: the vocabulary-sized matrices (Kaplan et al.).
    """
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    b = 1 if cfg.bias else 0
    norm = d * (1 + b)
    attn = d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.n_heads * hd * d
    attn += b * (cfg.n_heads * hd + 2 * cfg.kv_heads * hd + d)
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    dense_mlp = n_mats * d * cfg.ff_dim + b * ((n_mats - 1) * cfg.ff_dim + d)
    blocks = 0
    for layer in range(L):
        mlp = dense_mlp
        if cfg.moe is not None and cfg.moe.applies_to(layer):
            mlp = cfg.moe.num_experts * dense_mlp + d * cfg.moe.num_experts  # experts + router
        blocks += attn + mlp + norm * (1 if cfg.parallel_block else 2)
    non_embedding = blocks + norm
    embedding = cfg.vocab_size * d + (cfg.seq_len * d if cfg.pos == "learned" else 0)
    if not cfg.tie_embeddings:
        embedding += cfg.vocab_size * d
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def active_params(cfg: DecoderConfig) -> int:
    """Parameters a token passes through (one expert per Switch layer): the N of 6N for MoE."""
    if cfg.moe is None:
        return param_counts(cfg)["total"]
    dense = dataclasses.replace(cfg, moe=None)
    n_moe = sum(1 for layer in range(cfg.n_layers) if cfg.moe.applies_to(layer))
    return param_counts(dense)["total"] + n_moe * cfg.d_model * cfg.moe.num_experts


def flops_per_token(cfg: DecoderConfig, seq_len: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (forward + backward).

    ``6N`` is Chinchilla's C = 6ND with N all (active) parameters.
    ``with_attention`` adds the attention score/value matmuls as in PaLM's MFU
    formula: 6N + 12 * n_layers * n_heads * head_dim * seq_len.
    """
    T = cfg.seq_len if seq_len is None else seq_len
    n = active_params(cfg)
    six_n = 6.0 * n
    attn = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    return {"6N": six_n, "with_attention": six_n + attn}
