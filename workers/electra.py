"""The ELECTRA task: windows of the token stream, masked for the generator, with the uniforms it samples by.

A pretrain task (``workers/tasks.py``) for ``model.family: electra``: the
model (``models/electra.py``) does the generator, the sampling and the
discriminator in one forward; this task frames and masks the samples.

* Framing: ``[CLS] window [SEP]``, as RoBERTa (no sentence pairs).
* Masking: 15% of the ordinary tokens, of which 85% become [MASK] and 15%
  stay as they are (no random tokens: the generator supplies those), as
  ELECTRA's released code does; a new mask every epoch.
* Sampling: one uniform per position from the sample's own generator,
  seeded from (seed, epoch, sample index) like the mask, so a resumed job
  (on any number of workers) draws the same replacements.
"""
from __future__ import annotations

import numpy as np
import torch

from data.masking import Masker, MaskingConfig, sample_seed
from data.sampler import DataPlan

SAMPLING_SEED_OFFSET = 104_729
"""Keeps the sampling stream apart from the mask stream of the same (seed, epoch, index)."""


def electra_masking(seed: int) -> MaskingConfig:
    """ELECTRA's masking: 15% chosen, 85% of them [MASK], the rest unchanged, a new mask every epoch."""
    return MaskingConfig(mask_prob=0.15, replace_mask=0.85, replace_random=0.0, dynamic=True, seed=seed)


def sampling_uniforms(seed: int, epoch: int, index: int, length: int) -> torch.Tensor:
    """The (length,) uniforms the generator samples sample ``index`` of ``epoch`` by."""
    g = torch.Generator().manual_seed(sample_seed(seed + SAMPLING_SEED_OFFSET, epoch, index))
    return torch.rand(length, generator=g)


class ReplacedTokenDetection:
    """ELECTRA pre-training batches and loss; the same three methods as ``CausalLM`` and ``MaskedLM``."""

    def __init__(self, plan: DataPlan, tokenizer, seq_len: int, seed: int):
        self.plan, self.T, self.seed = plan, seq_len, seed
        self.masker = Masker.for_tokenizer(electra_masking(seed), tokenizer)
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id

    def _batch(self, rows: list[tuple[np.ndarray, int, int]]) -> dict:
        original, masked, labels, uniforms = [], [], [], []
        for tokens, key, epoch in rows:
            ids = torch.tensor([self.cls_id] + tokens[:self.T - 2].tolist() + [self.sep_id])     # (T,)
            x, y = self.masker.mask(ids, key, epoch)                                              # (T,) each
            original.append(ids), masked.append(x), labels.append(y)
            uniforms.append(sampling_uniforms(self.seed, epoch, key, len(ids)))
        return {"input_ids": torch.stack(masked), "original_ids": torch.stack(original),          # (B, T) each
                "mlm_labels": torch.stack(labels), "sample_u": torch.stack(uniforms)}

    def batch(self, positions) -> dict:
        n, L = self.plan.n_windows, self.plan.seq_len
        rows = []
        for p in positions:
            window = self.plan.window_of(p)
            rows.append((self.plan.tokens[window * L:(window + 1) * L], window, p // n))
        return self._batch(rows)

    def held_out(self, index: int, size: int) -> dict | None:
        """Held-out windows with a fixed mask and fixed uniforms (keys past the training windows, epoch 0)."""
        rows = self.plan.held_out_keyed(index, size)
        return None if rows is None else self._batch(rows)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """(MLM + 50 x RTD, its parts): ``gen_mlm_loss``, ``rtd_loss``, ``rtd_accuracy``, ``replaced_share``."""
        _, loss = engine(batch["input_ids"], batch["original_ids"], batch["mlm_labels"], batch["sample_u"])
        stats = getattr(engine, "module", engine).stats
        return loss, {"gen_mlm_loss": stats["mlm_loss"], "rtd_loss": stats["rtd_loss"],
                      "rtd_accuracy": stats["rtd_accuracy"], "replaced_share": stats["replaced_share"]}
