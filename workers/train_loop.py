"""The training loop one rank runs: data -> DeepSpeed engine -> checkpoints and metrics.

The step is visible code: for each micro-batch ``task.loss(engine, batch)``
then ``engine.backward(loss)``, then ``engine.step()`` (DeepSpeed accumulates
and steps the optimizer and the LR schedule at the accumulation boundary).
A pipeline (``parallel.pp > 1``) runs the whole step as
``engine.train_batch(micro-batches)``: DeepSpeed schedules the forward and
backward passes of every micro-batch over the stages.

What differs between model kinds is a *task*: how a batch is built from the
global sample positions a rank reads, and what the loss is. ``CausalLM``
(decoders: next-token prediction) and ``MaskedLM`` (encoders: masked LM, plus
NSP for BERT or sentence order for ALBERT) are two plain classes with the
same three methods; the loop does not know which one it runs.

Parallelism is applied from outside the model, in ``build_engine``: pipeline
stages (``workers/parallel/pipeline.py``) for ``pp > 1``, DeepSpeed's expert-parallel
MoE layer (``workers/parallel/experts.py``) for ``ep > 1``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.sampler import DataPlan, DataState
from data.shards import TokenCache
from data.storage import Storage
from models.transformer import Decoder
from workers import checkpoint as ckpt_lib
from workers.parallel.deepspeed_config import deepspeed_config
from workers.metrics import MetricsWriter, detect_peak_flops



@dataclass
class RunContext:
    """What a rank needs to train: plain values that travel to the actor."""

    spec: object                     # specs.job.JobSpec
    storage: Storage
    run_dir: str
    token_cache: str                 # URI of the complete token cache folder
    resume: bool                     # continue from the latest complete checkpoint
    peak_flops: float | None = None  # per worker, for MFU
    stop: threading.Event | None = None  # made on the rank (events do not pickle)
    progress: dict | None = None


# Model building and tasks live in workers/tasks.py; re-exported for callers of this module.
from workers.tasks import (  # noqa: E402,F401
    CausalLM, MaskedLM, UserError, build_model, config_from_dict, is_encoder_config, make_task, model_config,
    model_counts, _to_device,
)


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
    """AdamW/Adam/SGD; matrices decay, vectors do not; DeepSpeed MoE experts get groups of their own."""
    t = spec.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from workers.parallel.experts import moe_param_groups

        groups = moe_param_groups(model, groups)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    if t.optimizer == "adam":
        for g in groups:
            g["weight_decay"] = 0.0
        return torch.optim.Adam(groups, lr=t.lr, betas=t.betas)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def build_engine(model: torch.nn.Module, spec, load_universal: bool = False):
    """Apply the spec's parallelism to the single-device model, then DeepSpeed.

    pp > 1: the Decoder is cut into pipeline stages holding its weights (a
    ``PipelineEngine``). ep > 1: Switch layers become DeepSpeed MoE layers with
    their experts sharded over ``ep`` ranks. Collective: every rank calls it.
    """
    import deepspeed

    p = spec.parallel
    if p.pp > 1:
        from workers.parallel.pipeline import load_decoder_state, pipeline_module

        if not isinstance(model, Decoder):
            raise UserError(f"parallel.pp: pipeline parallelism is for decoders, not {type(model).__name__}")
        state = model.state_dict()
        try:
            model = pipeline_module(model.cfg, p.pp)
        except ValueError as err:
            raise UserError(str(err)) from None
        load_decoder_state(model, state)
    elif p.ep > 1:
        from workers.parallel.experts import expert_parallel

        expert_parallel(model, p.ep)
    optimizer = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec, load_universal))
    return engine


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


# ----------------------------------------------------------------------------- weights to start from


@dataclass
class Weights:
    """Trained weights with what is needed to rebuild and describe them."""

    family: str
    config: object                   # DecoderConfig | EncoderConfig
    state: dict                      # the single-device model's state dict
    source: str                      # the checkpoint folder or Hugging Face folder read
    tokenizer_dir: str | None        # folder with the tokenizer.json the weights were trained with


def pick_checkpoint(storage: Storage, run_dir: str) -> ckpt_lib.CheckpointInfo:
    """The run's best checkpoint (best_checkpoint.json) if it is complete, else its latest complete one."""
    done = ckpt_lib.list_checkpoints(storage, run_dir)
    best_uri = f"{run_dir}/best_checkpoint.json"
    if storage.exists(best_uri):
        best = posixpath.basename(storage.read_json(best_uri).get("path", "").rstrip("/"))
        for c in done:
            if posixpath.basename(c.path.rstrip("/")) == best:
                return c
    if not done:
        raise ValueError(f"{run_dir}: no complete checkpoint (a manifest.json in checkpoints/step_*/)")
    return done[-1]


def resolve_checkpoint(storage: Storage, path: str) -> tuple[str, ckpt_lib.CheckpointInfo]:
    """(run directory, checkpoint) of a run directory (best, else latest complete checkpoint) or of one
    checkpoint folder; ValueError with a message for people when ``path`` is neither or is incomplete."""
    path = path.rstrip("/")
    if storage.exists(f"{path}/manifest.json"):
        run_dir = posixpath.dirname(posixpath.dirname(path))                        # <run>/checkpoints/step_N
        done = [c for c in ckpt_lib.list_checkpoints(storage, run_dir)
                if posixpath.basename(c.path) == posixpath.basename(path)]
        if not done:
            raise ValueError(f"{path}: the checkpoint is incomplete (its files do not match its manifest)")
        return run_dir, done[0]
    if storage.exists(f"{path}/spec.json"):
        return path, pick_checkpoint(storage, path)
    raise ValueError(f"{path}: not a run directory (spec.json) or a checkpoint folder (manifest.json)")


def run_weights(storage: Storage, path: str) -> Weights:
    """Consolidated weights of a run directory (best, else latest checkpoint) or of one checkpoint folder.

    Raises ValueError with a message for people when ``path`` is neither or lacks what is needed.
    """
    run_dir, ckpt = resolve_checkpoint(storage, path)
    if not storage.exists(f"{ckpt.path}/model.safetensors"):
        raise ValueError(f"{ckpt.path}: no consolidated model.safetensors (the run had checkpoint.consolidated: false)")
    if not storage.exists(f"{run_dir}/model_config.json"):
        raise ValueError(f"{run_dir}: no model_config.json next to the checkpoints")
    info = storage.read_json(f"{run_dir}/model_config.json")
    family = info.get("family") or storage.read_json(f"{run_dir}/spec.json")["model"]["family"]
    cfg = config_from_dict(family, info["model"])
    tok_dir = None
    if storage.exists(f"{run_dir}/data.json"):
        tok_dir = storage.read_json(f"{run_dir}/data.json").get("token_cache")
    return Weights(family, cfg, ckpt_lib.load_consolidated(storage, ckpt.path), ckpt.path, tok_dir)


def source_weights(storage: Storage, path: str) -> Weights:
    """``model.init_from``: a Hugging Face folder (config.json), a run directory or a checkpoint folder."""
    path = path.rstrip("/")
    if storage.exists(f"{path}/config.json"):
        from models.hf import import_hf_family

        family, cfg, state = import_hf_family(path, fs=storage.fs)
        return Weights(family, cfg, state, path, path)
    if not storage.exists(f"{path}/spec.json") and not storage.exists(f"{path}/manifest.json"):
        raise ValueError(f"{path}: not a Hugging Face folder (config.json), a run directory (spec.json) "
                         "or a checkpoint folder (manifest.json)")
    return run_weights(storage, path)


def storage_for(path: str, storage: Storage) -> Storage:
    """A Storage rooted at ``path``, with the run storage's options when it is on the same filesystem."""
    scheme = path.split("://")[0] if "://" in path else "file"
    same = scheme == (storage.root.split("://")[0] if "://" in storage.root else "file")
    return Storage(path, dict(storage.options) if same else {})


def _same_vocab(a: tuple[Storage, str], b: tuple[Storage, str]) -> bool:
    """Whether two tokenizer folders map the same strings to the same ids."""
    from tokenizers import Tokenizer

    vocab = [Tokenizer.from_str(st.read_text(f"{folder}/tokenizer.json")).get_vocab(with_added_tokens=True)
             for st, folder in (a, b)]
    return vocab[0] == vocab[1]


def init_config(spec, storage: Storage, cfg, tokenizer, token_cache: str) -> tuple[object, Weights]:
    """The model config when starting from ``model.init_from``: the weights' architecture.

    ``cfg`` is the spec's own config. The preset is ignored; a size the spec
    sets explicitly (d_model, n_layers, ...) must match the weights. Taken
    from the spec: dropout, the Switch routing settings (capacity factors,
    loss weights; the experts must match), and for RoPE decoders the sequence
    length (rotary tables have no weights). Refused with a message: another
    family, a tokenizer other than the one the weights were trained with,
    more token ids than embedding rows, a longer data.seq_len than a learned
    position table holds.
    """
    m = spec.model
    where = f"model.init_from: {m.init_from}"
    src_storage = storage_for(m.init_from, storage)
    try:
        w = source_weights(src_storage, m.init_from)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"model.init_from: {err}") from None
    src = w.config
    if w.family != m.family:
        raise UserError(f"model.family: {m.init_from} holds a {w.family} model; set model.family={w.family}")
    explicit = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                "n_kv_heads": m.n_kv_heads, "parallel_block": m.parallel_block, "tie_embeddings": m.tie_embeddings}
    for name, value in explicit.items():
        theirs = {"n_kv_heads": getattr(src, "kv_heads", None), "d_ff": getattr(src, "ff_dim", src.d_ff)}.get(
            name, getattr(src, name, None))
        if value is not None and value != theirs:
            raise UserError(f"model.{name}: {value}, but {m.init_from} has {theirs}; leave it out or match it")
    experts = [(c.moe.num_experts, c.moe.every) if c.moe is not None else None for c in (cfg, src)]
    if experts[0] != experts[1]:
        raise UserError("model.moe: the weights have " + ("no Switch layers" if experts[1] is None else
                        f"num_experts={experts[1][0]}, every={experts[1][1]}") + "; set model.moe to match")
    if tokenizer.vocab_size > src.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{src.vocab_size} embedding rows")
    if w.tokenizer_dir and src_storage.exists(f"{w.tokenizer_dir}/tokenizer.json") \
            and not _same_vocab((src_storage, w.tokenizer_dir), (storage, token_cache)):
        raise UserError(f"{where}: the weights were trained with another tokenizer than data.tokenizer gives "
                        "here; use the same data.tokenizer (and corpus, for bpe)")
    changes: dict = {"dropout": m.dropout, "moe": cfg.moe}
    if not is_encoder_config(src) and src.pos == "rope":
        changes["seq_len"] = spec.data.seq_len
    elif spec.data.seq_len > src.seq_len:
        raise UserError(f"data.seq_len: {spec.data.seq_len} is longer than the position table of "
                        f"{m.init_from} ({src.seq_len})")
    return dataclasses.replace(src, **changes), w


# ----------------------------------------------------------------------------- consolidated weights


def expert_state(engine, ep: int) -> dict[str, torch.Tensor] | None:
    """Collective: the model's state dict on rank 0 with DeepSpeed MoE layers back in ``SwitchMLP`` names.

    Each rank holds num_experts / ep experts; rank r of an expert-parallel
    group holds global experts r * local ... (r + 1) * local - 1.
    TODO(moe_parallel): belongs next to ``expert_parallel`` in workers/parallel/experts.py.
    """
    from deepspeed.utils import groups

    from workers.parallel.experts import DeepSpeedSwitch

    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep}")
    mine: dict[str, torch.Tensor] = {}
    for name, m in engine.module.named_modules():
        if not isinstance(m, DeepSpeedSwitch):
            continue
        local = m.cfg.num_experts // ep
        for i, expert in enumerate(m.moe.deepspeed_moe.experts.deepspeed_experts):
            for k, v in expert.state_dict().items():
                mine[f"{name}.experts.{ep_rank * local + i}.{k}"] = v.detach().float().cpu().clone()
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    out = {}
    for k, v in engine.module.state_dict().items():
        if ".moe.deepspeed_moe." not in k:
            out[k] = v.detach().float().clone()
        elif k.endswith(".moe.deepspeed_moe.gate.wg.weight"):
            out[k.replace(".moe.deepspeed_moe.gate.wg.weight", ".router.weight")] = v.detach().float().clone()
    for part in parts:
        out.update(part)
    return out


def _write_consolidated(engine, spec, storage: Storage, ckpt_path: str) -> bool:
    """Pipeline and expert-parallel engines: write model.safetensors (single-device names) into the
    checkpoint folder before ``save_checkpoint`` writes the rest and the manifest, which then lists it.
    Returns whether it did (the default consolidation handles every other engine)."""
    p = spec.parallel
    if not spec.checkpoint.consolidated or (p.pp == 1 and p.ep == 1):
        return False
    if p.pp > 1:
        from workers.parallel.pipeline import gather_decoder_state

        state = gather_decoder_state(engine)
    else:
        state = expert_state(engine, p.ep)
    if state is not None:
        staging = tempfile.mkdtemp(prefix="sy-consolidated-")
        try:
            ckpt_lib.save_safetensors(state, os.path.join(staging, "model.safetensors"))
            storage.put_dir(staging, ckpt_path)
        finally:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return True


# ----------------------------------------------------------------------------- evaluation


def _reduce_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


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


# ----------------------------------------------------------------------------- the loop


def _check_layout(spec, latest: ckpt_lib.CheckpointInfo | None, world: int) -> None:
    """DeepSpeed's pipeline and expert files are laid out per stage and expert rank: resume on the same layout."""
    if latest is None:
        return
    p, m = spec.parallel, latest.manifest
    if m.get("pp", 1) != p.pp:
        raise UserError(f"parallel.pp: the checkpoint was written by a {m.get('pp', 1)}-stage run; "
                        f"resume with parallel.pp={m.get('pp', 1)}")
    if m.get("ep", 1) != p.ep:
        raise UserError(f"parallel.ep: the checkpoint was written with ep={m.get('ep', 1)}; "
                        f"resume with parallel.ep={m.get('ep', 1)}")
    if p.pp > 1 and m.get("world_size") != world:
        raise UserError(f"resources.workers: a pipeline run resumes on the number of workers it had "
                        f"({m.get('world_size')}), got {world}")


def load_init_state(model: torch.nn.Module, w: Weights) -> None:
    """Load ``model.init_from`` weights; a tied output projection may be absent from the file."""
    missing, unexpected = model.load_state_dict(w.state, strict=False)
    tied = getattr(model.cfg, "tie_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"model.init_from: {w.source} does not match the model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")


def _step_means(rows: list[dict]) -> dict[str, np.ndarray]:
    """Mean over micro-batches of each named value (scalars and vectors)."""
    out: dict[str, np.ndarray] = {}
    for row in rows:
        for k, v in row.items():
            v = np.atleast_1d(np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=np.float64))
            out[k] = out.get(k, 0.0) + v / len(rows)
    return out


def _reduce_mean_dict(values: dict[str, np.ndarray], device) -> dict[str, np.ndarray]:
    """One all-reduce for every named value (same keys and shapes on every rank), averaged over ranks."""
    keys = sorted(values)
    flat = np.concatenate([values[k] for k in keys]) if keys else np.zeros(0)
    mean = np.asarray(_reduce_mean(flat.tolist(), device))
    out, at = {}, 0
    for k in keys:
        n = len(values[k])
        out[k] = mean[at:at + n]
        at += n
    return out


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
    latest = ckpt_lib.latest_checkpoint(storage, ctx.run_dir) if ctx.resume else None
    _check_layout(spec, latest, world)
    init = None
    if spec.model.init_from:
        if latest is not None and storage.exists(f"{ctx.run_dir}/model_config.json"):
            # Resuming: the architecture this run has been training, whatever init_from holds now.
            trained = storage.read_json(f"{ctx.run_dir}/model_config.json")["model"]
            cfg = dataclasses.replace(config_from_dict(spec.model.family, trained), dropout=spec.model.dropout)
        else:
            cfg, init = init_config(spec, storage, cfg, cache.tokenizer, ctx.token_cache)
    task = make_task(spec, cfg, plan, cache.tokenizer)
    torch.manual_seed(spec.train.seed)
    model = build_model(cfg)
    if init is not None:
        load_init_state(model, init)
    universal = latest is not None and ckpt_lib.needs_universal(latest, world)
    if universal:
        # Resuming on another number of ranks: re-partition ZeRO state through a universal checkpoint.
        if rank == 0:
            ckpt_lib.convert_to_universal(storage, latest)
        dist.barrier()
    engine = build_engine(model, spec, load_universal=universal)
    pipeline = is_pipeline(engine)
    # Which share of each step's samples this rank reads: stages of one pipeline read the same ones.
    dp_rank = engine.grid.get_data_parallel_id() if pipeline else rank

    step, position = 0, 0
    if latest is not None:
        ckpt_lib.load_checkpoint(engine, storage, latest, universal=universal)
        state = DataState.from_dict(latest.manifest["data"])
        plan.check_resume(state)
        step, position = latest.step, state.position
        if step > spec.total_steps:
            raise UserError(f"train.steps: the run is already at step {step}, past train.steps={spec.total_steps}; "
                            "resume with a larger train.steps")

    total = spec.total_steps
    G, micro, accum = spec.samples_per_step, spec.train.micro_batch, spec.train.grad_accum
    counts = model_counts(cfg, spec.data.seq_len)
    fpt = counts["flops_per_token"]
    peak = detect_peak_flops(ctx.peak_flops)
    writer = MetricsWriter(storage, ctx.run_dir, enabled=rank == 0, start_step=step)
    if rank == 0:
        storage.write_json(f"{ctx.run_dir}/model_config.json",
                           {"model": cfg.to_dict(), "family": spec.model.family,
                            "kind": "encoder" if is_encoder_config(cfg) else "decoder", **counts})
    ctx.progress.update(step=step, total=total, start_step=step, loss=None, tokens_per_s=None,
                        n_params=counts["total"])
    first_loss = last_loss = None
    tokens_per_s_hist: list[float] = []
    t_start = time.time()
    last_saved = step if ctx.resume and step > 0 else -1

    trace: list[list[int]] = []
    trace_uri = f"{ctx.run_dir}/data_trace/rank_{rank}_from_{step:08d}.json"

    def write_trace() -> None:
        storage.write_json(trace_uri, {"rank": rank, "world_size": world, "dp_rank": dp_rank, "steps": trace})

    def save(at_step: int) -> None:
        nonlocal last_saved
        writer.sync()
        if spec.data.trace:
            write_trace()
        extra = {"data": plan.state(position).to_dict(), "spec_hash": spec.spec_hash(),
                 "samples_per_step": G, "loss": last_loss, "pp": spec.parallel.pp, "ep": spec.parallel.ep}
        path = ckpt_lib.checkpoint_dir(ctx.run_dir, at_step)
        wrote = _write_consolidated(engine, spec, storage, path)
        ckpt_lib.save_checkpoint(engine, storage, ctx.run_dir, at_step, extra,
                                 spec.checkpoint.consolidated and not wrote)
        last_saved = at_step
        ctx.progress["last_checkpoint"] = at_step
        if rank == 0:
            ckpt_lib.retain(storage, ctx.run_dir, spec.checkpoint.keep)

    while step < total:
        t0 = time.time()
        positions = plan.rank_positions(position, G, dp_rank, dp)
        if spec.data.trace:
            trace.append([step + 1, positions.start, positions.stop])
        lr = engine.get_lr()[0]
        rows: list[dict] = []
        if pipeline:
            from workers.parallel.pipeline import micro_batches

            batches = [_to_device(task.batch(positions[m * micro:(m + 1) * micro]), device) for m in range(accum)]
            loss = engine.train_batch(micro_batches(batches))                           # mean over micro-batches
            rows.append({"loss": float(loss)})
        else:
            for m in range(accum):
                batch = _to_device(task.batch(positions[m * micro:(m + 1) * micro]), device)
                loss, extras = task.loss(engine, batch)
                engine.backward(loss)
                engine.step()
                rows.append({"loss": loss.item(), **extras, **_moe_stats(engine.module)})
        position += G
        step += 1
        values = _step_means(rows)
        values["stop"] = np.array([1.0 if ctx.stop.is_set() else 0.0])
        reduced = _reduce_mean_dict(values, device)
        mean_loss, any_stop = float(reduced.pop("loss")[0]), float(reduced.pop("stop")[0])
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
            for k, v in reduced.items():                 # task extras (mlm_loss) and Switch-layer stats
                row[k] = v.tolist() if k.endswith("expert_share") else float(v[0])
            writer.log(row)
        if any_stop > 0:
            break
        if step % spec.checkpoint.every == 0 or step == total:
            save(step)
    if step == total and last_saved != step:
        save(step)
    if spec.data.trace:
        write_trace()
    final_eval = evaluate_held_out(engine, task, spec, device) if step == total else None
    writer.close()
    steady = tokens_per_s_hist[len(tokens_per_s_hist) // 5:] or tokens_per_s_hist
    return {"steps": step, "total": total, "stopped": step < total, "first_loss": first_loss,
            "final_loss": last_loss, "tokens_per_s": float(np.median(steady)) if steady else None,
            "final_eval": final_eval, "position": position}


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
                out[f"moe/{i}/{k}"] = v.tolist() if hasattr(v, "tolist") else v
    return out
