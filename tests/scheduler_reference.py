"""The scheduling pass as it was before it reused answers per job shape (issue #15): the oracle that
tests/test_queue_scale.py compares ``scheduler.schedule`` with. Kept verbatim apart from the helpers'
new homes and the time-limit backfill behind an aged head (written as plainly), so a difference in
decisions is a bug in the faster pass."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from orchestrator.scheduler import (
    DEFAULT_BACKFILL_WINDOW_S,
    Cancel,
    Decision,
    Fail,
    PreemptionPolicy,
    Preempt,
    QueuedJob,
    Resources,
    RunningJob,
    Start,
    TeamQuota,
    Wait,
    _aged,
    _DEP_FAILED,
    earliest_fit,
    held_reason,
    add_use,
    choose_victims,
    describe_bundles,
    describe_cluster,
    fits,
    free_summary,
    give_back,
    place,
    queue_order,
    quota_exceeded,
    subtract,
    units,
)


def reference_schedule(queue: Iterable[QueuedJob], free_per_node: Mapping[str, Resources],
             total_per_node: Mapping[str, Resources], *, now: float,
             backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S, running: Iterable[RunningJob] = (),
             preemption: PreemptionPolicy | None = None, quotas: Mapping[str, TeamQuota] | None = None,
             shares: Mapping[str, float] | None = None) -> list[Decision]:
    """One decision per queued job, in queue order, with any ``Preempt`` just before the job it makes room for.

    ``free_per_node`` is what is available now; ``total_per_node`` is each
    node's capacity and decides which jobs can never fit. Starts are
    planned against a running copy of ``free_per_node``, so the ``Start``
    decisions of one call fit together. ``running`` are the jobs holding
    workers (what preemption may stop and what counts against quotas);
    ``preemption`` None turns preemption off. ``quotas`` per team, ``shares``
    per team from :func:`fair_shares`.
    """
    jobs = queue_order(queue, shares)
    running = list(running)
    quotas = quotas or {}
    if not any(units(r.get("CPU", 0)) or units(r.get("GPU", 0)) for r in total_per_node.values()):
        # No nodes (yet): the cluster is still coming up or is unreachable. Failing
        # every job as impossible would be wrong, so everyone waits.
        return [Cancel(j.job_id) if j.cancel_requested else Wait(j.job_id, "the cluster reports no resources yet")
                for j in jobs]

    free = {n: dict(r) for n, r in free_per_node.items()}
    in_use: dict[str, list[float]] = {}
    for r in running:
        add_use(in_use, r.team, r.bundles)
    decisions: list[Decision] = []
    head: QueuedJob | None = None  # the first job that wanted to start but did not fit
    head_by: float | None = None  # when it can start at the latest
    started: list[RunningJob] = []  # this pass's starts, with when they end at the latest
    reserved_for: QueuedJob | None = None  # a job that preempted others: the room they leave is its own
    victims_taken: set[str] = set()
    for job in jobs:
        if job.cancel_requested:
            decisions.append(Cancel(job.job_id))
            continue
        failed = [(d, s) for d, s in job.deps if s in _DEP_FAILED]
        if failed:
            decisions.append(Fail(job.job_id, "dependency " + ", ".join(f"{d} ended {s}" for d, s in failed)
                                  + ": this job needs it to succeed, so it does not run"))
            continue
        pending = [(d, s) for d, s in job.deps if s != "SUCCEEDED"]
        if pending:
            decisions.append(Wait(job.job_id, "waiting for " + ", ".join(f"{d} ({s})" for d, s in pending)
                                  + " to succeed", "dependency"))
            continue
        if not job.bundles:
            # A job with no workers (a pipeline or sweep parent) needs no placement.
            decisions.append(Start(job.job_id))
            continue
        if not fits(job.bundles, total_per_node):
            gpus = any(b.gpus for b in job.bundles)
            decisions.append(Fail(job.job_id, (
                f"needs {describe_bundles(job.bundles)} but the cluster has {describe_cluster(total_per_node, gpus)}. "
                "Each worker must fit on one node: ask for fewer or smaller workers, or add nodes")))
            continue
        over = quota_exceeded(job, in_use, quotas.get(job.team))
        if over:
            decisions.append(Wait(job.job_id, over, "quota"))
            continue
        if reserved_for is not None:
            decisions.append(Wait(job.job_id, (
                f"held for {reserved_for.job_id}: jobs are being preempted to make room for it"), "backfill"))
            continue
        held = head is not None and _aged(head, now, backfill_window_s)
        in_gap = not held or head_by is not None and job.max_run_s is not None and now + job.max_run_s <= head_by
        nodes = place(job.bundles, free) if in_gap else None
        if nodes is not None:
            subtract(free, job.bundles, nodes)
            add_use(in_use, job.team, job.bundles)
            ends = None if job.max_run_s is None else now + job.max_run_s
            started.append(RunningJob(job.job_id, job.priority, job.bundles, nodes, None, team=job.team, ends_by=ends))
            decisions.append(Start(job.job_id))
            continue
        if held:
            decisions.append(Wait(job.job_id, held_reason(head, head_by, now, backfill_window_s), "backfill"))
            continue
        why_not = ""
        if preemption is not None and preemption.enabled:
            stopping = [r for r in running if r.stopping and r.priority < job.priority]
            if stopping and fits(job.bundles, give_back(free, stopping)):
                reserved_for = job
                decisions.append(Wait(job.job_id, (
                    "waiting for " + ", ".join(r.job_id for r in stopping)
                    + " to checkpoint and stop (preempted to make room)"), "preemption"))
                continue
            lower = [r for r in running if r.priority < job.priority and not r.stopping
                     and r.job_id not in victims_taken]
            allowed = [r for r in lower if preemption.why_not(r, now) is None]
            chosen = choose_victims(job.bundles, free, allowed)
            if chosen:
                reserved_for = job
                for v in chosen:
                    victims_taken.add(v.job_id)
                    decisions.append(Preempt(v.job_id, job.job_id, (
                        f"preempted by {job.job_id} (priority {job.priority} > {v.priority})")))
                decisions.append(Wait(job.job_id, (
                    "preempting " + ", ".join(v.job_id for v in chosen) + " to make room"), "preemption"))
                continue
            blocked = [preemption.why_not(r, now) for r in lower if preemption.why_not(r, now)]
            if blocked and fits(job.bundles, give_back(free, lower)):
                why_not = "; not preempting: " + "; ".join(blocked[:3])
        by = None
        if head is None:
            head = job
            head_by = by = earliest_fit(job.bundles, total_per_node, running + started, now)
        decisions.append(Wait(job.job_id, (
            f"waiting for resources: needs {describe_bundles(job.bundles)}, free now: "
            f"{free_summary(free)}{why_not}"), starts_by=by))
    return decisions

