"""cluster.yaml: where the Ray cluster, the storage and the job store are."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specs.errors import UsageError
from specs.validate import unknown_field

DEFAULT_PATH = "cluster.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RayConfig(_Section):
    address: str = "local"
    """'local' (embedded Ray started by Switchyard), 'auto', or 'ray://host:port'."""
    num_cpus: int | None = Field(None, ge=1, le=1 << 16)
    """CPUs for the embedded local Ray (None = all cores)."""
    namespace: str = "switchyard"
    """Ray namespace of the controller and the jobs."""
    node_ip: str = "127.0.0.1"
    """Address the local Ray (``address: local``) listens on; set a LAN address to let other machines join it."""


class WorkerDefaults(_Section):
    cpus: float = Field(1, gt=0, le=1024)
    """CPUs reserved per rank unless the job says otherwise."""
    gpus: float = Field(0, ge=0, le=64)
    """GPUs per rank unless the job says otherwise."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one worker's device, for MFU."""
    network_interface: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")
    """Interface the ranks' collectives bind to (e.g. eth1); default: the one holding the node's Ray address."""
    warm_pool: int = Field(2, ge=0, le=1024)
    """Idle rank processes (torch and DeepSpeed imported) kept ready for the next job of the default shape
    (cpus, gpus above); their room goes back to any queued job that needs it. 0: no pool."""
    eval_cpus: float = Field(1, gt=0, le=1024)
    """CPUs each checkpoint evaluation reserves (it also gets a GPU when its job's ranks had one)."""
    max_time_limit_s: float | None = Field(None, gt=0, le=366 * 86400)
    """The longest a submitted job may run (over all its attempts), seconds: a job's resources.time_limit_s
    may not be longer, and a job without one gets this (null: no cap)."""
    start_timeout_s: float = Field(1800, gt=0, le=7 * 86400)
    """Seconds a job may stay STARTING (gang placement, rank start, data preparation, rendezvous); past it the
    job fails, naming the phase it was in."""


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


class JobStoreRetentionConfig(_Section):
    """How long finished jobs stay in the job store (the policy: orchestrator/job_retention.py)."""

    finished_days: float = Field(30.0, gt=0)
    """A finished job, its history and evaluations are deleted this many days after it finished."""
    max_finished: int = Field(100_000, ge=1)
    """At most this many finished top-level jobs are kept (the most recently finished)."""
    every_s: float = Field(3600.0, gt=0)
    """How often the controller applies the policy."""
    batch: int = Field(5000, ge=1)
    """At most this many top-level jobs are deleted at a time."""


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


class WebhookConfig(_Section):
    """A URL the controller posts job state changes to (orchestrator/notify.py)."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    """http(s) URL that takes a JSON POST (a Slack or Mattermost incoming webhook shows its ``text``)."""
    states: list[str] = Field(default_factory=lambda: ["SUCCEEDED", "FAILED", "CANCELLED"], min_length=1)
    """The states whose entry is posted."""
    owners: list[str] = Field(default_factory=list)
    """Only these users' jobs (empty: everyone's)."""
    runs: bool = False
    """Also pipeline stages and sweep runs (false: only jobs of their own, pipelines and sweeps)."""

    @field_validator("states")
    @classmethod
    def _known_states(cls, v: list[str]) -> list[str]:
        from orchestrator.job_records import JobState

        states = [s.value for s in JobState]
        bad = [s for s in v if s.upper() not in states]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a job state; give some of {', '.join(states)}")
        return [s.upper() for s in v]


class PathsConfig(_Section):
    """Where jobs may read and write (specs.paths): checked at submit and again in the ranks."""

    read: list[str] | None = None
    """Roots jobs may read from: corpora, model.init_from, rlhf.data files, rlhf.ppo.reward_model
    (null: the folder of cluster.yaml). The storage root and the write roots are always readable."""
    write: list[str] = Field(default_factory=list)
    """Roots jobs may write besides the storage root (e.g. a shared rlhf.data.dir)."""


class ClusterConfig(_Section):
    ray: RayConfig = RayConfig()
    storage: str = "./runs"
    """fsspec URI for runs, checkpoints and caches."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Extra fsspec options for the storage URI (e.g. endpoint_url)."""
    job_store: str = "./.switchyard/jobs.db"
    """SQLite job store path."""
    job_store_retention: JobStoreRetentionConfig = JobStoreRetentionConfig()
    workers: WorkerDefaults = WorkerDefaults()
    preemption: PreemptionConfig = PreemptionConfig()
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    """Teams by name; a user in none is in team 'default' (add a 'default' entry to give it quotas)."""
    admins: list[str] = Field(default_factory=list)
    """Users who may cancel or change anyone's job."""
    fair_share: FairShareConfig = FairShareConfig()
    api: ApiConfig = ApiConfig()
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    """URLs the controller posts job state changes to."""
    paths: PathsConfig | None = None
    """Read and write roots of jobs. A cluster.yaml without it reads under its own folder and writes under
    storage; a ClusterConfig built in code without it (tests) is unrestricted."""

    @field_validator("api", mode="before")
    @classmethod
    def _api_url(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    def path_roots(self):
        """The normalised roots (specs.paths.PathRoots) jobs are held to, or None for no restriction."""
        from specs.paths import make_roots

        if self.paths is None:
            return None
        return make_roots(self.storage, self.paths.read or [], self.paths.write)

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
        from specs.validate import read_plain_yaml

        raw = read_plain_yaml(str(p), what="cluster file")
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected a mapping (ray, storage, job_store, workers, ...), "
                             f"got {type(raw).__name__}")
        base = p.resolve().parent
    elif path != DEFAULT_PATH:
        raise UsageError(f"{path}: no such cluster file")
    else:
        raw, base = {}, Path.cwd()
    try:
        cfg = ClusterConfig.model_validate(raw, strict=True)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        got = e.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) and len(repr(got)) < 60 else ""
        if e["type"] == "extra_forbidden":
            see = "cluster.yaml: where the cluster and the storage are"
            shown, e["msg"] = "", unknown_field(ClusterConfig, tuple(e["loc"]), see=see)
        raise UsageError(f"{path}: {loc or 'cluster'}: {e['msg']}{shown}") from None
    paths = cfg.paths or PathsConfig()
    paths = PathsConfig(read=[_resolve(r, base) for r in (paths.read if paths.read is not None else ["."])],
                        write=[_resolve(w, base) for w in paths.write])
    return cfg.model_copy(update={"storage": _resolve(cfg.storage, base), "job_store": _resolve(cfg.job_store, base),
                                  "paths": paths})
