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

``ElectraConfig``, the presets and the counts are in ``models/electra_config.py``,
which needs no torch; every name of it is importable from here too.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.electra_config import (  # noqa: F401  (re-exported: the config and counts live without torch)
    PRESETS, ElectraConfig, electra_config, flops_per_token, param_counts)
from models.encoder import IGNORE_INDEX, Block, Embeddings, init_bert_style


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
