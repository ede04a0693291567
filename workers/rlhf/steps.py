"""The InstructGPT step library: batches, the SFT / RM / PPO steps and the measures, over plain modules.

The steps take the model(s), a batch and a ``StepFn`` that turns a loss into
an update. In the single-process reference (``workers/rlhf/reference.py``) a
StepFn is ``optimizer_step(opt, params)`` (backward, clip, step); inside a
DeepSpeed worker (``workers/rlhf/stages.py``) it is
``lambda loss: (engine.backward(loss), engine.step())`` and the engine is
passed as the model (``engine(...)`` is a module call). ``ppo_step`` reads as
the four phases generate, score, advantages, update, each timed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from data import instruct
from data.rlhf_files import Comparison, Demonstration
from data.tokenizer import TextTokenizer
from models.generate import Generation, SamplingConfig, gather_response, generate
from models.transformer import IGNORE_INDEX
from workers.rlhf import ppo_math as pm
from workers.rlhf.ppo_config import PPOConfig

StepFn = Callable[[torch.Tensor], None]
"""Turns a loss into one update: backward, (clip), optimizer step. Injected so DeepSpeed can replace it."""


# ----------------------------------------------------------------------------- plumbing


class PhaseTimer:
    """Seconds spent per named phase, summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def optimizer_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip_norm: float = 1.0,
                   schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> StepFn:
    """The plain-PyTorch StepFn: zero grads, backward, clip the grad norm, step (and the schedule)."""
    params = list(params)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        if schedule is not None:
            schedule.step()

    return step


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int | None, floor: float = 0.1):
    """Linear warmup, then cosine decay to ``floor`` of the peak (constant after warmup if total is None)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T) right-padded, lengths (B,))."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows])


def encode_pair(tok: TextTokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos): the layout every stage shares."""
    return tok.encode(prompt), tok.encode(response) + [tok.eos_id]


# ----------------------------------------------------------------------------- SFT


def sft_batch(tok: TextTokenizer, demos: Sequence[Demonstration], response_only: bool = True
              ) -> dict[str, torch.Tensor]:
    """input_ids (B, T) and targets (B, T): next tokens, IGNORE_INDEX on padding (and prompts if response_only)."""
    rows, starts = [], []
    for d in demos:
        p, r = encode_pair(tok, d.prompt, d.response)
        rows.append(p + r)
        starts.append(len(p))
    ids, lengths = pad_right(rows, tok.pad_id)                                  # (B, T+1)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()                           # (B, T)
    pos = torch.arange(targets.shape[1])[None, :]
    targets[pos >= (lengths - 1)[:, None]] = IGNORE_INDEX
    if response_only:
        # targets[:, i] is token i+1: a prompt token while i + 1 < prompt length.
        targets[pos < (torch.tensor(starts) - 1)[:, None]] = IGNORE_INDEX
    return {"input_ids": inputs, "targets": targets}


def sft_step(model: nn.Module, batch: dict[str, torch.Tensor], step: StepFn) -> dict[str, float]:
    """One SFT update: mean next-token loss on the batch's target tokens."""
    model.train()
    _, loss = model(batch["input_ids"], batch["targets"])
    step(loss)
    return {"loss": float(loss.detach())}


# ----------------------------------------------------------------------------- reward model


def comparison_batch(tok: TextTokenizer, comps: Sequence[Comparison]) -> dict[str, torch.Tensor]:
    """All responses of the batch in one tensor and where each prompt's ranked responses sit.

    input_ids (M, T) right-padded prompt+response+eos, lengths (M,), index (P, K)
    into the M rows, best first, -1 past a prompt's own K.
    """
    rows: list[list[int]] = []
    K = max(len(c.responses) for c in comps)
    index = torch.full((len(comps), K), -1, dtype=torch.long)
    for i, c in enumerate(comps):
        for j, text in enumerate(c.ranked):
            p, r = encode_pair(tok, c.prompt, text)
            index[i, j] = len(rows)
            rows.append(p + r)
    ids, lengths = pad_right(rows, tok.pad_id)
    return {"input_ids": ids, "lengths": lengths, "index": index}


def rm_step(rm: nn.Module, batch: dict[str, torch.Tensor], step: StepFn, center_coef: float = 0.0
            ) -> dict[str, float]:
    """One reward-model update on K-way rankings (all pairs of a prompt in one batch element)."""
    rm.train()
    scores = rm(batch["input_ids"], batch["lengths"])                           # (M,)
    rewards, mask = pm.group_rewards(scores, batch["index"])                    # (P, K)
    loss = pm.ranking_loss(rewards, mask, center_coef)
    step(loss)
    return {"loss": float(loss.detach()), "accuracy": float(pm.pairwise_accuracy(rewards.detach(), mask))}


@torch.no_grad()
def rm_accuracy(rm: nn.Module, tok: TextTokenizer, comps: Sequence[Comparison], batch_size: int = 32
                ) -> dict[str, float]:
    """Pairwise accuracy and mean ranking loss over comparisons."""
    rm.eval()
    right = pairs = loss = 0.0
    for i in range(0, len(comps), batch_size):
        chunk = comps[i:i + batch_size]
        b = comparison_batch(tok, chunk)
        rewards, mask = pm.group_rewards(rm(b["input_ids"], b["lengths"]), b["index"])
        n = float(sum(pm.n_pairs(len(c.responses)) for c in chunk))
        right += float(pm.pairwise_accuracy(rewards, mask)) * n
        pairs += n
        loss += float(pm.ranking_loss(rewards, mask)) * len(chunk)
    return {"accuracy": right / pairs, "loss": loss / len(comps)}


def demo_batches(tok: TextTokenizer, demos: Sequence[Demonstration], batch_size: int = 64):
    """(ids (B, T), lengths (B,)) of prompt+response+eos, for ScalarHeadModel.set_reward_bias."""
    for i in range(0, len(demos), batch_size):
        yield pad_right([sum(encode_pair(tok, d.prompt, d.response), []) for d in demos[i:i + batch_size]],
                        tok.pad_id)


# ----------------------------------------------------------------------------- PPO


@dataclass
class PPORoles:
    """The four models of PPO and who updates what."""

    policy: nn.Module
    """Trained Decoder (or its engine), initialised from SFT."""
    value: nn.Module
    """Trained ScalarHeadModel (or its engine), initialised from the reward model."""
    reference: nn.Module
    """Frozen SFT Decoder: the KL anchor."""
    reward: nn.Module
    """Frozen reward model (ScalarHeadModel)."""
    policy_step: StepFn
    """Update of the policy from its loss."""
    value_step: StepFn
    """Update of the value model from its loss."""
    ema: nn.Module | None = None
    """EMA copy of the policy, or None."""


def _rows(gen: Generation, idx: torch.Tensor) -> Generation:
    return Generation(**{f.name: getattr(gen, f.name)[idx] for f in dataclasses.fields(Generation)})


@dataclass
class Rollout:
    """One rollout's samples and what was measured on them before any update."""

    gen: Generation
    old_logp: torch.Tensor                 # (B, N) policy log-probs of the response tokens
    ref_logp: torch.Tensor                 # (B, N) reference log-probs
    old_values: torch.Tensor               # (B, N) value-model estimates
    raw_score: torch.Tensor                # (B,) reward-model scores
    score: torch.Tensor                    # (B,) clipped, with the no-eos penalty


def kl_controller(cfg: PPOConfig):
    """The KL coefficient's controller: fixed beta, or adaptive towards ``cfg.kl_target``."""
    if cfg.kl_target is None:
        return pm.FixedKLController(cfg.kl_beta)
    return pm.AdaptiveKLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)


def ppo_step(roles: PPORoles, prompt_ids: Sequence[Sequence[int]], cfg: PPOConfig, kl_ctl,
             sampling: SamplingConfig, generator: torch.Generator,
             ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None, update_policy: bool = True,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, minibatch: int | None = None
             ) -> dict[str, float]:
    """One PPO iteration: generate, score, advantages, update. Returns stats and seconds per phase.

    ``prompt_ids`` holds distinct prompts; each is sampled
    ``cfg.samples_per_prompt`` times. ``update_policy=False`` trains only the
    value model (value warmup). With data parallelism each rank passes its
    own prompts, ``reduce`` (a sum over ranks) and ``minibatch``, its share of
    ``cfg.minibatch_size`` (``JobSpec.ppo_shares``): advantages are whitened
    and the KL controller steered with whole-rollout statistics.
    """
    timer = PhaseTimer()
    with timer("generate"):
        roles.policy.eval()
        repeated = [p for p in prompt_ids for _ in range(cfg.samples_per_prompt)]   # groups stay consecutive
        gen = generate(roles.policy, repeated, sampling, generator)
    with timer("score"), torch.no_grad():
        rollout = _score(roles, gen, cfg)
    with timer("advantages"):
        score = rollout.score
        if cfg.loo_baseline:
            score = pm.leave_one_out_scores(score, cfg.samples_per_prompt)
        mask = gen.response_mask                                                # (B, N)
        rewards, kl = pm.kl_penalized_rewards(score, rollout.old_logp, rollout.ref_logp, mask, kl_ctl.beta)
        advantages, returns = pm.gae(rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask, reduce=reduce)
    with timer("update"):
        stats = _update(roles, rollout, advantages, returns, cfg, minibatch or cfg.minibatch_size, generator,
                        ptx_batches, update_policy)
    B = gen.sequences.shape[0]
    seq_kl = kl.sum(1).mean()                                                   # nats per sequence
    if reduce is not None:
        seq_kl = reduce(seq_kl.double().reshape(1))[0] / reduce(torch.ones(1, dtype=torch.float64))[0]
    seq_kl = float(seq_kl)
    beta = kl_ctl.beta
    if update_policy:  # during value warmup the policy is the reference: nothing to steer
        kl_ctl.update(seq_kl, B if reduce is None else int(reduce(torch.tensor([float(B)]))[0]))
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out.update(score=float(rollout.raw_score.mean()), kl=seq_kl, beta=beta, response_len=float(mask.sum(1).mean()),
               finished=float(gen.finished.float().mean()))
    out.update({f"t_{k}": v for k, v in timer.seconds.items()})
    return out


def _score(roles: PPORoles, gen: Generation, cfg: PPOConfig) -> Rollout:
    """Log-probs under the policy and the reference, values and reward-model scores of the samples."""
    seq, mask = gen.sequences, gen.response_mask                                # (B, L), (B, N)
    N = mask.shape[1]
    old_logp = pm.token_logprobs(gather_response(roles.policy(seq)[0], gen.prompt_lengths, N),
                                 gen.response_ids) * mask                       # (B, N)
    ref_logp = pm.token_logprobs(gather_response(roles.reference(seq)[0], gen.prompt_lengths, N),
                                 gen.response_ids) * mask                       # (B, N)
    roles.value.eval()
    old_values = gather_response(roles.value(seq, per_token=True), gen.prompt_lengths, N) * mask  # (B, N)
    raw_score = roles.reward(seq, gen.lengths)                                  # (B,)
    score = pm.clip_reward(raw_score, cfg.reward_clip) - cfg.no_eos_penalty * (~gen.finished).float()
    return Rollout(gen, old_logp, ref_logp, old_values, raw_score, score)


def _update(roles: PPORoles, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
            minibatch: int, generator: torch.Generator, ptx_batches: Iterator[dict[str, torch.Tensor]] | None,
            update_policy: bool) -> dict[str, list[float]]:
    """``cfg.ppo_epochs`` passes over the rollout in shuffled minibatches: policy (unless warming up the
    value model) then value updates; the EMA policy follows."""
    roles.policy.train()
    roles.value.train()
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac",
                                                     "approx_kl", "entropy", "ptx_loss")}
    gen, mask = r.gen, r.gen.response_mask
    B, N = mask.shape
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for i in range(0, B, minibatch):
            mb = order[i:i + minibatch]
            g, m = _rows(gen, mb), mask[mb]
            if update_policy:
                logits = gather_response(roles.policy(g.sequences)[0], g.prompt_lengths, N)  # (b, N, V)
                logp = pm.token_logprobs(logits, g.response_ids)                            # (b, N)
                loss, clipfrac, approx_kl = pm.policy_loss(logp, r.old_logp[mb], advantages[mb], m, cfg.clip)
                entropy = pm.masked_mean(pm.entropy_from_logits(logits), m)
                loss = loss - cfg.entropy_coef * entropy
                for k, v in (("policy_loss", loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
                             ("entropy", entropy)):
                    stats[k].append(float(v.detach()))
                if ptx_batches is not None and cfg.ptx_coef > 0:
                    ptx = next(ptx_batches)
                    _, lm_loss = roles.policy(ptx["input_ids"], ptx["targets"])
                    loss = pm.ptx_loss(loss, lm_loss, cfg.ptx_coef)
                    stats["ptx_loss"].append(float(lm_loss.detach()))
                roles.policy_step(loss)
            values = gather_response(roles.value(g.sequences, per_token=True), g.prompt_lengths, N)  # (b, N)
            v_loss, vf_clipfrac = pm.value_loss(values, r.old_values[mb], returns[mb], m, cfg.value_clip)
            roles.value_step(v_loss)
            stats["value_loss"].append(float(v_loss.detach()))
            stats["vf_clipfrac"].append(float(vf_clipfrac))
    if roles.ema is not None and update_policy:
        pm.ema_update(roles.ema, getattr(roles.policy, "module", roles.policy), cfg.ema_decay)
    return stats


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_responses(model: nn.Module, tok: TextTokenizer, prompts: Sequence[str], n: int,
                     sampling: SamplingConfig, generator: torch.Generator, batch_size: int = 128
                     ) -> list[list[str]]:
    """``n`` sampled response texts per prompt (prompts are batched by length to save forced steps)."""
    model.eval()
    jobs = sorted(((len(p), i) for i, p in enumerate(prompts) for _ in range(n)))
    encoded = {i: tok.encode(p) for i, p in enumerate(prompts)}
    out: list[list[str]] = [[] for _ in prompts]
    for s in range(0, len(jobs), batch_size):
        chunk = [i for _, i in jobs[s:s + batch_size]]
        gen = generate(model, [encoded[i] for i in chunk], sampling, generator)
        for i, ids, m in zip(chunk, gen.response_ids, gen.response_mask):
            out[i].append(tok.decode(ids[m.bool()].tolist()))
    return out


def gold_scores(prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[float]:
    """Per prompt: mean gold-judge score of its responses."""
    return [sum(instruct.judge(p, r) for r in rs) / len(rs) for p, rs in zip(prompts, responses)]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of prompts where a scores above b; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@torch.no_grad()
def reward_and_kl(policy: nn.Module, reference: nn.Module, reward: nn.Module, tok: TextTokenizer,
                  prompts: Sequence[str], sampling: SamplingConfig, generator: torch.Generator,
                  batch_size: int = 128) -> dict[str, float]:
    """Mean reward-model score and KL to the reference (nats per sequence) of the policy's samples."""
    policy.eval()
    scores, kls = [], []
    for s in range(0, len(prompts), batch_size):
        gen = generate(policy, [tok.encode(p) for p in prompts[s:s + batch_size]], sampling, generator)
        N = gen.response_mask.shape[1]
        lp = pm.token_logprobs(gather_response(policy(gen.sequences)[0], gen.prompt_lengths, N), gen.response_ids)
        ref = pm.token_logprobs(gather_response(reference(gen.sequences)[0], gen.prompt_lengths, N),
                                gen.response_ids)
        kls.append(((lp - ref) * gen.response_mask).sum(1))
        scores.append(reward(gen.sequences, gen.lengths))
    return {"reward": float(torch.cat(scores).mean()), "kl": float(torch.cat(kls).mean())}

