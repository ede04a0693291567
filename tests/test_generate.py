"""Sampling (cache == no cache, padding, top-p, temperature, eos) and the scalar-head model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.generate import SamplingConfig, gather_response, generate, response_logprobs, sample_next
from models.heads import ScalarHeadModel, right_align
from models.transformer import Decoder, decoder_config

torch.set_num_threads(1)

PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12]]


def tiny(family: str = "llama", seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(decoder_config(family, "tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                  seq_len=48)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "palm"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_cache_and_no_cache_give_identical_tokens(family, temperature, top_p):
    model = tiny(family)
    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p, eos_id=3, pad_id=0)
    a = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(7), use_cache=True)
    b = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(7), use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_logprobs_match_a_forward_pass_and_layout_is_right_padded():
    model = tiny()
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, eos_id=3, pad_id=0)
    gen = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(1))
    logits = model(gen.sequences)[0]
    assert torch.allclose(response_logprobs(logits, gen), gen.logprobs, atol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        n = int(gen.response_lengths[b])
        row = gen.sequences[b]
        assert row[:len(prompt)].tolist() == prompt
        assert row[len(prompt):len(prompt) + n].tolist() == gen.response_ids[b, :n].tolist()
        assert (row[len(prompt) + n:] == 0).all()
        assert gen.finished[b] == (gen.response_ids[b, n - 1] == 3)
        assert bool(gen.finished[b]) or n == 8


def test_left_and_right_padding_match_lists_and_single_rows():
    model = tiny()
    P = max(map(len, PROMPTS))
    left, right = torch.zeros(len(PROMPTS), P, dtype=torch.long), torch.zeros(len(PROMPTS), P, dtype=torch.long)
    lmask, rmask = torch.zeros_like(left), torch.zeros_like(right)
    for b, p in enumerate(PROMPTS):
        left[b, P - len(p):], lmask[b, P - len(p):] = torch.tensor(p), 1
        right[b, :len(p)], rmask[b, :len(p)] = torch.tensor(p), 1
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, pad_id=0)
    ref = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(3))
    for ids, mask in ((left, lmask), (right, rmask)):
        out = generate(model, ids, cfg, torch.Generator().manual_seed(3), attention_mask=mask)
        assert torch.equal(out.sequences, ref.sequences)
    # Greedy: every row of the batch equals that prompt decoded alone (no pad ever leaks into attention).
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, pad_id=0)
    batch = generate(model, left, greedy, attention_mask=lmask)
    for b, p in enumerate(PROMPTS):
        alone = generate(model, [p], greedy)
        assert batch.response_ids[b].tolist() == alone.response_ids[0].tolist()
        assert torch.allclose(batch.logprobs[b], alone.logprobs[0], atol=1e-5)


def test_eos_stops_each_row():
    class Counter(nn.Module):
        """Emits token 10, 11, ... and eos (3) once a row holds 6 tokens."""

        def __init__(self):
            super().__init__()
            self.cfg = decoder_config("llama", "tiny", vocab_size=16, d_model=8, n_heads=2, n_layers=1, seq_len=32)
            self.dummy = nn.Parameter(torch.zeros(1))

        def new_cache(self):
            return None

        def forward(self, idx, cache=None):
            assert cache is None
            logits = torch.full((idx.shape[0], idx.shape[1], 16), -1e4)
            nxt = 3 if idx.shape[1] >= 6 else 10 + idx.shape[1] % 5
            logits[:, :, nxt] = 0.0
            return logits, None

    gen = generate(Counter(), [[1, 1], [1, 1, 1, 1]], SamplingConfig(max_new_tokens=8, eos_id=3, pad_id=0),
                   torch.Generator().manual_seed(0), use_cache=False)
    assert gen.response_lengths.tolist() == [5, 3]                   # both rows reach 6 tokens, then eos
    assert gen.finished.tolist() == [True, True]
    assert gen.response_ids[1].tolist() == [14, 10, 3, 0, 0]
    assert gen.response_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert gen.sequences.shape == (2, 7)


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[2] == 0 and counts[3] == 0                          # 0.5 + 0.3 reaches 0.7
    assert counts[0].item() == pytest.approx(0.5 / 0.8, abs=0.02)
    assert torch.allclose(logp, probs.log()[tokens], atol=1e-6)       # logprobs before truncation
    tokens, _ = sample_next(logits, temperature=1.0, top_p=0.4, generator=g)
    assert (tokens == 0).all()                                        # the top token always stays


def test_temperature_reshapes_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    for t in (0.5, 1.0, 2.0):
        tokens, logp = sample_next(logits, temperature=t, top_p=1.0, generator=g)
        freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
        expect = (logits[0] / t).softmax(-1)
        assert torch.allclose(freq, expect, atol=0.015), (t, freq, expect)
        assert torch.allclose(logp, expect.log()[tokens], atol=1e-5)
    tokens, _ = sample_next(logits, temperature=0.0, top_p=1.0, generator=g)
    assert (tokens == 0).all()


def test_same_seed_same_samples_and_too_long_is_refused():
    model = tiny()
    cfg = SamplingConfig(max_new_tokens=5, pad_id=0)
    a = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(5))
    c = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    with pytest.raises(ValueError, match="seq_len"):
        generate(model, [[1] * 45], SamplingConfig(max_new_tokens=5))


def test_gather_response_positions():
    x = torch.arange(2 * 6).view(2, 6)                                # value at (b, t) = 6b + t
    out = gather_response(x, torch.tensor([2, 4]), 3)
    assert out.tolist() == [[1, 2, 3], [9, 10, 11]]                   # position prompt_len - 1 + j, clamped


# ----------------------------------------------------------------------------- scalar heads


def test_scalar_head_reads_last_real_token_for_either_padding():
    torch.manual_seed(0)
    rm = ScalarHeadModel(tiny()).eval()
    rows = [[5, 6, 7, 8], [9, 10]]
    alone = [rm(torch.tensor([r])).item() for r in rows]
    right = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    assert rm(right, lengths=torch.tensor([4, 2])).tolist() == pytest.approx(alone, abs=1e-5)
    assert rm(right, attention_mask=(torch.arange(4) < torch.tensor([[4], [2]])).long()).tolist() == \
        pytest.approx(alone, abs=1e-5)
    lmask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert rm(left, attention_mask=lmask).tolist() == pytest.approx(alone, abs=1e-5)
    # Per-token values come back in the caller's layout, 0 on pads.
    values = rm(left, attention_mask=lmask, per_token=True)
    single = rm(torch.tensor([rows[1]]), per_token=True)[0]
    assert values[1, :2].tolist() == [0.0, 0.0]
    assert values[1, 2:].tolist() == pytest.approx(single.tolist(), abs=1e-5)
    assert values.shape == (2, 4)


def test_reward_bias_centres_demonstrations():
    rm = ScalarHeadModel(tiny()).eval()
    batches = [(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])), (torch.tensor([[7, 8, 9]]), torch.tensor([3]))]
    bias = rm.set_reward_bias(batches)
    scores = torch.cat([rm(ids, n) for ids, n in batches])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert rm.state_dict()["reward_bias"].item() == pytest.approx(bias)
    assert rm.set_reward_bias(batches) == pytest.approx(bias, abs=1e-6)   # idempotent


def test_right_align_rejects_holes():
    ids = torch.tensor([[1, 2, 3]])
    out, lengths, start = right_align(torch.tensor([[0, 7, 8]]), torch.tensor([[0, 1, 1]]))
    assert out[0, :2].tolist() == [7, 8] and lengths.tolist() == [2] and start.tolist() == [1]
    with pytest.raises(ValueError, match="contiguous"):
        right_align(ids, torch.tensor([[1, 0, 1]]))
