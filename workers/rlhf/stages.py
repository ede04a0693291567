"""The InstructGPT stages as job kinds: SFT, reward model, PPO, through DeepSpeed engines.

A job of ``kind: sft | rm | ppo`` runs in the one training loop
(``workers/train_loop.py``) like a pretrain job, on the same ranks and with
the same run directory, checkpoints (manifest last, data position inside),
metrics and stop/resume behaviour. Each stage is a job kind
(``workers/kind.py``): it builds its models and engines, runs one step, and
says what its checkpoints hold beyond the main engine. The step math is the
step library's (``workers/rlhf/steps.py``), with the models wrapped in
DeepSpeed engines and each rank reading its share of every step's records
(``data.sampler.ItemOrder``).

* **sft**: a decoder (fresh, or ``model.init_from``) on demonstrations; loss on
  response tokens; held-out loss per checkpoint.
* **rm**: ``ScalarHeadModel`` on the SFT model; K-way ranking loss with all
  of a prompt's responses in one batch element; held-out pairwise accuracy.
  Each checkpoint's weights carry the reward bias that makes demonstrations
  score a mean of zero (computed at save time; training never sees it).
* **ppo**: policy and value engines trained, reference (SFT) and reward model
  frozen engines (``rlhf.ppo.frozen_zero3``: ZeRO-3 inference). A checkpoint
  holds both trained engines, the EMA policy, the KL coefficient and the
  prompt position; sampling seeds derive from (seed, rollout, rank), so a
  resumed stage continues as the uninterrupted one would.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch

from data.rlhf_files import Demonstration, read_demonstrations
from data.sampler import ItemOrder
from data.shards import load_cached_tokenizer
from models.generate import SamplingConfig
from models.heads import ScalarHeadModel
from models.transformer import Decoder
from specs.errors import UserError
from workers.checkpoint import CheckpointInfo, CheckpointState, consolidated_state_dict, load_consolidated
from workers.kind import RankEnv
from workers.metrics import all_sum, collective_device
from workers.parallel.engine import build_engine, frozen_engine
from workers.rlhf import ppo_math as pm
from workers.rlhf.datasets import (comparison_tokens, ensure_builtin_comparisons, ensure_builtin_prompts, fitting,
                                   pair_tokens, ppo_data, rm_data, rm_heldout_sums, sft_data, sft_heldout_sums)
from workers.rlhf.steps import (PPORoles, comparison_batch, demo_batches, kl_controller, ppo_step, reward_and_kl,
                                sft_batch)
from workers.tasks import model_config, model_counts
from workers.weights import checkpoint_of, init_config, load_init_state, load_policy, load_reward_model, run_tokenizer


# ----------------------------------------------------------------------------- what the stages share


class _StageBasics:
    """The tokenizer, the records consumed per step and the metrics fields every stage has."""

    reshards = False
    """ZeRO state is not converted for another number of workers: a stage resumes on the workers it had."""

    def __init__(self, env: RankEnv, per_step: int):
        self.env, self.spec = env, env.spec
        self.tok = load_cached_tokenizer(env.ctx.token_cache, env.storage)
        self.per_step = per_step
        self.tokens_per_step: int | None = None
        self.n_params: int | None = None
        self.others: dict = {}

    def rank_records(self, position: int) -> list[int]:
        """This rank's record indices of the step starting at global position ``position``."""
        return self.order.rank_indices(position, self.per_step, self.env.rank, self.env.world)

    def log_fields(self, position: int, seconds: float) -> dict:
        return {"records": position, "step_seconds": seconds}

    def restore(self, latest: CheckpointInfo) -> None:
        """Nothing beyond the engines and the record position (PPO overrides it)."""

    def write_model_info(self, cfg, head: str | None) -> None:
        if self.env.rank == 0:
            self.env.storage.write_json(f"{self.env.run_dir}/model_config.json",
                                        {"model": cfg.to_dict(), "family": self.spec.model.family, "kind": "decoder",
                                         "head": head, "stage": self.spec.kind, **model_counts(cfg, cfg.seq_len)})


def _train_spec(spec, **changes):
    """The spec with some train.* values replaced (per-engine batch sizes and learning rates)."""
    return spec.model_copy(update={"train": spec.train.model_copy(update=changes)})


def _freeze_unused_lm_head(model: ScalarHeadModel) -> None:
    """A scalar-head model never reads the decoder's output layer (unless it is tied to the embeddings)."""
    if not model.decoder.cfg.tie_embeddings:
        model.decoder.lm_head.requires_grad_(False)


def _sft_policy(env: RankEnv, tok) -> Decoder:
    """The SFT model ``model.init_from`` names, checked to use this job's tokenizer."""
    path = env.spec.model.init_from
    try:
        policy = load_policy(env.storage, path)
        run_dir, _ = checkpoint_of(env.storage, path)
        theirs = run_tokenizer(env.storage, run_dir)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"model.init_from: {err}") from None
    if theirs.fingerprint() != tok.fingerprint():
        raise UserError(f"model.init_from: {path} was trained with another tokenizer than data.tokenizer gives here; "
                        "use the SFT stage's data settings")
    if policy.cfg.vocab_size < tok.vocab_size:
        raise UserError(f"model.init_from: {path} has fewer embedding rows than the tokenizer has ids")
    return policy


# ----------------------------------------------------------------------------- SFT


class SFTStage(_StageBasics):
    """Supervised fine-tuning on demonstrations."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        super().__init__(env, env.spec.samples_per_step)
        spec, tok = self.spec, self.tok
        files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
        demos, held = sft_data(spec, files)
        cfg = model_config(spec, tok.padded_vocab_size)
        init = None
        if spec.model.init_from:
            cfg, init = init_config(spec, env.storage, cfg, tok, env.ctx.token_cache)
        self.demos = fitting(demos, [pair_tokens(tok, d.prompt, d.response) for d in demos], cfg.seq_len + 1,
                             "rlhf.data.demonstrations")
        self.held = fitting(held, [pair_tokens(tok, d.prompt, d.response) for d in held], cfg.seq_len + 1,
                            "held-out demonstrations")
        self.write_model_info(cfg, None)
        torch.manual_seed(spec.train.seed)
        model = Decoder(cfg)
        if init is not None:
            load_init_state(model, init)
        self.engine = build_engine(model, spec)
        self.order = ItemOrder(len(self.demos), spec.train.seed)

    def step(self, step: int, position: int) -> dict:
        idx, engine, device = self.rank_records(position), self.engine, self.env.device
        losses = []
        for s in self.spec.micro_slices:
            b = sft_batch(self.tok, [self.demos[i] for i in idx[s]], self.spec.rlhf.sft.response_only)
            _, loss = engine(b["input_ids"].to(device), b["targets"].to(device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        return {"loss": sum(losses) / len(losses)}

    def evaluate(self) -> dict:
        env = self.env
        self.engine.eval()
        total, count = all_sum(sft_heldout_sums(self.engine, self.tok, self.held[env.rank::env.world],
                                                self.spec.rlhf.sft.response_only, device=env.device))
        self.engine.train()
        return {"held_out_loss": total / max(count, 1.0)}

    def checkpoint_state(self, step: int) -> CheckpointState:
        return CheckpointState()


# ----------------------------------------------------------------------------- reward model


class RewardModelStage(_StageBasics):
    """The reward model on K-way rankings, from the SFT model."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        super().__init__(env, env.spec.samples_per_step)
        spec, tok = self.spec, self.tok
        files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
        sft = _sft_policy(env, tok)
        ensure_builtin_comparisons(env, tok, files, sft)
        comps, held = rm_data(spec, files)
        limit = sft.cfg.seq_len
        self.comps = fitting(comps, [comparison_tokens(tok, c) for c in comps], limit, "rlhf.data.comparisons")
        self.held = fitting(held, [comparison_tokens(tok, c) for c in held], limit, "held-out comparisons")
        if files.demonstrations is not None:
            bias_demos = read_demonstrations(files.demonstrations)[:spec.rlhf.rm.n_bias]
        else:  # no demonstrations: the best-ranked response of each comparison stands in for one
            bias_demos = [Demonstration(c.prompt, c.ranked[0]) for c in self.comps[:spec.rlhf.rm.n_bias]]
        self.bias_demos = fitting(bias_demos, [pair_tokens(tok, d.prompt, d.response) for d in bias_demos], limit,
                                  "demonstrations for the reward bias")
        self.write_model_info(sft.cfg, "scalar")
        torch.manual_seed(spec.train.seed + 1)
        rm = ScalarHeadModel(sft)
        _freeze_unused_lm_head(rm)
        self.engine = build_engine(rm, spec)
        self.order = ItemOrder(len(self.comps), spec.train.seed)

    def step(self, step: int, position: int) -> dict:
        idx, engine, device = self.rank_records(position), self.engine, self.env.device
        losses, accs = [], []
        for s in self.spec.micro_slices:
            b = comparison_batch(self.tok, [self.comps[i] for i in idx[s]])
            scores = engine(b["input_ids"].to(device), b["lengths"].to(device))                   # (M,)
            rewards, mask = pm.group_rewards(scores, b["index"].to(device))                       # (P, K)
            loss = pm.ranking_loss(rewards, mask, self.spec.rlhf.rm.center_coef)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            accs.append(float(pm.pairwise_accuracy(rewards.detach(), mask)))
        return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}

    @torch.no_grad()
    def checkpoint_state(self, step: int) -> CheckpointState:
        # Demonstrations score a mean of zero in the saved weights; training itself never sees the bias.
        env, engine = self.env, self.engine
        engine.eval()
        total = count = 0.0
        for ids, lengths in demo_batches(self.tok, self.bias_demos[env.rank::env.world]):
            raw = engine(ids.to(env.device), lengths.to(env.device)) - engine.module.reward_bias
            total, count = total + float(raw.sum()), count + raw.numel()
        engine.train()
        total, count = all_sum([total, count])
        return CheckpointState(manifest={"reward_bias": -total / count},
                               overrides={"reward_bias": torch.tensor(-total / count, dtype=torch.float32)})

    def evaluate(self) -> dict:
        env = self.env
        self.engine.eval()
        right, pairs, loss, prompts = all_sum(rm_heldout_sums(self.engine, self.tok, self.held[env.rank::env.world],
                                                              device=env.device))
        self.engine.train()
        return {"held_out_loss": loss / prompts, "held_out_accuracy": right / pairs}


# ----------------------------------------------------------------------------- PPO


class PPOStage(_StageBasics):
    """PPO: policy and value trained, reference and reward model frozen; one rollout per step."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        super().__init__(env, env.spec.ppo_shares.prompts_per_rollout)
        spec, tok, p = self.spec, self.tok, self.spec.rlhf.ppo
        files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
        prompts, eval_prompts = ppo_data(spec, files)
        policy = _sft_policy(env, tok)
        rm = self._reward_model()
        if rm.decoder.cfg.vocab_size != policy.cfg.vocab_size:
            raise UserError("rlhf.ppo.reward_model: the reward model and the policy have different vocabularies")
        limit = policy.cfg.seq_len - p.max_new_tokens
        self.prompts = fitting(prompts, [len(tok.encode(x)) for x in prompts], limit, "rlhf.data.prompts")
        eval_prompts = fitting(eval_prompts, [len(tok.encode(x)) for x in eval_prompts], limit, "evaluation prompts")
        self.eval_prompts = eval_prompts[:p.eval_prompts]
        self.write_model_info(policy.cfg, None)
        self._engines(policy, rm)
        self.kl_ctl = kl_controller(p)
        self.sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        self.order = ItemOrder(len(self.prompts), spec.train.seed)
        self.ptx = _ptx_source(env) if p.ptx_coef > 0 else None

    def _reward_model(self) -> ScalarHeadModel:
        try:
            return load_reward_model(self.env.storage, self.spec.rlhf.ppo.reward_model)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise UserError(f"rlhf.ppo.reward_model: {err}") from None

    def _engines(self, policy: Decoder, rm: ScalarHeadModel) -> None:
        """Policy and value engines (value from the reward model), frozen reference and reward engines."""
        spec, p = self.spec, self.spec.rlhf.ppo
        reference, value = copy.deepcopy(policy), copy.deepcopy(rm)
        self.ema = copy.deepcopy(policy).requires_grad_(False).eval() if p.ema_decay is not None else None
        _freeze_unused_lm_head(value)
        batch = {"micro_batch": spec.ppo_shares.minibatch, "grad_accum": 1, "decay": "constant", "warmup_steps": 0}
        self.engine = build_engine(policy, _train_spec(spec, **batch))
        self.value = build_engine(value, _train_spec(spec, **batch, lr=p.value_lr))
        self.others = {"value": self.value}
        self.reference = frozen_engine(reference, spec, p.frozen_zero3)
        self.reward = frozen_engine(rm, spec, p.frozen_zero3)
        policy_engine, value_engine = self.engine, self.value
        self.roles = PPORoles(policy=policy_engine, value=value_engine, reference=self.reference, reward=self.reward,
                              policy_step=lambda loss: (policy_engine.backward(loss), policy_engine.step()),
                              value_step=lambda loss: (value_engine.backward(loss), value_engine.step()),
                              ema=self.ema)

    def step(self, step: int, position: int) -> dict:
        env, spec, p = self.env, self.spec, self.spec.rlhf.ppo
        idx = self.rank_records(position)
        gen = torch.Generator().manual_seed(spec.train.seed * 1_000_003 + step * 1009 + env.rank)
        stats = ppo_step(self.roles, [self.tok.encode(self.prompts[i]) for i in idx], p, self.kl_ctl, self.sampling,
                         gen, self.ptx(step) if self.ptx is not None else None, update_policy=step >= p.value_warmup,
                         reduce=_reduce_sum, minibatch=spec.ppo_shares.minibatch)
        stats["loss"] = stats.get("policy_loss", stats["value_loss"])
        return stats

    def checkpoint_state(self, step: int) -> CheckpointState:
        files = {"value.safetensors": consolidated_state_dict(self.value)}                 # collective
        if self.ema is not None:
            files["ema.safetensors"] = ({k: v.detach().float().clone() for k, v in self.ema.state_dict().items()}
                                        if self.env.rank == 0 else None)
        return CheckpointState(manifest={"kl_beta": self.kl_ctl.beta}, others=self.others, tensor_files=files)

    def restore(self, latest: CheckpointInfo) -> None:
        self.kl_ctl.beta = float(latest.manifest["kl_beta"])
        if self.ema is not None:
            self.ema.load_state_dict(load_consolidated(self.env.storage, latest.path, "ema.safetensors"), strict=False)

    def evaluate(self) -> dict:
        env = self.env
        mine = self.eval_prompts[env.rank::env.world]
        gen = torch.Generator().manual_seed(self.spec.train.seed * 7 + env.rank)
        eval_sampling = dataclasses.replace(self.sampling, temperature=1.0, top_p=1.0)
        r = reward_and_kl(self.engine, self.reference, self.reward, self.tok, mine, eval_sampling, gen) if mine \
            else {"reward": 0.0, "kl": 0.0}
        reward, kl, n = all_sum([r["reward"] * len(mine), r["kl"] * len(mine), len(mine)])
        self.engine.train()
        return {"reward": reward / n, "kl": kl / n, "kl_beta": self.kl_ctl.beta}


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = t.detach().to(collective_device(), copy=True)  # callers pass CPU scalars too; NCCL wants the GPU
    dist.all_reduce(out)
    return out.to(t.device)


def _ptx_source(env: RankEnv) -> Callable[[int], object]:
    """PPO-ptx batches from data.corpus: rollout ``step`` reads its own slice of the token stream, so a
    resumed stage reads what the uninterrupted one would."""
    from data.sampler import DataPlan
    from data.shards import TokenCache

    spec = env.spec
    cache = TokenCache.load(env.ctx.token_cache, env.storage)
    try:
        plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    except ValueError as err:
        raise UserError(f"rlhf.ppo.ptx_coef: {err}") from None
    shares = spec.ppo_shares
    updates, per_update = shares.updates_per_rollout, shares.minibatch * env.world

    def batches(step: int):
        for u in range(updates):
            positions = plan.rank_positions((step * updates + u) * per_update, per_update, env.rank, env.world)
            x, y = plan.batch(positions)
            yield {"input_ids": torch.as_tensor(x).to(env.device), "targets": torch.as_tensor(y).to(env.device)}

    return batches
