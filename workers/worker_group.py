"""A job's gang of rank actors in one placement group: all start together or none do."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.rank import RankWorker
from workers.resources import WorkerResources


class PlacementTimeout(Exception):
    """The cluster could not place every worker of the job in time."""


@dataclass(frozen=True)
class PollStatus:
    """The ranks of a running job in one value: how many returned, their results, or why one failed."""

    finished: int
    """Ranks whose ``train`` returned (or raised)."""
    total: int
    """Ranks of the job."""
    results: list
    """Results of the ranks that returned."""
    error: BaseException | None = None
    """The root cause when a rank failed: a lost rank process first, else the first exception raised."""

    @property
    def done(self) -> bool:
        """Every rank returned a result."""
        return self.error is None and self.finished == self.total


def poll(refs: list, timeout_s: float = 0.0) -> PollStatus:
    """The status of ``train_async``'s refs, waiting at most ``timeout_s`` for all of them."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    results, error = [], None
    for ref in ready:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayActorError as err:  # the root cause: a rank's process is gone
            error = err
            break
        except Exception as err:  # a rank raised (a UserError, or a peer's death seen through gloo)
            error = error or err
    return PollStatus(len(ready), len(refs), results, error)


class WorkerGroup:
    def __init__(self, resources: WorkerResources, run_dir: str, storage, name: str = "job"):
        self.resources, self.run_dir, self.storage, self.name = resources, run_dir, storage, name
        self.pg = None
        self.pool_pgs: list = []  # the one-bundle placement groups of pool members this gang took over
        self.actors: list = []
        self.infos: list[dict] = []
        self.distributed = False  # torch.distributed is up among these ranks (kept when the gang is reused)

    def reserve(self, timeout_s: float | None) -> bool:
        """Create the placement group; True once every bundle is placed (PACK may span nodes)."""
        self.pg = placement_group(self.resources.bundles(), strategy="PACK",
                                  name=f"sy-{self.name}-{os.getpid()}-{time.time_ns()}")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return False
        return True

    def start(self) -> list[dict]:
        """Start one actor per rank inside the placement group; returns their {rank, node, ip, pid}."""
        r = self.resources
        cls = ray.remote(RankWorker)
        self.actors = [
            cls.options(
                num_cpus=r.cpus, num_gpus=r.gpus, max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, r.workers, self.run_dir, self.storage, r.threads)
            for i in range(r.workers)
        ]
        self.infos = ray.get([a.info.remote() for a in self.actors])
        return self.infos

    def adopt(self, members: list) -> list[dict]:
        """Make warm pool members (``workers/pool.py``) this gang's ranks, in order; returns their infos.

        The members were taken all at once, so the gang is whole before any rank is assigned; a member
        that died meanwhile fails the start as a lost process would."""
        r = self.resources
        self.pool_pgs = [m.pg for m in members]
        self.actors = [m.actor for m in members]
        self.infos = ray.get([a.assign.remote(i, r.workers, self.run_dir, self.storage, r.threads)
                              for i, a in enumerate(self.actors)])
        return self.infos

    def init_distributed(self, master_ip: str) -> None:
        """Check every rank reaches every other at its node's address, then join torch.distributed there."""
        self.check_reachable()
        port = ray.get(self.actors[0].open_store.remote())
        ray.get([a.setup.remote(master_ip, port, self.resources.network_interface) for a in self.actors])
        self.distributed = True

    def check_reachable(self) -> None:
        """Raise UnreachablePeers (one line naming ranks, nodes and addresses) if some rank cannot reach another."""
        from workers.network import UnreachablePeers, unreachable_message

        ports = ray.get([a.open_probe.remote() for a in self.actors])
        peers = [(i["rank"], i["ip"], port) for i, port in zip(self.infos, ports)]
        try:
            failures = ray.get([a.probe_peers.remote(peers) for a in self.actors])
        finally:
            ray.get([a.close_probe.remote() for a in self.actors])
        failed = {rank: f for rank, f in enumerate(failures) if f}
        if failed:
            raise UnreachablePeers(unreachable_message(self.infos, failed))

    def reattach(self, run_dir: str) -> list[dict]:
        """Hand this warm gang to another job of the same shape: no placement, no process start, no rendezvous."""
        self.run_dir = run_dir
        ray.get([a.attach.remote(run_dir) for a in self.actors])
        return self.infos

    def train_async(self, ctx) -> list:
        return [a.train.remote(ctx) for a in self.actors]

    def progress(self, timeout_s: float = 5.0) -> dict:
        try:
            return ray.get(self.actors[0].progress.remote(), timeout=timeout_s)
        except Exception:
            return {}

    def stop(self) -> None:
        for a in self.actors:
            try:
                a.stop.remote()
            except Exception:
                pass

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        for pg in [self.pg, *self.pool_pgs]:
            if pg is not None:
                try:
                    remove_placement_group(pg)
                except Exception:
                    pass
        self.pg, self.pool_pgs = None, []
