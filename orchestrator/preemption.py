"""The preemption policy: which running jobs may be stopped to make room, and the fewest that suffice.

Pure functions over plain values; the scheduler asks them when a queued job
of higher priority does not fit in what is free.

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
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.packing import Bundle, Resources, fits, give_back

_COMBINATION_BUDGET = 4000  # victim sets tried exactly before falling back to a greedy pick


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

    def why_not(self, job: Any, now: float) -> str | None:
        """None if ``job`` (a ``RunningJob``) may be preempted now, else why not (for pending reasons)."""
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



def choose_victims(bundles: Sequence[Bundle], free: Mapping[str, Resources],
                    candidates: Sequence[Any]) -> list[Any] | None:
    """The fewest candidates whose workers make room for ``bundles``, lowest priority first; None if none do.

    Candidates are ordered by priority (lowest first), then the most recently started (the least time
    invested in its current stretch), then id. Sets of each size are
    tried in that order, so the first set that fits has the fewest jobs and, among those, the lowest
    priorities. Past a budget of tries it falls back to adding candidates in order until the job fits and
    then dropping any that are not needed.
    """
    cands = sorted(candidates, key=lambda r: (r.priority, -(r.running_since or 0.0), r.job_id))
    if not cands or not fits(bundles, give_back(free, cands)):
        return None
    tries = 0
    for k in range(1, len(cands) + 1):
        for combo in itertools.combinations(cands, k):
            tries += 1
            if tries > _COMBINATION_BUDGET:
                break
            if fits(bundles, give_back(free, combo)):
                return list(combo)
        if tries > _COMBINATION_BUDGET:
            break
    chosen: list[Any] = []
    for c in cands:
        chosen.append(c)
        if fits(bundles, give_back(free, chosen)):
            break
    for c in sorted(chosen, key=lambda r: (-r.priority, r.job_id)):
        rest = [x for x in chosen if x is not c]
        if fits(bundles, give_back(free, rest)):
            chosen = rest
    return chosen

