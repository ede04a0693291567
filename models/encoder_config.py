"""The encoders' config (``models.encoder.Encoder``: BERT, RoBERTa, ALBERT), presets and parameter counts.

Plain Python, no torch, so validating a spec checks the config's invariants
without importing it; ``models.encoder`` imports every name here. A config is
a family's switches (``FAMILIES``), a preset's sizes (``PRESETS``; ALBERT's
factorized embedding size per preset in ``ALBERT_EMBEDDING_DIM``) and explicit
overrides, put together by ``encoder_config``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.moe_config import SwitchConfig


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 320
    """Rows of the word embedding (the tokenizer's vocab, padded)."""
    seq_len: int = 128
    """Longest input, [CLS] and [SEP]s included; sizes the position table."""
    d_model: int = 96
    """Hidden width H."""
    n_layers: int = 3
    """Number of encoder blocks (applications of the shared block under share_layers)."""
    n_heads: int = 4
    """Attention heads; head_dim = d_model / n_heads."""
    d_ff: int = 384
    """MLP hidden width (4 * d_model in BERT)."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings: 2 for BERT's sentence A/B, 0 for none (RoBERTa)."""
    nsp: bool = True
    """Add the [CLS] pooler + 2-way classifier (NSP for BERT, SOP for ALBERT)."""
    embedding_dim: int | None = None
    """ALBERT's factorized embedding size E (< d_model, projected up); None = d_model."""
    share_layers: bool = False
    """ALBERT's cross-layer sharing: one block's weights used for all n_layers."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and sublayer outputs."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT uses 1e-12)."""
    init_std: float = 0.02
    """Std of the normal initialisation of weight matrices and embeddings."""
    moe: Any = None
    """A ``models.moe_config.SwitchConfig`` to use Switch layers in place of some MLPs, or None."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.embedding_dim is not None and not 0 < self.embedding_dim <= self.d_model:
            raise ValueError(f"embedding_dim ({self.embedding_dim}) must be in 1..d_model ({self.d_model})")
        if self.share_layers and self.moe is not None and self.moe.every != 1:
            raise ValueError(f"share_layers uses one block for all layers, so moe.every must be 1, "
                             f"got {self.moe.every}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def emb_dim(self) -> int:
        """E: width of the embedding tables (d_model unless factorized)."""
        return self.d_model if self.embedding_dim is None else self.embedding_dim

    @property
    def n_blocks(self) -> int:
        """Distinct blocks with their own weights."""
        return 1 if self.share_layers else self.n_layers

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            d["moe"] = SwitchConfig(**d["moe"])
        return cls(**d)


# Style switches per family; sizes come from PRESETS.
FAMILIES: dict[str, dict] = {
    "bert": dict(type_vocab_size=2, nsp=True, share_layers=False),
    "roberta": dict(type_vocab_size=0, nsp=False, share_layers=False),
    "albert": dict(type_vocab_size=2, nsp=True, share_layers=True),
}

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=3, n_heads=4, d_ff=384, seq_len=128),       # ~0.4M params, for tests
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=256),    # ~3.3M
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, seq_len=512),   # BERT-base shape
}

# ALBERT's E per preset (the paper uses E = 128 for every size from base up).
ALBERT_EMBEDDING_DIM: dict[str, int] = {"tiny": 32, "small": 64, "base": 128}


def encoder_config(family: str, preset: str | None = None, **overrides: Any) -> EncoderConfig:
    """Family style + preset sizes + explicit overrides (None values are ignored)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {sorted(FAMILIES)}")
    fields: dict[str, Any] = dict(FAMILIES[family])
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset[:40]!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
        if family == "albert":
            fields["embedding_dim"] = ALBERT_EMBEDDING_DIM[preset]
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return EncoderConfig(**fields)


# ----------------------------------------------------------------------------- counting


def param_counts(cfg: EncoderConfig) -> dict[str, int]:
    """Exact parameter counts, by formula (tests check them against the module).

    ``non_embedding`` leaves out the word, position and segment tables (the
    MLM decoder is tied to the word table, so it adds only its bias).
    """
    d, E, V, ff = cfg.d_model, cfg.emb_dim, cfg.vocab_size, cfg.d_ff
    layer_norm = 2 * d
    attn = 4 * (d * d + d)
    dense_mlp = d * ff + ff + ff * d + d
    blocks = 0
    for layer in range(cfg.n_blocks):
        mlp = dense_mlp
        if cfg.moe is not None and cfg.moe.applies_to(layer):
            mlp = cfg.moe.num_experts * dense_mlp + d * cfg.moe.num_experts          # experts + router
        blocks += attn + mlp + 2 * layer_norm
    tables = (V + cfg.seq_len + cfg.type_vocab_size) * E
    embedding_rest = 2 * E + (E * d + d if E != d else 0)                            # LayerNorm, projection
    mlm = d * E + E + 2 * E + V                                                      # dense, LayerNorm, bias
    nsp = (d * d + d + 2 * d + 2) if cfg.nsp else 0
    non_embedding = embedding_rest + blocks + mlm + nsp
    return {"total": tables + non_embedding, "non_embedding": non_embedding}
