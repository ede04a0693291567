"""Encoder-decoder pretraining (t5, bart) as a task of the pretrain kind: denoise windows of the token stream.

A sample is one window of ``data.seq_len`` tokens of the token cache, noised
by ``data/noising.py`` with a generator seeded from (seed, epoch, window):
the noise is redrawn every epoch, as T5 and BART noise on the fly, and a
resumed job sees exactly the noise an uninterrupted one would have.

* T5: the encoder reads the window with its noise spans replaced by
  sentinels; the decoder predicts the sentinel-delimited spans. The decoder
  starts from the pad id (T5's ``decoder_start_token_id``). Input and target
  lengths are fixed by the window length, so there is no padding.
* BART: the encoder reads the noised window plus ``</s>`` (our
  ``<|endoftext|>``), padded to ``seq_len`` (cut to fit in the rare case
  zero-length spans make it longer); the decoder predicts the original
  window from ``</s>`` followed by the window shifted right (BART's
  ``decoder_start_token_id`` is ``</s>``).

The loss is the mean cross-entropy over target tokens; held-out windows are
noised the same way with epoch 0.

The t5/bart config of a spec (``seq2seq_config``) and its counts
(``seq2seq_counts``) are in ``workers/model_config.py``, which needs no torch,
and importable from here.
"""
from __future__ import annotations

import numpy as np
import torch

from data.noising import SENTINEL_ROWS, bart_noise, noise_mask, sample_rng, sentence_ends, sentinel_ids, span_corruption
from data.sampler import DataPlan
from models.bart import Bart
from models.t5 import T5, T5Config
from specs.errors import UserError
from specs.seq2seq import NoisingSpec
from workers.model_config import (  # noqa: F401  (re-exported: the configs and counts, built without torch)
    SEQ2SEQ_CONFIGS, is_seq2seq_config, seq2seq_config, seq2seq_counts)


def build_seq2seq(cfg) -> torch.nn.Module:
    return T5(cfg) if isinstance(cfg, T5Config) else Bart(cfg)


class Seq2SeqLM:
    """T5 span corruption or BART denoising over windows of the token stream (module docstring)."""

    def __init__(self, plan: DataPlan, tokenizer, cfg, seq_len: int, seed: int, noising: NoisingSpec | None):
        self.plan, self.T, self.seed = plan, seq_len, seed
        self.noising = noising or NoisingSpec()
        self.t5 = isinstance(cfg, T5Config)
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        if self.t5:
            self.sentinels = sentinel_ids(cfg.vocab_size, SENTINEL_ROWS)
        else:
            if cfg.seq_len < seq_len:
                raise UserError(f"data.seq_len: {seq_len} is longer than the model's position table ({cfg.seq_len})")
            self.bart, self.mask_id = self.noising.bart(), tokenizer.mask_id
            self.ends = sentence_ends(tokenizer, cfg.vocab_size)

    def _t5_sample(self, window: np.ndarray, rng) -> tuple[list, list, list]:
        mask = noise_mask(len(window), self.noising.noise_density, self.noising.mean_span_length, rng)
        inputs, targets = span_corruption(window.tolist(), mask, self.sentinels, self.eos_id)
        return inputs, [self.pad_id] + targets[:-1], targets

    def _bart_sample(self, window: np.ndarray, rng) -> tuple[list, list, list]:
        noised = bart_noise(window, self.bart, self.mask_id, self.ends, rng)[:self.T - 1] + [self.eos_id]
        ids = window.tolist()
        return noised, [self.eos_id] + ids[:-1], ids

    def _batch(self, rows: list[tuple[np.ndarray, int, int]]) -> dict:
        sample = self._t5_sample if self.t5 else self._bart_sample
        made = [sample(window, sample_rng(self.seed, epoch, key)) for window, key, epoch in rows]
        width = max(len(inputs) for inputs, _, _ in made)
        input_ids = torch.full((len(made), width), self.pad_id, dtype=torch.long)        # (B, S)
        attention_mask = torch.zeros((len(made), width), dtype=torch.long)               # (B, S)
        for b, (inputs, _, _) in enumerate(made):
            input_ids[b, :len(inputs)] = torch.tensor(inputs)
            attention_mask[b, :len(inputs)] = 1
        return {"input_ids": input_ids, "attention_mask": None if self.t5 else attention_mask,
                "decoder_input_ids": torch.tensor([m[1] for m in made]),                  # (B, T_dec)
                "labels": torch.tensor([m[2] for m in made])}                             # (B, T_dec)

    def batch(self, positions) -> dict:
        n = self.plan.n_windows
        x, _ = self.plan.batch(positions)                                                # (B, T)
        return self._batch([(row, self.plan.window_of(p), p // n) for row, p in zip(x, positions)])

    def held_out(self, index: int, size: int) -> dict | None:
        rows = self.plan.held_out_keyed(index, size)
        return None if rows is None else self._batch(rows)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        _, loss = engine(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["labels"])
        return loss, {}
