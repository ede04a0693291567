"""The one training loop every job kind runs on a rank: resume, steps, metrics, checkpoints, stop, final eval.

A job kind (``workers/kind.py``: pretrain, sft, rm, ppo) builds its models
and engines and runs one step; the loop does the rest, the same way for each
kind, in the shape of torchtitan's ``Trainer.train``::

    kind = KINDS[spec.kind](env, latest, universal)     # models, engines, data
    step, position = resume(...)                        # engines + data position + kind state
    while step < total:
        values = kind.step(step, position)              # engine.backward / engine.step inside
        ... all-reduce values, the stop flag and "checkpoint written", log a metrics row
        checkpointer.publish_if_written(...)            # the save in flight, once every rank wrote it
        if checkpointer.due(step, last_step=...): save(step)
    checkpointer.wait()                                 # the last save published before the final eval
    kind.evaluate()                                     # when the run reached train.steps

The checkpointer (``workers/checkpoint.py``) owns when to save, retention and
the resume layout (another number of workers, pipeline and expert layouts); a
save copies the state to host memory and its files are written while the next
steps train.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from data.sampler import DataState
from specs.errors import UserError
from workers.checkpoint import CheckpointInfo, Checkpointer, storage_fault
from workers import phases
from workers.kind import JobKind, RankEnv, RunContext
from workers.metrics import MetricsWriter, reduce_mean_dict, step_means

log = logging.getLogger(__name__)


def _kinds() -> dict:
    """``spec.kind`` -> the kind's class (imported here: the stages pull in the RLHF stack)."""
    from workers.classify import Classify
    from workers.distill import Distill
    from workers.pretrain import Pretrain
    from workers.rlhf.stages import PPOStage, RewardModelStage, SFTStage

    return {"pretrain": Pretrain, "sft": SFTStage, "rm": RewardModelStage, "ppo": PPOStage, "classify": Classify,
            "distill": Distill}


@dataclass
class LoopState:
    """What the loop tracks between steps."""

    step: int = 0
    position: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    tokens_per_s: list[float] = field(default_factory=list)


def train(ctx: RunContext) -> dict:
    """What every rank runs for a job of any kind (``workers.rank.RankWorker.train``); returns the result."""
    env = RankEnv.current(ctx)
    spec = env.spec
    builder = _kinds()[spec.kind]
    checkpointer = Checkpointer(spec, env.storage, env.run_dir, env.rank, env.world, attempt=ctx.attempt)
    latest = checkpointer.resume_point() if ctx.resume else None   # checksums checked; a bad one is skipped
    universal = checkpointer.resume_layout(latest, builder.reshards)
    if universal:
        checkpointer.prepare_universal(latest)
    startup = phases.for_rank(env.rank, env.storage, env.run_dir)   # rank 0 records; run, status, logs show
    startup.enter("building_engines", f"{spec.kind}, ZeRO-{spec.parallel.zero_stage}, {env.world} rank(s)")
    kind = builder(env, latest, universal)
    state = LoopState()
    if latest is not None:
        startup.enter("loading_checkpoint", latest.path)
        state.step, state.position = resume(kind, checkpointer, latest, universal, spec.total_steps)
        state.first_loss = latest.manifest.get("first_loss")  # the run's, not this attempt's (older: None)
    startup.enter("first_step", f"step {state.step + 1}")
    try:
        return run(env, kind, checkpointer, state)
    except OSError as err:  # the storage refused a write (metrics, logs): fail with that reason, no restart
        fault = storage_fault(err, env.run_dir, checkpointer.intact)
        if fault is None:
            raise
        raise fault from None


def resume(kind: JobKind, checkpointer: Checkpointer, latest: CheckpointInfo, universal: bool,
           total: int) -> tuple[int, int]:
    """Collective: the kind's engines, its data position and extra state from ``latest``; (step, position)."""
    try:
        checkpointer.load(latest, kind.engine, kind.others, universal)
    except RuntimeError as err:  # torch's load_state_dict: a model of another shape (a requeue's --set model.*)
        mismatch = _state_dict_mismatch(err)
        if mismatch is None:
            raise
        raise UserError(f"resume: the checkpoint at step {latest.step} is of a model of another shape ({mismatch}); "
                        "resume with the model fields it was written with, or start a new job") from None
    data = DataState.from_dict(latest.manifest["data"])
    try:
        kind.order.check_resume(data)
    except ValueError as err:
        raise UserError(f"resume: {err}") from None
    kind.restore(latest)
    if latest.step > total:
        raise UserError(f"train.steps: the run is already at step {latest.step}, past train.steps={total}; "
                        "resume with a larger train.steps")
    log.info("resumed from %s (step %d, position %d)", latest.path, latest.step, data.position)
    return latest.step, data.position


def _state_dict_mismatch(err: RuntimeError) -> str | None:
    """The first line of what torch's ``load_state_dict`` found wrong (a size, a missing or unexpected key)."""
    lines = [line.strip() for line in str(err).splitlines()]
    if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
        return None
    return next((line.rstrip(".") for line in lines[1:] if line), lines[0])


def run(env: RankEnv, kind: JobKind, checkpointer: Checkpointer, state: LoopState) -> dict:
    """Steps until train.steps or a stop request, with metrics rows and checkpoints; then the final eval."""
    spec, ctx = env.spec, env.ctx
    total = spec.total_steps
    writer = MetricsWriter(env.storage, env.run_dir, enabled=env.rank == 0, start_step=state.step)
    ctx.progress.update(step=state.step, total=total, start_step=state.step, loss=None, tokens_per_s=None)
    if kind.n_params is not None:
        ctx.progress["n_params"] = kind.n_params
    t_start = time.time()

    def save() -> None:
        if env.rank == 0 and checkpointer.is_current():  # a zombie never overwrites the metrics (remote storage)
            writer.sync()
        manifest = {"data": kind.order.state(state.position).to_dict(), "spec_hash": spec.spec_hash(),
                    "kind": spec.kind, "loss": state.last_loss, "first_loss": state.first_loss}
        checkpointer.save(state.step, kind.engine, manifest, kind.checkpoint_state(state.step))
        ctx.progress["last_checkpoint"] = state.step
        saved.append(state.step)

    saved: list[int] = []

    while state.step < total:
        t0 = time.time()
        lr = kind.engine.get_lr()[0]
        values = step_means([kind.step(state.step, state.position)])
        state.position += kind.per_step
        state.step += 1
        values["stop"] = np.array([1.0 if ctx.stop.is_set() else 0.0])
        values["checkpoint_written"] = np.array([1.0 if checkpointer.written() else 0.0])
        reduced = reduce_mean_dict(values, env.device)
        loss, stop = float(reduced.pop("loss")[0]), float(reduced.pop("stop")[0])
        checkpointer.publish_if_written(float(reduced.pop("checkpoint_written")[0]) == 1.0)  # same on every rank
        seconds = time.time() - t0
        tps = kind.tokens_per_step / seconds if kind.tokens_per_step else None
        if tps is not None:
            state.tokens_per_s.append(tps)
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.last_loss = loss
        ctx.progress.update(step=state.step, loss=loss, tokens_per_s=tps)
        phases.for_rank(env.rank, env.storage, env.run_dir).stepped()   # the first step ends start-up
        if env.rank == 0 and (state.step % spec.train.log_every == 0 or state.step == total):
            writer.log(_row(kind, state, loss, lr, reduced, seconds, time.time() - t_start))
        if stop > 0:  # preemption, cancel or Ctrl-C: every step done so far is kept
            save()
            break
        if checkpointer.due(state.step, last_step=state.step == total):
            save()
    if state.step == total and state.step not in saved and checkpointer.due(state.step, last_step=True):
        save()                                          # stopped right at the last step
    checkpointer.wait()
    final_eval = kind.evaluate() if state.step == total else None
    writer.close()
    return _result(state, total, final_eval)


def _row(kind: JobKind, state: LoopState, loss: float, lr: float, reduced: dict, seconds: float,
         elapsed: float) -> dict:
    """One metrics row: the loop's fields, the kind's, then the step's named values (Switch-layer shares
    are vectors)."""
    gn = kind.engine.get_global_grad_norm()
    row = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": float(gn) if gn is not None else None,
           **kind.log_fields(state.position, seconds), "elapsed": elapsed}
    for k, v in reduced.items():
        row[k] = v.tolist() if k.endswith("expert_share") else float(v[0])
    return row


def _result(state: LoopState, total: int, final_eval: dict | None) -> dict:
    steady = state.tokens_per_s[len(state.tokens_per_s) // 5:] or state.tokens_per_s
    return {"steps": state.step, "total": total, "stopped": state.step < total, "first_loss": state.first_loss,
            "final_loss": state.last_loss, "tokens_per_s": float(np.median(steady)) if steady else None,
            "final_eval": final_eval, "position": state.position}
