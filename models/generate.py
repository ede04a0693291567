"""Sampling from a decoder: temperature, top-p, eos, batches of ragged prompts.

Two paths give the same tokens for the same seed: ``use_cache=True`` feeds
one new token per step through a KV cache; ``use_cache=False`` recomputes the
whole sequence every step (what the generation benchmark compares against).
Both draw their random numbers the same way (one uniform per row per step,
inverse-CDF sampling), so only the arithmetic differs.

Ragged prompts without an attention mask: the decoder has none, so every row
starts at position 0 (rotary and learned positions stay exact) and a row
whose prompt is longer than the shortest one keeps being *fed its own prompt
tokens* while the others already sample. No position ever attends to a pad,
so left- and right-padded inputs give the same result as one row alone. The
cost is up to (longest - shortest prompt) extra one-token steps.

The result is right-padded (``Generation``): each row is its prompt followed
by its response, which is what the reward, value and reference models read.

No torch.distributed, Ray or DeepSpeed here. ``model`` is anything called as
``model(idx, cache=...) -> (logits, loss)``; a wrapper that keeps the
``Decoder`` in ``.module`` (a DeepSpeed engine) works too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses."""

    max_new_tokens: int = 32
    """Most response tokens per row, eos included."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    eos_id: int | None = None
    """A row stops after sampling this token (kept in the response); None = never stop early."""
    pad_id: int = 0
    """Fills positions after a row's end in the returned tensors."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """Prompts and sampled responses, right-padded."""

    sequences: torch.Tensor
    """(B, L) prompt + response tokens, then pad_id."""
    prompt_lengths: torch.Tensor
    """(B,) real prompt tokens per row."""
    response_ids: torch.Tensor
    """(B, N) sampled tokens (eos included), then pad_id."""
    response_mask: torch.Tensor
    """(B, N) 1.0 on sampled tokens, 0.0 on padding."""
    logprobs: torch.Tensor
    """(B, N) log-probability of each sampled token under logits/temperature (before top-p), 0 on padding."""
    finished: torch.Tensor
    """(B,) True where the row sampled eos (False: cut at max_new_tokens)."""

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) prompt + response tokens per row."""
        return self.prompt_lengths + self.response_mask.sum(1).long()

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) response tokens per row."""
        return self.response_mask.sum(1).long()


def prompt_rows(prompts: torch.Tensor | Sequence[Sequence[int]],
                attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """Real prompt tokens per row, from lists or a (B, P) tensor padded on either side (given its mask)."""
    if isinstance(prompts, torch.Tensor):
        if attention_mask is None:
            return [row.tolist() for row in prompts]
        return [row[m.bool()].tolist() for row, m in zip(prompts, attention_mask)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded prompt tensor, not with lists of token ids")
    return [list(map(int, row)) for row in prompts]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (B, V): returns tokens (B,) and their logprobs (B,).

    Inverse-CDF sampling with one uniform per row, so two callers with equal
    logits and generators draw equal tokens.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)                                              # (B,)
        return tokens, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    logp = (logits / temperature).log_softmax(-1)                               # (B, V)
    probs = logp.exp()
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)                          # (B, V)
        # Keep a token while the mass before it is below top_p: the first always stays.
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)                                                      # (B, V)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=cdf.dtype)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)                 # (B, 1)
    # Rounding can push the pick past the last token with mass; step back onto it.
    last = torch.where(probs > 0, torch.arange(probs.shape[1], device=probs.device), 0).max(-1, keepdim=True).values
    pick = torch.minimum(pick, last)
    tokens = (order.gather(1, pick) if order is not None else pick).squeeze(1)  # (B,)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _decoder(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def generate(model: nn.Module, prompts: torch.Tensor | Sequence[Sequence[int]], cfg: SamplingConfig,
             generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
             use_cache: bool = True) -> Generation:
    """Sample a response for every prompt; see the module docstring for padding and caching.

    ``prompts``: lists of token ids, or a (B, P) tensor with an optional
    ``attention_mask`` (B, P) marking real tokens (left or right padding).
    The caller picks train/eval mode (use eval: dropout changes samples).
    """
    rows = prompt_rows(prompts, attention_mask)
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("every prompt needs at least one token")
    dec = _decoder(model)
    device = next(dec.parameters()).device
    B, N = len(rows), cfg.max_new_tokens
    lens = torch.tensor([len(r) for r in rows], device=device)                  # (B,)
    p_min, p_max = int(lens.min()), int(lens.max())
    if p_max + N > dec.cfg.seq_len:
        raise ValueError(f"longest prompt ({p_max}) + max_new_tokens ({N}) exceeds the model's seq_len "
                         f"({dec.cfg.seq_len})")
    buf = torch.full((B, p_max + N), cfg.pad_id, dtype=torch.long, device=device)  # (B, P_max + N)
    for b, r in enumerate(rows):
        buf[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    resp = torch.full((B, N), cfg.pad_id, dtype=torch.long, device=device)      # (B, N)
    logprobs = torch.zeros(B, N, device=device)                                 # (B, N)
    n_out = torch.zeros(B, dtype=torch.long, device=device)                     # (B,) response tokens so far
    done = torch.zeros(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = dec.new_cache() if use_cache else None
    fed, cur = 0, p_min                    # tokens in the cache; tokens known for every row
    while cur < p_max + N and not bool(done.all()):
        if use_cache:
            logits = model(buf[:, fed:cur], cache=cache)[0][:, -1]              # (B, V)
            fed = cur
        else:
            logits = model(buf[:, :cur])[0][:, -1]                              # (B, V)
        tokens, logp = sample_next(logits, cfg.temperature, cfg.top_p, generator)
        sampling = (cur >= lens) & ~done                                        # rows past their prompt
        j = n_out.clamp(max=N - 1)
        buf[:, cur] = torch.where(sampling, tokens, buf[:, cur])
        resp[sampling, j[sampling]] = tokens[sampling]
        logprobs[sampling, j[sampling]] = logp[sampling]
        n_out += sampling.long()
        if cfg.eos_id is not None:
            finished |= sampling & (tokens == cfg.eos_id)
        done |= finished | (n_out >= N)
        cur += 1
    n_max = max(int(n_out.max()), 1)
    mask = (torch.arange(n_max, device=device)[None, :] < n_out[:, None]).float()  # (B, N')
    L = int((lens + n_out).max())
    sequences = buf[:, :L].clone()
    sequences[torch.arange(L, device=device)[None, :] >= (lens + n_out)[:, None]] = cfg.pad_id
    return Generation(sequences=sequences, prompt_lengths=lens, response_ids=resp[:, :n_max],
                      response_mask=mask, logprobs=logprobs[:, :n_max] * mask, finished=finished)


def gather_response(x: torch.Tensor, prompt_lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Per-position outputs (B, L, ...) of a model on ``Generation.sequences`` -> (B, n, ...) for the responses.

    Response token j of row b is predicted at position prompt_lengths[b] - 1 + j,
    which is also where the value model sees state s_j. Positions past a row's
    end are clamped (mask them with ``response_mask``).
    """
    L = x.shape[1]
    idx = (prompt_lengths[:, None] - 1 + torch.arange(n, device=x.device)[None, :]).clamp(0, L - 1)  # (B, n)
    if x.dim() == 3:
        idx = idx[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, idx)


def response_logprobs(logits: torch.Tensor, gen: Generation, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (B, N) of the sampled response tokens under logits (B, L, V) of ``gen.sequences``."""
    n = gen.response_ids.shape[1]
    logp = (gather_response(logits, gen.prompt_lengths, n).float() / temperature).log_softmax(-1)  # (B, N, V)
    return logp.gather(2, gen.response_ids[:, :, None]).squeeze(2) * gen.response_mask
