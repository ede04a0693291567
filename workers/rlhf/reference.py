"""InstructGPT in one process with plain PyTorch: SFT -> reward model -> PPO, then a report.

This is the reference the distributed pipeline is checked against and the
place to find hyper-parameters on a laptop: it trains a tiny byte-level
decoder on the built-in instruction task (``data.instruct``), whose gold
judge ranks the comparisons and referees the result.

The stages are step functions over plain modules: ``sft_step``, ``rm_step``
and ``ppo_step`` take the model(s), a batch and a ``StepFn`` that turns a loss
into an update. Here a StepFn is ``optimizer_step(opt, params)`` (backward,
clip, step); inside a DeepSpeed worker it is
``lambda loss: (engine.backward(loss), engine.step())`` and the engine is
passed as the model (``engine(...)`` is a module call). ``ppo_step`` reads as
the four phases generate, score, advantages, update, each timed.

Run it (the report lands in ``<run-dir>/report.json``)::

    python -m workers.rlhf.reference --run-dir /tmp/rlhf-ref
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import fsspec
import torch
import torch.nn as nn

from data import instruct
from data.rlhf_files import (BuiltinDataConfig, Comparison, Demonstration, read_comparisons, read_demonstrations,
                             read_prompts, write_builtin_comparisons, write_builtin_prompts)
from data.tokenizer import TextTokenizer, byte_tokenizer
from models.generate import Generation, SamplingConfig, gather_response, generate
from models.heads import ScalarHeadModel
from models.transformer import IGNORE_INDEX, Decoder, decoder_config
from workers.rlhf import ppo_math as pm

StepFn = Callable[[torch.Tensor], None]
"""Turns a loss into one update: backward, (clip), optimizer step. Injected so DeepSpeed can replace it."""


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations (from scratch here: the tiny model has no pretraining)."""

    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 32
    """Demonstrations per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 50
    """Warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    response_only: bool = True
    """Loss on response tokens only (InstructGPT); False = on the whole sequence."""


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training on K-way rankings, initialised from the SFT model."""

    epochs: float = 6.0
    """Passes over the ranked comparisons."""
    batch_size: int = 16
    """Prompts per step; all K responses of a prompt go in the same step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 20
    """Warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    center_coef: float = 0.1
    """Weight of the reward-centring term (ppo_math.ranking_loss); 0 = the plain InstructGPT loss."""
    n_bias: int = 512
    """Demonstrations used to set the reward bias (mean demonstration reward = 0)."""


@dataclass(frozen=True)
class PPOConfig:
    """PPO against the frozen reward model, with a KL penalty to the frozen SFT reference."""

    steps: int = 100
    """Rollouts (each is one batch of prompts, then ppo_epochs of updates)."""
    rollout_size: int = 128
    """Sequences per rollout: rollout_size / samples_per_prompt prompts."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt in a rollout (InstructGPT: 1)."""
    loo_baseline: bool = True
    """Subtract from each score the mean score of its prompt's other samples (needs samples_per_prompt > 1)."""
    minibatch_size: int = 64
    """Sequences per policy/value update."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    value_warmup: int = 10
    """First rollouts train only the value model, so advantages start from a fitted baseline."""
    policy_lr: float = 1e-4
    """Policy AdamW learning rate (Adam turns noisy policy gradients into full-size steps: keep it small)."""
    value_lr: float = 1e-3
    """Value-model AdamW learning rate."""
    clip: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip around the rollout's values."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_beta: float = 0.1
    """Initial KL coefficient beta (InstructGPT: 0.02, on a differently scaled reward)."""
    kl_target: float | None = 3.0
    """Target KL in nats per sequence for the adaptive controller; None = fixed beta."""
    kl_horizon: int = 2000
    """Adaptive controller horizon in samples (Ziegler et al.)."""
    reward_clip: float = 5.0
    """Clamp reward-model scores to +-this before the KL penalty (0 = off)."""
    no_eos_penalty: float = 1.0
    """Subtracted from the score of a response cut at max_new_tokens (no eos)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    ptx_coef: float = 0.0
    """PPO-ptx gamma: weight of the LM loss on ptx batches (0 = plain PPO)."""
    ema_decay: float = 0.992
    """EMA of policy weights (InstructGPT: 0.992); evaluated alongside the policy."""
    max_new_tokens: int = 40
    """Longest response."""
    temperature: float = 1.0
    """Rollout sampling temperature (1.0 keeps rollouts on-policy)."""
    whiten_advantages: bool = True
    """Normalise advantages over each rollout."""

    def __post_init__(self) -> None:
        if self.rollout_size % self.samples_per_prompt:
            raise ValueError(f"ppo.rollout_size ({self.rollout_size}) must be a multiple of "
                             f"ppo.samples_per_prompt ({self.samples_per_prompt})")
        if self.loo_baseline and self.samples_per_prompt < 2:
            raise ValueError("ppo.loo_baseline needs ppo.samples_per_prompt >= 2")
        if not 0 < self.minibatch_size <= self.rollout_size:
            raise ValueError(f"ppo.minibatch_size must be in 1..rollout_size, got {self.minibatch_size}")
        if self.steps <= self.value_warmup:
            raise ValueError(f"ppo.steps ({self.steps}) must exceed ppo.value_warmup ({self.value_warmup})")


# Families of data.instruct the reference trains on. Left out: sort, max and
# initials, whose answers the tiny reward model could not check (held-out
# pairwise accuracy ~0.6-0.75 on them), so PPO learned to exploit it there.
REFERENCE_FAMILIES = ("reverse", "add", "upper", "count", "repeat")


@dataclass(frozen=True)
class ReferenceConfig:
    """One reference run."""

    run_dir: str = "/tmp/switchyard-rlhf-ref"
    """Where datasets, checkpoints and report.json go (any fsspec URI)."""
    family: str = "llama"
    """Decoder family (models.transformer.FAMILIES)."""
    preset: str = "tiny"
    """Decoder size (models.transformer.PRESETS)."""
    data: BuiltinDataConfig = BuiltinDataConfig(families=REFERENCE_FAMILIES)
    """The built-in datasets: sizes, families, demonstration noise, comparison make-up."""
    sft: SFTConfig = SFTConfig()
    """SFT stage."""
    rm: RMConfig = RMConfig()
    """Reward-model stage."""
    ppo: PPOConfig = PPOConfig()
    """PPO stage."""
    eval_samples: int = 4
    """Responses per evaluation prompt and policy; per-prompt scores are their mean."""
    seed: int = 0
    """Seed of weights, batches and sampling."""
    reuse: bool = True
    """Reuse a stage's checkpoint in run_dir when its config is unchanged."""


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


def ppo_step(roles: PPORoles, prompt_ids: Sequence[Sequence[int]], cfg: PPOConfig, kl_ctl,
             sampling: SamplingConfig, generator: torch.Generator,
             ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None, update_policy: bool = True,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One PPO iteration: generate, score, advantages, update. Returns stats and seconds per phase.

    ``prompt_ids`` holds distinct prompts; each is sampled
    ``cfg.samples_per_prompt`` times. ``update_policy=False`` trains only the
    value model (value warmup). With data parallelism each rank passes its
    own prompts and ``reduce`` (a sum over ranks): advantages are whitened
    and the KL controller steered with whole-rollout statistics.
    """
    timer = PhaseTimer()
    with timer("generate"):
        roles.policy.eval()
        repeated = [p for p in prompt_ids for _ in range(cfg.samples_per_prompt)]   # groups stay consecutive
        gen = generate(roles.policy, repeated, sampling, generator)
    seq, mask = gen.sequences, gen.response_mask                                # (B, L), (B, N)
    N = mask.shape[1]

    with timer("score"), torch.no_grad():
        old_logp = pm.token_logprobs(gather_response(roles.policy(seq)[0], gen.prompt_lengths, N),
                                     gen.response_ids) * mask                   # (B, N)
        ref_logp = pm.token_logprobs(gather_response(roles.reference(seq)[0], gen.prompt_lengths, N),
                                     gen.response_ids) * mask                   # (B, N)
        roles.value.eval()
        old_values = gather_response(roles.value(seq, per_token=True), gen.prompt_lengths, N) * mask  # (B, N)
        raw_score = roles.reward(seq, gen.lengths)                              # (B,)
        score = pm.clip_reward(raw_score, cfg.reward_clip) - cfg.no_eos_penalty * (~gen.finished).float()

    with timer("advantages"):
        if cfg.loo_baseline:
            score = pm.leave_one_out_scores(score, cfg.samples_per_prompt)
        rewards, kl = pm.kl_penalized_rewards(score, old_logp, ref_logp, mask, kl_ctl.beta)
        advantages, returns = pm.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask, reduce=reduce)

    with timer("update"):
        roles.policy.train()
        roles.value.train()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac",
                                                         "approx_kl", "entropy", "ptx_loss")}
        B = seq.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=generator)
            for i in range(0, B, cfg.minibatch_size):
                mb = order[i:i + cfg.minibatch_size]
                g, m = _rows(gen, mb), mask[mb]
                if update_policy:
                    logits = gather_response(roles.policy(g.sequences)[0], g.prompt_lengths, N)  # (b, N, V)
                    logp = pm.token_logprobs(logits, g.response_ids)                        # (b, N)
                    loss, clipfrac, approx_kl = pm.policy_loss(logp, old_logp[mb], advantages[mb], m, cfg.clip)
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
                v_loss, vf_clipfrac = pm.value_loss(values, old_values[mb], returns[mb], m, cfg.value_clip)
                roles.value_step(v_loss)
                stats["value_loss"].append(float(v_loss.detach()))
                stats["vf_clipfrac"].append(float(vf_clipfrac))
        if roles.ema is not None and update_policy:
            pm.ema_update(roles.ema, getattr(roles.policy, "module", roles.policy), cfg.ema_decay)

    seq_kl = kl.sum(1).mean()                                                   # nats per sequence
    if reduce is not None:
        seq_kl = reduce(seq_kl.double().reshape(1))[0] / reduce(torch.ones(1, dtype=torch.float64))[0]
    seq_kl = float(seq_kl)
    beta = kl_ctl.beta
    if update_policy:  # during value warmup the policy is the reference: nothing to steer
        kl_ctl.update(seq_kl, B if reduce is None else int(reduce(torch.tensor([float(B)]))[0]))
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out.update(score=float(raw_score.mean()), kl=seq_kl, beta=beta, response_len=float(mask.sum(1).mean()),
               finished=float(gen.finished.float().mean()))
    out.update({f"t_{k}": v for k, v in timer.seconds.items()})
    return out


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


# ----------------------------------------------------------------------------- the run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checkpoint(cfg: ReferenceConfig, name: str, stage_cfg: dict, model: nn.Module, train: Callable[[], dict]
                ) -> dict:
    """Load ``name``.pt from run_dir if it was trained with this exact config, else train and save it."""
    uri = f"{cfg.run_dir.rstrip('/')}/{name}.pt"
    fs, path = fsspec.core.url_to_fs(uri)
    key = json.dumps(stage_cfg, sort_keys=True, default=str)
    if cfg.reuse and fs.exists(path):
        with fs.open(path, "rb") as f:
            saved = torch.load(f, map_location="cpu", weights_only=False)
        if saved["key"] == key:
            model.load_state_dict(saved["state"])
            _log(f"[{name}] reused {uri}")
            return saved["stats"]
    stats = train()
    with fs.open(path, "wb") as f:
        torch.save({"key": key, "state": model.state_dict(), "stats": stats}, f)
    return stats


def run_reference(cfg: ReferenceConfig) -> dict:
    """SFT -> RM -> PPO on the built-in task; returns (and writes) the report."""
    t_start = time.perf_counter()
    # One random stream per stage, so reusing a stage's checkpoint leaves the later stages unchanged.
    rng = {stage: random.Random(f"{cfg.seed}:{stage}") for stage in ("sft", "rm", "ppo")}
    gens = {stage: torch.Generator().manual_seed(cfg.seed * 100 + i) for i, stage in enumerate(("cmp", "ppo", "eval"))}
    tok = byte_tokenizer()
    model_cfg = decoder_config(cfg.family, cfg.preset, vocab_size=tok.padded_vocab_size)
    eval_sampling = SamplingConfig(max_new_tokens=cfg.ppo.max_new_tokens, temperature=1.0, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id)
    report: dict = {"config": dataclasses.asdict(cfg), "seconds": {}}

    # Datasets go to the run directory and come back through the same loaders as a user's files.
    files = write_builtin_prompts(cfg.run_dir, cfg.data)
    demos = read_demonstrations(files.sft_train)
    ppo_prompts = read_prompts(files.ppo_prompts)
    eval_prompts = read_prompts(files.eval_prompts)

    # --- SFT
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    sft = Decoder(model_cfg)

    def train_sft() -> dict:
        opt = adamw(sft, cfg.sft.lr, cfg.sft.weight_decay)
        step = optimizer_step(opt, sft.parameters(), schedule=warmup_cosine(opt, cfg.sft.warmup, cfg.sft.steps))
        losses = []
        for i in range(cfg.sft.steps):
            batch = sft_batch(tok, rng["sft"].sample(demos, cfg.sft.batch_size), cfg.sft.response_only)
            losses.append(sft_step(sft, batch, step)["loss"])
            if (i + 1) % 100 == 0:
                _log(f"[sft] step {i + 1}/{cfg.sft.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
        return {"final_loss": sum(losses[-50:]) / len(losses[-50:])}

    sft_data = {k: getattr(cfg.data, k) for k in ("n_sft", "seed", "families", "demo_noise")}
    report["sft"] = _checkpoint(cfg, "sft", {"model": model_cfg.to_dict(), "sft": dataclasses.asdict(cfg.sft),
                                             "data": sft_data, "seed": cfg.seed}, sft, train_sft)
    report["seconds"]["sft"] = time.perf_counter() - t0

    # --- reward model
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    rm = ScalarHeadModel(copy.deepcopy(sft))

    def sft_sampler(prompts: Sequence[str], n: int) -> list[list[str]]:
        return sample_responses(sft, tok, prompts, n, eval_sampling, gens["cmp"])

    def train_rm() -> dict:
        # Comparisons: half SFT samples, half corrupted gold answers, ranked by the judge.
        t_cmp = time.perf_counter()
        files = write_builtin_comparisons(cfg.run_dir, cfg.data, sampler=sft_sampler)
        rm_train, rm_heldout = read_comparisons(files.rm_train), read_comparisons(files.rm_heldout)
        t_cmp = time.perf_counter() - t_cmp
        steps = int(cfg.rm.epochs * len(rm_train) / cfg.rm.batch_size)
        opt = adamw(rm, cfg.rm.lr, cfg.rm.weight_decay)
        step = optimizer_step(opt, rm.parameters(), schedule=warmup_cosine(opt, cfg.rm.warmup, steps))
        order: list[Comparison] = []
        accs = []
        for i in range(steps):
            if len(order) < cfg.rm.batch_size:
                order += rng["rm"].sample(rm_train, len(rm_train))
            chunk, order = order[:cfg.rm.batch_size], order[cfg.rm.batch_size:]
            accs.append(rm_step(rm, comparison_batch(tok, chunk), step, cfg.rm.center_coef)["accuracy"])
            if (i + 1) % 50 == 0:
                _log(f"[rm] step {i + 1}/{steps} train acc {sum(accs[-50:]) / len(accs[-50:]):.3f}")
        rm.set_reward_bias(demo_batches(tok, demos[:cfg.rm.n_bias]))
        return {"steps": steps, "train_accuracy": sum(accs[-50:]) / len(accs[-50:]),
                "heldout": rm_accuracy(rm, tok, rm_heldout), "reward_bias": float(rm.reward_bias),
                "comparisons_seconds": t_cmp}

    report["rm"] = _checkpoint(cfg, "rm", {"sft": report["sft"], "rm": dataclasses.asdict(cfg.rm),
                                           "data": dataclasses.asdict(cfg.data)}, rm, train_rm)
    report["seconds"]["rm"] = time.perf_counter() - t0
    _log(f"[rm] held-out accuracy {report['rm']['heldout']['accuracy']:.3f}")

    # --- PPO
    t0 = time.perf_counter()
    policy, reference, value = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(rm)
    ema = copy.deepcopy(sft)
    for frozen in (reference, rm, ema):
        frozen.requires_grad_(False).eval()
    p_opt, v_opt = adamw(policy, cfg.ppo.policy_lr), adamw(value, cfg.ppo.value_lr)
    roles = PPORoles(policy=policy, value=value, reference=reference, reward=rm,
                     policy_step=optimizer_step(p_opt, policy.parameters()),
                     value_step=optimizer_step(v_opt, value.parameters()), ema=ema)
    kl_ctl = (pm.FixedKLController(cfg.ppo.kl_beta) if cfg.ppo.kl_target is None else
              pm.AdaptiveKLController(cfg.ppo.kl_beta, cfg.ppo.kl_target, cfg.ppo.kl_horizon))
    rollout_sampling = dataclasses.replace(eval_sampling, temperature=cfg.ppo.temperature)

    def ptx_stream() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield sft_batch(tok, rng["ppo"].sample(demos, cfg.ppo.minibatch_size))

    def train_ppo() -> dict:
        history = []
        for i in range(cfg.ppo.steps):
            prompts = rng["ppo"].sample(ppo_prompts, cfg.ppo.rollout_size // cfg.ppo.samples_per_prompt)
            stats = ppo_step(roles, [tok.encode(p) for p in prompts], cfg.ppo, kl_ctl, rollout_sampling, gens["ppo"],
                             ptx_stream() if cfg.ppo.ptx_coef > 0 else None, update_policy=i >= cfg.ppo.value_warmup)
            history.append(stats)
            if (i + 1) % 5 == 0:
                _log(f"[ppo] step {i + 1}/{cfg.ppo.steps} score {stats['score']:.3f} kl {stats['kl']:.3f} "
                     f"beta {stats['beta']:.4f} len {stats['response_len']:.1f} "
                     f"value_loss {stats['value_loss']:.3f} clipfrac {stats.get('clipfrac', 0.0):.3f}")
        last = history[-10:]  # (past the value warmup: the defaults keep steps > value_warmup + 10)
        phases = {k: sum(h[k] for h in history) for k in history[0] if k.startswith("t_")}
        return {"last10": {k: sum(h[k] for h in last) / len(last) for k in last[0]}, "phase_seconds": phases,
                "first_score": history[0]["score"]}

    report["ppo"] = _checkpoint(cfg, "ppo", {"rm": report["rm"], "ppo": dataclasses.asdict(cfg.ppo)},
                                nn.ModuleDict({"policy": policy, "ema": ema}), train_ppo)
    report["seconds"]["ppo"] = time.perf_counter() - t0

    # --- evaluation on held-out prompts, gold judge
    t0 = time.perf_counter()
    eval_gen = gens["eval"]

    def gold(model: nn.Module) -> list[float]:
        return gold_scores(eval_prompts, sample_responses(model, tok, eval_prompts, cfg.eval_samples,
                                                          eval_sampling, eval_gen))

    sft_scores, ppo_scores, ema_scores = gold(sft), gold(policy), gold(ema)
    by_family: dict[str, list[list[float]]] = {}
    for prompt, a, b in zip(eval_prompts, sft_scores, ppo_scores):
        by_family.setdefault(instruct.parse(prompt)[0], []).append([a, b])
    report["eval"] = {
        "prompts": len(eval_prompts),
        "samples_per_prompt": cfg.eval_samples,
        "rm_heldout_accuracy": report["rm"]["heldout"]["accuracy"],
        "sft_gold": sum(sft_scores) / len(sft_scores),
        "ppo_gold": sum(ppo_scores) / len(ppo_scores),
        "ppo_win_rate_vs_sft": win_rate(ppo_scores, sft_scores),
        "ema_gold": sum(ema_scores) / len(ema_scores),
        "ema_win_rate_vs_sft": win_rate(ema_scores, sft_scores),
        "gold_by_family": {f: {"sft": sum(x for x, _ in v) / len(v), "ppo": sum(y for _, y in v) / len(v),
                               "prompts": len(v)} for f, v in sorted(by_family.items())},
        "sft": reward_and_kl(sft, reference, rm, tok, eval_prompts, eval_sampling, eval_gen),
        "ppo": reward_and_kl(policy, reference, rm, tok, eval_prompts, eval_sampling, eval_gen),
    }
    report["seconds"]["eval"] = time.perf_counter() - t0
    report["seconds"]["total"] = time.perf_counter() - t_start
    fs, path = fsspec.core.url_to_fs(f"{cfg.run_dir.rstrip('/')}/report.json")
    with fs.open(path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=ReferenceConfig.run_dir)
    ap.add_argument("--preset", default=ReferenceConfig.preset)
    ap.add_argument("--family", default=ReferenceConfig.family)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-steps", type=int, default=SFTConfig.steps)
    ap.add_argument("--ppo-steps", type=int, default=PPOConfig.steps)
    ap.add_argument("--no-reuse", action="store_true", help="retrain every stage even if a checkpoint matches")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ReferenceConfig(run_dir=args.run_dir, family=args.family, preset=args.preset, seed=args.seed,
                          sft=SFTConfig(steps=args.sft_steps), ppo=PPOConfig(steps=args.ppo_steps),
                          reuse=not args.no_reuse)
    report = run_reference(cfg)
    print(json.dumps({"eval": report["eval"], "seconds": report["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
