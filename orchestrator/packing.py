"""Gang packing: whether a job's worker bundles fit on the nodes' free resources, and where.

Pure functions over plain values (no Ray): the scheduler plans starts with
them and the controller checks elastic resizes with them.

Packing: bundles are placed first-fit decreasing (largest GPU, then CPU
demand first) onto nodes. For the usual job, whose workers all ask for the
same bundle, this is exact: a node holds floor(min(CPU/c, GPU/g)) such
bundles whatever the order. For mixed bundles it can miss a packing that
exists, never claim one that does not. Quantities are compared in Ray's
resource granularity (1e-4), so 0.1 + 0.2 CPUs fit in 0.3.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Ray stores resource quantities as fixed point with four decimal places.
_UNITS = 10_000


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


def bundles_of(resources: Mapping[str, Any]) -> tuple[Bundle, ...]:
    """One bundle per worker from the job store's ``{workers, cpus_per_worker, gpus_per_worker}``.

    Jobs of one shape share one tuple, so the scheduler's per-shape answers are found by identity.
    """
    return _gang(float(resources.get("cpus_per_worker") or 0), float(resources.get("gpus_per_worker") or 0),
                 int(resources["workers"]))


@functools.lru_cache(maxsize=4096)
def _gang(cpus: float, gpus: float, workers: int) -> tuple[Bundle, ...]:
    return (Bundle(cpus, gpus),) * workers


Resources = Mapping[str, float]
"""One node's resources in Ray's spelling: {"CPU": 8, "GPU": 1, ...}; other keys are ignored."""


def units(x: float) -> int:
    """``x`` in Ray's fixed-point resource units (1e-4), so sums compare exactly."""
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
    free = {n: [units(r.get("CPU", 0)), units(r.get("GPU", 0))] for n, r in free_per_node.items()}
    gpu_first = sorted(free)
    gpu_last = sorted(free, key=lambda n: (free[n][1] > 0, n))
    order = sorted(range(len(items)), key=lambda i: (items[i].gpus, items[i].cpus), reverse=True)
    chosen: list[str | None] = [None] * len(items)
    for i in order:
        cpu, gpu = units(items[i].cpus), units(items[i].gpus)
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


def subtract(free: dict[str, dict[str, float]], bundles: Sequence[Bundle], nodes: Sequence[str]) -> None:
    """Take ``bundles`` placed on ``nodes`` out of ``free``, in place."""
    for b, node in zip(bundles, nodes):
        free[node] = {"CPU": (units(free[node].get("CPU", 0)) - units(b.cpus)) / _UNITS,
                      "GPU": (units(free[node].get("GPU", 0)) - units(b.gpus)) / _UNITS}


# ---------------------------------------------------------------------- messages


def count(x: float, unit: str) -> str:
    """'1 CPU', '2.5 CPUs' for people."""
    return f"{x:g} {unit}{'' if x == 1 else 's'}"


def describe_bundles(bundles: Sequence[Bundle]) -> str:
    """'3 workers x {2 CPUs}' or '2 workers x {1 CPU, 1 GPU}' for people."""
    def one(b: Bundle) -> str:
        return "{" + count(b.cpus, "CPU") + (f", {count(b.gpus, 'GPU')}" if b.gpus else "") + "}"
    if len(set(bundles)) <= 1:
        return f"{len(bundles)} worker{'' if len(bundles) == 1 else 's'} x {one(bundles[0]) if bundles else '{}'}"
    return f"{len(bundles)} workers: " + " + ".join(one(b) for b in bundles)


def describe_cluster(total_per_node: Mapping[str, Resources], gpus: bool = False) -> str:
    """'2 nodes with 6 CPUs in all: a (4 CPUs), b (2 CPUs)' for people; GPUs shown if any or asked."""
    gpus = gpus or any(r.get("GPU", 0) for r in total_per_node.values())

    def res(r: Resources) -> str:
        return count(r.get("CPU", 0), "CPU") + (f", {count(r.get('GPU', 0), 'GPU')}" if gpus else "")

    nodes = sorted(total_per_node)
    total = {"CPU": sum(r.get("CPU", 0) for r in total_per_node.values()),
             "GPU": sum(r.get("GPU", 0) for r in total_per_node.values())}
    head = f"{len(nodes)} node{'' if len(nodes) == 1 else 's'} with {res(total)} in all"
    if len(nodes) <= 4:
        return head + ": " + ", ".join(f"{n[:12]} ({res(total_per_node[n])})" for n in nodes)  # Ray's ids: 56 hex
    big = max(nodes, key=lambda n: (total_per_node[n].get("GPU", 0), total_per_node[n].get("CPU", 0)))
    return f"{head}, the largest {big[:12]} ({res(total_per_node[big])})"


def give_back(free: Mapping[str, Resources], jobs: Iterable[Any]) -> dict[str, dict[str, float]]:
    """``free`` with the workers of ``jobs`` (``RunningJob``: bundles and their nodes) given back to their nodes."""
    out = {n: {"CPU": float(r.get("CPU", 0)), "GPU": float(r.get("GPU", 0))} for n, r in free.items()}
    for j in jobs:
        _add(out, j.bundles, j.nodes)
    return out


def _add(free: dict[str, dict[str, float]], bundles: Sequence[Bundle], nodes: Sequence[str]) -> None:
    """Give ``bundles`` placed on ``nodes`` back to ``free``, in place (the reverse of :func:`subtract`)."""
    for b, node in zip(bundles, nodes):
        room = free.setdefault(node, {"CPU": 0.0, "GPU": 0.0})
        room["CPU"] = (units(room["CPU"]) + units(b.cpus)) / _UNITS
        room["GPU"] = (units(room["GPU"]) + units(b.gpus)) / _UNITS


def earliest_fit(bundles: Sequence[Bundle], total: Mapping[str, Resources], jobs: Iterable[Any],
                 now: float) -> float | None:
    """When a gang of ``bundles`` fits at the latest, counting only what ``jobs`` (``RunningJob``: bundles,
    nodes, ``ends_by``) hold of the nodes' ``total``: ``now`` if it fits beside them, else the earliest
    ``ends_by`` by which enough of them have ended; None if that never happens (those in the way have no
    ``ends_by``). Short-lived holders that are not jobs (checkpoint evaluations, warm workers given back on
    demand) are not counted. A job whose nodes are not known yet (still being placed) is counted where
    :func:`place` would put it."""
    room = {n: {"CPU": float(r.get("CPU", 0)), "GPU": float(r.get("GPU", 0))} for n, r in total.items()}
    held = []  # (ends_by, bundles, nodes) of each job, as placed in ``room``
    for j in jobs:
        nodes = tuple(j.nodes) if all(n in room for n in j.nodes) else place(j.bundles, room)
        if nodes is not None:
            subtract(room, j.bundles, nodes)
            held.append((j.ends_by, j.bundles, nodes))
    if fits(bundles, room):
        return now
    for ends_by, held_bundles, nodes in sorted((h for h in held if h[0] is not None), key=lambda h: h[0]):
        _add(room, held_bundles, nodes)
        if fits(bundles, room):
            return ends_by
    return None


def span(s: float) -> str:
    """A duration for people (a job's time left, a token's lifetime): 45s, 90m, 12h, 30d."""
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h" if s < 172800 \
        else f"{s / 86400:.0f}d"


def free_summary(free: Mapping[str, Resources]) -> str:
    """'6 CPUs (at most 4 CPUs on one node)' for pending reasons."""
    cpu = sum(r.get("CPU", 0) for r in free.values())
    gpu = sum(r.get("GPU", 0) for r in free.values())
    most = max((r.get("CPU", 0) for r in free.values()), default=0)
    gpus = f", {count(gpu, 'GPU')}" if gpu else ""
    return f"{count(cpu, 'CPU')}{gpus} (at most {most:g} CPUs on one node)"

