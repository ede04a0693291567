"""Noising for encoder-decoder pretraining: T5's span corruption and BART's denoising functions.

Every function takes its randomness from a ``numpy.random.Generator`` the
caller seeds from (seed, epoch, window index) (``sample_rng``), never from
batch composition or worker count, so a resumed job sees exactly the noise
an uninterrupted one would have.

**T5 span corruption** (Raffel et al. 2020, section 3.14; the reference
``random_spans_noise_mask``): of a window of n tokens, round(n x 0.15) are
noise, cut into round(noise / 3) spans (mean length 3). Noise and non-noise
spans alternate, starting with non-noise, so every span is separated from the
next; each span length is at least 1. The input keeps the non-noise tokens and
puts one sentinel where each noise span was; the target lists each sentinel
followed by the span it replaced and ends with one more sentinel, as in the
paper's Figure 2::

    input:  nn_0 <S_0> nn_1 <S_1> ... nn_k-1 <S_k-1> </s>
    target: <S_0> n_0 <S_1> n_1 ... <S_k-1> n_k-1 <S_k>

Sentinels are the top rows of the model's embedding (``sentinel_ids``):
``<extra_id_i>`` is row V - 1 - i, as in T5's vocabulary, where the 100
extra ids come after the ordinary ones with ``<extra_id_0>`` last. The
encoder-decoder task adds ``SENTINEL_ROWS`` rows above the tokenizer's padded
vocabulary for them, so no ordinary token is ever a sentinel. Both lengths
are fixed for a given n, so batches need no padding.

**BART denoising** (Lewis et al. 2019, section 2.2), applied in this order:

* sentence permutation: the window is cut after each sentence-ending token
  ('.', '!', '?' or a newline at the end of the token's text) and the
  sentences are shuffled;
* token deletion: round(n x ratio) tokens at random positions are removed;
* text infilling: span lengths are drawn from Poisson(lambda = 3) until they
  cover ceil(n x ratio) tokens (the last one trimmed to fit); each span is
  replaced by ONE mask token, and a 0-length span inserts a mask. Spans never
  touch (at least one kept token between two), so the number of mask tokens
  is the number of spans;
* document rotation: the sequence starts at a uniformly chosen token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SENTINEL_ROWS = 128
"""Embedding rows reserved above the tokenizer's padded vocabulary for T5's sentinels (a multiple of 64)."""


def sample_rng(seed: int, epoch: int | None, index: int) -> np.random.Generator:
    """A sample's own generator, a function of (seed, epoch, window index) only."""
    from data.masking import sample_seed

    return np.random.default_rng(sample_seed(seed + 104_729, epoch, index))


# ----------------------------------------------------------------------------- T5


def sentinel_ids(vocab_size: int, n: int) -> list[int]:
    """``<extra_id_0>`` .. ``<extra_id_{n-1}>``: rows V - 1, V - 2, ... of a model with V embedding rows."""
    return [vocab_size - 1 - i for i in range(n)]


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of ``length`` tokens, as T5 rounds them."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = min(max(int(round(noise / mean_span_length)), 1), noise, length - noise)
    return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(input length with </s>, target length with the final sentinel) of span corruption."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def _segment(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of n_items into n_segments lengths, each at least 1."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True on noise: non-noise and noise spans alternate, non-noise first."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = _segment(noise, spans, rng)
    keep_lengths = _segment(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    at = 0
    for keep, span in zip(keep_lengths, noise_lengths):
        mask[at + keep:at + keep + span] = True
        at += keep + span
    return mask


def span_corruption(tokens: Sequence[int], mask: np.ndarray, sentinels: Sequence[int], eos_id: int
                    ) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of ``tokens`` under noise ``mask``, laid out as in the module docstring."""
    inputs, targets, k = [], [], 0
    for i, token in enumerate(tokens):
        starts = mask[i] and (i == 0 or not mask[i - 1])
        if starts:
            if k >= len(sentinels) - 1:
                raise ValueError(f"span corruption needs more than {len(sentinels)} sentinels")
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            k += 1
        (targets if mask[i] else inputs).append(int(token))
    return inputs + [eos_id], targets + [sentinels[k]]


# ----------------------------------------------------------------------------- BART


@dataclass(frozen=True)
class BartNoise:
    """Which of BART's noising functions run, and how hard."""

    mask_ratio: float = 0.3
    """Text infilling: share of tokens inside masked spans (0 = off)."""
    poisson_lambda: float = 3.0
    """Text infilling: mean span length (Poisson)."""
    permute_sentences: bool = True
    """Sentence permutation."""
    delete_ratio: float = 0.0
    """Token deletion: share of tokens removed (0 = off)."""
    rotate: bool = False
    """Document rotation."""


def sentence_permutation(tokens: Sequence[int], ends: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Sentences (each through its ending token; a trailing piece counts as one) in a random order.

    ``ends``: a (vocab,) bool table, True for tokens that end a sentence.
    """
    sentences, start = [], 0
    for i, token in enumerate(tokens):
        if ends[token]:
            sentences.append(list(tokens[start:i + 1]))
            start = i + 1
    if start < len(tokens):
        sentences.append(list(tokens[start:]))
    return [t for j in rng.permutation(len(sentences)) for t in sentences[j]]


def token_deletion(tokens: Sequence[int], ratio: float, rng: np.random.Generator) -> list[int]:
    """``tokens`` without round(n x ratio) of them, chosen uniformly."""
    n = len(tokens)
    drop = set(rng.choice(n, size=min(n, int(round(n * ratio))), replace=False).tolist())
    return [t for i, t in enumerate(tokens) if i not in drop]


def infilling_spans(n: int, ratio: float, poisson_lambda: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, length) of text infilling's spans over n tokens, in order; lengths sum to ceil(n x ratio).

    A 0-length span at ``start`` inserts a mask before token ``start``.
    """
    target = min(n, math.ceil(n * ratio))
    if target == 0 or n == 0:
        return []
    lengths: list[int] = []
    while sum(lengths) < target:
        lengths.append(int(rng.poisson(poisson_lambda)))
    lengths[-1] -= sum(lengths) - target                                 # trimmed to cover exactly target
    kept = n - target
    gap = 1 if kept >= len(lengths) - 1 else 0                           # spans never touch when there is room
    spare = kept - gap * (len(lengths) - 1)
    extra = np.diff(np.concatenate([[0], np.sort(rng.integers(0, spare + 1, size=len(lengths))), [spare]]))
    spans, at = [], 0
    for i, length in enumerate(lengths):
        at += int(extra[i]) + (gap if i else 0)
        spans.append((at, length))
        at += length
    return spans


def apply_infilling(tokens: Sequence[int], spans: Sequence[tuple[int, int]], mask_id: int) -> list[int]:
    """Each span replaced by one ``mask_id``; a 0-length span inserts one."""
    out, at = [], 0
    for start, length in spans:
        out.extend(tokens[at:start])
        out.append(mask_id)
        at = start + length
    return out + list(tokens[at:])


def document_rotation(tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
    """The sequence rotated to start at a uniformly chosen token."""
    if not tokens:
        return []
    k = int(rng.integers(len(tokens)))
    return list(tokens[k:]) + list(tokens[:k])


def bart_noise(tokens: Sequence[int], noise: BartNoise, mask_id: int, ends: np.ndarray,
               rng: np.random.Generator) -> list[int]:
    """BART's enabled noising functions in order: permutation, deletion, infilling, rotation."""
    out = [int(t) for t in tokens]
    if noise.permute_sentences:
        out = sentence_permutation(out, ends, rng)
    if noise.delete_ratio > 0:
        out = token_deletion(out, noise.delete_ratio, rng)
    if noise.mask_ratio > 0:
        out = apply_infilling(out, infilling_spans(len(out), noise.mask_ratio, noise.poisson_lambda, rng), mask_id)
    if noise.rotate:
        out = document_rotation(out, rng)
    return out


def sentence_ends(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the tokens whose text ends a sentence ('.', '!', '?', or a newline)."""
    ends = np.zeros(vocab_size, dtype=bool)
    for i in range(tokenizer.vocab_size):
        text = tokenizer.tok.decode([i], skip_special_tokens=True)
        ends[i] = bool(text) and (text.endswith("\n") or text.rstrip(" ").endswith((".", "!", "?")))
    return ends
