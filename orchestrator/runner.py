"""Run one job to completion, blocking: what ``switchyard run`` does.

spec -> run directory -> placement group + rank actors -> token cache ->
torch.distributed -> training (progress bar) -> result. The controller
(``orchestrator.controller``) drives the same ``JobRun`` steps without blocking.
"""
from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass

import ray

from data.shards import TokenSource
from data.storage import Storage
from orchestrator.preflight import preflight
from specs.errors import UsageError, root_cause
from specs.job import JobSpec, validate_spec
from workers.checkpoint import begin_attempt, current_attempt
from workers import phases
from workers.kind import RunContext
from workers.resources import worker_resources
from workers.worker_group import PlacementTimeout, WorkerGroup, WorkerResources


def new_job_id() -> str:
    return f"sy-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def storage_of(cluster) -> Storage:
    """The storage jobs use, carrying cluster.yaml's read/write roots to the ranks (specs.paths)."""
    roots = cluster.path_roots() if hasattr(cluster, "path_roots") else None
    return Storage(cluster.storage, dict(cluster.storage_options), roots=roots)


def feasible(res: WorkerResources) -> str | None:
    """None if the cluster could ever hold the job's bundles, else why not."""
    from orchestrator.ray_cluster import cluster_resources

    nodes = cluster_resources()
    per_node = sorted((n["total"]["CPU"], n["total"]["GPU"]) for n in nodes.values())
    # Greedy count of how many bundles fit on an empty cluster.
    fit = sum(int(min(c // res.cpus if res.cpus else 1 << 30, g // res.gpus if res.gpus else 1 << 30))
              for c, g in per_node)
    if fit >= res.workers:
        return None
    total_cpu = sum(c for c, _ in per_node)
    total_gpu = sum(g for _, g in per_node)
    return (f"resources: the job needs {res.workers} workers x {res.cpus:g} CPU"
            + (f" + {res.gpus:g} GPU" if res.gpus else "")
            + f" but the cluster has {total_cpu:g} CPUs and {total_gpu:g} GPUs on {len(per_node)} node(s); "
              "lower resources.workers or resources.cpus_per_worker")


@dataclass
class JobRun:
    """One attempt of a job on a worker group."""

    spec: JobSpec
    storage: Storage
    run_dir: str
    resources: WorkerResources
    peak_flops: float | None = None
    owner: str = "run"
    """Who runs the attempts: "controller" or "run" (``switchyard run``), recorded in attempt.json."""
    job_id: str | None = None
    group: WorkerGroup | None = None
    refs: list | None = None
    workers: list | None = None
    started: float | None = None
    """When this attempt began (its start-up record is kept from then; None: at ``start``)."""

    def _phase(self, phase: str, detail: str = "") -> None:
        """Record the start-up phase this attempt is in (``workers/phases.py``; run, status and logs show it)."""
        rec = phases.read(self.storage, self.run_dir)
        fresh = rec is None or rec.get("started", 0) < (self.started or time.time()) - 1.0
        phases.enter(self.storage, self.run_dir, phase, detail, fresh=fresh)
        self.started = self.started or time.time()

    def start(self, resume: bool, reserve_timeout_s: float | None = 120.0, warm: WorkerGroup | None = None,
              pooled: list | None = None) -> None:
        """Place the gang (or take over a warm one, or warm pool members), build the token cache, start
        training on every rank."""
        if warm is not None:
            self._phase("reusing_gang", f"{self.resources.workers} rank process(es) of the previous job")
            self.group = warm
            self.workers = warm.reattach(self.run_dir)
        elif pooled:
            self._phase("starting_workers", f"{self.resources.workers} idle rank process(es) of the warm pool")
            self.group = WorkerGroup(self.resources, self.run_dir, self.storage, name=self.spec.name)
            self.workers = self.group.adopt(pooled)
        else:
            self._phase("waiting_for_gang", gang_wait_detail(self.resources, reserve_timeout_s))
            self.group = WorkerGroup(self.resources, self.run_dir, self.storage, name=self.spec.name)
            if not self.group.reserve(reserve_timeout_s):
                self.group.shutdown()
                raise PlacementTimeout(f"resources: could not place {self.resources.workers} workers within "
                                       f"{reserve_timeout_s:g}s; is another job holding the cluster?")
            self._phase("starting_workers", f"{self.resources.workers} rank process(es)")
            self.workers = self.group.start()
        self._phase("preparing_data", f"{self.spec.data.corpus}: tokenizing on rank 0 unless its token cache exists")
        try:
            cache = ray.get(self.group.actors[0].prepare_data.remote(TokenSource.from_spec(self.spec.data),
                                                                     self.storage))
        except ray.exceptions.RayTaskError as err:
            raise root_cause(err) from None
        self.storage.write_json(f"{self.run_dir}/data.json", {"token_cache": cache})
        if not self.group.distributed:
            self._phase("joining", f"{self.resources.workers} rank(s), rendezvous at {self.workers[0]['ip']}")
            self.group.init_distributed(self.workers[0]["ip"])
        # A new attempt fences every earlier one: their ranks can no longer publish a checkpoint.
        attempt = begin_attempt(self.storage, self.run_dir, self.owner, self.job_id)
        ctx = RunContext(self.spec, self.storage, self.run_dir, cache, resume, self.peak_flops, attempt=attempt)
        self.refs = self.group.train_async(ctx)

    def done(self, timeout_s: float = 0.0) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout_s)
        return len(ready) == len(self.refs)

    def result(self) -> dict:
        """Rank 0's result; a rank's exception (a UserError among them) is raised as Ray's task error."""
        return ray.get(self.refs)[0]

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()

    def release_group(self) -> WorkerGroup | None:
        """Detach the (healthy, finished) gang so it can be reused; the caller owns it now."""
        group, self.group = self.group, None
        return group


def gang_wait_detail(res: WorkerResources, timeout_s: float | None) -> str:
    """What waiting for the gang waits for: the bundles, and what the cluster has free now."""
    want = f"{res.workers} x {res.cpus:g} CPU" + (f" + {res.gpus:g} GPU" if res.gpus else "") + " in one placement group"
    try:
        from orchestrator.ray_cluster import cluster_resources

        nodes = cluster_resources().values()
        free, total = sum(n["free"]["CPU"] for n in nodes), sum(n["total"]["CPU"] for n in nodes)
        want += f"; {free:g} of {total:g} CPUs free now"
    except Exception:
        pass
    return want + (f"; gives up after {timeout_s:g} s" if timeout_s else "")


def _progress_bar(total: int, desc: str, initial: int = 0):
    """The step bar, made at the first step so that its clock and rate leave start-up out."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, initial=initial,
                disable=not _show_progress())


def _show_progress() -> bool:
    return sys.stderr.isatty() or os.environ.get("SWITCHYARD_PROGRESS") == "1"


def _watch_startup(watcher: phases.Watcher, log, stop: threading.Event) -> None:
    """Until the first step (or ``stop``): print each start-up phase as it begins, and on a terminal keep one
    status line with the current phase and its elapsed time."""
    from tqdm import tqdm

    line = tqdm(total=0, bar_format="{desc}", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not _show_progress())
    try:
        while not stop.is_set():
            for text in watcher.poll():
                with line.external_write_mode():  # the status line steps aside for the printed line
                    log(text)
            if watcher.done:
                break
            line.set_description_str(f"  {watcher.current() or ''}")
            stop.wait(0.5)
        line.close()
        for _ in range(8):  # the phases a short last interval held, and where the time went (rank 0 writes
            for text in watcher.poll():  # it just after the first step)
                log(text)
            if watcher.done:
                break
            time.sleep(0.25)
    except Exception:  # the display is advisory: the job goes on
        pass
    finally:
        line.close()


def _open_run_dir(spec: JobSpec, cluster, storage: Storage, resume_dir: str | None) -> tuple[str, str]:
    """(job id, run directory): the one being resumed, or a new one holding the spec."""
    if resume_dir:
        run_dir = resume_dir.rstrip("/")
        refuse_owned_resume(cluster, storage, run_dir)
        return run_dir.rsplit("/", 1)[-1], run_dir
    job_id = new_job_id()
    run_dir = storage.path(f"{spec.name}-{job_id}")
    storage.makedirs(run_dir)
    storage.write_json(f"{run_dir}/spec.json", spec.to_dict())
    return job_id, run_dir


def run_job(spec: JobSpec, cluster, resume_dir: str | None = None, log=print) -> dict:
    """Run to completion; returns the summary that ``--json`` prints."""
    from orchestrator.ray_cluster import connect

    storage = storage_of(cluster)
    res = worker_resources(spec, cluster)
    preflight(spec, storage)
    t_connect = time.time()  # printed once connected: a cluster that cannot be reached stays one line (exit 2)
    address = connect(cluster)
    why = feasible(res)
    if why:
        raise UsageError(why)
    job_id, run_dir = _open_run_dir(spec, cluster, storage, resume_dir)
    what = "" if spec.kind == "pretrain" else f"{spec.kind} stage, "
    unit = "rollouts" if spec.kind == "ppo" else "steps"
    log(f"job {job_id}: {what}{spec.model.family}/{spec.model.preset or 'custom'} on {res.workers} worker(s), "
        f"ZeRO-{spec.parallel.zero_stage}, {spec.total_steps} {unit} -> {run_dir}")
    job = JobRun(spec, storage, run_dir, res, cluster.workers.peak_flops, started=t_connect)
    phases.enter(storage, run_dir, "connecting", str(address or ""), now=t_connect, fresh=True)
    stop_watch, watcher = threading.Event(), phases.Watcher(storage, run_dir, t_connect)
    watch = threading.Thread(target=_watch_startup, args=(watcher, log, stop_watch), daemon=True,
                             name="startup-phases")
    watch.start()
    state = "FAILED"
    summary: dict = {}
    bar = None
    restore_sigterm = _sigterm_as_interrupt()
    limit, out_of_time = spec.resources.time_limit_s, None
    try:
        job.start(resume=resume_dir is not None)
        running_since = time.time()  # the time limit counts from here, as the controller's does from RUNNING
        stop_by = None
        while not job.done(timeout_s=0.5):
            if limit is not None and out_of_time is None and time.time() - running_since >= limit:
                out_of_time = f"time limit of {limit:g} s reached (resources.time_limit_s)"
                log(f"\n{out_of_time}: the workers finish the step and save a checkpoint")
                job.group.stop()
                stop_by = time.time() + cluster.preemption.stop_timeout_s
            if stop_by is not None and time.time() > stop_by:
                raise _StopOverdue(f"{out_of_time}: the workers did not stop within "
                                   f"{cluster.preemption.stop_timeout_s:g} s (preemption.stop_timeout_s) and were "
                                   f"killed; `switchyard run --resume {run_dir}` continues from the last checkpoint")
            p = job.group.progress(timeout_s=2.0)
            if bar is None and p.get("step") is not None and p["step"] > (p.get("start_step") or 0):
                stop_watch.set()
                watch.join(timeout=5)
                bar = _progress_bar(spec.total_steps, spec.name, initial=p["step"])
            if bar is not None and p.get("step") is not None:
                bar.n = p["step"]
                if p.get("loss") is not None:
                    bar.set_postfix(loss=f"{p['loss']:.4f}", tok_s=f"{p.get('tokens_per_s') or 0:.0f}")
                bar.refresh()
        summary = job.result()
        if bar is not None:
            bar.n = summary["steps"]
            bar.refresh()
        state = "SUCCEEDED" if not summary["stopped"] else "FAILED" if out_of_time else "CANCELLED"
        if out_of_time and summary["stopped"]:
            log(f"{out_of_time}: stopped at step {summary.get('steps')} with a checkpoint; "
                f"`switchyard run --resume {run_dir}` continues it (with --set resources.time_limit_s=SECONDS for more)")
    except KeyboardInterrupt:
        log("\ninterrupted: stopping the workers; the last complete checkpoint stays usable "
            f"(resume with: switchyard run --resume {run_dir})")
        if job.group is not None:
            job.group.stop()
            try:
                if job.done(timeout_s=20):
                    summary = job.result()  # the ranks' own result: the step they stopped (and saved) at
            except Exception:
                pass
        state = "CANCELLED"
    except _StopOverdue as err:
        log(str(err))
        state = "FAILED"
    except PlacementTimeout as err:
        raise UsageError(str(err)) from None
    except ray.exceptions.RayActorError as err:
        log(f"a worker died: {str(err).splitlines()[0]}")
        state = "FAILED"
    except ray.exceptions.RayTaskError as err:
        cause = root_cause(err)
        if isinstance(cause, UsageError):
            raise cause from None
        log(f"a worker failed: {_last_line(err)} (see {run_dir}/logs/)")
        state = "FAILED"
    finally:
        restore_sigterm()
        stop_watch.set()
        watch.join(timeout=5)
        if bar is not None:
            bar.close()
        job.shutdown()
    return {"id": job_id, "state": state, "run_dir": run_dir, "steps": summary.get("steps"),
            "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss"),
            "tokens_per_s": summary.get("tokens_per_s"), "final_eval": summary.get("final_eval")}


class _StopOverdue(Exception):
    """A run's ranks, asked to stop at its time limit, did not within ``preemption.stop_timeout_s``."""


def _sigterm_as_interrupt():
    """SIGTERM (`kill`, `docker stop`, a batch scheduler's stop) stops the run as Ctrl-C does: the ranks save a
    checkpoint and stop. Returns what puts the earlier handling back (nothing to do off the main thread,
    where no handler can be set; SIG_DFL where the earlier handler was not Python's, such as Ray's own)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def refuse_owned_resume(cluster, storage: Storage, run_dir: str) -> None:
    """``run --resume`` of a run directory the controller owns (its job is not over) is refused: two
    writers of one run would overwrite each other's checkpoints."""
    from orchestrator.job_store import JobState, JobStore

    store = JobStore(cluster.job_store)
    live = [JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.RESTARTING, JobState.PREEMPTED]
    owners = [r for r in store.list(live) if (r.run_dir or "").rstrip("/") == run_dir.rstrip("/")]
    attempt = current_attempt(storage, run_dir) or {}
    if not owners and attempt.get("owner") == "controller" and attempt.get("job_id"):
        try:  # a run directory named differently in this store (moved, a symlink): its attempt file says
            owners = [store.get(attempt["job_id"])]
        except Exception:  # not in this job store (another cluster's run)
            owners = []
    for rec in owners:
        if not rec.terminal:
            raise UsageError(f"--resume {run_dir}: the run belongs to job {rec.id} of the controller "
                             f"({rec.state.value}); wait for it to end or `switchyard cancel {rec.id}` first")


def _last_line(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def resume_spec(storage: Storage, run_dir: str, overrides: list[str]) -> JobSpec:
    from specs.job import apply_overrides

    uri = f"{run_dir.rstrip('/')}/spec.json"
    if not storage.exists(uri):
        raise UsageError(f"--resume {run_dir}: not a run directory (no spec.json)")
    return validate_spec(apply_overrides(storage.read_json(uri), overrides), source=uri)
