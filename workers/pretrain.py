"""The pretrain job kind: language modelling on the token cache, causal or masked, dense, pipeline or MoE.

The step is visible code: for each micro-batch ``task.loss(engine, batch)``
then ``engine.backward(loss)``, then ``engine.step()`` (DeepSpeed accumulates
and steps the optimizer and the LR schedule at the accumulation boundary).
A pipeline (``parallel.pp > 1``) runs the whole step as
``engine.train_batch(micro-batches)``: DeepSpeed schedules the forward and
backward passes of every micro-batch over the stages.

What differs between model kinds is a *task* (``workers/tasks.py``): how a
batch is built from the global sample positions a rank reads, and what the
loss is. Parallelism is applied from outside the model, in
``workers/parallel/engine.py``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from data.sampler import DataPlan
from data.shards import TokenCache
from specs.errors import UserError
from workers.checkpoint import CheckpointInfo, CheckpointState
from workers.kind import RankEnv
from workers.metrics import detect_peak_flops, step_means
from workers.parallel.engine import build_engine, is_pipeline, parallel_weights
from workers.tasks import (_to_device, build_model, config_from_dict, make_task, model_config, model_counts,
                           model_kind)
from workers.weights import init_config, load_init_state


class Pretrain:
    """One rank's model, engine, task and data plan for a pretrain job."""

    reshards = True
    """Resumes on another number of workers (a universal checkpoint re-partitions the ZeRO state)."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        spec, storage = env.spec, env.storage
        self.env, self.spec = env, spec
        cache = TokenCache.load(env.ctx.token_cache, storage)
        try:
            self.order = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
        except ValueError as err:
            raise UserError(str(err)) from None
        cfg, init = self._config(cache.tokenizer, latest)
        self.task = make_task(spec, cfg, self.order, cache.tokenizer)
        torch.manual_seed(spec.train.seed)
        model = build_model(cfg)
        if init is not None:
            load_init_state(model, init)
        self.engine = build_engine(model, spec, load_universal=universal)
        self.others: dict = {}
        self.pipeline = is_pipeline(self.engine)
        # Which share of each step's samples this rank reads: stages of one pipeline read the same ones.
        self.dp_rank = self.engine.grid.get_data_parallel_id() if self.pipeline else env.rank
        counts = model_counts(cfg, spec.data.seq_len, spec.data.noising)
        self.flops_per_token, self.n_params = counts["flops_per_token"], counts["total"]
        self.per_step = spec.samples_per_step
        self.tokens_per_step = spec.samples_per_step * spec.data.seq_len
        self.peak = detect_peak_flops(env.ctx.peak_flops)
        if env.rank == 0:
            storage.write_json(f"{env.run_dir}/model_config.json",
                               {"model": cfg.to_dict(), "family": spec.model.family,
                                "kind": model_kind(cfg), **counts})
        start = latest.step if latest is not None else 0
        self.trace: list[list[int]] = []
        self.trace_uri = f"{env.run_dir}/data_trace/rank_{env.rank}_from_{start:08d}.json"

    def _config(self, tokenizer, latest: CheckpointInfo | None):
        """(model config, ``init_from`` weights or None)."""
        spec, storage, run_dir = self.spec, self.env.storage, self.env.run_dir
        cfg = model_config(spec, tokenizer.padded_vocab_size)
        if not spec.model.init_from:
            return cfg, None
        if latest is not None and storage.exists(f"{run_dir}/model_config.json"):
            # Resuming: the architecture this run has been training, whatever init_from holds now.
            trained = storage.read_json(f"{run_dir}/model_config.json")["model"]
            return dataclasses.replace(config_from_dict(spec.model.family, trained), dropout=spec.model.dropout), None
        return init_config(spec, storage, cfg, tokenizer, self.env.ctx.token_cache)

    def step(self, step: int, position: int) -> dict:
        spec, engine, device = self.spec, self.engine, self.env.device
        positions = self.order.rank_positions(position, spec.samples_per_step, self.dp_rank, spec.dp)
        if spec.data.trace:
            self.trace.append([step + 1, positions.start, positions.stop])
            self.env.storage.write_json(self.trace_uri, {"rank": self.env.rank, "world_size": self.env.world,
                                                         "dp_rank": self.dp_rank, "steps": self.trace})
        batches = [_to_device(self.task.batch(positions[s]), device) for s in spec.micro_slices]
        if self.pipeline:
            from workers.parallel.pipeline import micro_batches

            return step_means([{"loss": float(engine.train_batch(micro_batches(batches)))}])  # mean over micro
        rows = []
        for batch in batches:  # no host sync in here: values stay tensors until the step's one all-reduce
            loss, extras = self.task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            rows.append({"loss": loss.detach(), **extras, **_moe_stats(engine.module)})
        return step_means(rows)

    def log_fields(self, position: int, seconds: float) -> dict:
        tps = self.tokens_per_step / seconds
        out = {"tokens": position * self.spec.data.seq_len, "tokens_per_s": tps,
               "flops_per_s": tps * self.flops_per_token}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / (self.peak * self.env.world)
        return out

    def evaluate(self) -> dict | None:
        return evaluate_held_out(self.engine, self.task, self.spec, self.env.device)

    def checkpoint_state(self, step: int) -> CheckpointState:
        p = self.spec.parallel
        state = CheckpointState(manifest={"samples_per_step": self.spec.samples_per_step, "pp": p.pp, "ep": p.ep})
        if self.spec.checkpoint.consolidated and (p.pp > 1 or p.ep > 1):
            # Pipeline and expert-parallel modules do not hold single-device names: gather them (collective).
            state.tensor_files["model.safetensors"] = parallel_weights(self.engine, self.spec)
            state.consolidate_engine = False
        return state

    def restore(self, latest: CheckpointInfo) -> None:
        """Nothing beyond the engine and the data position."""


def evaluate_held_out(engine, task, spec, device) -> dict | None:
    """Mean held-out loss over eval.batches batches (MLM loss for encoders); every rank takes part.

    Ranks split the batches, except under expert parallelism (the all-to-all
    needs every rank in every forward) and in a pipeline (every stage runs
    the same micro-batches; partial batches are left out: stage buffers have
    one shape).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = spec.train.micro_batch
    if is_pipeline(engine):
        from workers.parallel.pipeline import micro_batches

        batches = [b for b in (task.held_out(i, micro) for i in range(spec.eval.batches))
                   if b is not None and len(b["idx"]) == micro]
        if not batches:
            return None
        loss = float(engine.eval_batch(micro_batches(_to_device(b, device) for b in batches),
                                       num_micro_batches=len(batches)))
        return {"held_out_loss": loss, "held_out_ppl": math.exp(min(loss, 50))}
    split = spec.parallel.ep == 1
    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for i in (range(rank, spec.eval.batches, world) if split else range(spec.eval.batches)):
            batch = task.held_out(i, micro)
            if batch is None:
                break
            batch = _to_device(batch, device)
            n = len(next(iter(batch.values())))
            loss, extras = task.loss(engine, batch)
            total += extras.get("mlm_loss", float(loss)) * n
            count += n
    engine.train()
    s = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(s)
    if s[1] == 0:
        return None
    loss = float(s[0] / s[1])
    return {"held_out_loss": loss, "held_out_ppl": math.exp(min(loss, 50))}


def _moe_stats(module) -> dict:
    """Switch-layer stats of the last forward, per block: ``moe/<block>/expert_share`` (N,), ``.../dropped``, ...

    Decoders and encoders both keep their blocks in ``.blocks`` (an ALBERT
    encoder's one shared block reports its last application).
    """
    out = {}
    for i, block in enumerate(getattr(module, "blocks", [])):
        stats = getattr(block.mlp, "stats", None)
        if stats:
            for k, v in stats.items():
                out[f"moe/{i}/{k}"] = v.detach() if torch.is_tensor(v) else v
    return out
