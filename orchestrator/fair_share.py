"""Team quotas and fair share: who may start now, and which team goes first within a priority.

Pure functions over plain values; the scheduler calls them and the controller
feeds them the store's run history.

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
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.packing import Bundle, count, units


@dataclass(frozen=True)
class TeamQuota:
    """A team's limits and weight (``teams:`` in cluster.yaml); None means no limit."""

    cpus: float | None = None
    """CPUs its running jobs may hold at once."""
    gpus: float | None = None
    """GPUs its running jobs may hold at once."""
    weight: float = 1.0
    """Fair-share weight: a team of weight 2 is entitled to twice the usage of a team of weight 1."""


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


def team_usage(records: Iterable[Any], now: float, half_life_s: float, gpu_weight: float) -> dict[str, float]:
    """Each team's decayed usage from job records (``resources``, ``team``, ``run_intervals``): reserved
    CPU-seconds, a GPU-second counting ``gpu_weight`` CPU-seconds, for every stretch the job held workers."""
    usage: dict[str, float] = {}
    for rec in records:
        n = rec.resources.get("workers")
        if not n:
            continue
        rate = n * (float(rec.resources.get("cpus_per_worker") or 0)
                    + gpu_weight * float(rec.resources.get("gpus_per_worker") or 0))
        u = decayed_usage([(a, b, rate) for a, b in rec.run_intervals], now, half_life_s)
        usage[rec.team] = usage.get(rec.team, 0.0) + u
    return usage


def fair_shares(usage: Mapping[str, float], quotas: Mapping[str, TeamQuota]) -> dict[str, float]:
    """Each team's usage divided by its weight: lower goes first within a priority."""
    return {team: u / max(quotas[team].weight if team in quotas else 1.0, 1e-9) for team, u in usage.items()}


def add_use(in_use: dict[str, list[float]], team: str, bundles: Sequence[Bundle]) -> None:
    """Count ``bundles`` against ``team`` in ``in_use`` (team -> [CPUs, GPUs] held)."""
    use = in_use.setdefault(team, [0.0, 0.0])
    use[0] += sum(b.cpus for b in bundles)
    use[1] += sum(b.gpus for b in bundles)


def over_quota(job: Any, running: Iterable[Any], quota: TeamQuota | None) -> str | None:
    """Why starting ``job`` (a ``QueuedJob``) now would take its team over ``quota`` given ``running``, or None."""
    in_use: dict[str, list[float]] = {}
    for r in running:
        add_use(in_use, r.team, r.bundles)
    return quota_exceeded(job, in_use, quota)


def quota_exceeded(job: Any, in_use: Mapping[str, list[float]], quota: TeamQuota | None) -> str | None:
    """Why starting ``job`` would take its team over a quota given ``in_use`` (from :func:`add_use`), or None."""
    if quota is None:
        return None
    used = in_use.get(job.team, [0.0, 0.0])
    need = (sum(b.cpus for b in job.bundles), sum(b.gpus for b in job.bundles))
    for i, (limit, unit) in enumerate(((quota.cpus, "CPU"), (quota.gpus, "GPU"))):
        if limit is not None and units(used[i] + need[i]) > units(limit):
            return (f"team {job.team or 'default'} is at its quota: it holds {used[i]:g} of its {count(limit, unit)} "
                    f"and this job needs {need[i]:g} more")
    return None

