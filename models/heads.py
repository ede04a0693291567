"""Scalar heads on a decoder: the reward model and the value model of RLHF.

``ScalarHeadModel`` is a ``Decoder`` trunk plus one linear unit on its final
hidden states. Read at the last real token of each sequence it is the reward
model r(prompt, response); read at every position it is PPO's value model
V(s_t) (InstructGPT initialises the value model from the reward model, so
both are this one class).

Padding: the decoder has no attention mask, so a sequence must start at
position 0 for its hidden states to be exact. Right padding is exact as it
is (causal attention never looks at the pads after a token); left-padded
input given with an ``attention_mask`` is shifted to the right-padded layout
first (``right_align``) and per-token outputs are shifted back.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from models.transformer import Decoder


def right_align(idx: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to start at position 0.

    idx (B, T) token ids, attention_mask (B, T) with 1 on real tokens, which
    must be contiguous in each row (left, right or no padding). Returns
    (right-padded ids (B, T), lengths (B,), start of the real tokens in the
    input (B,)). The right padding repeats the row's tokens; causal attention
    never reads it for the real positions.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)                                                        # (B,)
    T = idx.shape[1]
    pos = torch.arange(T, device=idx.device)
    start = torch.where(mask, pos[None, :], T).min(1).values.clamp(max=T - 1)  # (B,) first real position
    end = start + lengths
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    if not torch.equal(inside, mask):
        raise ValueError("attention_mask must mark one contiguous run of real tokens per row")
    src = (pos[None, :] + start[:, None]).clamp(max=T - 1)                      # (B, T)
    return idx.gather(1, src), lengths, start


class ScalarHeadModel(nn.Module):
    """Decoder trunk + linear scalar head; reward model (last token) or value model (every token)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        self.head = nn.Linear(decoder.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, 0.0, decoder.cfg.init_std)
        nn.init.zeros_(self.head.bias)
        # Added to every output so demonstrations score a mean of zero (set_reward_bias).
        self.register_buffer("reward_bias", torch.zeros(()))

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
        """Scores (B,) read at each row's last real token, or values (B, T) at every token.

        idx (B, T); give ``lengths`` (B,) for right-padded rows or an
        ``attention_mask`` (B, T) for either padding side; neither means no padding.
        """
        start = None
        if attention_mask is not None:
            idx, lengths, start = right_align(idx, attention_mask)
        h = self.decoder.hidden(idx)                                             # (B, T, d)
        values = self.head(h).squeeze(-1).float() + self.reward_bias             # (B, T)
        if per_token:
            if start is None:
                return values
            # Back to the caller's layout: out[b, t] = values[b, t - start[b]] on real tokens, else 0.
            T = idx.shape[1]
            pos = torch.arange(T, device=idx.device)[None, :] - start[:, None]   # (B, T)
            real = (pos >= 0) & (pos < lengths[:, None])
            return torch.where(real, values.gather(1, pos.clamp(0, T - 1)), 0.0)
        if lengths is None:
            return values[:, -1]
        if (lengths < 1).any():
            raise ValueError("every sequence needs at least one token to score")
        return values.gather(1, (lengths - 1)[:, None].long()).squeeze(1)       # (B,)

    @torch.no_grad()
    def set_reward_bias(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Shift outputs so these sequences (demonstrations) score a mean of zero.

        ``batches`` yields (idx (B, T) right-padded, lengths (B,)). Returns the
        bias now stored in ``reward_bias`` (a buffer, saved with the weights).
        """
        total, count = 0.0, 0
        for idx, lengths in batches:
            raw = self.forward(idx, lengths) - self.reward_bias                  # (B,)
            total += float(raw.sum())
            count += raw.numel()
        if count == 0:
            raise ValueError("set_reward_bias needs at least one sequence")
        self.reward_bias.fill_(-total / count)
        return float(self.reward_bias)
