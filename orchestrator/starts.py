"""Starting jobs, as the controller does it: warm gangs, the warm pool, and starts that run side by side.

A part of ``orchestrator.controller.Controller`` (a mixin: it uses the controller's ``store``, ``storage``,
``cluster``, ``active``, ``warm`` and ``pool``).

Where a job's ranks come from, best first:

1. a warm gang: the whole gang of a finished job of the same shape (placement group, rank processes and
   torch.distributed all kept, ``WorkerGroup.reattach``) for ``WARM_IDLE_S``;
2. the warm pool (``workers/pool.py``): idle rank processes of the cluster's default worker shape with
   torch and DeepSpeed imported, taken all at once or not at all (``WorkerGroup.adopt``);
3. a fresh placement group and fresh rank processes.

Each start runs in a thread of its own, so several jobs can be STARTING at once and a slow one (a long
data preparation, a placement that waits) never holds up the others. Every way keeps the gang guarantee:
a placement group is all of its bundles or none, the pool hands over all members or none, and training
begins only once every rank of the gang is there.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from orchestrator import scheduler as sched
from orchestrator.job_store import JobState
from specs.errors import UsageError
from specs.job import validate_spec

log = logging.getLogger(__name__)

WARM_IDLE_S = 30.0   # a finished job's gang stays warm this long for the next job of the same shape
WARM_MAX = 4         # at most this many warm gangs


@dataclass
class Active:
    """A job the controller is running right now."""

    job_id: str
    run: object                       # orchestrator.runner.JobRun
    starter: threading.Thread | None = None
    start_error: BaseException | None = None
    started: bool = False
    preempt: sched.Preempt | None = None   # set once it has been asked to stop for a preemption
    preempt_at: float = 0.0
    since: float = 0.0                     # when it entered STARTING
    abort: tuple | None = None             # (state, reason) once a start is cancelled or past its deadline
    bundles: tuple = ()                    # what it asked for: counted as held until its gang is placed
    first_progress: tuple | None = None    # (time, step) of this attempt's first progress: its step rate
    stopping: tuple | None = None          # (state, why, then, when) once asked to checkpoint and stop: cancel --checkpoint,
                                           # or its time limit

    @property
    def starting(self) -> bool:
        return self.starter is not None and self.starter.is_alive()


class GangStarts:
    # ------------------------------------------------------------------ warm gangs

    def _shape(self, spec) -> tuple:
        from orchestrator.runner import worker_resources

        r = worker_resources(spec, self.cluster)
        return (r.workers, r.cpus, r.gpus, r.threads)

    def _take_warm(self, rec):
        try:
            shape = self._shape(validate_spec(rec.spec))
        except UsageError:
            return None
        for i, (_, group) in enumerate(self.warm):
            r = group.resources
            if (r.workers, r.cpus, r.gpus, r.threads) == shape:
                return self.warm.pop(i)[1]
        return None

    def _expire_warm(self) -> None:
        now = time.time()
        for parked, group in [w for w in self.warm if now - w[0] > WARM_IDLE_S]:
            group.shutdown()
        self.warm = [w for w in self.warm if now - w[0] <= WARM_IDLE_S]

    def _release_warm(self) -> None:
        for _, group in self.warm:
            group.shutdown()
        self.warm = []

    # ------------------------------------------------------------------ warm pool

    def _yield_idle_room(self) -> bool:
        """Free what idle workers hold (pool members, warm gangs) when a placement group other than the
        pool's waits for room, e.g. a `switchyard run` on this cluster; True if one waits (then no refill)."""
        if not (self.pool.members or self.warm or self.pool.size) or not self.pool.others_waiting():
            return False
        if self.pool.members or self.warm:
            log.info("a placement group waits for room: %d pool member(s) and %d warm gang(s) released",
                     self.pool.release(), len(self.warm))
            self._release_warm()
        return True

    def _fill_pool(self) -> None:
        """Nothing is queued or starting: top the pool up by one member where our free view has room."""
        if self._yield_idle_room() or self.pool.size == 0 or any(a.starting for a in self.active.values()):
            return
        self.pool.drop_failed()
        if len(self.pool.members) >= self.pool.size:
            return
        free, _ = self._free_and_total()
        held = self.pool.held()  # ``free`` counts the pool's room as free: leave what members hold
        room = {n: {k: f[k] - held.get(n, {}).get(k, 0.0) for k in ("CPU", "GPU")} for n, f in free.items()}
        self.pool.fill(room)

    def _pooled_for(self, res) -> list | None:
        """Pool members for a job about to start cold, or None; a job of another shape gets the pool's room."""
        members = self.pool.take(res.workers, res.cpus, res.gpus)
        if members is None and self.pool.members:
            log.info("warm pool: %d member(s) released to make room for a %d x %g CPU job",
                     self.pool.release(), res.workers, res.cpus)
        return members

    # ------------------------------------------------------------------ starts

    def _resume_elastic(self, rec, free, now: float) -> bool:
        """An elastic job that lost workers and waited its elastic_wait_s resumes on as many as fit now."""
        from orchestrator import elastic

        ran_before = any(h.to_state == JobState.RUNNING for h in rec.history)
        if not elastic.waited_long_enough(rec.spec, ran_before, rec.blocked_since, now):
            return False
        resize = elastic.resize(rec.spec, lambda w: sched.fits(sched.bundles_of(dict(rec.resources, workers=w)),
                                                                free))
        if resize is None:
            return False
        spec = resize.apply(rec.spec)
        validate_spec(spec, source=f"job {rec.id}")
        note = (f"elastic: resuming on {resize.workers} of {rec.resources['workers']} workers "
                f"(train.grad_accum {rec.spec['train']['grad_accum']} -> {resize.grad_accum}, same global batch)")
        log.info("%s: %s", rec.id, note)
        self.store.update(rec.id, spec=spec, resources=dict(rec.resources, workers=resize.workers), reason=note)
        self._start(rec.id)
        return True

    def _start(self, job_id: str, warm=None) -> None:
        """STARTING now; the gang is placed (or taken over) and started in a thread of its own."""
        from orchestrator.runner import JobRun, worker_resources

        rec = self.store.get(job_id)
        try:
            spec = validate_spec(rec.spec, source=f"job {job_id}")
        except UsageError as err:
            self.store.transition(job_id, JobState.FAILED, str(err))
            return
        res = worker_resources(spec, self.cluster)
        pooled = self._pooled_for(res) if warm is None else None
        resume = rec.restarts > 0 or bool(rec.history and any(t.to_state == JobState.RUNNING for t in rec.history))
        how = ("warm workers reused" if warm is not None else "warm pool workers" if pooled
               else "resources available")
        if (rec.reason or "").startswith("elastic:"):
            how = rec.reason  # say in the history that it resumes on fewer workers
        self.store.transition(job_id, JobState.STARTING, how + (" (resuming)" if resume else ""))
        run = JobRun(spec, self.storage, rec.run_dir, res, self.cluster.workers.peak_flops, owner="controller",
                     job_id=job_id)
        act = Active(job_id, run, since=time.time(), bundles=sched.bundles_of(rec.resources))

        def start() -> None:
            try:
                self.storage.makedirs(rec.run_dir)
                if not self.storage.exists(f"{rec.run_dir}/spec.json"):
                    self.storage.write_json(f"{rec.run_dir}/spec.json", spec.to_dict())
                run.start(resume=True, reserve_timeout_s=60.0, warm=warm, pooled=pooled)
            except BaseException as err:  # reported by _watch_running on the loop thread
                act.start_error = err
                if pooled and run.group is None:  # failed before the gang took the members over
                    from workers.pool import shutdown_members

                    shutdown_members(pooled)
            finally:
                self._wake.set()  # the loop records RUNNING (or the error) now

        act.starter = threading.Thread(target=start, name=f"start-{job_id}", daemon=True)
        self.active[job_id] = act
        act.starter.start()
