"""BART's config (``models.bart.Bart``), presets and parameter counts.

Plain Python, no torch, so validating a spec checks the config's invariants
without importing it; ``models.bart`` imports every name here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POSITION_OFFSET = 2
"""Row of position 0 in BART's position tables."""


@dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 320
    """Rows of the shared embedding (the tokenizer's vocab, padded)."""
    seq_len: int = 128
    """Longest encoder or decoder input; the position tables hold seq_len + 2 rows."""
    d_model: int = 96
    """Residual width."""
    n_layers: int = 2
    """Blocks in the encoder, and in the decoder."""
    n_heads: int = 4
    """Attention heads; head_dim = d_model / n_heads."""
    d_ff: int = 384
    """MLP hidden width (4 * d_model in BART)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and sublayer outputs."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation of matrices and embeddings."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BartConfig":
        return cls(**d)


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=2, n_heads=4, d_ff=384, seq_len=128),       # ~0.5M, for tests
    "base": dict(d_model=768, n_layers=6, n_heads=12, d_ff=3072, seq_len=1024),   # BART-base shape
    "large": dict(d_model=1024, n_layers=12, n_heads=16, d_ff=4096, seq_len=1024),  # BART-large shape
}


def bart_config(preset: str | None = None, **overrides: Any) -> BartConfig:
    """Preset sizes + explicit overrides (None values are ignored)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown bart preset {preset!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return BartConfig(**fields)


def param_counts(cfg: BartConfig) -> dict[str, int]:
    """Exact parameter counts by formula; ``non_embedding`` leaves out the token and position tables."""
    d, ff = cfg.d_model, cfg.d_ff
    attn = 4 * (d * d + d)
    mlp = d * ff + ff + ff * d + d
    norm = 2 * d
    encoder = cfg.n_layers * (attn + mlp + 2 * norm) + norm
    decoder = cfg.n_layers * (2 * attn + mlp + 3 * norm) + norm
    embedding = cfg.vocab_size * d + 2 * (cfg.seq_len + POSITION_OFFSET) * d
    return {"total": encoder + decoder + embedding, "non_embedding": encoder + decoder}
