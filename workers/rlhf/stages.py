"""The InstructGPT stages on a job's worker group: SFT, reward model, PPO, through DeepSpeed engines.

A job of ``kind: sft | rm | ppo`` runs here instead of the pretraining loop,
on the same ranks and with the same run directory, checkpoints (manifest last,
data position inside), metrics and stop/resume behaviour. The step math is
the reference's (``workers/rlhf/reference.py``): ``sft_batch``,
``comparison_batch`` + ``ppo_math.ranking_loss``, and ``ppo_step``, with the
models wrapped in DeepSpeed engines and each rank reading its share of every
step's records (``data.sampler.ItemOrder``).

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

Datasets are files (``spec.rlhf.data``) or the built-in task, written into
``rlhf.data.dir`` by rank 0 the first time a stage needs them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from data.rlhf_files import (BuiltinDataConfig, Comparison, Demonstration, RLHFDataFiles, builtin_comparisons,
                             read_comparisons, read_demonstrations, read_prompts, write_builtin_prompts,
                             write_comparisons, write_demonstrations)
from data.sampler import DataState, ItemOrder
from models.generate import SamplingConfig
from models.heads import ScalarHeadModel
from models.transformer import Decoder
from workers import checkpoint as ckpt_lib
from workers.metrics import MetricsWriter
from workers.rlhf import ppo_math as pm
from workers.rlhf.reference import (PPOConfig, PPORoles, comparison_batch, demo_batches, encode_pair, ppo_step,
                                    reward_and_kl, sample_responses, sft_batch)
from workers.tasks import UserError, model_config, model_counts

HELDOUT_SHARE = 0.05
"""Share of a dataset held out (its tail) when no held-out file is given."""


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class StageFiles:
    """The dataset URIs of a stage; None = not given (held-out sets then come from the tail)."""

    demonstrations: str | None
    demonstrations_heldout: str | None
    comparisons: str | None
    comparisons_heldout: str | None
    prompts: str | None
    eval_prompts: str | None
    builtin: dict                       # field -> whether the built-in task writes it


def data_dir(spec, run_dir: str) -> str:
    return (spec.rlhf.data.dir or f"{run_dir.rstrip('/')}/rlhf_data").rstrip("/")


def builtin_config(spec) -> BuiltinDataConfig:
    b = spec.rlhf.data.builtin
    fields = {f.name for f in dataclasses.fields(BuiltinDataConfig)}
    return BuiltinDataConfig(**{k: v for k, v in b.model_dump().items() if k in fields})


def stage_files(spec, run_dir: str) -> StageFiles:
    d = spec.rlhf.data
    std = RLHFDataFiles.under(data_dir(spec, run_dir))
    defaults = {"demonstrations": std.sft_train, "demonstrations_heldout": f"{data_dir(spec, run_dir)}/sft_heldout.jsonl",
                "comparisons": std.rm_train, "comparisons_heldout": std.rm_heldout, "prompts": std.ppo_prompts,
                "eval_prompts": std.eval_prompts}
    chosen, builtin = {}, {}
    for name, default in defaults.items():
        source = d.source_of(name)  # a held-out set next to the user's own pool file is that file's tail
        builtin[name] = source == "builtin"
        chosen[name] = getattr(d, name) if source == "given" else default if source == "builtin" else None
    return StageFiles(**chosen, builtin=builtin)


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _check_builtin_key(spec, run_dir: str) -> None:
    """The built-in files in a folder were made with this spec's settings (rank 0)."""
    import fsspec

    key = spec.rlhf.data.builtin.model_dump(mode="json")
    uri = f"{data_dir(spec, run_dir)}/builtin.json"
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        with fs.open(path) as f:
            if json.load(f) != key:
                raise UserError(f"rlhf.data.dir: {data_dir(spec, run_dir)} holds built-in datasets made with other "
                                "rlhf.data.builtin settings; give another rlhf.data.dir (or remove that folder)")
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(key, f)


def on_rank0(rank: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 while the others wait. Collective.

    A failure on rank 0 fails every rank (a UserError as itself), so no rank
    is left waiting in a later collective for a peer that has given up.
    """
    failure: BaseException | None = None
    if rank == 0:
        try:
            fn()
        except Exception as err:  # re-raised below, after the others have heard of it
            failure = err
    box = [None if failure is None else (isinstance(failure, UserError), str(failure))]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        user, message = box[0]
        raise UserError(message) if user else RuntimeError(f"rank 0 failed: {message}")


def ensure_builtin_prompts(spec, run_dir: str, rank: int) -> StageFiles:
    """Rank 0 writes the built-in demonstrations and prompts that are missing; everyone waits. Collective."""
    files = stage_files(spec, run_dir)
    needed = [n for n in ("demonstrations", "demonstrations_heldout", "prompts", "eval_prompts") if files.builtin[n]]

    def write() -> None:
        _check_builtin_key(spec, run_dir)
        if not all(_exists(getattr(files, n)) for n in needed):
            from data import instruct

            cfg = builtin_config(spec)
            write_builtin_prompts(data_dir(spec, run_dir), cfg)
            held = instruct.demonstrations(spec.rlhf.data.builtin.n_sft_heldout, "heldout", cfg.task())
            write_demonstrations(files.demonstrations_heldout, held)

    if needed:
        on_rank0(rank, write)
    return files


def held_out_count(n_rows: int) -> int:
    """How many rows at the end of a dataset are held out when no held-out file is given."""
    return max(1, int(n_rows * HELDOUT_SHARE))


def _tail_split(rows: list, what: str) -> tuple[list, list]:
    n = held_out_count(len(rows))
    if len(rows) < 2:
        raise UserError(f"{what}: needs at least 2 rows to hold some out (or give a held-out file)")
    return rows[:-n], rows[-n:]


def _read(reader, uri: str, field: str):
    try:
        return reader(uri)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"rlhf.data.{field}: {err}") from None


def sft_data(spec, files: StageFiles) -> tuple[list[Demonstration], list[Demonstration]]:
    if files.demonstrations is None:
        raise UserError("rlhf.data.demonstrations: the sft stage needs demonstrations (or rlhf.data.builtin)")
    demos = _read(read_demonstrations, files.demonstrations, "demonstrations")
    if files.demonstrations_heldout is not None:
        return demos, _read(read_demonstrations, files.demonstrations_heldout, "demonstrations_heldout")
    return _tail_split(demos, "rlhf.data.demonstrations")


def rm_data(spec, files: StageFiles) -> tuple[list[Comparison], list[Comparison]]:
    comps = _read(read_comparisons, files.comparisons, "comparisons")
    if files.comparisons_heldout is not None:
        return comps, _read(read_comparisons, files.comparisons_heldout, "comparisons_heldout")
    return _tail_split(comps, "rlhf.data.comparisons")


def ppo_data(spec, files: StageFiles) -> tuple[list[str], list[str]]:
    prompts = _read(read_prompts, files.prompts, "prompts")
    if files.eval_prompts is not None:
        return prompts, _read(read_prompts, files.eval_prompts, "eval_prompts")
    return _tail_split(prompts, "rlhf.data.prompts")


def pair_tokens(tok, prompt: str, response: str) -> int:
    """Tokens of prompt + response + eos, as every stage lays a pair out."""
    return sum(len(x) for x in encode_pair(tok, prompt, response))


def _fitting(rows: list, lengths: Sequence[int], limit: int, what: str) -> list:
    """Rows whose token length fits the model; says how many were left out, refuses if none fit."""
    kept = [r for r, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise UserError(f"{what}: no row fits the model's {limit} tokens; raise data.seq_len or shorten the rows")
    if len(kept) < len(rows):
        print(f"[switchyard] {what}: {len(rows) - len(kept)} of {len(rows)} rows are longer than {limit} tokens "
              "and are left out", flush=True)
    return kept


# ----------------------------------------------------------------------------- held-out measures


@torch.no_grad()
def sft_heldout_sums(model, tok, demos: Sequence[Demonstration], response_only: bool, batch_size: int = 32,
                     device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(sum of token losses, target tokens) over demonstrations: the held-out SFT loss is their ratio."""
    total = count = 0.0
    for i in range(0, len(demos), batch_size):
        b = sft_batch(tok, demos[i:i + batch_size], response_only)
        n = float((b["targets"] != -100).sum())
        _, loss = model(b["input_ids"].to(device), b["targets"].to(device))
        total += float(loss) * n
        count += n
    return total, count


@torch.no_grad()
def rm_heldout_sums(model, tok, comps: Sequence[Comparison], batch_size: int = 32,
                    device: torch.device = torch.device("cpu")) -> tuple[float, float, float, float]:
    """(right pairs, pairs, sum of per-prompt ranking losses, prompts) over comparisons."""
    right = pairs = loss = 0.0
    for i in range(0, len(comps), batch_size):
        chunk = comps[i:i + batch_size]
        b = comparison_batch(tok, chunk)
        scores = model(b["input_ids"].to(device), b["lengths"].to(device))
        rewards, mask = pm.group_rewards(scores, b["index"].to(device))
        n = float(sum(pm.n_pairs(len(c.responses)) for c in chunk))
        right += float(pm.pairwise_accuracy(rewards, mask)) * n
        pairs += n
        loss += float(pm.ranking_loss(rewards, mask)) * len(chunk)
    return right, pairs, loss, float(len(comps))


def _all_sum(values: Sequence[float]) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


# ----------------------------------------------------------------------------- engines


def _train_spec(spec, **changes):
    """The spec with some train.* values replaced (per-engine batch sizes and learning rates)."""
    return spec.model_copy(update={"train": spec.train.model_copy(update=changes)})


def frozen_engine(model: torch.nn.Module, spec, zero3: bool):
    """A frozen model as a DeepSpeed inference engine (ZeRO-3 shards its parameters over the ranks)."""
    import deepspeed

    model.requires_grad_(False).eval()
    config = {"train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3 if zero3 else 0}, "bf16": {"enabled": spec.train.precision == "bf16"},
              "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _freeze_unused_lm_head(model: ScalarHeadModel) -> None:
    """A scalar-head model never reads the decoder's output layer (unless it is tied to the embeddings)."""
    if not model.decoder.cfg.tie_embeddings:
        model.decoder.lm_head.requires_grad_(False)


# ----------------------------------------------------------------------------- the loop every stage shares


@dataclass
class Env:
    ctx: object                        # workers.train_loop.RunContext
    rank: int
    world: int
    device: torch.device
    tok: object                        # data.tokenizer.TextTokenizer

    @property
    def spec(self):
        return self.ctx.spec

    @property
    def storage(self):
        return self.ctx.storage

    @property
    def run_dir(self) -> str:
        return self.ctx.run_dir


@dataclass
class Saved:
    """What a stage adds to a checkpoint beyond its main engine."""

    manifest: dict = dataclasses.field(default_factory=dict)
    others: dict = dataclasses.field(default_factory=dict)            # name -> engine
    tensor_files: dict = dataclasses.field(default_factory=dict)      # file name -> state dict (rank 0) or None
    overrides: dict = dataclasses.field(default_factory=dict)         # consolidated weights replaced


def _write_model_info(env: Env, cfg, head: str | None) -> None:
    if env.rank == 0:
        env.storage.write_json(f"{env.run_dir}/model_config.json",
                               {"model": cfg.to_dict(), "family": env.spec.model.family, "kind": "decoder",
                                "head": head, "stage": env.spec.kind, **model_counts(cfg, cfg.seq_len)})


def stage_loop(env: Env, engine, order: ItemOrder, per_step: int,
               step_fn: Callable[[int, int], dict], evaluate: Callable[[], dict],
               on_save: Callable[[], Saved] = Saved, on_resume: Callable[[ckpt_lib.CheckpointInfo], None] | None = None,
               others: dict | None = None) -> dict:
    """Resume, then ``step_fn(step, position)`` until train.steps, with metrics, checkpoints and stop requests.

    ``per_step`` records are consumed per step by all ranks together.
    """
    from workers.train_loop import _reduce_mean_dict, _step_means

    spec, storage, ctx = env.spec, env.storage, env.ctx
    total = spec.total_steps
    step, position = 0, 0
    latest = ckpt_lib.latest_checkpoint(storage, env.run_dir) if ctx.resume else None
    if latest is not None:
        if latest.manifest.get("world_size") != env.world and latest.manifest.get("zero_stage", 0) > 0:
            raise UserError(f"resources.workers: the {spec.kind} stage resumes on the number of workers it had "
                            f"({latest.manifest.get('world_size')}), got {env.world}")
        ckpt_lib.load_checkpoint(engine, storage, latest)
        for name, other in (others or {}).items():
            ckpt_lib.load_checkpoint(other, storage, latest, name=name)
        state = DataState.from_dict(latest.manifest["data"])
        try:
            order.check_resume(state)
        except ValueError as err:
            raise UserError(f"resume: {err}") from None
        step, position = latest.step, state.position
        if on_resume is not None:
            on_resume(latest)
        if step > total:
            raise UserError(f"train.steps: the stage is already at step {step}, past train.steps={total}")
    writer = MetricsWriter(storage, env.run_dir, enabled=env.rank == 0, start_step=step)
    ctx.progress.update(step=step, total=total, start_step=step, loss=None, tokens_per_s=None)
    first_loss = last_loss = None
    last_saved = step if step > 0 else -1
    t_start = time.time()

    def save(at: int) -> None:
        nonlocal last_saved
        writer.sync()
        extra = on_save()
        manifest = {"data": order.state(position).to_dict(), "spec_hash": spec.spec_hash(), "kind": spec.kind,
                    "loss": last_loss, **extra.manifest}
        ckpt_lib.save_checkpoint(engine, storage, env.run_dir, at, manifest, spec.checkpoint.consolidated,
                                 others=extra.others, tensor_files=extra.tensor_files, overrides=extra.overrides)
        last_saved = at
        ctx.progress["last_checkpoint"] = at
        if env.rank == 0:
            ckpt_lib.retain(storage, env.run_dir, spec.checkpoint.keep)

    while step < total:
        t0 = time.time()
        lr = engine.get_lr()[0]
        rows = step_fn(step, position)
        position += per_step
        step += 1
        values = _step_means([rows])
        values["stop"] = np.array([1.0 if ctx.stop.is_set() else 0.0])
        reduced = _reduce_mean_dict(values, env.device)
        loss, stop = float(reduced.pop("loss")[0]), float(reduced.pop("stop")[0])
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        ctx.progress.update(step=step, loss=loss)
        if env.rank == 0 and (step % spec.train.log_every == 0 or step == total):
            gn = engine.get_global_grad_norm()
            writer.log({"step": step, "loss": loss, "lr": lr, "grad_norm": float(gn) if gn is not None else None,
                        "records": position, "step_seconds": time.time() - t0, "elapsed": time.time() - t_start,
                        **{k: float(v[0]) for k, v in reduced.items()}})
        if stop > 0:
            break
        if step % spec.checkpoint.every == 0 or step == total:
            save(step)
    if step == total and last_saved != step:
        save(step)
    final_eval = evaluate() if step == total else None
    writer.close()
    return {"steps": step, "total": total, "stopped": step < total, "first_loss": first_loss, "final_loss": last_loss,
            "tokens_per_s": None, "final_eval": final_eval, "position": position}


def _steps_records(env: Env, micro: int) -> int:
    return micro * env.spec.train.grad_accum * env.world


# ----------------------------------------------------------------------------- SFT


def run_sft(env: Env, token_cache: str) -> dict:
    from workers.train_loop import init_config, load_init_state

    spec, tok = env.spec, env.tok
    files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
    demos, held = sft_data(spec, files)
    cfg = model_config(spec, tok.padded_vocab_size)
    init = None
    if spec.model.init_from:
        cfg, init = init_config(spec, env.storage, cfg, tok, token_cache)
    demos = _fitting(demos, [pair_tokens(tok, d.prompt, d.response) for d in demos], cfg.seq_len + 1,
                     "rlhf.data.demonstrations")
    held = _fitting(held, [pair_tokens(tok, d.prompt, d.response) for d in held], cfg.seq_len + 1,
                    "held-out demonstrations")
    _write_model_info(env, cfg, None)
    torch.manual_seed(spec.train.seed)
    model = Decoder(cfg)
    if init is not None:
        load_init_state(model, init)
    from workers.train_loop import build_engine

    engine = build_engine(model, spec)
    order = ItemOrder(len(demos), spec.train.seed)
    micro, accum, response_only = spec.train.micro_batch, spec.train.grad_accum, spec.rlhf.sft.response_only

    def step_fn(step: int, position: int) -> dict:
        idx = order.rank_indices(position, _steps_records(env, micro), env.rank, env.world)
        losses = []
        for m in range(accum):
            b = sft_batch(tok, [demos[i] for i in idx[m * micro:(m + 1) * micro]], response_only)
            _, loss = engine(b["input_ids"].to(env.device), b["targets"].to(env.device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        return {"loss": sum(losses) / len(losses)}

    def evaluate() -> dict:
        engine.eval()
        total, count = _all_sum(sft_heldout_sums(engine, tok, held[env.rank::env.world], response_only,
                                                   device=env.device))
        engine.train()
        return {"held_out_loss": total / max(count, 1.0)}

    return stage_loop(env, engine, order, _steps_records(env, micro), step_fn, evaluate)


# ----------------------------------------------------------------------------- reward model


def _sft_policy(env: Env) -> Decoder:
    """The SFT model ``model.init_from`` names, checked to use this job's tokenizer."""
    from workers.rlhf.weights import checkpoint_of, load_policy, run_tokenizer

    path = env.spec.model.init_from
    try:
        policy = load_policy(env.storage, path)
        run_dir, _ = checkpoint_of(env.storage, path)
        theirs = run_tokenizer(env.storage, run_dir)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"model.init_from: {err}") from None
    if theirs.fingerprint() != env.tok.fingerprint():
        raise UserError(f"model.init_from: {path} was trained with another tokenizer than data.tokenizer gives here; "
                        "use the SFT stage's data settings")
    if policy.cfg.vocab_size < env.tok.vocab_size:
        raise UserError(f"model.init_from: {path} has fewer embedding rows than the tokenizer has ids")
    return policy


def ensure_builtin_comparisons(env: Env, files: StageFiles, sampler_model: Decoder) -> None:
    """Built-in comparisons: K responses per prompt, part sampled from the SFT model (ranks split the
    prompts), part corrupted gold answers, ranked by the gold judge; rank 0 writes them. Collective."""
    spec = env.spec
    if not files.builtin["comparisons"] and not files.builtin["comparisons_heldout"]:
        return
    missing = [u for n, u in (("comparisons", files.comparisons), ("comparisons_heldout", files.comparisons_heldout))
               if files.builtin[n] and not _exists(u)]
    if not any(_all_sum([float(bool(missing))])):
        return
    on_rank0(env.rank, lambda: _check_builtin_key(spec, env.run_dir))
    sampling = SamplingConfig(max_new_tokens=spec.rlhf.ppo.max_new_tokens, temperature=1.0, eos_id=env.tok.eos_id,
                              pad_id=env.tok.pad_id)
    gen = torch.Generator().manual_seed(spec.train.seed * 1000 + env.rank)

    def sampler(prompts: Sequence[str], n: int) -> list[list[str]]:
        mine = sample_responses(sampler_model, env.tok, list(prompts[env.rank::env.world]), n, sampling, gen)
        parts: list = [None] * env.world
        dist.all_gather_object(parts, mine)
        out: list = [None] * len(prompts)
        for r, part in enumerate(parts):
            out[r::env.world] = part
        return out

    t0 = time.time()
    train, heldout = builtin_comparisons(builtin_config(spec), sampler)

    def write() -> None:
        if files.builtin["comparisons"]:
            write_comparisons(files.comparisons, train)
        if files.builtin["comparisons_heldout"]:
            write_comparisons(files.comparisons_heldout, heldout)
        print(f"[switchyard] built-in comparisons: {len(train)} + {len(heldout)} held out in {time.time() - t0:.0f}s",
              flush=True)

    on_rank0(env.rank, write)


def _comparison_tokens(tok, c: Comparison) -> int:
    return max(pair_tokens(tok, c.prompt, r) for r in c.responses)


def run_rm(env: Env, token_cache: str) -> dict:
    from workers.train_loop import build_engine

    spec, tok = env.spec, env.tok
    files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
    sft = _sft_policy(env)
    ensure_builtin_comparisons(env, files, sft)
    comps, held = rm_data(spec, files)
    limit = sft.cfg.seq_len
    comps = _fitting(comps, [_comparison_tokens(tok, c) for c in comps], limit, "rlhf.data.comparisons")
    held = _fitting(held, [_comparison_tokens(tok, c) for c in held], limit, "held-out comparisons")
    if files.demonstrations is not None:
        bias_demos = read_demonstrations(files.demonstrations)[:spec.rlhf.rm.n_bias]
    else:  # no demonstrations: the best-ranked response of each comparison stands in for one
        bias_demos = [Demonstration(c.prompt, c.ranked[0]) for c in comps[:spec.rlhf.rm.n_bias]]
    bias_demos = _fitting(bias_demos, [pair_tokens(tok, d.prompt, d.response) for d in bias_demos], limit,
                          "demonstrations for the reward bias")
    _write_model_info(env, sft.cfg, "scalar")
    torch.manual_seed(spec.train.seed + 1)
    rm = ScalarHeadModel(sft)
    _freeze_unused_lm_head(rm)
    engine = build_engine(rm, spec)
    order = ItemOrder(len(comps), spec.train.seed)
    micro, accum, center = spec.train.micro_batch, spec.train.grad_accum, spec.rlhf.rm.center_coef

    def step_fn(step: int, position: int) -> dict:
        idx = order.rank_indices(position, _steps_records(env, micro), env.rank, env.world)
        losses, accs = [], []
        for m in range(accum):
            b = comparison_batch(tok, [comps[i] for i in idx[m * micro:(m + 1) * micro]])
            scores = engine(b["input_ids"].to(env.device), b["lengths"].to(env.device))       # (M,)
            rewards, mask = pm.group_rewards(scores, b["index"].to(env.device))               # (P, K)
            loss = pm.ranking_loss(rewards, mask, center)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            accs.append(float(pm.pairwise_accuracy(rewards.detach(), mask)))
        return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}

    @torch.no_grad()
    def on_save() -> Saved:
        # Demonstrations score a mean of zero in the saved weights; training itself never sees the bias.
        engine.eval()
        total = count = 0.0
        for ids, lengths in demo_batches(tok, bias_demos[env.rank::env.world]):
            raw = engine(ids.to(env.device), lengths.to(env.device)) - engine.module.reward_bias
            total, count = total + float(raw.sum()), count + raw.numel()
        engine.train()
        total, count = _all_sum([total, count])
        return Saved(manifest={"reward_bias": -total / count},
                     overrides={"reward_bias": torch.tensor(-total / count, dtype=torch.float32)})

    def evaluate() -> dict:
        engine.eval()
        right, pairs, loss, prompts = _all_sum(rm_heldout_sums(engine, tok, held[env.rank::env.world], device=env.device))
        engine.train()
        return {"held_out_loss": loss / prompts, "held_out_accuracy": right / pairs}

    return stage_loop(env, engine, order, _steps_records(env, micro), step_fn, evaluate, on_save=on_save)


# ----------------------------------------------------------------------------- PPO


def ppo_config(spec, world: int) -> PPOConfig:
    """The reference's PPOConfig with this job's settings and each rank's share of the batch sizes."""
    p = spec.rlhf.ppo
    same = {f.name for f in dataclasses.fields(PPOConfig)} & set(type(p).model_fields) - {"rollout_size",
                                                                                          "minibatch_size"}
    return PPOConfig(steps=spec.train.steps, rollout_size=p.rollout_size // world,
                     minibatch_size=p.minibatch_size // world, policy_lr=spec.train.lr,
                     **{k: getattr(p, k) for k in same})


def _reward_model(env: Env) -> ScalarHeadModel:
    from workers.rlhf.weights import load_reward_model

    try:
        return load_reward_model(env.storage, env.spec.rlhf.ppo.reward_model)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"rlhf.ppo.reward_model: {err}") from None


def run_ppo(env: Env, token_cache: str) -> dict:
    from workers.train_loop import build_engine

    spec, tok, p = env.spec, env.tok, env.spec.rlhf.ppo
    files = ensure_builtin_prompts(spec, env.run_dir, env.rank)
    prompts, eval_prompts = ppo_data(spec, files)
    policy = _sft_policy(env)
    rm = _reward_model(env)
    if rm.decoder.cfg.vocab_size != policy.cfg.vocab_size:
        raise UserError("rlhf.ppo.reward_model: the reward model and the policy have different vocabularies")
    limit = policy.cfg.seq_len - p.max_new_tokens
    prompts = _fitting(prompts, [len(tok.encode(x)) for x in prompts], limit, "rlhf.data.prompts")
    eval_prompts = _fitting(eval_prompts, [len(tok.encode(x)) for x in eval_prompts], limit, "evaluation prompts")
    eval_prompts = eval_prompts[:p.eval_prompts]
    _write_model_info(env, policy.cfg, None)
    reference, value = copy.deepcopy(policy), copy.deepcopy(rm)
    ema = copy.deepcopy(policy).requires_grad_(False).eval() if p.ema_decay is not None else None
    _freeze_unused_lm_head(value)
    batch = {"micro_batch": p.minibatch_size // env.world, "grad_accum": 1, "decay": "constant", "warmup_steps": 0}
    policy_engine = build_engine(policy, _train_spec(spec, **batch))
    value_engine = build_engine(value, _train_spec(spec, **batch, lr=p.value_lr))
    ref_engine = frozen_engine(reference, spec, p.frozen_zero3)
    rm_engine = frozen_engine(rm, spec, p.frozen_zero3)
    cfg = ppo_config(spec, env.world)
    kl_ctl = (pm.FixedKLController(p.kl_beta) if p.kl_target is None else
              pm.AdaptiveKLController(p.kl_beta, p.kl_target, p.kl_horizon))
    roles = PPORoles(policy=policy_engine, value=value_engine, reference=ref_engine, reward=rm_engine,
                     policy_step=lambda loss: (policy_engine.backward(loss), policy_engine.step()),
                     value_step=lambda loss: (value_engine.backward(loss), value_engine.step()), ema=ema)
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                              eos_id=tok.eos_id, pad_id=tok.pad_id)
    order = ItemOrder(len(prompts), spec.train.seed)
    per_step = p.rollout_size // p.samples_per_prompt                          # prompts per rollout, all ranks
    ptx = _ptx_source(env, token_cache, cfg) if p.ptx_coef > 0 else None

    def step_fn(step: int, position: int) -> dict:
        idx = order.rank_indices(position, per_step, env.rank, env.world)
        gen = torch.Generator().manual_seed(spec.train.seed * 1_000_003 + step * 1009 + env.rank)
        stats = ppo_step(roles, [tok.encode(prompts[i]) for i in idx], cfg, kl_ctl, sampling, gen,
                         ptx(step) if ptx is not None else None, update_policy=step >= p.value_warmup,
                         reduce=_reduce_sum)
        stats["loss"] = stats.get("policy_loss", stats["value_loss"])
        return stats

    def on_save() -> Saved:
        from workers.checkpoint import consolidated_state_dict

        value_state = consolidated_state_dict(value_engine)                          # collective
        files = {"value.safetensors": value_state}
        if ema is not None:
            files["ema.safetensors"] = ({k: v.detach().float().clone() for k, v in ema.state_dict().items()}
                                        if env.rank == 0 else None)
        return Saved(manifest={"kl_beta": kl_ctl.beta}, others={"value": value_engine}, tensor_files=files)

    def on_resume(latest: ckpt_lib.CheckpointInfo) -> None:
        kl_ctl.beta = float(latest.manifest["kl_beta"])
        if ema is not None:
            ema.load_state_dict(ckpt_lib.load_consolidated(env.storage, latest.path, "ema.safetensors"), strict=False)

    def evaluate() -> dict:
        mine = eval_prompts[env.rank::env.world]
        gen = torch.Generator().manual_seed(spec.train.seed * 7 + env.rank)
        eval_sampling = dataclasses.replace(sampling, temperature=1.0, top_p=1.0)
        r = reward_and_kl(policy_engine, ref_engine, rm_engine, tok, mine, eval_sampling, gen) if mine else \
            {"reward": 0.0, "kl": 0.0}
        reward, kl, n = _all_sum([r["reward"] * len(mine), r["kl"] * len(mine), len(mine)])
        policy_engine.train()
        return {"reward": reward / n, "kl": kl / n, "kl_beta": kl_ctl.beta}

    return stage_loop(env, policy_engine, order, per_step, step_fn, evaluate, on_save=on_save,
                      on_resume=on_resume, others={"value": value_engine})


def _ptx_source(env: Env, token_cache: str, cfg: PPOConfig) -> Callable[[int], object]:
    """PPO-ptx batches from data.corpus: rollout ``step`` reads its own slice of the token stream, so a
    resumed stage reads what the uninterrupted one would."""
    from data.sampler import DataPlan
    from data.shards import TokenCache

    spec = env.spec
    cache = TokenCache.load(token_cache, env.storage)
    try:
        plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    except ValueError as err:
        raise UserError(f"rlhf.ppo.ptx_coef: {err}") from None
    updates = cfg.ppo_epochs * -(-cfg.rollout_size // cfg.minibatch_size)        # policy updates per rollout
    per_update = cfg.minibatch_size * env.world

    def batches(step: int):
        for u in range(updates):
            positions = plan.rank_positions((step * updates + u) * per_update, per_update, env.rank, env.world)
            x, y = plan.batch(positions)
            yield {"input_ids": torch.as_tensor(x).to(env.device), "targets": torch.as_tensor(y).to(env.device)}

    return batches


# ----------------------------------------------------------------------------- entry point


STAGES = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}


def run_stage(ctx) -> dict:
    """What a rank runs for a job of kind sft / rm / ppo (``workers.rank.RankWorker.train`` dispatches here)."""
    from data.shards import load_cached_tokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    env = Env(ctx, rank, world, device, load_cached_tokenizer(ctx.token_cache, ctx.storage))
    return STAGES[ctx.spec.kind](env, ctx.token_cache)
