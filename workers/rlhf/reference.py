"""InstructGPT in one process with plain PyTorch: SFT -> reward model -> PPO, then a report.

This is the reference the distributed pipeline is checked against and the
place to find hyper-parameters on a laptop: it trains a tiny byte-level
decoder on the built-in instruction task (``data.instruct``), whose gold
judge ranks the comparisons and referees the result. The steps are the step
library's (``workers/rlhf/steps.py``), with ``optimizer_step`` as the update;
PPO takes the same ``PPOConfig`` a job spec's ``rlhf.ppo`` holds.

Run it (the report lands in ``<run-dir>/report.json``)::

    python -m workers.rlhf.reference --run-dir /tmp/rlhf-ref
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import fsspec
import torch
import torch.nn as nn

from data import instruct
from data.rlhf_files import (BuiltinDataConfig, Comparison, read_comparisons, read_demonstrations, read_prompts,
                             write_builtin_comparisons, write_builtin_prompts)
from data.tokenizer import byte_tokenizer
from models.generate import SamplingConfig
from models.heads import ScalarHeadModel
from models.transformer import Decoder, decoder_config
from workers.rlhf.ppo_config import PPOConfig
from workers.rlhf.steps import (PPORoles, adamw, comparison_batch, demo_batches, gold_scores, kl_controller,
                                optimizer_step, ppo_step, reward_and_kl, rm_accuracy, rm_step, sample_responses,
                                sft_batch, sft_step, warmup_cosine, win_rate)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


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
    """PPO stage: the job spec's rlhf.ppo settings."""
    ppo_steps: int = 100
    """PPO rollouts (each is one batch of prompts, then ppo_epochs of updates)."""
    ppo_lr: float = 1e-4
    """Policy AdamW learning rate (Adam turns noisy policy gradients into full-size steps: keep it small)."""
    eval_samples: int = 4
    """Responses per evaluation prompt and policy; per-prompt scores are their mean."""
    seed: int = 0
    """Seed of weights, batches and sampling."""
    reuse: bool = True
    """Reuse a stage's checkpoint in run_dir when its config is unchanged."""

    def __post_init__(self) -> None:
        if self.ppo_steps <= self.ppo.value_warmup:
            raise ValueError(f"ppo_steps ({self.ppo_steps}) must exceed ppo.value_warmup ({self.ppo.value_warmup})")

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                **{k: dataclasses.asdict(getattr(self, k)) for k in ("data", "sft", "rm")}, "ppo": self.ppo.model_dump()}


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What the stages of one reference run share."""

    cfg: ReferenceConfig
    tok: object
    rng: dict                              # stage -> random.Random: reusing a stage leaves the later ones unchanged
    gens: dict                             # phase -> torch.Generator
    eval_sampling: SamplingConfig
    demos: list


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
            log.info("[%s] reused %s", name, uri)
            return saved["stats"]
    stats = train()
    with fs.open(path, "wb") as f:
        torch.save({"key": key, "state": model.state_dict(), "stats": stats}, f)
    return stats


def _sft(run: Run, sft: Decoder) -> dict:
    cfg = run.cfg

    def train() -> dict:
        opt = adamw(sft, cfg.sft.lr, cfg.sft.weight_decay)
        step = optimizer_step(opt, sft.parameters(), schedule=warmup_cosine(opt, cfg.sft.warmup, cfg.sft.steps))
        losses = []
        for i in range(cfg.sft.steps):
            batch = sft_batch(run.tok, run.rng["sft"].sample(run.demos, cfg.sft.batch_size), cfg.sft.response_only)
            losses.append(sft_step(sft, batch, step)["loss"])
            if (i + 1) % 100 == 0:
                log.info("[sft] step %d/%d loss %.4f", i + 1, cfg.sft.steps, sum(losses[-100:]) / len(losses[-100:]))
        return {"final_loss": sum(losses[-50:]) / len(losses[-50:])}

    data = {k: getattr(cfg.data, k) for k in ("n_sft", "seed", "families", "demo_noise")}
    return _checkpoint(cfg, "sft", {"model": sft.cfg.to_dict(), "sft": dataclasses.asdict(cfg.sft), "data": data,
                                    "seed": cfg.seed}, sft, train)


def _rm(run: Run, sft: Decoder, rm: ScalarHeadModel, sft_stats: dict) -> dict:
    cfg, tok = run.cfg, run.tok

    def sft_sampler(prompts: Sequence[str], n: int) -> list[list[str]]:
        return sample_responses(sft, tok, prompts, n, run.eval_sampling, run.gens["cmp"])

    def train() -> dict:
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
                order += run.rng["rm"].sample(rm_train, len(rm_train))
            chunk, order = order[:cfg.rm.batch_size], order[cfg.rm.batch_size:]
            accs.append(rm_step(rm, comparison_batch(tok, chunk), step, cfg.rm.center_coef)["accuracy"])
            if (i + 1) % 50 == 0:
                log.info("[rm] step %d/%d train acc %.3f", i + 1, steps, sum(accs[-50:]) / len(accs[-50:]))
        rm.set_reward_bias(demo_batches(tok, run.demos[:cfg.rm.n_bias]))
        return {"steps": steps, "train_accuracy": sum(accs[-50:]) / len(accs[-50:]),
                "heldout": rm_accuracy(rm, tok, rm_heldout), "reward_bias": float(rm.reward_bias),
                "comparisons_seconds": t_cmp}

    return _checkpoint(cfg, "rm", {"sft": sft_stats, "rm": dataclasses.asdict(cfg.rm),
                                   "data": dataclasses.asdict(cfg.data)}, rm, train)


def _ppo(run: Run, roles: PPORoles, ppo_prompts: list[str], rm_stats: dict) -> dict:
    cfg, tok, p = run.cfg, run.tok, run.cfg.ppo
    kl_ctl = kl_controller(p)
    rollout_sampling = dataclasses.replace(run.eval_sampling, temperature=p.temperature)
    shares = p.shares(1)

    def ptx_stream() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield sft_batch(tok, run.rng["ppo"].sample(run.demos, shares.minibatch))

    def train() -> dict:
        history = []
        for i in range(cfg.ppo_steps):
            prompts = run.rng["ppo"].sample(ppo_prompts, shares.prompts_per_rollout)
            stats = ppo_step(roles, [tok.encode(x) for x in prompts], p, kl_ctl, rollout_sampling, run.gens["ppo"],
                             ptx_stream() if p.ptx_coef > 0 else None, update_policy=i >= p.value_warmup)
            history.append(stats)
            if (i + 1) % 5 == 0:
                log.info("[ppo] step %d/%d score %.3f kl %.3f beta %.4f len %.1f value_loss %.3f clipfrac %.3f",
                         i + 1, cfg.ppo_steps, stats["score"], stats["kl"], stats["beta"], stats["response_len"],
                         stats["value_loss"], stats.get("clipfrac", 0.0))
        last = history[-10:]  # (past the value warmup: the defaults keep steps > value_warmup + 10)
        phases = {k: sum(h[k] for h in history) for k in history[0] if k.startswith("t_")}
        return {"last10": {k: sum(h[k] for h in last) / len(last) for k in last[0]}, "phase_seconds": phases,
                "first_score": history[0]["score"]}

    key = {"rm": rm_stats, "ppo": {**p.model_dump(), "steps": cfg.ppo_steps, "policy_lr": cfg.ppo_lr}}
    return _checkpoint(cfg, "ppo", key, nn.ModuleDict({"policy": roles.policy, "ema": roles.ema}), train)


def _evaluate(run: Run, sft: Decoder, roles: PPORoles, eval_prompts: list[str], rm_accuracy_: float) -> dict:
    """Gold-judge scores and win rates on held-out prompts; reward-model score and KL of SFT and PPO."""
    cfg, tok, gen = run.cfg, run.tok, run.gens["eval"]

    def gold(model: nn.Module) -> list[float]:
        return gold_scores(eval_prompts, sample_responses(model, tok, eval_prompts, cfg.eval_samples,
                                                          run.eval_sampling, gen))

    sft_scores, ppo_scores, ema_scores = gold(sft), gold(roles.policy), gold(roles.ema)
    by_family: dict[str, list[list[float]]] = {}
    for prompt, a, b in zip(eval_prompts, sft_scores, ppo_scores):
        by_family.setdefault(instruct.parse(prompt)[0], []).append([a, b])
    return {
        "prompts": len(eval_prompts),
        "samples_per_prompt": cfg.eval_samples,
        "rm_heldout_accuracy": rm_accuracy_,
        "sft_gold": sum(sft_scores) / len(sft_scores),
        "ppo_gold": sum(ppo_scores) / len(ppo_scores),
        "ppo_win_rate_vs_sft": win_rate(ppo_scores, sft_scores),
        "ema_gold": sum(ema_scores) / len(ema_scores),
        "ema_win_rate_vs_sft": win_rate(ema_scores, sft_scores),
        "gold_by_family": {f: {"sft": sum(x for x, _ in v) / len(v), "ppo": sum(y for _, y in v) / len(v),
                               "prompts": len(v)} for f, v in sorted(by_family.items())},
        "sft": reward_and_kl(sft, roles.reference, roles.reward, tok, eval_prompts, run.eval_sampling, gen),
        "ppo": reward_and_kl(roles.policy, roles.reference, roles.reward, tok, eval_prompts, run.eval_sampling, gen),
    }


def run_reference(cfg: ReferenceConfig) -> dict:
    """SFT -> RM -> PPO on the built-in task; returns (and writes) the report."""
    t_start = time.perf_counter()
    tok = byte_tokenizer()
    run = Run(cfg, tok, rng={stage: random.Random(f"{cfg.seed}:{stage}") for stage in ("sft", "rm", "ppo")},
              gens={s: torch.Generator().manual_seed(cfg.seed * 100 + i) for i, s in enumerate(("cmp", "ppo", "eval"))},
              eval_sampling=SamplingConfig(max_new_tokens=cfg.ppo.max_new_tokens, temperature=1.0, eos_id=tok.eos_id,
                                           pad_id=tok.pad_id), demos=[])
    report: dict = {"config": cfg.to_dict(), "seconds": {}}
    # Datasets go to the run directory and come back through the same loaders as a user's files.
    files = write_builtin_prompts(cfg.run_dir, cfg.data)
    run.demos = read_demonstrations(files.sft_train)

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    sft = Decoder(decoder_config(cfg.family, cfg.preset, vocab_size=tok.padded_vocab_size))
    report["sft"] = _sft(run, sft)
    report["seconds"]["sft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    rm = ScalarHeadModel(copy.deepcopy(sft))
    report["rm"] = _rm(run, sft, rm, report["sft"])
    report["seconds"]["rm"] = time.perf_counter() - t0
    log.info("[rm] held-out accuracy %.3f", report["rm"]["heldout"]["accuracy"])

    t0 = time.perf_counter()
    policy, reference, value, ema = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(rm), copy.deepcopy(sft)
    for frozen in (reference, rm, ema):
        frozen.requires_grad_(False).eval()
    p_opt, v_opt = adamw(policy, cfg.ppo_lr), adamw(value, cfg.ppo.value_lr)
    roles = PPORoles(policy=policy, value=value, reference=reference, reward=rm,
                     policy_step=optimizer_step(p_opt, policy.parameters()),
                     value_step=optimizer_step(v_opt, value.parameters()), ema=ema)
    report["ppo"] = _ppo(run, roles, read_prompts(files.ppo_prompts), report["rm"])
    report["seconds"]["ppo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report["eval"] = _evaluate(run, sft, roles, read_prompts(files.eval_prompts), report["rm"]["heldout"]["accuracy"])
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
    ap.add_argument("--ppo-steps", type=int, default=ReferenceConfig.ppo_steps)
    ap.add_argument("--no-reuse", action="store_true", help="retrain every stage even if a checkpoint matches")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    cfg = ReferenceConfig(run_dir=args.run_dir, family=args.family, preset=args.preset, seed=args.seed,
                          sft=SFTConfig(steps=args.sft_steps), ppo_steps=args.ppo_steps, reuse=not args.no_reuse)
    report = run_reference(cfg)
    print(json.dumps({"eval": report["eval"], "seconds": report["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
