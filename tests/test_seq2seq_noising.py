"""T5 span corruption and BART's noising functions, checked by hand and by their distributions; bad
encoder-decoder specs refused at validation (no Ray)."""
import math

import numpy as np
import pytest

from data.noising import (BartNoise, apply_infilling, bart_noise, corrupted_lengths, document_rotation,
                          infilling_spans, noise_mask, sample_rng, sentence_permutation, sentinel_ids,
                          span_corruption, span_counts, token_deletion)


def _runs(mask):
    """Lengths of the runs of True in a bool array."""
    runs, n = [], 0
    for m in list(mask) + [False]:
        if m:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("length,noise,spans", [(64, 10, 3), (512, 77, 26), (128, 19, 6)])
def test_span_corruption_noise_proportion_and_span_lengths(length, noise, spans):
    assert span_counts(length, 0.15, 3.0) == (noise, spans)                  # round(n x 0.15), round(noise / 3)
    all_runs = []
    for i in range(200):
        mask = noise_mask(length, 0.15, 3.0, sample_rng(0, 0, i))
        runs = _runs(mask)
        assert mask.sum() == noise and len(runs) == spans and min(runs) >= 1
        assert not mask[0] and mask[-1]                                      # non-noise first, noise last
        all_runs += runs
    assert np.mean(all_runs) == pytest.approx(noise / spans)                # mean span length about 3
    assert len(set(all_runs)) > 3                                            # the lengths vary
    assert noise / length == pytest.approx(0.15, abs=0.01)


def test_span_corruption_sentinel_layout_by_hand():
    tokens = list(range(10, 20))
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    s = sentinel_ids(384, 3)
    assert s == [383, 382, 381]                                             # <extra_id_0> is the top row
    inputs, targets = span_corruption(tokens, mask, s, eos_id=1)
    assert inputs == [10, 11, 383, 14, 15, 16, 382, 18, 19, 1]
    assert targets == [383, 12, 13, 382, 17, 381]                           # ends with the final sentinel


def test_span_corruption_round_trips_and_has_fixed_lengths():
    window = np.arange(100, 164)
    s = sentinel_ids(384, 128)
    for i in range(20):
        mask = noise_mask(64, 0.15, 3.0, sample_rng(5, 1, i))
        inputs, targets = span_corruption(window.tolist(), mask, s, eos_id=1)
        assert (len(inputs), len(targets)) == corrupted_lengths(64, 0.15, 3.0) == (64 - 10 + 3 + 1, 10 + 3 + 1)
        # Put each target span back where its sentinel sits in the input: the window again.
        spans, k = {}, None
        for t in targets:
            if t in s:
                k = t
                spans[k] = []
            else:
                spans[k].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in s else [t])]
        assert rebuilt == window.tolist()
    same = [noise_mask(64, 0.15, 3.0, sample_rng(5, e, 3)) for e in (1, 1, 2)]
    assert (same[0] == same[1]).all() and not (same[0] == same[2]).all()    # (seed, epoch, window) decide


def test_bart_infilling_by_hand():
    a = list(range(10))
    assert apply_infilling(a, [(0, 0), (2, 3), (7, 1)], mask_id=-1) == [-1, 0, 1, -1, 5, 6, -1, 8, 9]


def test_bart_infilling_span_distribution_is_poisson_3():
    n, lengths = 400, []
    for i in range(300):
        spans = infilling_spans(n, 0.3, 3.0, sample_rng(0, 0, i))
        assert sum(length for _, length in spans) == math.ceil(0.3 * n)     # exactly 30% of tokens masked
        for (s0, l0), (s1, _) in zip(spans, spans[1:]):
            assert s0 + l0 < s1                                              # never touching: one mask each
        assert spans[-1][0] + spans[-1][1] <= n
        lengths += [length for _, length in spans[:-1]]                      # the last one is trimmed
        tokens = list(range(n))
        out = apply_infilling(tokens, spans, mask_id=-1)
        assert out.count(-1) == len(spans) and len(out) == n - 120 + len(spans)
    lengths = np.array(lengths)
    assert lengths.mean() == pytest.approx(3.0, abs=0.08)
    for k in range(7):                                                       # the Poisson(3) pmf
        assert (lengths == k).mean() == pytest.approx(math.exp(-3) * 3 ** k / math.factorial(k), abs=0.012)


def test_bart_sentence_permutation_keeps_sentences_whole():
    ends = np.zeros(100, dtype=bool)
    ends[99] = True                                                          # token 99 is '.'
    tokens = [1, 2, 99, 3, 99, 4, 5, 6, 99, 7]                               # three sentences and a tail
    sentences = [(1, 2, 99), (3, 99), (4, 5, 6, 99), (7,)]
    orders = set()
    for i in range(60):
        out = sentence_permutation(tokens, ends, sample_rng(0, 0, i))
        assert len(out) == len(tokens)
        pieces, at = [], 0
        while at < len(out):                                                 # cut the output at sentence starts
            piece = next(s for s in sentences if tuple(out[at:at + len(s)]) == s)
            pieces.append(piece)
            at += len(piece)
        assert sorted(pieces) == sorted(sentences)
        orders.add(tuple(pieces))
    assert len(orders) > 12                                                  # of the 24 orders


def test_bart_deletion_rotation_and_defaults():
    tokens = list(range(50))
    kept = token_deletion(tokens, 0.2, sample_rng(0, 0, 1))
    assert len(kept) == 40 and kept == sorted(kept)                          # order kept, 10 removed
    rotated = document_rotation(tokens, sample_rng(0, 0, 2))
    k = rotated.index(0)
    assert rotated[k:] + rotated[:k] == tokens
    ends = np.zeros(100, dtype=bool)
    out = bart_noise(tokens, BartNoise(), mask_id=99, ends=ends, rng=sample_rng(0, 0, 3))
    assert 99 in out and len(out) < len(tokens)                              # infilling is on by default
    assert bart_noise(tokens, BartNoise(mask_ratio=0, permute_sentences=False), 99, ends,
                      sample_rng(0, 0, 3)) == tokens


@pytest.mark.parametrize("overrides,match", [
    ({"model.family": "t5", "model.moe": {"num_experts": 4}}, "no Switch layers"),
    ({"model.family": "bart", "model.tie_embeddings": False}, "always ties"),
    ({"model.family": "t5", "data.seq_len": 4096}, "sentinels"),
    ({"model.family": "bart", "parallel.pp": 2, "parallel.zero_stage": 1, "train.grad_accum": 2}, "decoder famil"),
    ({"model.family": "bart", "data.noising": {"mask_ratio": 1.5}}, "data.noising.mask_ratio"),
    ({"model.family": "t5", "kind": "classify", "train.steps": 2}, "kind: pretrain only"),
    ({"model.family": "bert", "data.noising": {"rotate": True}}, "bert does not use data.noising"),
])
def test_bad_encoder_decoder_specs_are_refused_at_validation(overrides, match):
    from specs.job import SpecError
    from tests.conftest import tiny_spec

    with pytest.raises(SpecError, match=match) as err:
        tiny_spec(**overrides)
    assert "\n" not in str(err.value)
