"""The cluster controller: a detached, named Ray actor that Ray restarts if it dies.

Every TICK_S (0.2 s), and at once when a start ends or a gang returns, it ``tick()``s:

1. reconcile cancel requests of running jobs (stop, free the placement group);
2. watch running jobs: progress into the store, results, faults;
3. ask ``scheduler.schedule`` what to start, and start it (in a thread: placing
   a gang and starting its ranks takes seconds);
4. give each new complete checkpoint an evaluation task (below training
   priority: no reserved CPUs, a niced process) and mark the best one;
5. finish sweeps, and move InstructGPT pipelines on (next stage, report).

Preemption: when ``schedule`` returns ``Preempt`` for a running job, the
controller moves it to PREEMPTED (recording the job it makes room for) and
calls its worker group's ``stop()``: every rank finishes the step it is on
and returns (the loop's stop at a step boundary). The controller then frees
its gang and requeues it; it resumes from its latest complete checkpoint at
the exact data position. A job that does not stop within
``preemption.stop_timeout_s`` is killed and resumes the same way. The
preempting job's room is reserved by the scheduler until it starts.

When cluster.yaml sets ``api.listen``, the controller also serves the HTTP
API (``orchestrator.api``) from a thread of its own.

The SQLite job store is the source of truth. A restarted controller finds
jobs the store says are STARTING/RUNNING/RESTARTING; their rank actors died
with the old controller, so it requeues them to resume from their latest
complete checkpoint with their exact data position.
"""
from __future__ import annotations

import os
import threading
import logging
import time

import ray

from data.storage import Storage
from orchestrator import failure_policy
from orchestrator import scheduler as sched
from orchestrator.evaluations import CheckpointEvaluations
from orchestrator.job_retention import RetentionPolicy, compact
from orchestrator.parent_jobs import ParentJobs
from orchestrator.queue_view import EXACT_POSITIONS, QueueView
from orchestrator.starts import WARM_MAX, Active, GangStarts
from orchestrator.stops import JobStops
from specs.errors import UsageError
from orchestrator.job_records import TRAINING_KINDS
from orchestrator.job_store import JobState, JobStore
from orchestrator.notify import Notifier
from workers.pool import WarmPool
from workers.worker_group import poll

log = logging.getLogger(__name__)


def _log_to_stderr() -> None:
    """The controller's records (``orchestrator.*``, INFO and above) go to its process's stderr; once."""
    logger = logging.getLogger("orchestrator")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


CONTROLLER_NAME = "switchyard-controller"
TICK_S = 0.2  # a tick costs what changed (queue_view.py); a submit waits half a tick on average
FAIR_SHARE_HORIZON = 30  # half-lives of run history that fair share reads
DOWN_STOP_S = 20.0  # at `switchyard down`, running jobs get this long to checkpoint and stop (stop_controller waits 30)
VACATED_GRACE_S = 15.0  # a preempted gang's room counts as spoken for this long (Ray's free view lags its removal)
START_ALLOWANCE_S = 120.0
"""What a start is counted to take when the scheduler works out when a job with a time limit ends (its time
limit counts from RUNNING): see ``_ends_by`` and ``QueueView``."""


class Controller(GangStarts, JobStops, CheckpointEvaluations, ParentJobs):
    def __init__(self, cluster: dict, tick_s: float = TICK_S, backfill_window_s: float = 120.0):
        from orchestrator.cluster_config import ClusterConfig
        import orchestrator.runner  # noqa: F401  (imports torch now, not when the first job starts)

        self.cluster = ClusterConfig.model_validate(cluster)
        self.store = JobStore(self.cluster.job_store)
        self.storage = Storage(self.cluster.storage, dict(self.cluster.storage_options),
                               roots=self.cluster.path_roots())  # the ranks check paths against these
        self.tick_s, self.backfill_window_s = tick_s, backfill_window_s
        self.active: dict[str, Active] = {}
        self._skipped: set[str] = set()
        self._fits: dict[str, object] = {}
        self._reports: dict[str, object] = {}  # pipeline id -> ObjectRef of its report task
        self.warm: list[tuple[float, object]] = []  # (parked at, WorkerGroup) of finished healthy jobs
        w = self.cluster.workers
        self.pool = WarmPool(w.warm_pool, w.cpus, w.gpus, self.cluster.ray.namespace)  # for the next cold job
        self.pool.remove_leftovers()
        self.eval_jobs: dict[str, dict] = {}  # job_id -> {checkpoint path: ObjectRef}; jobs whose checkpoints need evals
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when a start ends or a gang returns: tick now, not at the next beat
        self._shares: tuple[float, dict[str, float]] = (0.0, {})  # (computed at, team -> usage / weight)
        # The queue, read incrementally from the store (queue_view.py); a queued job's time limit bounds how long
        # it holds its workers once started, with a start and a stop (scheduler.py: backfill behind an aged head).
        self.queue = QueueView(TRAINING_KINDS, self.cluster.workers.max_time_limit_s,
                               START_ALLOWANCE_S + self.cluster.preemption.stop_timeout_s)
        self._compacted_at = 0.0  # when the job store's retention policy last ran
        self._vacated: dict[str, tuple[float, sched.RunningJob]] = {}  # preempted job -> (when, what it held)
        p = self.cluster.preemption
        self.preemption = sched.PreemptionPolicy(p.enabled, p.min_run_s, p.never_preempt_priority, p.max_per_job,
                                                 p.backoff_s)
        self.quotas = {name: sched.TeamQuota(t.cpus, t.gpus, t.weight) for name, t in self.cluster.teams.items()}
        self.pid = os.getpid()
        refuse_second_controller(self.store, self.pid)
        before = self.store.controller()  # a controller that died: the webhooks hear what changed since it last ticked
        self.notifier = Notifier(self.cluster.webhooks, self.store, since=before.heartbeat if before else None)
        self.store.set_controller(self.pid, ray.get_runtime_context().gcs_address)
        self._reconcile()
        self.api = None
        if self.cluster.api.listen:
            from orchestrator.api import serve_in_thread

            self.api = serve_in_thread(self.cluster)
        self._thread = threading.Thread(target=self._loop, name="controller-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public (actor methods)

    def ping(self) -> dict:
        return {"pid": self.pid, "address": ray.get_runtime_context().gcs_address,
                "node": ray.get_runtime_context().get_node_id(), "active": sorted(self.active),
                "api": self.api.url if self.api is not None else None,
                "pool": self.pool.pids()}

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.api is not None:
            self.api.stop()
        with self._lock:
            self._release_warm()
            self.pool.release()
            self._stop_jobs_for_shutdown()
            self.store.clear_controller(self.pid)
        self.notifier.poll()  # what `down` did to the jobs, then a few seconds to send it
        self.notifier.drain(5.0)

    def _stop_jobs_for_shutdown(self, timeout_s: float = DOWN_STOP_S) -> None:
        """`switchyard down`: running jobs finish their step, save a checkpoint and stop (killed past
        ``timeout_s``; the latest complete checkpoint stays), then wait QUEUED for the next `up`. A stop the
        user asked for spends none of the job's restarts."""
        running = [act for act in self.active.values() if act.started]
        for act in running:
            act.run.group.stop()
        deadline = time.time() + timeout_s
        for act in running:
            act.run.done(max(0.0, deadline - time.time()))
        for job_id, act in list(self.active.items()):
            step = (act.run.group.progress(timeout_s=1.0).get("last_checkpoint") if act.started else None)
            act.run.shutdown()
            where = f"its checkpoint at step {step}" if step else "its latest complete checkpoint"
            try:
                self.store.transition(job_id, JobState.QUEUED, f"stopped with the controller (switchyard down); "
                                      f"resumes from {where} at the next start")
            except Exception:  # it ended meanwhile
                log.exception("job %s: not requeued at shutdown", job_id)
        self.active.clear()

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        _log_to_stderr()
        while not self._stop.is_set():
            try:
                self.tick()
                self.store.heartbeat(self.pid)
            except Exception:  # the loop must survive anything one job does
                log.exception("controller tick failed")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            self._handle_stops()
            self._watch_running()
            self._schedule()
            self._evaluate_checkpoints()
            self._finish_sweeps()
            self._advance_pipelines()
            self._settle_parents()
            self._compact_store()
        self.notifier.poll()

    def _compact_store(self) -> None:
        """Apply the job store's retention policy (``job_retention.py``) at start and every ``every_s``."""
        r, now = self.cluster.job_store_retention, time.time()
        if now - self._compacted_at < r.every_s:
            return
        self._compacted_at = now
        done = compact(self.store, RetentionPolicy(r.finished_days, r.max_finished, r.batch), now)
        if done.deleted or done.tokens:
            log.info("job store retention: deleted %d finished jobs (%d kept for jobs that wait for them) and %d "
                     "expired API tokens", done.deleted, done.kept_for_dependents, done.tokens)

    # ------------------------------------------------------------------ reconcile

    def _reconcile(self) -> None:
        for rec in self.store.list([JobState.STARTING, JobState.RUNNING, JobState.RESTARTING, JobState.PREEMPTED]):
            if rec.kind not in TRAINING_KINDS:
                continue  # sweeps and pipelines are bookkeeping records: nothing of theirs ran
            if rec.cancel_requested:
                self.store.transition(rec.id, JobState.CANCELLED, f"{rec.cancel_reason} while the controller was down")
                continue
            if rec.state == JobState.PREEMPTED:
                self.store.transition(rec.id, JobState.QUEUED, f"preempted by {rec.preempted_by}; the controller "
                                      "restarted while it stopped; resumes from its latest checkpoint")
                continue
            if rec.state != JobState.RESTARTING:
                self.store.transition(rec.id, JobState.RESTARTING, "controller restarted; resuming from checkpoint")
            self.store.transition(rec.id, JobState.QUEUED, "requeued after controller restart")

    # ------------------------------------------------------------------ running jobs

    def _abort_start(self, act: Active, state: JobState, reason: str) -> None:
        """Stop a start in flight (data preparation, placement, rendezvous): its ranks are killed now, so the
        starter thread ends; ``_watch_running`` then frees what it made and records ``state``."""
        act.abort = (state, reason)
        log.warning("job %s: start aborted: %s", act.job_id, reason)
        act.run.shutdown()

    def _start_deadline(self, job_id: str, act: Active) -> None:
        """A job STARTING longer than workers.start_timeout_s fails, naming the phase it was in."""
        limit = self.cluster.workers.start_timeout_s
        if act.abort is not None or time.time() - act.since <= limit:
            return
        from workers import phases

        try:
            where = phases.describe(phases.read(self.storage, self.store.get(job_id).run_dir))
        except Exception:  # the phase is advisory
            where = None
        self._abort_start(act, JobState.FAILED, f"startup: not running after {limit:g} s (workers.start_timeout_s)"
                          + (f"; it was {where}" if where else ""))

    def _watch_running(self) -> None:
        for job_id, act in list(self.active.items()):
            if act.starter is not None and act.starter.is_alive():
                self._start_deadline(job_id, act)
                continue
            if act.abort is not None:
                act.run.shutdown()  # again: whatever the starter made after the first shutdown
                self.active.pop(job_id)
                self.store.transition(job_id, act.abort[0], act.abort[1])
                continue
            if act.start_error is not None:
                from workers.worker_group import PlacementTimeout

                if isinstance(act.start_error, PlacementTimeout):  # someone else took the room: queue again
                    act.run.shutdown()
                    self.active.pop(job_id)
                    self.store.transition(job_id, JobState.QUEUED, str(act.start_error))
                else:
                    self._on_fault(job_id, act, act.start_error)
                continue
            if not act.started:
                act.started = True
                self.eval_jobs.setdefault(job_id, {})
                workers = [{"rank": w["rank"], "node": w["node"], "ip": w["ip"], "pid": w["pid"]}
                           for w in act.run.workers]
                self.store.transition(job_id, JobState.RUNNING, "all workers started", workers=workers)
                self.storage.write_json(f"{self.store.get(job_id).run_dir}/workers.json", workers)
                threading.Thread(target=self._wake_when_done, args=(act.run.refs,), daemon=True,
                                 name=f"wait-{job_id}").start()
            status = poll(act.run.refs)                     # one value for the gang: results or the root cause
            if status.error is not None:
                self._on_fault(job_id, act, status.error)
                continue
            progress = act.run.group.progress(timeout_s=1.0)
            if progress.get("step") is not None:
                metrics = {k: progress.get(k) for k in ("loss", "tokens_per_s", "last_checkpoint") if progress.get(k) is not None}
                step, now = int(progress["step"]), time.time()
                act.first_progress = act.first_progress or (now, step)
                t0, step0 = act.first_progress
                if step > step0 and now > t0:  # this attempt's steps per second, for `status`'s time left
                    metrics["steps_per_s"] = (step - step0) / (now - t0)
                self.store.update(job_id, step=step, metrics=metrics)
            if not status.done:
                if act.preempt is not None and time.time() - act.preempt_at > self.cluster.preemption.stop_timeout_s:
                    self._requeue_preempted(job_id, act, None, killed=True)
                continue
            r = status.results[0]
            if act.preempt is not None and r["stopped"]:
                self._requeue_preempted(job_id, act, r)
                continue
            self.active.pop(job_id)
            if len(self.warm) >= WARM_MAX or act.preempt is not None:
                act.run.shutdown()
            else:
                self.warm.append((time.time(), act.run.release_group()))
            metrics = {"loss": r["final_loss"], "first_loss": r["first_loss"], "tokens_per_s": r["tokens_per_s"]}
            if r.get("final_eval"):
                metrics.update(r["final_eval"])
            if r["stopped"]:
                state, why, then, _ = act.stopping or (JobState.CANCELLED, "stopped", "", 0.0)
                if act.stopping is not None:
                    why = f"{why}: stopped at step {r['steps']} with a checkpoint{then}"
                self.store.transition(job_id, state, why, step=r["steps"], metrics=metrics)
            else:
                self.store.transition(job_id, JobState.SUCCEEDED, "finished", step=r["steps"], metrics=metrics)
                if self.store.get(job_id).kind == "sweep-run":
                    self._record_sweep_result(job_id)

    def _wake_when_done(self, refs: list) -> None:
        """The loop ticks as soon as every rank of a gang has returned (or one failed), so a finished job's
        room goes to the next one at once: many short runs (a sweep) do not each wait out a tick."""
        try:
            ray.wait(refs, num_returns=len(refs))
        finally:
            self._wake.set()

    def _requeue_preempted(self, job_id: str, act: Active, result: dict | None, killed: bool = False) -> None:
        """A preempted job has stopped (or is killed): free its gang and queue it to resume."""
        progress = act.run.group.progress(timeout_s=1.0) if act.run.group is not None else {}
        held = self._as_running(job_id, act, self.store.get(job_id))
        self._vacated[job_id] = (time.time(), sched.RunningJob(**{**held.__dict__, "stopping": True,
                                                                  "ends_by": time.time() + VACATED_GRACE_S}))
        if result is not None and not killed and len(self.warm) < WARM_MAX:
            # Its ranks returned at a step boundary, healthy: the gang is warm for the preempting job (same
            # shape: it starts on it at once) and is released at the end of the tick otherwise.
            self.warm.append((time.time(), act.run.release_group()))
        else:
            act.run.shutdown()
        self.active.pop(job_id, None)
        ckpt = progress.get("last_checkpoint")
        at = f" at step {result['steps']}" if result else ""
        how = (f"did not stop within {self.cluster.preemption.stop_timeout_s:g} s and was killed; " if killed
               else f"stopped{at}; ")
        self.store.transition(job_id, JobState.QUEUED, (
            f"preempted by {act.preempt.by}: {how}resumes from "
            + (f"its checkpoint at step {ckpt}" if ckpt else "its latest complete checkpoint")))

    def _on_fault(self, job_id: str, act: Active, err: BaseException) -> None:
        """A rank failed: the failure policy decides restart or fail, and the log says which and why."""
        if act.preempt is not None and self.store.get(job_id).state == JobState.PREEMPTED:
            self._requeue_preempted(job_id, act, None)  # it was stopping anyway; a fault there costs no restart
            return
        act.run.shutdown()
        self.active.pop(job_id, None)
        rec = self.store.get(job_id)
        decision = failure_policy.decide(err, rec.restarts, rec.max_restarts, job_id)
        log.warning("job %s: %s: %s", job_id, type(decision).__name__.lower(), decision.reason)
        if isinstance(decision, sched.Restart):
            self.store.transition(job_id, JobState.RESTARTING, decision.reason)
            self.store.transition(job_id, JobState.QUEUED, self._restart_point(rec.run_dir))
        else:
            self.store.transition(job_id, JobState.FAILED, decision.reason)

    def _restart_point(self, run_dir: str) -> str:
        """Where a restart resumes, for the job's reason: the latest complete checkpoint, or step 0."""
        from workers.checkpoint_store import latest_checkpoint

        try:
            ckpt = latest_checkpoint(self.storage, run_dir)
        except Exception:  # noqa: BLE001 -- the storage may be what failed; the note is advisory
            return "waiting to restart from its latest complete checkpoint"
        if ckpt is None:
            return "waiting to restart from step 0 (no checkpoint was complete yet)"
        return f"waiting to restart from its checkpoint at step {ckpt.step}"

    # ------------------------------------------------------------------ scheduling

    def _free_and_total(self) -> tuple[dict, dict]:
        """Free resources per node: Ray's view, but never more than the total minus what our own gangs hold.

        Ray's available-resources view lags placement by a moment; the controller knows exactly which
        nodes its running and warm gangs occupy, so it trusts whichever view is tighter. Jobs still
        STARTING whose gang is not placed yet hold their bundles too (parallel starts must not promise
        the same room twice). What warm pool members hold counts as free: any job may have it.
        """
        from orchestrator.ray_cluster import cluster_resources

        nodes = cluster_resources()
        total = {nid: n["total"] for nid, n in nodes.items()}
        held: dict[str, dict[str, float]] = {nid: {"CPU": 0.0, "GPU": 0.0} for nid in nodes}
        groups = [a.run.group for a in self.active.values() if a.run.group is not None] + [g for _, g in self.warm]
        for group in groups:
            for info in group.infos:
                if info["node"] in held:
                    held[info["node"]]["CPU"] += group.resources.cpus
                    held[info["node"]]["GPU"] += group.resources.gpus
        pool = self.pool.held()
        free = {nid: {k: max(0.0, min(n["free"][k] + pool.get(nid, {}).get(k, 0.0), total[nid][k] - held[nid][k]))
                      for k in ("CPU", "GPU")} for nid, n in nodes.items()}
        for act in self.active.values():
            if act.starting and act.bundles and (act.run.group is None or not act.run.group.infos):
                placed = sched.place(act.bundles, free)
                for b, nid in zip(act.bundles, placed or ()):
                    free[nid] = {"CPU": max(0.0, free[nid]["CPU"] - b.cpus), "GPU": max(0.0, free[nid]["GPU"] - b.gpus)}
        return free, total

    def _as_running(self, job_id: str, act: Active, rec) -> sched.RunningJob:
        bundles = sched.bundles_of(rec.resources)
        infos = act.run.group.infos if act.run.group is not None else []
        nodes = tuple(i["node"] for i in infos) if len(infos) == len(bundles) else ("?",) * len(bundles)
        since = rec.running_since if rec.state == JobState.RUNNING and act.started else None
        return sched.RunningJob(job_id, rec.priority, bundles, nodes, since, rec.preemptions, rec.team,
                                stopping=act.preempt is not None or act.stopping is not None,
                                ends_by=self._ends_by(act, rec, time.time()))

    def _ends_by(self, act: Active, rec, now: float) -> float | None:
        """When a live job will have given its workers back at the latest, as the scheduler counts it: the
        deadline of a stop under way, or what is left of its time limit, then a stop (None: no time limit)."""
        stop = self.cluster.preemption.stop_timeout_s
        if act.stopping is not None or act.preempt is not None:
            return (act.stopping[3] if act.stopping is not None else act.preempt_at) + stop
        limit = rec.time_limit(self.cluster.workers.max_time_limit_s)
        if limit is None:
            return None
        began = now if rec.state == JobState.RUNNING and act.started else max(act.since + START_ALLOWANCE_S, now)
        return began + max(limit - rec.run_seconds(now), 0.0) + stop

    def _running_jobs(self) -> list[sched.RunningJob]:
        """The jobs holding workers, as the scheduler sees them (preemption candidates, quota use).

        Gangs of just-preempted jobs are included as stopping for a few seconds: Ray's free view lags
        their removal, and without them the preempting job would look short of room and preempt again.
        """
        out = [self._as_running(job_id, act, self.store.get(job_id)) for job_id, act in self.active.items()]
        now = time.time()
        self._vacated = {j: v for j, v in self._vacated.items() if now - v[0] < VACATED_GRACE_S}
        out += [v for j, (_, v) in self._vacated.items() if j not in self.active]
        return out

    def _fair_shares(self, now: float) -> dict[str, float]:
        """Each team's decayed usage / weight, recomputed every 10 s from the store's run history.

        Only jobs that ran within FAIR_SHARE_HORIZON half-lives count (an indexed query, not the whole
        store): anything older weighs less than 2**-FAIR_SHARE_HORIZON of what it did.
        """
        at, shares = self._shares
        if now - at < 10.0:
            return shares
        fs = self.cluster.fair_share
        ran = self.store.ran_since(now - FAIR_SHARE_HORIZON * fs.half_life_s if fs.half_life_s else None)
        usage = sched.team_usage([r for r in ran if r.kind in TRAINING_KINDS], now, fs.half_life_s, fs.gpu_weight)
        shares = sched.fair_shares(usage, self.quotas)
        self._shares = (now, shares)
        return shares

    def _schedule(self) -> None:
        self._expire_warm()
        self.queue.refresh(self.store)
        if not self.queue.rows:
            self._fill_pool()  # ahead of demand, only while nothing waits for the room
            return
        now = time.time()
        running = self._running_jobs()
        shares = self._fair_shares(now)
        jobs = self.queue.jobs(shares)
        head = jobs[0]
        if (not head.cancel_requested and all(s == "SUCCEEDED" for _, s in head.deps)
                and sched.over_quota(head, running, self.quotas.get(head.team)) is None):
            warm = self._take_warm(self.store.get(head.job_id))
            if warm is not None:
                self._start(head.job_id, warm)
                self._vacated.clear()  # the room a preempted job left, if it was that gang, is taken now
                return
        free, total = self._free_and_total()
        started = False
        plan = sched.plan_tick(jobs, free, total, now=now, backfill_window_s=self.backfill_window_s, running=running,
                               preemption=self.preemption, quotas=self.quotas, shares=shares,
                               exact=EXACT_POSITIONS, always=frozenset(self.queue.elastic), ordered=True,
                               counts=self.queue.counts)
        decisions = plan.decisions
        if self.warm and any(isinstance(d, sched.Preempt) for d in decisions):
            self._release_warm()  # idle warm gangs go before anyone's running job does
            return
        self.queue.estimate(plan, running, total, now)  # start times for the first waiting jobs, every 10 s
        for decision in decisions:
            if isinstance(decision, sched.Start):  # the Starts of one pass fit together: start them all
                self._start(decision.job_id)
                started = True
                self._vacated.clear()  # the room preempted jobs left is taken now
                continue
            if isinstance(decision, sched.Preempt):
                self._preempt(decision)
                continue
            if isinstance(decision, sched.Wait):
                rec = self.queue.rows[decision.job_id]
                if rec.blocked_since is None:
                    self.queue.note_blocked(rec.id, now)
                elif not started and rec.elastic and self._resume_elastic(self.store.get(rec.id), free, now):
                    started = True
                    continue
                self.queue.note_pending(rec.id, plan.positions[rec.id], decision, now)
            elif isinstance(decision, sched.Fail):
                rec = self.queue.rows[decision.job_id]
                if rec.ran_before:
                    # It ran before and lost a node: wait for capacity to come back instead of failing.
                    if rec.blocked_since is None:
                        self.queue.note_blocked(rec.id, now)
                    elif not started and rec.elastic and self._resume_elastic(self.store.get(rec.id), free, now):
                        started = True
                        continue
                    if rec.reason != f"waiting for capacity: {decision.reason}":
                        self.store.update(decision.job_id, reason=f"waiting for capacity: {decision.reason}")
                else:
                    self.store.transition(decision.job_id, JobState.FAILED, decision.reason)
            elif isinstance(decision, sched.Cancel):
                why = self.store.get(decision.job_id).cancel_reason
                self.store.transition(decision.job_id, JobState.CANCELLED, why)
        for job_id in self.queue.due(now, plan):  # the jobs the pass did not need to decide: notes now and then
            wait, position = plan.wait_for(job_id)
            self.queue.note_pending(job_id, position, wait, now)
        self.queue.flush(self.store)  # blocked_since and pending reasons: one transaction per tick
        if not started and self.warm:
            self._release_warm()  # warm gangs of another shape hold what the queue needs

    def _preempt(self, decision: sched.Preempt) -> None:
        act = self.active.get(decision.job_id)
        if act is None or act.preempt is not None or act.stopping is not None:
            return  # already stopping: a cancel's or a time limit's stop frees the same room
        from orchestrator.job_store import IllegalTransitionError

        try:
            self.store.transition(decision.job_id, JobState.PREEMPTED,
                                  decision.reason + "; checkpointing at the next step boundary",
                                  preempted_by=decision.by)
        except IllegalTransitionError:
            return  # it ended meanwhile
        act.preempt, act.preempt_at = decision, time.time()
        act.run.group.stop()
        log.info("preempting %s: %s", decision.job_id, decision.reason)


# ---------------------------------------------------------------------- handles


CONTROLLER_STALE_S = 60.0  # a recorded controller silent this long is gone even if its pid was reused


def refuse_second_controller(store: JobStore, pid: int | None) -> None:
    """One controller per job store: while another one lives (its heartbeat fresh, its process there),
    this one is refused."""
    other = store.controller()
    if other is None or other.pid == pid or time.time() - other.heartbeat > CONTROLLER_STALE_S:
        return
    try:
        os.kill(other.pid, 0)
    except ProcessLookupError:
        return  # it died (Ray restarts a crashed controller in a new process)
    except PermissionError:
        pass
    raise UsageError(f"controller: another controller (pid {other.pid}, Ray at {other.address}) owns the job "
                     f"store {store.path}; use it, or stop it with "
                     "`switchyard down` first")


def get_controller(namespace: str):
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        return None


def start_controller(cluster, tick_s: float = TICK_S, backfill_window_s: float = 120.0):
    """Start (or find) the detached controller actor; returns its handle once it answers."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handle = get_controller(cluster.ray.namespace)
    if handle is None:
        refuse_second_controller(JobStore(cluster.job_store), None)  # one line here, not an actor's traceback
        cls = ray.remote(Controller)
        # On this node, the head: the job store is a file on its disk, and a worker host may be lost.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        handle = cls.options(name=CONTROLLER_NAME, namespace=cluster.ray.namespace, lifetime="detached",
                             max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=8,
                             scheduling_strategy=here,
                             get_if_exists=True).remote(cluster.model_dump(), tick_s, backfill_window_s)
    ray.get(handle.ping.remote(), timeout=120)
    return handle


def stop_controller(namespace: str) -> bool:
    """Shut the controller down (its jobs' workers stop; the store keeps them for the next start)."""
    handle = get_controller(namespace)
    if handle is None:
        return False
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except Exception:  # already dying: kill it anyway
        pass
    ray.kill(handle, no_restart=True)
    return True
