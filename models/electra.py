"""ELECTRA (Clark et al. 2020): a small masked-LM generator and a replaced-token-detection discriminator.

Both are BERT-style encoders (``models/encoder.py`` blocks: post-LN, exact
GELU) trained together on one loss:

* The **generator** (hidden size a fraction of the discriminator's, the
  paper's 1/4 to 1/3) predicts the masked tokens: the MLM loss.
* Its predictions are **sampled** (from its softmax, not the argmax, and with
  no gradient through the sample) into the masked positions of the original
  sequence, giving the corrupted input.
* The **discriminator** labels every token of the corrupted input as
  original (0) or replaced (1): the RTD loss, a binary cross-entropy. A
  sampled token that equals the original is labelled original.

loss = MLM + rtd_weight x RTD, with rtd_weight = 50 as in the paper. The two
share their token, position and segment embeddings (and the embedding
LayerNorm), at the discriminator's width; the generator projects them down
to its own width and its MLM head projects back up to the tied word table,
as the paper (and HF's ``ElectraForMaskedLM`` with ``embedding_size``) does.

Sampling draws one uniform number per position, handed in with the batch
(``sample_u``), by inverse-CDF over the generator's distribution: the data
side seeds it from (seed, epoch, sample index), so a resumed run draws the
same replacements. After pre-training the discriminator is the model kept
(``models/hf_electra.py`` exports it as ``ElectraForPreTraining``).

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import IGNORE_INDEX, Block, EncoderConfig, Embeddings, init_bert_style


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


# ----------------------------------------------------------------------------- sampling and labels


def sample_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (..., V) rows summing to 1, u (...) uniform in [0, 1) -> ids (...).

    The id is the first one whose cumulative probability exceeds u, so id i is
    drawn with probability probs[i] exactly (rounding aside).
    """
    cdf = probs.float().cumsum(-1)                                                    # (..., V)
    ids = torch.searchsorted(cdf, u.float().unsqueeze(-1).contiguous()).squeeze(-1)   # (...)
    return ids.clamp_(max=probs.shape[-1] - 1)


def corrupt(original: torch.Tensor, chosen: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """The discriminator's input: ``samples`` where ``chosen`` (B, T), the original ids elsewhere."""
    return torch.where(chosen, samples, original)


def rtd_labels(corrupted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """1.0 where a token was replaced, 0.0 where it is the original, a sample equal to it included."""
    return (corrupted != original).float()


# ----------------------------------------------------------------------------- heads


class GeneratorHead(nn.Module):
    """dense gen_d_model -> E, GELU, LayerNorm, then logits through the shared word table plus a bias."""

    def __init__(self, cfg: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.gen_d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))                                              # (B, T, E)
        return F.linear(h, word_weight, self.bias)                                        # (B, T, V)


class DiscriminatorHead(nn.Module):
    """dense d -> d, GELU, dense d -> 1: one replaced-vs-original logit per token (HF's layout)."""

    def __init__(self, cfg: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.prediction = nn.Linear(cfg.d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.prediction(F.gelu(self.dense(h))).squeeze(-1)                         # (B, T)


# ----------------------------------------------------------------------------- model


class Electra(nn.Module):
    def __init__(self, cfg: ElectraConfig):
        super().__init__()
        self.cfg = cfg
        disc, gen = cfg.discriminator, cfg.generator
        self.embeddings = Embeddings(disc)                          # shared by generator and discriminator
        self.gen_project = nn.Linear(cfg.d_model, cfg.gen_d_model)
        self.gen_blocks = nn.ModuleList([Block(gen, i) for i in range(cfg.n_layers)])
        self.gen_head = GeneratorHead(cfg)                          # tied to embeddings.word
        self.disc_blocks = nn.ModuleList([Block(disc, i) for i in range(cfg.n_layers)])
        self.disc_head = DiscriminatorHead(cfg)
        self.stats: dict[str, float] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, init_std) for matrices and embeddings, zero biases, unit LayerNorm gains."""
        init_bert_style(self, self.cfg.init_std)
        nn.init.zeros_(self.gen_head.bias)

    def _check(self, ids: torch.Tensor) -> None:
        if ids.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds seq_len {self.cfg.seq_len}")

    def generator_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked input (B, T) -> the generator's MLM logits (B, T, V)."""
        self._check(input_ids)
        x = self.gen_project(self.embeddings(input_ids, token_type_ids))                  # (B, T, d_gen)
        for block in self.gen_blocks:
            x = block(x, None)
        return self.gen_head(x, self.embeddings.word.weight)

    def hidden(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input (B, T) -> the discriminator's final hidden states (B, T, d), the features fine-tuning reads;
        attention_mask (B, T): 1 = token, 0 = padding."""
        self._check(input_ids)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)                                    # (B, T, d)
        for block in self.disc_blocks:
            x = block(x, key_mask)
        return x

    def discriminator_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input (B, T) -> replaced-token logits (B, T); attention_mask (B, T): 1 = token, 0 = padding."""
        return self.disc_head(self.hidden(input_ids, token_type_ids, attention_mask))

    def pretraining_heads(self) -> list[nn.Module]:
        """What fine-tuning leaves untrained: the generator (thrown away after pre-training) and the RTD head."""
        return [self.gen_project, self.gen_blocks, self.gen_head, self.disc_head]

    def forward(self, input_ids: torch.Tensor, original_ids: torch.Tensor, mlm_labels: torch.Tensor,
                sample_u: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ELECTRA step: (discriminator logits (B, T), loss = MLM + rtd_weight x RTD).

        input_ids (B, T): the masked input; original_ids (B, T): the text
        before masking; mlm_labels (B, T): the original id at masked positions,
        IGNORE_INDEX elsewhere; sample_u (B, T): uniforms for sampling. The
        parts of the loss and the RTD accuracy are left in ``self.stats``.
        """
        gen_logits = self.generator_logits(input_ids, token_type_ids)                     # (B, T, V)
        chosen = mlm_labels != IGNORE_INDEX                                               # (B, T)
        mlm = F.cross_entropy(gen_logits.float().view(-1, gen_logits.shape[-1]), mlm_labels.reshape(-1),
                              ignore_index=IGNORE_INDEX)
        with torch.no_grad():                                       # no gradient through the sample
            samples = sample_tokens(F.softmax(gen_logits.float(), dim=-1), sample_u)      # (B, T)
            corrupted = corrupt(original_ids, chosen, samples)
            labels = rtd_labels(corrupted, original_ids)                                  # (B, T)
        logits = self.discriminator_logits(corrupted, token_type_ids)                     # (B, T)
        rtd = F.binary_cross_entropy_with_logits(logits.float(), labels)
        with torch.no_grad():
            self.stats = {"mlm_loss": float(mlm), "rtd_loss": float(rtd),
                          "rtd_accuracy": float(((logits > 0).float() == labels).float().mean()),
                          "replaced_share": float(labels.mean())}
        return logits, mlm + self.cfg.rtd_weight * rtd


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
