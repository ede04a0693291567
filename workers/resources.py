"""What one job's gang asks of the cluster: ``WorkerResources``, decided from the spec and cluster.yaml.

No Ray here: ``submit`` records a job's resources in the job store without
importing it; ``workers/worker_group.py`` turns them into a placement group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specs.job import JobSpec


@dataclass(frozen=True)
class WorkerResources:
    workers: int
    """Ranks in the gang, one placement-group bundle each."""
    cpus: float
    """CPUs per rank."""
    gpus: float
    """GPUs per rank (0 on a CPU cluster)."""
    threads: int
    """torch intra-op threads per rank."""
    network_interface: str | None = None
    """Interface the collectives bind to; None: the one holding the node's Ray address."""

    def bundles(self) -> list[dict]:
        b = {"CPU": self.cpus}
        if self.gpus:
            b["GPU"] = self.gpus
        return [dict(b) for _ in range(self.workers)]


def worker_resources(spec: JobSpec, cluster) -> WorkerResources:
    """The spec's ``resources`` section, with cluster.yaml's per-worker CPUs and GPUs where it leaves them out."""
    r = spec.resources
    cpus = r.cpus_per_worker if r.cpus_per_worker is not None else cluster.workers.cpus
    gpus = r.gpus_per_worker if r.gpus_per_worker is not None else cluster.workers.gpus
    threads = r.torch_threads or max(1, int(math.floor(cpus)))
    return WorkerResources(r.workers, cpus, gpus, threads, cluster.workers.network_interface)
