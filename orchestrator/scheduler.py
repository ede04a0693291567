"""The scheduling and failure policies: pure functions that return decisions.

Nothing here touches Ray or the job store. The controller takes a snapshot
(queued jobs, free and total resources per node), calls :func:`schedule`, and
executes the ``Start`` / ``Wait`` / ``Fail`` / ``Cancel`` values it gets back;
on a fault it calls :func:`on_failure` and executes the ``Restart`` or
``Fail``. Tests check the policy with plain values and no cluster.

Scheduling policy (README paragraph):

    Switchyard runs queued jobs by priority (higher first) and, within a
    priority, in submission order. A job is admitted as a gang: all of its
    workers start together in one Ray placement group, or none do, so a
    3-worker job never starts on room for 2. Each worker is one bundle of CPUs
    and GPUs that must fit on a single node; a job may span nodes. Before
    anything is placed, a job that could not fit even on the empty cluster is
    failed at once with a message saying what it needs and what the cluster
    has, instead of waiting forever. When the job at the head of the queue
    does not fit in what is free, smaller jobs behind it may start in the gap
    (backfill), but only for a bounded time: once the head has waited longer
    than the backfill window (default 120 s), nothing behind it starts until it
    does, so resources drain to it and it cannot be starved by a stream of
    small jobs. A window of 0 turns backfill off (strict priority order).

How the controller drives it: call ``schedule`` each tick with the QUEUED
jobs. For every ``Wait``, set the job's ``blocked_since`` to now if it is not
set yet; a ``Start`` clears it (``JobStore.transition`` to STARTING does).
``blocked_since`` is the aging clock: a job that waited behind an aged head
is itself aged when it reaches the head, which is fair. Pass the cluster's
total resources from ``ray.cluster_resources``-style per-node totals: they
decide which jobs are impossible.

Packing: bundles are placed first-fit decreasing (largest GPU, then CPU
demand first) onto nodes. For the usual job, whose workers all ask for the
same bundle, this is exact: a node holds floor(min(CPU/c, GPU/g)) such
bundles whatever the order. For mixed bundles it can miss a packing that
exists, never claim one that does not. Quantities are compared in Ray's
resource granularity (1e-4), so 0.1 + 0.2 CPUs fit in 0.3.

Preemption policy (README paragraph):

    When a queued job does not fit in what is free and running jobs of
    strictly lower priority hold enough workers to make room, the scheduler
    picks the fewest of them, lowest priority first (then the most recently
    started), and returns a ``Preempt`` for each. The controller asks their
    ranks to checkpoint at the next step boundary and stop, moves them to
    PREEMPTED and back to QUEUED with the preempting job recorded, and starts
    the high-priority job in the room they leave; nothing else may take that
    room meanwhile. A preempted job resumes from that checkpoint at its exact
    data position, so its per-step losses are those of an uninterrupted run.
    Guards against thrashing (``preemption:`` in cluster.yaml): a job is never
    preempted before it has run ``min_run_s`` since it (re)started, nor when
    its priority is at or above ``never_preempt_priority``, nor more than
    ``max_per_job`` times; and after its n-th preemption it is protected for
    ``min_run_s + backoff_s * 2**(n-1)``. Preemption is only ever by strictly
    higher priority, so two jobs of equal priority never preempt each other,
    and a job still starting (no checkpoint to resume from yet) is never
    preempted.

Quotas and fair share (README paragraph):

    Every job has an owner and the owner's team (``teams:`` in cluster.yaml;
    users in no team are in team ``default``). A team may have quotas: CPUs
    and GPUs its running jobs may hold at once, and jobs it may have queued
    (checked at submit). A job that would take its team over a quota waits,
    and says so. Within one priority the queue is ordered by fair share, the
    team's usage divided by its weight, lower first, then by submission time.
    Usage is reserved resource-seconds (a GPU counts as ``gpu_weight`` CPUs)
    decayed with a half-life (``fair_share.half_life_s``, default one day), so
    a team that used the cluster a lot recently yields to one that did not,
    and the memory fades. Priority always comes first: fair share only orders
    jobs of equal priority.

Dependencies: a job submitted with ``--after A,B`` waits until A and B have
SUCCEEDED; if either ends FAILED or CANCELLED, the job fails with the reason.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

DEFAULT_BACKFILL_WINDOW_S = 120.0

# Ray stores resource quantities as fixed point with four decimal places.
_UNITS = 10_000


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Start:
    """Create the job's placement group and start its workers."""

    job_id: str


@dataclass(frozen=True)
class Wait:
    """Leave the job queued; ``reason`` is for people (``switchyard status``)."""

    job_id: str
    reason: str
    waiting_for: str = "capacity"
    """What it waits for: capacity, quota, dependency, backfill (held for an aged head) or preemption."""


@dataclass(frozen=True)
class Preempt:
    """Checkpoint the running job ``job_id`` at its next step, stop it and requeue it, to make room for ``by``."""

    job_id: str
    by: str
    reason: str


@dataclass(frozen=True)
class Restart:
    """Tear the workers down and run the job again from its latest checkpoint."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Fail:
    """Move the job to FAILED with ``reason``."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    """Move the job to CANCELLED (someone asked)."""

    job_id: str


Decision = Union[Start, Wait, Preempt, Restart, Fail, Cancel]


# ---------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Bundle:
    """One worker's reservation; Ray's ``{"CPU": cpus, "GPU": gpus}``."""

    cpus: float
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0 or not (math.isfinite(self.cpus) and math.isfinite(self.gpus)):
            raise ValueError(f"bundle needs finite, non-negative CPU and GPU counts, got {self}")

    def to_ray(self) -> dict[str, float]:
        """The bundle dict for ``ray.util.placement_group`` (zero entries left out, as Ray wants)."""
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v}


@dataclass(frozen=True)
class QueuedJob:
    """What the scheduler needs to know about one QUEUED job."""

    job_id: str
    priority: int
    """Higher runs first."""
    submitted_at: float
    """Unix time (s); earlier runs first within a priority."""
    bundles: tuple[Bundle, ...]
    """One per worker."""
    blocked_since: float | None = None
    """When it was first told to Wait (None: not yet); the backfill aging clock."""
    cancel_requested: bool = False
    team: str = ""
    """The owner's team: its quota and fair share apply."""
    deps: tuple[tuple[str, str], ...] = ()
    """(job id, state) of each job it must wait for (``--after``)."""

    @classmethod
    def from_resources(cls, job_id: str, priority: int, submitted_at: float, resources: Mapping[str, Any],
                       blocked_since: float | None = None, cancel_requested: bool = False, team: str = "",
                       deps: tuple[tuple[str, str], ...] = ()) -> QueuedJob:
        """Build from the job store's ``{workers, cpus_per_worker, gpus_per_worker}``."""
        return cls(job_id, priority, submitted_at, bundles_of(resources), blocked_since, cancel_requested, team,
                   tuple(deps))

    @classmethod
    def from_record(cls, record: Any, dep_states: Mapping[str, str] | None = None) -> QueuedJob:
        """Build from a ``JobRecord`` (duck-typed, so this module does not import the store).

        ``dep_states`` maps the ids in ``record.after`` to their states now.
        """
        deps = tuple((d, str((dep_states or {}).get(d, "UNKNOWN"))) for d in getattr(record, "after", ()))
        return cls.from_resources(record.id, record.priority, record.submitted_at, record.resources,
                                  record.blocked_since, record.cancel_requested, getattr(record, "team", ""), deps)


def bundles_of(resources: Mapping[str, Any]) -> tuple[Bundle, ...]:
    """One bundle per worker from the job store's ``{workers, cpus_per_worker, gpus_per_worker}``."""
    bundle = Bundle(float(resources.get("cpus_per_worker") or 0), float(resources.get("gpus_per_worker") or 0))
    return (bundle,) * int(resources["workers"])


@dataclass(frozen=True)
class RunningJob:
    """What the scheduler needs to know about a job holding workers (STARTING, RUNNING or PREEMPTED)."""

    job_id: str
    priority: int
    bundles: tuple[Bundle, ...]
    nodes: tuple[str, ...]
    """The node of each bundle (same order as ``bundles``)."""
    running_since: float | None
    """When its current stretch of RUNNING began; None while it is still starting."""
    preemptions: int = 0
    team: str = ""
    stopping: bool = False
    """Already told to stop for a preemption: its room is spoken for."""


@dataclass(frozen=True)
class PreemptionPolicy:
    """The anti-thrashing guards (``preemption:`` in cluster.yaml)."""

    enabled: bool = True
    min_run_s: float = 120.0
    """A job runs at least this long after each (re)start before it can be preempted."""
    never_preempt_priority: int | None = None
    """Jobs with a priority at or above this are never preempted (None: no such class)."""
    max_per_job: int = 3
    """A job preempted this many times is not preempted again."""
    backoff_s: float = 60.0
    """After its n-th preemption a job is protected for min_run_s + backoff_s * 2**(n-1)."""

    def protected_for(self, preemptions: int) -> float:
        """Seconds of protection after a (re)start for a job preempted ``preemptions`` times so far."""
        return self.min_run_s + (self.backoff_s * 2 ** (preemptions - 1) if preemptions > 0 else 0.0)

    def why_not(self, job: RunningJob, now: float) -> str | None:
        """None if ``job`` may be preempted now, else why not (for pending reasons)."""
        if job.stopping:
            return f"{job.job_id} is already stopping"
        if job.running_since is None:
            return f"{job.job_id} is still starting"
        if self.never_preempt_priority is not None and job.priority >= self.never_preempt_priority:
            return f"{job.job_id} has priority {job.priority} (never preempted at {self.never_preempt_priority} or above)"
        if job.preemptions >= self.max_per_job:
            return f"{job.job_id} was preempted {job.preemptions} times already (max_per_job {self.max_per_job})"
        ran, need = now - job.running_since, self.protected_for(job.preemptions)
        if ran < need:
            return f"{job.job_id} has run {ran:.0f} s of its protected {need:g} s"
        return None


@dataclass(frozen=True)
class TeamQuota:
    """A team's limits and weight (``teams:`` in cluster.yaml); None means no limit."""

    cpus: float | None = None
    """CPUs its running jobs may hold at once."""
    gpus: float | None = None
    """GPUs its running jobs may hold at once."""
    weight: float = 1.0
    """Fair-share weight: a team of weight 2 is entitled to twice the usage of a team of weight 1."""


Resources = Mapping[str, float]
"""One node's resources in Ray's spelling: {"CPU": 8, "GPU": 1, ...}; other keys are ignored."""


# ---------------------------------------------------------------------- packing


def _units(x: float) -> int:
    return round(x * _UNITS)


def _as_bundle(b: Bundle | Mapping[str, float]) -> Bundle:
    return b if isinstance(b, Bundle) else Bundle(float(b.get("CPU", 0)), float(b.get("GPU", 0)))


def place(bundles: Sequence[Bundle | Mapping[str, float]],
          free_per_node: Mapping[str, Resources]) -> tuple[str, ...] | None:
    """A node for each bundle (in the order given) such that all fit at once, or None.

    First-fit decreasing: GPU-heavy bundles first, then CPU-heavy; each goes
    to the first node in name order with room, except that bundles needing no
    GPU try GPU-less nodes first so GPUs stay free for those who need them.
    """
    items = [_as_bundle(b) for b in bundles]
    free = {n: [_units(r.get("CPU", 0)), _units(r.get("GPU", 0))] for n, r in free_per_node.items()}
    gpu_first = sorted(free)
    gpu_last = sorted(free, key=lambda n: (free[n][1] > 0, n))
    order = sorted(range(len(items)), key=lambda i: (items[i].gpus, items[i].cpus), reverse=True)
    chosen: list[str | None] = [None] * len(items)
    for i in order:
        cpu, gpu = _units(items[i].cpus), _units(items[i].gpus)
        for node in gpu_first if gpu else gpu_last:
            room = free[node]
            if room[0] >= cpu and room[1] >= gpu:
                room[0] -= cpu
                room[1] -= gpu
                chosen[i] = node
                break
        else:
            return None
    return tuple(chosen)  # type: ignore[arg-type]


def fits(bundles: Sequence[Bundle | Mapping[str, float]], free_per_node: Mapping[str, Resources]) -> bool:
    """Whether every bundle can be placed at once, each on one node (a gang may span nodes)."""
    return place(bundles, free_per_node) is not None


def _subtract(free: dict[str, dict[str, float]], bundles: Sequence[Bundle], nodes: Sequence[str]) -> None:
    for b, node in zip(bundles, nodes):
        free[node] = {"CPU": (_units(free[node].get("CPU", 0)) - _units(b.cpus)) / _UNITS,
                      "GPU": (_units(free[node].get("GPU", 0)) - _units(b.gpus)) / _UNITS}


# ---------------------------------------------------------------------- messages


def _n(x: float, unit: str) -> str:
    return f"{x:g} {unit}{'' if x == 1 else 's'}"


def describe_bundles(bundles: Sequence[Bundle]) -> str:
    """'3 workers x {2 CPUs}' or '2 workers x {1 CPU, 1 GPU}' for people."""
    def one(b: Bundle) -> str:
        return "{" + _n(b.cpus, "CPU") + (f", {_n(b.gpus, 'GPU')}" if b.gpus else "") + "}"
    if len(set(bundles)) <= 1:
        return f"{len(bundles)} worker{'' if len(bundles) == 1 else 's'} x {one(bundles[0]) if bundles else '{}'}"
    return f"{len(bundles)} workers: " + " + ".join(one(b) for b in bundles)


def describe_cluster(total_per_node: Mapping[str, Resources], gpus: bool = False) -> str:
    """'2 nodes with 6 CPUs in all: a (4 CPUs), b (2 CPUs)' for people; GPUs shown if any or asked."""
    gpus = gpus or any(r.get("GPU", 0) for r in total_per_node.values())

    def res(r: Resources) -> str:
        return _n(r.get("CPU", 0), "CPU") + (f", {_n(r.get('GPU', 0), 'GPU')}" if gpus else "")

    nodes = sorted(total_per_node)
    total = {"CPU": sum(r.get("CPU", 0) for r in total_per_node.values()),
             "GPU": sum(r.get("GPU", 0) for r in total_per_node.values())}
    head = f"{len(nodes)} node{'' if len(nodes) == 1 else 's'} with {res(total)} in all"
    if len(nodes) <= 4:
        return head + ": " + ", ".join(f"{n} ({res(total_per_node[n])})" for n in nodes)
    big = max(nodes, key=lambda n: (total_per_node[n].get("GPU", 0), total_per_node[n].get("CPU", 0)))
    return f"{head}, the largest {big} ({res(total_per_node[big])})"


# ---------------------------------------------------------------------- scheduling


def decayed_usage(intervals: Iterable[tuple[float, float | None, float]], now: float, half_life_s: float) -> float:
    """Sum over (start, end or None for still running, rate) of rate x seconds, each second weighted
    2**(-age / half_life_s): the integral, so the answer does not depend on how often it is computed."""
    k = math.log(2) / half_life_s if half_life_s > 0 else 0.0
    total = 0.0
    for start, end, rate in intervals:
        end = now if end is None else min(end, now)
        if end <= start:
            continue
        if k == 0.0:
            total += rate * (end - start)
        else:  # integral of exp(-k (now - t)) dt from start to end
            total += rate * (math.exp(-k * (now - end)) - math.exp(-k * (now - start))) / k
    return total


def fair_shares(usage: Mapping[str, float], quotas: Mapping[str, TeamQuota]) -> dict[str, float]:
    """Each team's usage divided by its weight: lower goes first within a priority."""
    return {team: u / max(quotas[team].weight if team in quotas else 1.0, 1e-9) for team, u in usage.items()}


def queue_order(jobs: Iterable[QueuedJob], shares: Mapping[str, float] | None = None) -> list[QueuedJob]:
    """Priority (higher first), then the team's fair share (lower first), then submission time, then id."""
    shares = shares or {}
    return sorted(jobs, key=lambda j: (-j.priority, shares.get(j.team, 0.0), j.submitted_at, j.job_id))


_DEP_FAILED = ("FAILED", "CANCELLED")
_COMBINATION_BUDGET = 4000  # victim sets tried exactly before falling back to a greedy pick


def schedule(queue: Iterable[QueuedJob], free_per_node: Mapping[str, Resources],
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
    if not any(_units(r.get("CPU", 0)) or _units(r.get("GPU", 0)) for r in total_per_node.values()):
        # No nodes (yet): the cluster is still coming up or is unreachable. Failing
        # every job as impossible would be wrong, so everyone waits.
        return [Cancel(j.job_id) if j.cancel_requested else Wait(j.job_id, "the cluster reports no resources yet")
                for j in jobs]

    free = {n: dict(r) for n, r in free_per_node.items()}
    in_use: dict[str, list[float]] = {}
    for r in running:
        _add_use(in_use, r.team, r.bundles)
    decisions: list[Decision] = []
    head: QueuedJob | None = None  # the first job that wanted to start but did not fit
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
        over = _over_quota(job, in_use, quotas.get(job.team))
        if over:
            decisions.append(Wait(job.job_id, over, "quota"))
            continue
        if reserved_for is not None:
            decisions.append(Wait(job.job_id, (
                f"held for {reserved_for.job_id}: jobs are being preempted to make room for it"), "backfill"))
            continue
        if head is not None and _aged(head, now, backfill_window_s):
            waited = now - head.blocked_since if head.blocked_since is not None else 0.0
            decisions.append(Wait(job.job_id, (
                f"held for {head.job_id}, which has waited {waited:.0f} s (backfill window "
                f"{backfill_window_s:g} s): free resources are reserved for it"), "backfill"))
            continue
        nodes = place(job.bundles, free)
        if nodes is not None:
            _subtract(free, job.bundles, nodes)
            _add_use(in_use, job.team, job.bundles)
            decisions.append(Start(job.job_id))
            continue
        why_not = ""
        if preemption is not None and preemption.enabled:
            stopping = [r for r in running if r.stopping and r.priority < job.priority]
            if stopping and fits(job.bundles, _plus(free, stopping)):
                reserved_for = job
                decisions.append(Wait(job.job_id, (
                    "waiting for " + ", ".join(r.job_id for r in stopping)
                    + " to checkpoint and stop (preempted to make room)"), "preemption"))
                continue
            lower = [r for r in running if r.priority < job.priority and not r.stopping
                     and r.job_id not in victims_taken]
            allowed = [r for r in lower if preemption.why_not(r, now) is None]
            chosen = _choose_victims(job.bundles, free, allowed)
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
            if blocked and fits(job.bundles, _plus(free, lower)):
                why_not = "; not preempting: " + "; ".join(blocked[:3])
        if head is None:
            head = job
        decisions.append(Wait(job.job_id, (
            f"waiting for resources: needs {describe_bundles(job.bundles)}, free now: "
            f"{_free_summary(free)}{why_not}")))
    return decisions


def _add_use(in_use: dict[str, list[float]], team: str, bundles: Sequence[Bundle]) -> None:
    use = in_use.setdefault(team, [0.0, 0.0])
    use[0] += sum(b.cpus for b in bundles)
    use[1] += sum(b.gpus for b in bundles)


def over_quota(job: QueuedJob, running: Iterable[RunningJob], quota: TeamQuota | None) -> str | None:
    """Why starting ``job`` now would take its team over ``quota`` given the ``running`` jobs, or None."""
    in_use: dict[str, list[float]] = {}
    for r in running:
        _add_use(in_use, r.team, r.bundles)
    return _over_quota(job, in_use, quota)


def _over_quota(job: QueuedJob, in_use: Mapping[str, list[float]], quota: TeamQuota | None) -> str | None:
    """Why starting ``job`` would take its team over a quota, or None."""
    if quota is None:
        return None
    used = in_use.get(job.team, [0.0, 0.0])
    need = (sum(b.cpus for b in job.bundles), sum(b.gpus for b in job.bundles))
    for i, (limit, unit) in enumerate(((quota.cpus, "CPU"), (quota.gpus, "GPU"))):
        if limit is not None and _units(used[i] + need[i]) > _units(limit):
            return (f"team {job.team or 'default'} is at its quota: it holds {used[i]:g} of its {_n(limit, unit)} "
                    f"and this job needs {need[i]:g} more")
    return None


def _plus(free: Mapping[str, Resources], jobs: Iterable[RunningJob]) -> dict[str, dict[str, float]]:
    """``free`` with the workers of ``jobs`` given back to their nodes."""
    out = {n: {"CPU": float(r.get("CPU", 0)), "GPU": float(r.get("GPU", 0))} for n, r in free.items()}
    for j in jobs:
        for b, node in zip(j.bundles, j.nodes):
            room = out.setdefault(node, {"CPU": 0.0, "GPU": 0.0})
            room["CPU"] = (_units(room["CPU"]) + _units(b.cpus)) / _UNITS
            room["GPU"] = (_units(room["GPU"]) + _units(b.gpus)) / _UNITS
    return out


def _choose_victims(bundles: Sequence[Bundle], free: Mapping[str, Resources],
                    candidates: Sequence[RunningJob]) -> list[RunningJob] | None:
    """The fewest candidates whose workers make room for ``bundles``, lowest priority first; None if none do.

    Candidates are ordered by priority (lowest first), then the most recently started (the least time
    invested in its current stretch), then id. Sets of each size are
    tried in that order, so the first set that fits has the fewest jobs and, among those, the lowest
    priorities. Past a budget of tries it falls back to adding candidates in order until the job fits and
    then dropping any that are not needed.
    """
    cands = sorted(candidates, key=lambda r: (r.priority, -(r.running_since or 0.0), r.job_id))
    if not cands or not fits(bundles, _plus(free, cands)):
        return None
    tries = 0
    for k in range(1, len(cands) + 1):
        for combo in itertools.combinations(cands, k):
            tries += 1
            if tries > _COMBINATION_BUDGET:
                break
            if fits(bundles, _plus(free, combo)):
                return list(combo)
        if tries > _COMBINATION_BUDGET:
            break
    chosen: list[RunningJob] = []
    for c in cands:
        chosen.append(c)
        if fits(bundles, _plus(free, chosen)):
            break
    for c in sorted(chosen, key=lambda r: (-r.priority, r.job_id)):
        rest = [x for x in chosen if x is not c]
        if fits(bundles, _plus(free, rest)):
            chosen = rest
    return chosen


def _aged(head: QueuedJob, now: float, window_s: float) -> bool:
    """Whether the blocked head has waited past the backfill window (a head never seen blocked starts now)."""
    since = now if head.blocked_since is None else head.blocked_since
    return now - since >= window_s


def _free_summary(free: Mapping[str, Resources]) -> str:
    cpu = sum(r.get("CPU", 0) for r in free.values())
    gpu = sum(r.get("GPU", 0) for r in free.values())
    most = max((r.get("CPU", 0) for r in free.values()), default=0)
    gpus = f", {_n(gpu, 'GPU')}" if gpu else ""
    return f"{_n(cpu, 'CPU')}{gpus} (at most {most:g} CPUs on one node)"


# ---------------------------------------------------------------------- failures


class ErrorKind(str, Enum):
    USER = "user"
    """The job itself is wrong (a bad spec field at run time, a missing data file): a restart cannot fix it."""
    INFRA = "infra"
    """The cluster failed the job (a rank died, a node was lost, an actor died): a restart may fix it."""


def on_failure(restarts: int, max_restarts: int, error_kind: ErrorKind | str, message: str, *,
               job_id: str) -> Restart | Fail:
    """What to do about a failed job that has already been restarted ``restarts`` times.

    User errors fail at once. Infrastructure errors restart until
    ``max_restarts`` restarts have been used, then fail with the last error.
    """
    kind = ErrorKind(error_kind)
    if kind is ErrorKind.USER:
        return Fail(job_id, f"{message} (a job error: restarting cannot fix it)")
    if restarts < max_restarts:
        return Restart(job_id, f"restart {restarts + 1} of {max_restarts} after: {message}")
    return Fail(job_id, f"gave up after {restarts} restart{'' if restarts == 1 else 's'} "
                        f"(max_restarts={max_restarts}); last error: {message}")
