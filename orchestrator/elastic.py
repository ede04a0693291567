"""Elastic resume: a job that lost workers, and did not get them back in time, resumes on fewer.

Opt-in per job (``resources.elastic``). The global batch stays the same: with W' workers the job's
``train.grad_accum`` becomes global / (micro_batch x W'), so every step still averages the gradient over
the same samples, and the data position and ZeRO's re-partitioned optimizer state (the universal
checkpoint) carry on exactly; the per-step losses equal the uninterrupted run's up to float summation
order. Decisions only: the controller applies them.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resize:
    """Resume the job on ``workers`` ranks with ``grad_accum`` micro-batches per step."""

    workers: int
    grad_accum: int

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(spec)
        out["resources"]["workers"], out["train"]["grad_accum"] = self.workers, self.grad_accum
        return out


def waited_long_enough(spec: dict[str, Any], ran_before: bool, blocked_since: float | None, now: float) -> bool:
    r = spec.get("resources", {})
    return bool(r.get("elastic")) and ran_before and blocked_since is not None \
        and now - blocked_since >= float(r.get("elastic_wait_s", 60.0))


def resize(spec: dict[str, Any], fits: Callable[[int], bool]) -> Resize | None:
    """The most workers in [min_workers, workers) that fit now and keep the global batch, or None."""
    r, t, p = spec["resources"], spec["train"], spec.get("parallel", {})
    micro, ep = int(t["micro_batch"]), int(p.get("ep", 1))
    global_batch = micro * int(t["grad_accum"]) * int(r["workers"])
    for workers in range(int(r["workers"]) - 1, int(r.get("min_workers") or 1) - 1, -1):
        if global_batch % (micro * workers) or workers % ep:
            continue
        if fits(workers):
            return Resize(workers, global_batch // (micro * workers))
    return None
