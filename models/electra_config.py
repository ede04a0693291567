"""ELECTRA's config (``models.electra.Electra``: generator and discriminator), presets and counts.

Plain Python, no torch, so validating a spec checks the config's invariants
without importing it; ``models.electra`` imports every name here. The two
halves are BERT-style encoder shapes (``discriminator``, ``generator``:
``models.encoder_config.EncoderConfig``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.encoder_config import EncoderConfig


@dataclass(frozen=True)
class ElectraConfig:
    vocab_size: int = 320
    """Rows of the shared word embedding (the tokenizer's vocab, padded)."""
    seq_len: int = 128
    """Longest input, [CLS] and [SEP] included; sizes the shared position table."""
    d_model: int = 96
    """Discriminator hidden width; also the width of the shared embeddings."""
    n_layers: int = 3
    """Blocks of the discriminator and of the generator (the paper keeps the depth, shrinks the width)."""
    n_heads: int = 4
    """Discriminator attention heads."""
    d_ff: int = 384
    """Discriminator MLP width."""
    gen_d_model: int = 32
    """Generator hidden width (a fraction of d_model: 1/4 for ELECTRA-Small, 1/3 for Base)."""
    gen_n_heads: int = 1
    """Generator attention heads (the paper keeps 64-wide heads)."""
    gen_d_ff: int = 128
    """Generator MLP width (4 x gen_d_model)."""
    type_vocab_size: int = 2
    """Segment embeddings (BERT's sentence A/B), shared."""
    rtd_weight: float = 50.0
    """lambda of loss = MLM + lambda x RTD (50 in the paper)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and sublayer outputs."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation of weight matrices and embeddings."""
    moe: Any = None
    """Always None: ELECTRA here has dense MLPs (the field exists because every model config has it)."""

    def __post_init__(self) -> None:
        if self.moe is not None:
            raise ValueError("electra has no Switch (MoE) layers; leave model.moe out")
        if self.gen_d_model > self.d_model:
            raise ValueError(f"the generator (gen_d_model={self.gen_d_model}) must not be wider than the "
                             f"discriminator (d_model={self.d_model})")
        for width, heads, what in ((self.d_model, self.n_heads, ""), (self.gen_d_model, self.gen_n_heads, "gen_")):
            if width % heads:
                raise ValueError(f"{what}d_model ({width}) must be divisible by {what}n_heads ({heads})")

    @property
    def discriminator(self) -> EncoderConfig:
        """The discriminator's encoder shape (no NSP head)."""
        return EncoderConfig(vocab_size=self.vocab_size, seq_len=self.seq_len, d_model=self.d_model,
                             n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
                             type_vocab_size=self.type_vocab_size, nsp=False, dropout=self.dropout,
                             norm_eps=self.norm_eps, init_std=self.init_std)

    @property
    def generator(self) -> EncoderConfig:
        """The generator's block shape (its embeddings are the discriminator's, projected)."""
        return dataclasses.replace(self.discriminator, d_model=self.gen_d_model, n_heads=self.gen_n_heads,
                                   d_ff=self.gen_d_ff)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ElectraConfig":
        return cls(**d)


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=3, n_heads=4, d_ff=384, gen_d_model=32, gen_n_heads=2, gen_d_ff=128,
                 seq_len=128),                                                      # for tests
    "small": dict(d_model=256, n_layers=12, n_heads=4, d_ff=1024, gen_d_model=64, gen_n_heads=1, gen_d_ff=256,
                  seq_len=128),                                                     # ELECTRA-Small (~14M)
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, gen_d_model=256, gen_n_heads=4, gen_d_ff=1024,
                 seq_len=512),                                                      # ELECTRA-Base (~110M)
}


def electra_config(preset: str | None = None, **overrides: Any) -> ElectraConfig:
    """Preset sizes + explicit overrides (None values are ignored)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown electra preset {preset!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ElectraConfig(**fields)


# ----------------------------------------------------------------------------- counting


def param_counts(cfg: ElectraConfig) -> dict[str, int]:
    """Exact parameter counts by formula (tests check them against the module); ``discriminator``: what
    the export keeps (shared embeddings, discriminator blocks and head)."""
    d, V, E = cfg.d_model, cfg.vocab_size, cfg.d_model

    def blocks(width: int, ff: int) -> int:
        return cfg.n_layers * (4 * (width * width + width) + width * ff + ff + ff * width + width + 4 * width)

    tables = (V + cfg.seq_len + cfg.type_vocab_size) * E
    embeddings = tables + 2 * E
    g = cfg.gen_d_model
    generator = (E * g + g) + blocks(g, cfg.gen_d_ff) + (g * E + E + 2 * E + V)
    discriminator = blocks(d, cfg.d_ff) + (d * d + d + d + 1)
    return {"total": embeddings + generator + discriminator, "non_embedding": 2 * E + generator + discriminator,
            "discriminator": embeddings + discriminator}


def flops_per_token(cfg: ElectraConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the weights each token meets (both models, the V-wide generator head
    included, the embedding lookup not), plus attention's 12 x layers x width x seq_len per model."""
    counts = param_counts(cfg)
    tables = (cfg.vocab_size + cfg.seq_len + cfg.type_vocab_size) * cfg.d_model
    dense = counts["total"] - tables + cfg.vocab_size * cfg.d_model                  # the tied head's matmul
    return 6.0 * dense + 12.0 * cfg.n_layers * (cfg.d_model + cfg.gen_d_model) * seq_len
