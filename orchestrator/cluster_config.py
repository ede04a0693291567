"""cluster.yaml: where the Ray cluster, the storage and the job store are."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    network_interface: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")
    """Interface the ranks' collectives bind to (e.g. eth1); default: the one holding the node's Ray address."""


class PreemptionConfig(_Section):
    """When a queued job may stop a running one (see orchestrator/scheduler.py for the policy)."""

    enabled: bool = True
    """False: a high-priority job waits for running jobs to end, as before."""
    min_run_s: float = Field(120.0, ge=0)
    """A job runs at least this long after each (re)start before it can be preempted."""
    never_preempt_priority: int | None = None
    """Jobs at or above this priority are never preempted (null: every priority may be)."""
    max_per_job: int = Field(3, ge=0)
    """A job is preempted at most this many times."""
    backoff_s: float = Field(60.0, ge=0)
    """After its n-th preemption a job is protected for min_run_s + backoff_s * 2**(n-1)."""
    stop_timeout_s: float = Field(300.0, gt=0)
    """A preempted job that has not stopped at a step boundary by then is killed (it resumes from its last checkpoint)."""


class TeamConfig(_Section):
    """One team: who is in it, what it may hold at once, and its fair-share weight."""

    users: list[str] = Field(default_factory=list)
    """User names (API token users, or local login names)."""
    weight: float = Field(1.0, gt=0)
    """Fair share: twice the weight, entitled to twice the usage."""
    cpus: float | None = Field(None, ge=0)
    """CPUs the team's running jobs may hold at once (null: no limit)."""
    gpus: float | None = Field(None, ge=0)
    """GPUs the team's running jobs may hold at once (null: no limit)."""
    queued_jobs: int | None = Field(None, ge=0)
    """Jobs the team may have queued at once; checked at submit (null: no limit)."""


class FairShareConfig(_Section):
    half_life_s: float = Field(86400.0, ge=0)
    """Usage this long ago counts half (0: no decay)."""
    gpu_weight: float = Field(10.0, ge=0)
    """A GPU-second counts as this many CPU-seconds of usage."""


class ApiConfig(_Section):
    """The controller's HTTP API (server side: listen, certfile, keyfile) and the CLI's way to it (url, token)."""

    url: str | None = None
    """e.g. https://head:8642. When set, the CLI talks to the API instead of Ray and the job store."""
    listen: str | None = None
    """host:port the controller serves the API on, e.g. 0.0.0.0:8642 (null: no API server)."""
    certfile: str | None = None
    """TLS certificate (PEM) for the server; with keyfile, the API is served over https."""
    keyfile: str | None = None
    """TLS private key (PEM) for the server."""
    cafile: str | None = None
    """CA bundle the CLI trusts for the server's certificate (null: the system's)."""
    token_env: str = "SWITCHYARD_TOKEN"
    """Environment variable the CLI reads its bearer token from."""
    token_file: str = "~/.switchyard/token"
    """File the CLI reads its bearer token from when the variable is unset."""


class ClusterConfig(_Section):
    ray: RayConfig = RayConfig()
    storage: str = "./runs"
    """fsspec URI for runs, checkpoints and caches."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Extra fsspec options for the storage URI (e.g. endpoint_url)."""
    job_store: str = "./.switchyard/jobs.db"
    """SQLite job store path."""
    workers: WorkerDefaults = WorkerDefaults()
    preemption: PreemptionConfig = PreemptionConfig()
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    """Teams by name; a user in none is in team 'default' (add a 'default' entry to give it quotas)."""
    admins: list[str] = Field(default_factory=list)
    """Users who may cancel or change anyone's job."""
    fair_share: FairShareConfig = FairShareConfig()
    api: ApiConfig = ApiConfig()

    @field_validator("api", mode="before")
    @classmethod
    def _api_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    def team_of(self, user: str) -> str:
        """The team ``user`` belongs to (the first listing them), else 'default'."""
        for name, team in self.teams.items():
            if user in team.users:
                return name
        return "default"


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
