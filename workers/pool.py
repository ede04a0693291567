"""The warm worker pool: idle rank processes, torch and DeepSpeed already imported, ready for the next job.

A cold job spends most of its start in things no job owns: placing a gang,
forking rank processes and importing torch, DeepSpeed and the model code. The
pool does that ahead of demand. Each member is one ``RankWorker`` (``rank=None``)
in a placement group of its own with one bundle of the cluster's default worker
shape (``workers.cpus``, ``workers.gpus``). A job of that shape takes all the
members it needs at once or none (``take``): a gang is never started partly from
the pool, so the gang guarantee is the same as a fresh placement group's, and
the group then owns the members' placement groups and frees them with the job.

The controller counts members' resources as free (a queued job never waits
for the pool, and the pool is never "capacity" in a pending reason), releases
them when a job of another shape or a checkpoint evaluation needs the room,
and refills the pool only while nothing is queued.

A member serves one job, then dies with its gang (or stays in that gang's warm
reuse, ``WorkerGroup.reattach``); it never goes back to the pool. ``RankWorker.assign``
still resets what a job could inherit from the process: every environment
variable to its value at process start (so no MASTER_*, RANK, GLOO/NCCL
interface, OMP or auth variable of anyone else), ``OMP_NUM_THREADS`` and torch's
threads to the job's, and the rank log. ``TORCH_EXTENSIONS_DIR`` is the
environment's prebuilt one for every job.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import (PlacementGroup, placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.rank import RankWorker

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One idle rank process and the one-bundle placement group it lives in."""

    pg: object
    actor: object
    ready: object                 # ObjectRef of the actor's ``info()``: resolves once its imports are done
    created: float = field(default_factory=time.time)
    node: str | None = None       # the node its bundle is on, once placed


class WarmPool:
    """Up to ``size`` idle members of one shape (``cpus`` and ``gpus`` per rank)."""

    def __init__(self, size: int, cpus: float, gpus: float, tag: str = "pool"):
        self.size, self.cpus, self.gpus = size, cpus, gpus
        self.prefix = f"sy-pool-{tag}/"  # the controller's namespace: one pool per controller
        self.members: list[Member] = []

    def others_waiting(self) -> bool:
        """Whether some placement group other than the pool's own waits for room (a `switchyard run` on
        this cluster, another tool's gang): the pool must not keep it waiting."""
        return any(rec.get("state") in ("PENDING", "RESCHEDULING") and not rec.get("name", "").startswith(self.prefix)
                   for rec in placement_group_table().values())

    def remove_leftovers(self) -> int:
        """Remove placement groups a previous controller process of this namespace left (it died with its
        members, which Ray killed, but not with their placement groups); returns how many."""
        removed = 0
        for pg_id, rec in placement_group_table().items():
            if rec.get("name", "").startswith(self.prefix) and rec.get("state") in ("CREATED", "PENDING",
                                                                                     "RESCHEDULING"):
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
                    removed += 1
                except Exception:
                    pass
        return removed

    def fits(self, workers: int, cpus: float, gpus: float) -> bool:
        """Whether a job of this shape could take members (it needs ``workers`` of them)."""
        return (cpus, gpus) == (self.cpus, self.gpus) and 0 < workers <= len(self.members)

    def take(self, workers: int, cpus: float, gpus: float) -> list[Member] | None:
        """``workers`` members for one job, oldest first (the most likely to be ready), or None: all or none."""
        if not self.fits(workers, cpus, gpus):
            return None
        members = sorted(self.members, key=lambda m: m.created)  # a new list: ping() may be reading this one
        taken, self.members = members[:workers], members[workers:]
        return taken

    def fill(self, free_per_node: dict) -> int:
        """Start one member if the pool is short and some node has room for it; returns how many started."""
        if len(self.members) >= self.size:
            return 0
        if not any(f.get("CPU", 0) >= self.cpus and f.get("GPU", 0) >= self.gpus for f in free_per_node.values()):
            return 0
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        pg = placement_group([bundle], strategy="PACK", name=f"{self.prefix}{os.getpid()}-{time.time_ns()}")
        actor = ray.remote(RankWorker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_concurrency=4, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(None)
        self.members.append(Member(pg, actor, actor.info.remote()))
        return 1

    def pids(self) -> list[int]:
        """Process ids of the members ready now (their imports done), for ``ping`` and the benchmarks."""
        members = list(self.members)
        done, _ = ray.wait([m.ready for m in members], num_returns=len(members), timeout=0) if members else ([], [])
        out = []
        for m in members:
            if m.ready in done:
                try:
                    out.append(ray.get(m.ready)["pid"])
                except Exception:  # lost; drop_failed forgets it
                    pass
        return out

    def held(self) -> dict[str, dict[str, float]]:
        """What members hold per node (those whose bundle is placed), so the controller can count it as free."""
        out: dict[str, dict[str, float]] = {}
        for m in self.members:
            if m.node is None:
                m.node = _node_of(m.pg)
            if m.node is not None:
                n = out.setdefault(m.node, {"CPU": 0.0, "GPU": 0.0})
                n["CPU"] += self.cpus
                n["GPU"] += self.gpus
        return out

    def drop_failed(self) -> None:
        """Forget members whose process died while idle (a lost node, an import error)."""
        done, _ = ray.wait([m.ready for m in self.members], num_returns=len(self.members), timeout=0) \
            if self.members else ([], [])
        lost = []
        for m in [m for m in self.members if m.ready in done]:
            try:
                ray.get(m.ready)
            except Exception as err:
                log.warning("warm pool member lost: %s", str(err).strip().splitlines()[-1][:200])
                lost.append(m)
        if lost:
            self.members = [m for m in self.members if m not in lost]
            shutdown_members(lost)

    def release(self, n: int | None = None) -> int:
        """Free ``n`` members, the newest first, or every one (a job of another shape or an evaluation
        needs the room, or the controller stops); returns how many."""
        members = sorted(self.members, key=lambda m: m.created)
        keep = 0 if n is None else max(0, len(members) - n)
        gone, self.members = members[keep:], members[:keep]
        shutdown_members(gone)
        return len(gone)


def shutdown_members(members: list[Member]) -> None:
    for m in members:
        try:
            ray.kill(m.actor, no_restart=True)
        except Exception:
            pass
        try:
            remove_placement_group(m.pg)
        except Exception:
            pass


def _node_of(pg) -> str | None:
    try:
        nodes = placement_group_table(pg).get("bundles_to_node_id") or {}
    except Exception:
        return None
    return nodes.get(0)
