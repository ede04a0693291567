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
"""
from __future__ import annotations

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


Decision = Union[Start, Wait, Restart, Fail, Cancel]


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

    @classmethod
    def from_resources(cls, job_id: str, priority: int, submitted_at: float, resources: Mapping[str, Any],
                       blocked_since: float | None = None, cancel_requested: bool = False) -> QueuedJob:
        """Build from the job store's ``{workers, cpus_per_worker, gpus_per_worker}``."""
        bundle = Bundle(float(resources.get("cpus_per_worker") or 0), float(resources.get("gpus_per_worker") or 0))
        return cls(job_id, priority, submitted_at, (bundle,) * int(resources["workers"]), blocked_since,
                   cancel_requested)

    @classmethod
    def from_record(cls, record: Any) -> QueuedJob:
        """Build from a ``JobRecord`` (duck-typed, so this module does not import the store)."""
        return cls.from_resources(record.id, record.priority, record.submitted_at, record.resources,
                                  record.blocked_since, record.cancel_requested)


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


def queue_order(jobs: Iterable[QueuedJob]) -> list[QueuedJob]:
    """Priority (higher first), then submission time, then id so ties are stable."""
    return sorted(jobs, key=lambda j: (-j.priority, j.submitted_at, j.job_id))


def schedule(queue: Iterable[QueuedJob], free_per_node: Mapping[str, Resources],
             total_per_node: Mapping[str, Resources], *, now: float,
             backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S) -> list[Decision]:
    """One decision per queued job, in queue order.

    ``free_per_node`` is what is available now; ``total_per_node`` is each
    node's capacity and decides which jobs can never fit. Starts are
    planned against a running copy of ``free_per_node``, so the ``Start``
    decisions of one call fit together.
    """
    jobs = queue_order(queue)
    if not any(_units(r.get("CPU", 0)) or _units(r.get("GPU", 0)) for r in total_per_node.values()):
        # No nodes (yet): the cluster is still coming up or is unreachable. Failing
        # every job as impossible would be wrong, so everyone waits.
        return [Cancel(j.job_id) if j.cancel_requested else Wait(j.job_id, "the cluster reports no resources yet")
                for j in jobs]

    free = {n: dict(r) for n, r in free_per_node.items()}
    decisions: list[Decision] = []
    head: QueuedJob | None = None  # the first job that wanted to start but did not fit
    for job in jobs:
        if job.cancel_requested:
            decisions.append(Cancel(job.job_id))
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
        if head is not None and _aged(head, now, backfill_window_s):
            waited = now - head.blocked_since if head.blocked_since is not None else 0.0
            decisions.append(Wait(job.job_id, (
                f"held for {head.job_id}, which has waited {waited:.0f} s (backfill window "
                f"{backfill_window_s:g} s): free resources are reserved for it")))
            continue
        nodes = place(job.bundles, free)
        if nodes is not None:
            _subtract(free, job.bundles, nodes)
            decisions.append(Start(job.job_id))
            continue
        if head is None:
            head = job
        decisions.append(Wait(job.job_id, (
            f"waiting for resources: needs {describe_bundles(job.bundles)}, free now: "
            f"{_free_summary(free)}")))
    return decisions


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
