"""T5's config (``models.t5.T5``), presets and parameter counts.

Plain Python, no torch, so validating a spec checks the config's invariants
without importing it; ``models.t5`` imports every name here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 384
    """Rows of the shared embedding: the tokenizer's padded vocab plus the sentinel rows on top."""
    d_model: int = 96
    """Residual width."""
    n_layers: int = 2
    """Blocks in the encoder, and in the decoder."""
    n_heads: int = 4
    """Attention heads."""
    d_kv: int | None = None
    """Width of one head's keys and values; None = d_model / n_heads (T5 v1.1 small uses 64 with d_model 512)."""
    d_ff: int = 256
    """MLP hidden width."""
    tie_embeddings: bool = True
    """T5 v1.0 (True: tied head with d_model**-0.5 scaling, ReLU MLP) or v1.1 (False: own head, gated GELU)."""
    num_buckets: int = 32
    """Relative position buckets per direction pair (half per direction in the encoder)."""
    max_distance: int = 128
    """Offsets at or past this many tokens share the last bucket."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and sublayer outputs."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        if self.d_kv is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                             "or give d_kv")
        if self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"num_buckets ({self.num_buckets}) must be >= 4 and max_distance "
                             f"({self.max_distance}) past a quarter of it")

    @property
    def head_dim(self) -> int:
        return self.d_kv if self.d_kv is not None else self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """T5 v1.1's gated-GELU MLP goes with its untied head."""
        return not self.tie_embeddings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return cls(**d)


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=2, n_heads=4, d_ff=256),                   # ~0.3M, for tests
    "small": dict(d_model=512, n_layers=8, n_heads=6, d_kv=64, d_ff=1024),      # T5 v1.1 small
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_kv=64, d_ff=2048),     # T5 v1.1 base
}


def t5_config(preset: str | None = None, **overrides: Any) -> T5Config:
    """Preset sizes + explicit overrides (None values are ignored)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown t5 preset {preset!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return T5Config(**fields)


def param_counts(cfg: T5Config) -> dict[str, int]:
    """Exact parameter counts by formula; ``non_embedding`` leaves out the shared table and an untied head."""
    d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_ff
    attn = 4 * d * inner
    mlp = (3 if cfg.gated else 2) * d * ff
    encoder = cfg.n_layers * (attn + mlp + 2 * d) + d + cfg.num_buckets * cfg.n_heads
    decoder = cfg.n_layers * (2 * attn + mlp + 3 * d) + d + cfg.num_buckets * cfg.n_heads
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return {"total": encoder + decoder + embedding, "non_embedding": encoder + decoder}
