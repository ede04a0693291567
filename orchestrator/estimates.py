"""When the first jobs of the queue can start, from the time limits of the jobs ahead of them.

The scheduler itself only needs the head's time (``scheduler``: it bounds the
gap that backfill may use). People waiting further back ask the same question,
so every ``ESTIMATE_EVERY_S`` the controller plays the queue forward for its
first ``ESTIMATED`` waiting jobs: each running job holds its workers until its
``ends_by`` (forever without one), and each waiting job, in queue order, takes
the earliest time at which its gang fits for its whole ``max_run_s`` (forever
without one) beside everything placed so far, as reservations. That is
conservative backfill's plan; the real scheduler may do better (a job that ends
early, a gap a later job fits), never worse unless a higher-priority job is
submitted meanwhile. As in the scheduler, a job without a time limit does not
go ahead of a job before it. A job that cannot be placed at any time
(something in its way has no time limit) gets no estimate, and neither does
anything behind it.

Times are rounded up to ``GRAIN_S`` so the plan's number of distinct times,
and its cost, stays small on a large cluster (400 running jobs: about 120
times over two hours).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.packing import _UNITS, Bundle, Resources, place, units

ESTIMATED = 20
"""How many waiting jobs, from the head back, get a start time."""
ESTIMATE_EVERY_S = 10.0
"""How often the controller plays the queue forward."""
GRAIN_S = 60.0


def _up(t: float, now: float) -> float:
    """``t`` rounded up to the grain, counted from ``now``."""
    return now + math.ceil(max(t - now, 0.0) / GRAIN_S) * GRAIN_S


class _Plan:
    """The room on every node over time: ``times[k]`` starts segment k, which lasts until ``times[k + 1]`` (the
    last one forever); ``cpu[k][i]`` and ``gpu[k][i]`` are what node ``nodes[i]`` has free then, in Ray's
    fixed-point units (lists of ints, cheap to split and take from; each search turns them into arrays)."""

    def __init__(self, total: Mapping[str, Resources], now: float):
        self.nodes = sorted(total)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.times = [now]
        self.cpu = [[units(total[n].get("CPU", 0)) for n in self.nodes]]
        self.gpu = [[units(total[n].get("GPU", 0)) for n in self.nodes]]

    def _cut(self, t: float) -> int:
        """The index of the segment that starts at ``t``, splitting the one that holds it."""
        k = bisect.bisect_left(self.times, t)
        if k < len(self.times) and self.times[k] == t:
            return k
        self.times.insert(k, t)
        self.cpu.insert(k, list(self.cpu[k - 1]))
        self.gpu.insert(k, list(self.gpu[k - 1]))
        return k

    def hold(self, bundles: Sequence[Bundle], nodes: Sequence[str], start: float, end: float | None) -> None:
        """Take ``bundles`` on ``nodes`` from ``start`` until ``end`` (None: forever)."""
        k = self._cut(start)
        m = len(self.times) if end is None else self._cut(end)
        for b, node in zip(bundles, nodes):
            i, c, g = self.index[node], units(b.cpus), units(b.gpus)
            for seg in range(k, m):
                self.cpu[seg][i] -= c
                self.gpu[seg][i] -= g

    def free(self, cpu: Sequence[int], gpu: Sequence[int]) -> dict[str, dict[str, float]]:
        """One row of the plan as a free view for :func:`place`."""
        return {n: {"CPU": cpu[i] / _UNITS, "GPU": gpu[i] / _UNITS} for i, n in enumerate(self.nodes)}

    def earliest(self, bundles: Sequence[Bundle], length: float | None,
                 not_before: float) -> tuple[float, tuple[str, ...]] | None:
        """The first segment start from ``not_before`` on at which ``bundles`` fit, on the same nodes, for
        ``length`` (None: forever), and the nodes; None if there is none. Every start is tried at once: the room
        of each window (from segment k up to the one its run ends in, or the last, which lasts forever) is a
        range minimum."""
        times = np.asarray(self.times)
        n = len(times)
        ends = np.full(n, n) if length is None else np.searchsorted(times, times + length, side="left")
        cpu = _range_min(np.asarray(self.cpu, dtype=np.int64), ends)
        gpu = _range_min(np.asarray(self.gpu, dtype=np.int64), ends)
        if len(set(bundles)) == 1:  # the usual gang: count how many bundles each node holds
            c, g, want = units(bundles[0].cpus), units(bundles[0].gpus), len(bundles)
            per_node = np.minimum(cpu // c if c else want, gpu // g if g else want).clip(min=0)
            starts = np.nonzero((per_node.sum(axis=1) >= want) & (times >= not_before))[0]
            if not len(starts):
                return None
            k = int(starts[0])
            nodes = [node for node, fit in zip(self.nodes, per_node[k]) for _ in range(int(fit))]
            return float(times[k]), tuple(nodes[:want])
        for k in range(int(np.searchsorted(times, not_before, side="left")), n):
            nodes = place(bundles, self.free(cpu[k], gpu[k]))
            if nodes is not None:
                return float(times[k]), nodes
        return None


def _range_min(a: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Row k: the element-wise minimum of ``a[k:ends[k]]`` (``ends[k] > k``), for every k at once (a sparse
    table of minima over power-of-two runs of rows)."""
    n = len(a)
    table = [a]
    while 2 ** len(table) <= n:
        half = 2 ** (len(table) - 1)
        prev = table[-1]
        table.append(np.minimum(prev[:-half], prev[half:]))
    k = np.arange(n)
    span = np.maximum(ends - k, 1)
    level = np.floor(np.log2(span)).astype(int)
    out = np.empty_like(a)
    for j in np.unique(level):
        rows = k[level == j]
        out[rows] = np.minimum(table[j][rows], table[j][ends[rows] - 2 ** j])
    return out


def start_estimates(waiting: Iterable[Any], total: Mapping[str, Resources], holders: Iterable[Any],
                    now: float, limit: int = ESTIMATED) -> dict[str, float | None]:
    """Job id -> when it can start (Unix time; None: not known) for the first ``limit`` of ``waiting``
    (``QueuedJob``, in queue order), with ``holders`` (``RunningJob``) keeping their workers until ``ends_by``.

    A holder whose nodes are not known yet (still being placed) is counted where :func:`place` puts it."""
    plan = _Plan(total, now)
    for h in holders:
        nodes = tuple(h.nodes)
        if not all(n in total for n in nodes):
            nodes = place(h.bundles, plan.free(plan.cpu[0], plan.gpu[0]))
            if nodes is None:
                continue
        plan.hold(h.bundles, nodes, now, None if h.ends_by is None else _up(h.ends_by, now))
    out: dict[str, float | None] = {}
    latest, stuck = now, False  # the latest start of a job ahead; whether one ahead has none
    for job in waiting:
        if len(out) >= limit:
            break
        if stuck:
            out[job.job_id] = None  # behind a job with no start time, as the scheduler holds it
            continue
        length = None if job.max_run_s is None else math.ceil(job.max_run_s / GRAIN_S) * GRAIN_S
        # Only a job with a time limit goes ahead of one before it (the scheduler's backfill rule).
        found = plan.earliest(job.bundles, length, now if length is not None else latest)
        if found is None:
            out[job.job_id], stuck = None, True
            continue
        start, nodes = found
        plan.hold(job.bundles, nodes, start, None if length is None else start + length)
        out[job.job_id] = start
        latest = max(latest, start)
    return out
