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
"""
from __future__ import annotations

import numpy as np
import torch

from data.noising import (SENTINEL_ROWS, bart_noise, corrupted_lengths, noise_mask, sample_rng, sentence_ends,
                          sentinel_ids, span_corruption, span_counts)
from data.sampler import DataPlan
from models.bart import Bart, BartConfig, bart_config
from models.bart import param_counts as bart_counts
from models.t5 import T5, T5Config, t5_config
from models.t5 import param_counts as t5_counts
from specs.errors import UserError
from specs.seq2seq import NoisingSpec

SEQ2SEQ_CONFIGS = {"t5": T5Config, "bart": BartConfig}


def is_seq2seq_config(cfg) -> bool:
    return isinstance(cfg, (T5Config, BartConfig))


def seq2seq_config(spec, vocab_size: int):
    """The spec's t5 or bart model; ``vocab_size`` is the tokenizer's padded vocab (T5 adds its sentinel rows)."""
    m = spec.model
    if m.moe is not None or m.n_kv_heads is not None or m.parallel_block is not None:
        raise ValueError(f"{m.family} has no Switch layers, n_kv_heads or parallel_block; leave them out")
    sizes = dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff, dropout=m.dropout)
    if m.family == "t5":
        noising = spec.data.noising or NoisingSpec()
        _, spans = span_counts(spec.data.seq_len, noising.noise_density, noising.mean_span_length)
        if spans + 1 > SENTINEL_ROWS:
            raise ValueError(f"t5 has {SENTINEL_ROWS - 1} sentinels for noise spans, and data.seq_len "
                             f"{spec.data.seq_len} makes {spans}; use a shorter data.seq_len or a longer "
                             "data.noising.mean_span_length")
        return t5_config(m.preset, vocab_size=vocab_size + SENTINEL_ROWS, tie_embeddings=m.tie_embeddings, **sizes)
    if m.tie_embeddings is False:
        raise ValueError("bart always ties its output head to the shared embedding; leave tie_embeddings out")
    return bart_config(m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len, **sizes)


def build_seq2seq(cfg) -> torch.nn.Module:
    return T5(cfg) if isinstance(cfg, T5Config) else Bart(cfg)


def seq2seq_counts(cfg, seq_len: int, noising: NoisingSpec | None) -> dict:
    """Parameter counts and training FLOPs per window token: 6 x (weights a token meets) per encoder and
    decoder token, plus attention's 12 x layers x d x (keys attended), scaled by each stack's length."""
    noising = noising or NoisingSpec()
    if isinstance(cfg, T5Config):
        counts, inner = t5_counts(cfg), cfg.n_heads * cfg.head_dim
        enc_len, dec_len = corrupted_lengths(seq_len, noising.noise_density, noising.mean_span_length)
        ff = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
    else:
        counts, inner = bart_counts(cfg), cfg.d_model
        enc_len, dec_len = seq_len, seq_len
        ff = 2 * cfg.d_model * cfg.d_ff
    d, L = cfg.d_model, cfg.n_layers
    enc = L * (4 * d * inner + ff)
    dec = L * (8 * d * inner + ff) + cfg.vocab_size * d
    attn = 12 * L * inner * (enc_len * enc_len + dec_len * dec_len / 2 + dec_len * enc_len)
    flops = (6 * (enc * enc_len + dec * dec_len) + attn) / seq_len
    return {**counts, "flops_per_token": float(flops)}


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
