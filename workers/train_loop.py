"""The training loop one rank runs: data -> DeepSpeed engine -> checkpoints and metrics.

The step is visible code: for each micro-batch ``engine(x, y)`` then
``engine.backward(loss)``, then ``engine.step()`` (DeepSpeed accumulates and
steps the optimizer and the LR schedule at the accumulation boundary).
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from data.sampler import DataPlan, DataState
from data.shards import TokenCache
from data.storage import Storage
from models.transformer import Decoder, DecoderConfig, decoder_config, flops_per_token, param_counts
from workers import checkpoint as ckpt_lib
from workers.deepspeed_config import deepspeed_config
from workers.metrics import MetricsWriter, detect_peak_flops


class UserError(Exception):
    """A failure a restart cannot fix (bad spec value found at run time, missing data)."""


@dataclass
class RunContext:
    """What a rank needs to train: plain values that travel to the actor."""

    spec: object                     # orchestrator.spec.JobSpec
    storage: Storage
    run_dir: str
    token_cache: str                 # URI of the complete token cache folder
    resume: bool                     # continue from the latest complete checkpoint
    peak_flops: float | None = None  # per worker, for MFU
    stop: threading.Event | None = None  # made on the rank (events do not pickle)
    progress: dict | None = None


def model_config(spec, vocab_size: int) -> DecoderConfig:
    m = spec.model
    if not m.is_decoder:
        raise UserError(f"model.family: {m.family} trains with the encoder loop, not the decoder loop")
    moe = None
    if m.moe is not None:
        from models.moe import SwitchConfig

        moe = SwitchConfig(**m.moe.model_dump())
    try:
        return decoder_config(
            m.family, m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len, d_model=m.d_model,
            n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_ff=m.d_ff,
            parallel_block=m.parallel_block, tie_embeddings=m.tie_embeddings, dropout=m.dropout, moe=moe)
    except ValueError as err:
        raise UserError(f"model: {err}") from None


def lr_lambda(spec):
    """Multiplier on the peak LR: linear warm-up, then cosine/linear/constant decay to min_lr_ratio."""
    t = spec.train
    total, warm, floor = spec.total_steps, t.warmup_steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.decay == "constant" or total <= warm:
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.decay == "cosine" else 1 - frac
        return floor + (1 - floor) * shape

    return f


def make_optimizer(model: torch.nn.Module, spec) -> torch.optim.Optimizer:
    t = spec.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    if t.optimizer == "adam":
        for g in groups:
            g["weight_decay"] = 0.0
        return torch.optim.Adam(groups, lr=t.lr, betas=t.betas)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def build_engine(model: torch.nn.Module, spec, load_universal: bool = False):
    import deepspeed

    if spec.parallel.pp > 1:
        raise UserError("parallel.pp: pipeline parallelism is not available in this build; set parallel.pp=1")
    optimizer = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec, load_universal))
    return engine


def _reduce_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def evaluate_held_out(engine, plan: DataPlan, spec, device) -> dict | None:
    """Mean held-out loss over eval.batches batches (all ranks take part; ranks split the batches)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for i in range(rank, spec.eval.batches, world):
            batch = plan.held_out_batch(i, spec.train.micro_batch)
            if batch is None:
                break
            x, y = (torch.from_numpy(a).to(device) for a in batch)
            _, loss = engine(x, y)
            total += float(loss) * len(x)
            count += len(x)
    engine.train()
    s = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(s)
    if s[1] == 0:
        return None
    loss = float(s[0] / s[1])
    return {"held_out_loss": loss, "held_out_ppl": math.exp(min(loss, 50))}


def train(ctx: RunContext) -> dict:
    spec, storage = ctx.spec, ctx.storage
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dp = spec.dp

    cache = TokenCache.load(ctx.token_cache, storage)
    try:
        plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    cfg = model_config(spec, cache.tokenizer.padded_vocab_size)
    torch.manual_seed(spec.train.seed)
    model = Decoder(cfg)
    latest = ckpt_lib.latest_checkpoint(storage, ctx.run_dir) if ctx.resume else None
    universal = latest is not None and ckpt_lib.needs_universal(latest, world)
    if universal:
        # Resuming on another number of ranks: re-partition ZeRO state through a universal checkpoint.
        if rank == 0:
            ckpt_lib.convert_to_universal(storage, latest)
        dist.barrier()
    engine = build_engine(model, spec, load_universal=universal)

    step, position = 0, 0
    if latest is not None:
        ckpt_lib.load_checkpoint(engine, storage, latest, universal=universal)
        state = DataState.from_dict(latest.manifest["data"])
        plan.check_resume(state)
        step, position = latest.step, state.position

    total = spec.total_steps
    G, micro = spec.samples_per_step, spec.train.micro_batch
    fpt = flops_per_token(cfg, spec.data.seq_len)["with_attention"]
    peak = detect_peak_flops(ctx.peak_flops)
    writer = MetricsWriter(storage, ctx.run_dir, enabled=rank == 0)
    if rank == 0:
        storage.write_json(f"{ctx.run_dir}/model_config.json", {"model": cfg.to_dict(), **param_counts(cfg)})
    counts = param_counts(cfg)
    ctx.progress.update(step=step, total=total, start_step=step, loss=None, tokens_per_s=None,
                        n_params=counts["total"])
    first_loss = last_loss = None
    tokens_per_s_hist: list[float] = []
    t_start = time.time()
    last_saved = step if ctx.resume and step > 0 else -1

    trace: list[list[int]] = []
    trace_uri = f"{ctx.run_dir}/data_trace/rank_{rank}_from_{step:08d}.json"

    def save(at_step: int) -> None:
        nonlocal last_saved
        writer.sync()
        if spec.data.trace:
            storage.write_json(trace_uri, {"rank": rank, "world_size": world, "steps": trace})
        extra = {"data": plan.state(position).to_dict(), "spec_hash": spec.spec_hash(),
                 "samples_per_step": G, "loss": last_loss}
        ckpt_lib.save_checkpoint(engine, storage, ctx.run_dir, at_step, extra, spec.checkpoint.consolidated)
        last_saved = at_step
        ctx.progress["last_checkpoint"] = at_step
        if rank == 0:
            protect = set()
            best_uri = f"{ctx.run_dir}/best_checkpoint.json"
            if storage.exists(best_uri):
                protect.add(storage.read_json(best_uri).get("path", ""))
            ckpt_lib.apply_retention(storage, ctx.run_dir, spec.checkpoint.keep, protect)

    while step < total:
        t0 = time.time()
        positions = plan.rank_positions(position, G, rank, dp)
        if spec.data.trace:
            trace.append([step + 1, positions.start, positions.stop])
        losses = []
        lr = engine.get_lr()[0]
        for m in range(spec.train.grad_accum):
            x, y = (torch.from_numpy(a).to(device) for a in plan.batch(positions[m * micro:(m + 1) * micro]))
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        position += G
        step += 1
        stop_flag = 1.0 if ctx.stop.is_set() else 0.0
        mean_loss, any_stop = _reduce_mean([sum(losses) / len(losses), stop_flag], device)
        dt = time.time() - t0
        tps = G * spec.data.seq_len / dt
        tokens_per_s_hist.append(tps)
        first_loss = mean_loss if first_loss is None else first_loss
        last_loss = mean_loss
        ctx.progress.update(step=step, loss=mean_loss, tokens_per_s=tps)
        if rank == 0 and (step % spec.train.log_every == 0 or step == total):
            gn = engine.get_global_grad_norm()
            row = {"step": step, "loss": mean_loss, "lr": lr,
                   "grad_norm": float(gn) if gn is not None else None,
                   "tokens": position * spec.data.seq_len, "tokens_per_s": tps,
                   "flops_per_s": tps * fpt, "elapsed": time.time() - t_start}
            if peak:
                row["mfu"] = tps * fpt / (peak * world)
            moe = _moe_stats(engine.module)
            if moe:
                row.update(moe)
            writer.log(row)
        if any_stop > 0:
            break
        if step % spec.checkpoint.every == 0 or step == total:
            save(step)
    if step == total and last_saved != step:
        save(step)
    if spec.data.trace:
        storage.write_json(trace_uri, {"rank": rank, "world_size": world, "steps": trace})
    final_eval = evaluate_held_out(engine, plan, spec, device) if step == total else None
    writer.close()
    steady = tokens_per_s_hist[len(tokens_per_s_hist) // 5:] or tokens_per_s_hist
    return {"steps": step, "total": total, "stopped": step < total, "first_loss": first_loss,
            "final_loss": last_loss, "tokens_per_s": float(np.median(steady)) if steady else None,
            "final_eval": final_eval, "position": position}


def _moe_stats(module) -> dict:
    out = {}
    for i, block in enumerate(getattr(module, "blocks", [])):
        stats = getattr(block.mlp, "stats", None)
        if stats:
            for k, v in stats.items():
                out[f"moe/{i}/{k}"] = v.tolist() if hasattr(v, "tolist") else v
    return out
