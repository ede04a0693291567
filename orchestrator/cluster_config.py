"""cluster.yaml: where the Ray cluster, the storage and the job store are."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specs.errors import UsageError

DEFAULT_PATH = "cluster.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(_Section):
    address: str = "local"
    """'local' (embedded Ray started by Switchyard), 'auto', or 'ray://host:port'."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for the embedded local Ray (None = all cores)."""
    namespace: str = "switchyard"
    """Ray namespace of the controller and the jobs."""
    node_ip: str = "127.0.0.1"
    """Address the local Ray (``address: local``) listens on; set a LAN address to let other machines join it."""


class WorkerDefaults(_Section):
    cpus: float = Field(1, gt=0)
    """CPUs reserved per rank unless the job says otherwise."""
    gpus: float = Field(0, ge=0)
    """GPUs per rank unless the job says otherwise."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one worker's device, for MFU."""


class ClusterConfig(_Section):
    ray: RayConfig = RayConfig()
    storage: str = "./runs"
    """fsspec URI for runs, checkpoints and caches."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Extra fsspec options for the storage URI (e.g. endpoint_url)."""
    job_store: str = "./.switchyard/jobs.db"
    """SQLite job store path."""
    workers: WorkerDefaults = WorkerDefaults()


def _resolve(path: str, base: Path) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return str((base / path).resolve())


def load_cluster_config(path: str | None = None) -> ClusterConfig:
    """Read cluster.yaml (from --cluster, $SWITCHYARD_CLUSTER, or ./cluster.yaml; defaults if absent)."""
    path = path or os.environ.get("SWITCHYARD_CLUSTER") or DEFAULT_PATH
    p = Path(path)
    if p.exists():
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{path}: is not valid YAML ({err})") from None
        base = p.resolve().parent
    elif path != DEFAULT_PATH:
        raise UsageError(f"{path}: no such cluster file")
    else:
        raw, base = {}, Path.cwd()
    try:
        cfg = ClusterConfig.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise UsageError(f"{path}: {loc}: {e['msg']}") from None
    return cfg.model_copy(update={"storage": _resolve(cfg.storage, base), "job_store": _resolve(cfg.job_store, base)})
