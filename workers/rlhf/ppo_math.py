"""The arithmetic of InstructGPT's reward model and PPO, as pure tensor functions.

Nothing here owns a model or an optimizer: every function takes tensors and
returns tensors, so the single-process reference and the DeepSpeed workers
compute exactly the same numbers, and each can be checked by hand
(tests/test_ppo_math.py).

Shapes: P prompts with up to K ranked responses; B sequences with N response
tokens; ``mask`` is 1.0 on real tokens (right padding). Token averages are
taken over all real tokens of the batch.

References: Ouyang et al. 2022 (InstructGPT) for the K-way ranking loss and
PPO-ptx; Ziegler et al. 2019 for the KL-shaped reward and the adaptive KL
controller; Schulman et al. 2016/2017 for GAE and the clipped objectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ----------------------------------------------------------------------------- reward model


def group_rewards(flat: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of all responses (M,) -> per-prompt ranked scores (P, K) and mask (P, K).

    ``index`` (P, K) holds, best first, the position in ``flat`` of each
    prompt's responses, -1 where a prompt has fewer than K.
    """
    mask = index >= 0
    return flat[index.clamp(min=0)] * mask, mask


def _pairs(mask: torch.Tensor) -> torch.Tensor:
    """(P, K, K) True for i < j with both responses present: i ranked above j."""
    K = mask.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=mask.device).triu(1)
    return upper[None] & mask[:, :, None] & mask[:, None, :]


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None, center_coef: float = 0.0
                 ) -> torch.Tensor:
    """InstructGPT's K-way loss: mean over prompts of -1/C(K,2) sum_{i above j} log sigmoid(r_i - r_j).

    rewards (P, K) ordered best first; mask (P, K) marks present responses
    (prompts may have different K). All pairs of one prompt form one batch
    element, so each prompt weighs the same whatever its K.

    ``center_coef`` > 0 adds coef * mean over prompts of (mean reward of the
    prompt)^2. The ranking loss leaves each prompt's offset free; pinning it
    near zero spares PPO's value model from learning arbitrary per-prompt
    offsets (reward centring, Eisenstein et al. 2023).
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    pairs = _pairs(mask.bool())                                                 # (P, K, K)
    diff = rewards[:, :, None] - rewards[:, None, :]                            # (P, K, K) r_i - r_j
    per_prompt = -(F.logsigmoid(diff.float()) * pairs).sum((1, 2))              # (P,)
    n_pairs = pairs.sum((1, 2))                                                 # (P,) C(K_p, 2)
    has = n_pairs > 0
    if not bool(has.any()):
        raise ValueError("ranking_loss needs a prompt with at least two responses")
    loss = (per_prompt[has] / n_pairs[has]).mean()
    if center_coef > 0:
        prompt_mean = masked_mean(rewards.float(), mask, dim=1)                 # (P,)
        loss = loss + center_coef * prompt_mean[has].pow(2).mean()
    return loss


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The K = 2 case on (B,) scores: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid((chosen - rejected).float()).mean()


def pairwise_accuracy(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of ranked pairs (over all prompts) the scores order correctly; ties count half."""
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    pairs = _pairs(mask.bool())
    diff = rewards[:, :, None] - rewards[:, None, :]
    right = (diff > 0).float() + 0.5 * (diff == 0).float()
    return (right * pairs).sum() / pairs.sum().clamp(min=1)


# ----------------------------------------------------------------------------- rewards and KL


def clip_reward(score: torch.Tensor, limit: float) -> torch.Tensor:
    """Reward-model scores clamped to [-limit, limit] (limit <= 0: unchanged)."""
    return score.clamp(-limit, limit) if limit > 0 else score


def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, N): -beta * (logp - logp_ref), plus the sequence score (B,) at the last token.

    Returns (rewards (B, N), per-token KL estimate logp - logp_ref (B, N)), both 0 on padding.
    """
    kl = (logp - ref_logp) * mask                                               # (B, N)
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)                                # (B,)
    rewards = rewards.scatter_add(1, last[:, None], (score * (mask.sum(1) > 0))[:, None].to(rewards.dtype))
    return rewards, kl


def leave_one_out_scores(score: torch.Tensor, group: int) -> torch.Tensor:
    """Scores (B,) of ``group`` consecutive samples per prompt, minus the mean of the prompt's other samples.

    The reward model's ranking loss leaves each prompt's offset free; removing
    it per prompt (as RLOO does) leaves only the within-prompt differences
    that rankings taught, so the value model need not learn the offsets.
    """
    if group < 2:
        return score
    if score.shape[0] % group:
        raise ValueError(f"{score.shape[0]} scores do not split into groups of {group}")
    s = score.view(-1, group)                                                   # (P, group)
    others = (s.sum(1, keepdim=True) - s) / (group - 1)
    return (s - others).view(-1)


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    beta: float = 0.02
    """KL penalty coefficient (InstructGPT: 0.02)."""

    def update(self, kl: float, n_steps: int) -> float:
        return self.beta


@dataclass
class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: steer the measured KL to ``target``."""

    beta: float = 0.02
    """Current KL coefficient (the initial one at construction)."""
    target: float = 6.0
    """KL (nats per sequence) the controller aims for."""
    horizon: int = 10000
    """Samples over which beta moves by the (clipped) relative error."""

    def update(self, kl: float, n_steps: int) -> float:
        """Feed the KL measured over ``n_steps`` samples; returns the new beta."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# ----------------------------------------------------------------------------- advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences.

    delta_t = r_t + gamma * V_{t+1} - V_t (V past the last token is 0),
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages (B, N),
    returns = A + V (B, N)), both 0 on padding.
    """
    B, N = rewards.shape
    mask = mask.to(values.dtype)
    values = values * mask
    adv = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(N)):
        next_mask = mask[:, t + 1] if t + 1 < N else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < N else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        adv[:, t] = running * mask[:, t]
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions (keep the mean if not ``shift_mean``); 0 on padding.

    ``reduce`` sums a tensor over data-parallel ranks (an all-reduce), so the
    statistics are those of the whole rollout, not of one rank's share.
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        sums = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
        mean = (sums[0] / sums[2]).to(x.dtype)
        var = (sums[1] / sums[2] - (sums[0] / sums[2]) ** 2).clamp(min=0).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------- losses


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean of max(-A r, -A clip(r, 1-c, 1+c)), r = exp(logp - old_logp).

    Returns (loss, clip fraction: share of tokens where the clipped term is
    the larger (so its gradient is zero), approximate KL mean(old - new)).
    """
    ratio = torch.exp(logp - old_logp)                                          # (B, N)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(old_logp - logp, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-c).

    Returns (loss, clip fraction: share of tokens where the clipped error is the larger).
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (...) of the categorical distributions over the last axis of logits (..., V)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) (...) under logits (..., V)."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def ptx_loss(ppo_loss: torch.Tensor, lm_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx: the policy loss plus ``coef`` (InstructGPT's gamma, 27.8) times the pretraining LM loss."""
    return ppo_loss + coef * lm_loss


# ----------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float = 0.992) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def n_pairs(k: int) -> int:
    """C(k, 2): ranked pairs among k responses."""
    return math.comb(k, 2)
