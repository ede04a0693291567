"""The job store: one SQLite file that is the source of truth for every job.

Every job's state, its history of transitions, its evaluations and the
controller's whereabouts live here, so the controller can die and come back
and lose nothing. Several processes open the same file at once: each CLI
invocation and the controller actor. That shapes the design:

- WAL journal mode, so readers (``switchyard status``) never block the
  controller's writes and vice versa. WAL needs a local filesystem (shared
  memory for its index), so the path must be local, not an fsspec URI.
- A fresh connection per operation. Nothing is cached across calls, so a
  ``JobStore`` is safe to share between threads, survives ``fork`` and is
  cheap to pickle into a Ray actor (it is just a path).
- Every write is one ``BEGIN IMMEDIATE`` transaction. Taking the write lock
  up front, rather than upgrading a read lock half way, is what lets the busy
  timeout queue writers instead of failing them with SQLITE_BUSY, and it makes
  read-check-write sequences (a legal-transition check, id allocation)
  atomic across processes.
- Reads run in one deferred transaction, so a job, its history and its evals
  come from the same snapshot.

State changes go through :meth:`JobStore.transition`, which checks
``LEGAL_TRANSITIONS`` and writes the history row in the same transaction.
Terminal states (SUCCEEDED, FAILED, CANCELLED) are final.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from specs.errors import UsageError

SAFE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""Job ids, job names and run-dir parts: safe as one path segment anywhere."""

SCHEMA_VERSION = 2


# ---------------------------------------------------------------------- errors


class JobStoreError(Exception):
    """Base class for job store errors that are not a user's mistake."""


class IllegalTransitionError(JobStoreError):
    """A state change the state machine forbids (often a lost race: check and move on)."""


class InvalidNameError(UsageError, ValueError):
    """A name or path part that is not filesystem-safe."""


class JobNotFoundError(UsageError, LookupError):
    """No job with that id or id prefix."""


class AmbiguousJobIdError(UsageError, LookupError):
    """An id prefix that matches more than one job."""


class QuotaError(UsageError):
    """A submission over the team's quota of queued jobs."""


# ---------------------------------------------------------------------- states


class JobState(str, Enum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"

    @property
    def terminal(self) -> bool:
        """True for states a job never leaves."""
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Every state can be CANCELLED or FAILED until it is terminal. Beyond that:
# QUEUED -> STARTING      the scheduler admitted it; the controller creates the placement group
# STARTING -> RUNNING     every rank is up
# STARTING -> QUEUED      the placement group could not be placed after all; back in the queue
# STARTING|RUNNING -> RESTARTING   an infrastructure fault the failure policy will retry
# RESTARTING -> QUEUED    wait for resources again (usual case)
# RESTARTING -> STARTING  restart straight away on resources still held
# RUNNING -> SUCCEEDED    the job finished
# STARTING|RUNNING -> PREEMPTED   a higher-priority job needs its workers: it checkpoints and stops
# PREEMPTED -> QUEUED     stopped; waits to resume from that checkpoint (PREEMPTED -> SUCCEEDED if it
#                         finished its last step before it saw the stop)
# Entering PREEMPTED counts one preemption (not a restart).
# Entering RESTARTING counts one restart. A pipeline or sweep parent runs no
# workers of its own but still goes QUEUED -> STARTING -> RUNNING.
LEGAL_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.STARTING: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.RESTARTING, JobState.PREEMPTED, JobState.FAILED,
         JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.RESTARTING, JobState.PREEMPTED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.PREEMPTED: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RESTARTING: frozenset(
        {JobState.QUEUED, JobState.STARTING, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Workers are only meaningful while ranks exist; leaving these states clears them.
_HAS_WORKERS = frozenset({JobState.STARTING, JobState.RUNNING, JobState.PREEMPTED})


# ---------------------------------------------------------------------- names and paths


def validate_name(name: str, what: str = "job name") -> str:
    """Lower-case ``name`` and check it is one safe path segment; return it."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, got {type(name).__name__}")
    low = name.lower()
    if not SAFE_NAME_RE.match(low) or ".." in low:
        raise InvalidNameError(
            f"{what} {name!r} is not allowed: use 1-64 of a-z 0-9 . _ -, "
            "starting with a letter or digit, and no '..'"
        )
    return low


def safe_join(root: str, *parts: str) -> str:
    """Join path segments under ``root`` so the result can never escape it.

    ``root`` is trusted (it comes from cluster.yaml) and may be a local path
    or a URI such as ``s3://bucket/prefix``. Each part must be a single safe
    segment: no separators, no absolute paths, no '..', nothing outside
    ``SAFE_NAME_RE``, and no upper case (names are lower-cased before they get
    here, so upper case means a caller skipped validation).
    """
    if not isinstance(root, str) or not root:
        raise InvalidNameError("storage root must be a non-empty path or URI")
    for part in parts:
        if not isinstance(part, str) or part.startswith("/") or ".." in part or not SAFE_NAME_RE.match(part):
            raise InvalidNameError(
                f"path part {part!r} is not allowed under {root}: use one segment of "
                "1-64 of a-z 0-9 . _ -, starting with a letter or digit, and no '..'"
            )
    if not parts:
        return root
    # Keep exactly one separator after the root; "/" and "file:///" are roots in their own right.
    stripped = root.rstrip("/")
    base = root if not stripped or stripped.endswith(":") else stripped + "/"
    return base + "/".join(parts)


# ---------------------------------------------------------------------- records


@dataclass(frozen=True)
class Transition:
    """One row of a job's history."""

    job_id: str
    ts: float
    """Unix time (s) of the change."""
    from_state: JobState | None
    """None for the submission row."""
    to_state: JobState
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of one checkpoint on held-out data."""

    job_id: str
    checkpoint: str
    """Checkpoint URI or name, unique per job (re-evaluating replaces the row)."""
    step: int
    """Optimizer step of the checkpoint."""
    loss: float
    """Mean held-out cross-entropy (nats/token); NaN for a diverged checkpoint."""
    perplexity: float | None
    """exp(loss); None when the loss is NaN or exp overflows."""
    ts: float
    extra: dict[str, Any]
    """Anything else the evaluator measured (win rate, accuracy, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "step": self.step,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "ts": self.ts,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class ControllerInfo:
    """Where the controller actor lives and when it last said so."""

    pid: int
    address: str
    """Ray address the controller is attached to."""
    heartbeat: float
    """Unix time (s) of its last ``set_controller`` or ``heartbeat``."""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored, JSON fields decoded. Frozen, but the dicts inside are plain dicts."""

    id: str
    name: str
    kind: str
    spec: dict[str, Any]
    priority: int
    state: JobState
    submitted_at: float
    updated_at: float
    started_at: float | None
    """First time the job reached RUNNING."""
    finished_at: float | None
    """When it reached a terminal state."""
    restarts: int
    max_restarts: int
    run_dir: str
    step: int
    reason: str
    """Reason of the latest transition, or a progress note set with ``update``."""
    best_checkpoint: str | None
    parent_id: str | None
    """The pipeline or sweep this job belongs to."""
    workers: list[dict[str, Any]]
    """[{rank, node, pid}] while STARTING or RUNNING, else empty."""
    metrics: dict[str, Any]
    """Latest training metrics."""
    report: dict[str, Any] | None
    cancel_requested: bool
    resources: dict[str, Any]
    """{workers, cpus_per_worker, gpus_per_worker}."""
    blocked_since: float | None
    """When the scheduler first told this job to wait; None once it starts."""
    history: tuple[Transition, ...]
    evals: tuple[EvalRecord, ...]
    owner: str = ""
    """Who submitted it: the API token's user, or the local user on the head."""
    team: str = ""
    """The owner's team in cluster.yaml when it was submitted (quotas and fair share count against it)."""
    after: tuple[str, ...] = ()
    """Jobs that must SUCCEED before this one starts (``submit --after``)."""
    preemptions: int = 0
    """Times a higher-priority job preempted it."""
    preempted_by: str | None = None
    """The job that preempted it last."""
    pending: dict[str, Any] | None = None
    """Why a QUEUED job is not running, as the controller last saw it:
    {position, waiting_for: capacity|quota|dependency|backfill|preemption, reason, at}."""

    @property
    def run_intervals(self) -> list[tuple[float, float | None]]:
        """(start, end) of every stretch in RUNNING or PREEMPTED (still stopping), end None while it lasts."""
        out: list[tuple[float, float | None]] = []
        start = None
        for t in self.history:
            busy = t.to_state in (JobState.RUNNING, JobState.PREEMPTED)
            if busy and start is None:
                start = t.ts
            elif not busy and start is not None:
                out.append((start, t.ts))
                start = None
        if start is not None:
            out.append((start, None))
        return out

    @property
    def running_since(self) -> float | None:
        """When the current stretch of RUNNING began (None if not running)."""
        iv = self.run_intervals
        return iv[-1][0] if iv and iv[-1][1] is None else None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def to_status_dict(self) -> dict[str, Any]:
        """A JSON-ready view for ``switchyard status`` (the spec is left out; it can be large)."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "priority": self.priority,
            "step": self.step,
            "restarts": self.restarts,
            "max_restarts": self.max_restarts,
            "run_dir": self.run_dir,
            "metrics": dict(self.metrics),
            "evals": [e.to_dict() for e in self.evals],
            "best_checkpoint": self.best_checkpoint,
            "workers": [dict(w) for w in self.workers],
            "history": [t.to_dict() for t in self.history],
            "reason": self.reason,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "parent_id": self.parent_id,
            "resources": dict(self.resources),
            "cancel_requested": self.cancel_requested,
            "report": self.report,
            "owner": self.owner,
            "team": self.team,
            "after": list(self.after),
            "preemptions": self.preemptions,
            "preempted_by": self.preempted_by,
            "pending": dict(self.pending) if self.pending else None,
        }


# ---------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    spec_json        TEXT NOT NULL,
    priority         INTEGER NOT NULL,
    state            TEXT NOT NULL,
    submitted_at     REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    restarts         INTEGER NOT NULL DEFAULT 0,
    max_restarts     INTEGER NOT NULL,
    run_dir          TEXT NOT NULL,
    step             INTEGER NOT NULL DEFAULT 0,
    reason           TEXT NOT NULL DEFAULT '',
    best_checkpoint  TEXT,
    parent_id        TEXT REFERENCES jobs(id),
    workers_json     TEXT NOT NULL DEFAULT '[]',
    metrics_json     TEXT NOT NULL DEFAULT '{}',
    report_json      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resources_json   TEXT NOT NULL,
    blocked_since    REAL,
    owner            TEXT NOT NULL DEFAULT '',
    team             TEXT NOT NULL DEFAULT '',
    after_json       TEXT NOT NULL DEFAULT '[]',
    preemptions      INTEGER NOT NULL DEFAULT 0,
    preempted_by     TEXT,
    pending_json     TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent_id);
CREATE TABLE IF NOT EXISTS transitions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- orders rows that share a timestamp
    job_id     TEXT NOT NULL REFERENCES jobs(id),
    ts         REAL NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id, seq);
CREATE TABLE IF NOT EXISTS evals (
    job_id     TEXT NOT NULL REFERENCES jobs(id),
    checkpoint TEXT NOT NULL,
    step       INTEGER NOT NULL,
    loss       REAL,  -- NULL stands for NaN, which SQLite cannot store
    perplexity REAL,
    ts         REAL NOT NULL,
    extra_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, checkpoint)  -- a retried evaluation replaces, never duplicates
);
CREATE TABLE IF NOT EXISTS tokens (
    hash       TEXT PRIMARY KEY,  -- sha256 of the bearer token; the token itself is never stored
    user       TEXT NOT NULL,
    admin      INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS controller (
    id        INTEGER PRIMARY KEY CHECK (id = 0),  -- singleton row
    pid       INTEGER NOT NULL,
    address   TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""

# v1 -> v2: owners, teams, dependencies, preemption and pending reasons; API tokens.
_MIGRATE_V1 = """
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN team TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN after_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN preemptions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN preempted_by TEXT;
ALTER TABLE jobs ADD COLUMN pending_json TEXT;
CREATE TABLE IF NOT EXISTS tokens (
    hash       TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    admin      INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
"""

# Fields callers may set through update() and transition(): name -> (column, is_json).
_UPDATABLE: dict[str, tuple[str, bool]] = {
    "step": ("step", False),
    "metrics": ("metrics_json", True),
    "workers": ("workers_json", True),
    "best_checkpoint": ("best_checkpoint", False),
    "report": ("report_json", True),
    "reason": ("reason", False),
    "priority": ("priority", False),
    "blocked_since": ("blocked_since", False),
    "preempted_by": ("preempted_by", False),
    "pending": ("pending_json", True),
    "spec": ("spec_json", True),  # an elastic job resized after losing workers
    "resources": ("resources_json", True),
}

_RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serializable: {err}") from None


def _check_resources(resources: dict[str, Any]) -> dict[str, Any]:
    """Normalise {workers, cpus_per_worker, gpus_per_worker}; 0 workers is a parent job."""
    if not isinstance(resources, dict):
        raise ValueError("resources must be a dict of workers, cpus_per_worker, gpus_per_worker")
    unknown = set(resources) - set(_RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"resources: unknown keys {sorted(unknown)}; allowed {list(_RESOURCE_KEYS)}")
    workers = resources.get("workers")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"resources.workers must be an int >= 0, got {workers!r}")
    out: dict[str, Any] = {"workers": workers}
    for key, default in (("cpus_per_worker", None), ("gpus_per_worker", 0)):
        v = resources.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"resources.{key} must be a number >= 0, got {v!r}")
        out[key] = v
    if workers and out["cpus_per_worker"] == 0 and out["gpus_per_worker"] == 0:
        # Ray refuses empty placement-group bundles.
        raise ValueError("resources: each worker must reserve some CPUs or GPUs")
    return out


def _check_int(value: Any, what: str, minimum: int | None = None) -> int:
    """An int (not a bool) >= minimum that SQLite can store (signed 64 bits)."""
    lo = -(1 << 63) if minimum is None else minimum
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= (1 << 63) - 1:
        raise ValueError(f"{what} must be an integer from {lo} to {(1 << 63) - 1}, got {value!r}")
    return value


def _perplexity(loss: float) -> float | None:
    if math.isnan(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


# ---------------------------------------------------------------------- the store


class JobStore:
    """The SQLite job store at ``path``. Cheap to construct; holds no open connection.

    Writes take ids exactly; only :meth:`get` resolves a unique prefix (for
    people typing ids at the CLI).
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        path = os.fspath(path)
        if "://" in path or path == ":memory:" or not path:
            raise UsageError(
                f"job_store {path!r} must be a local file path: SQLite's WAL mode needs a local "
                "filesystem and every process must open the same file"
            )
        self.path = os.path.abspath(os.path.expanduser(path))
        self.busy_timeout_s = busy_timeout_s
        self._clock = clock
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"JobStore({self.path!r})"

    # -------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the sqlite3
        # module never opens a transaction behind our back.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        # NORMAL is durable across process crashes in WAL mode (a controller that
        # dies loses nothing committed); only an OS crash can drop the last commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN")  # one snapshot for every SELECT inside
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            # journal_mode is stored in the file: the first process to open it switches
            # it to WAL and everyone after inherits it. It cannot run inside a transaction.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JobStoreError(f"{self.path}: could not switch the job store to WAL mode (got {mode})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"{self.path}: job store schema v{version} is newer than this Switchyard "
                    f"(v{SCHEMA_VERSION}); upgrade Switchyard"
                )
            if version == 1:
                conn.executescript(f"BEGIN IMMEDIATE;{_MIGRATE_V1}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
            elif version < SCHEMA_VERSION:
                conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        finally:
            conn.close()

    # -------------------------------------------------------------- loading

    def _load(self, conn: sqlite3.Connection, where: str, params: tuple) -> list[JobRecord]:
        rows = conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY submitted_at, id", params).fetchall()
        if not rows:
            return []
        # Same filter as a subquery, so a listing of many jobs costs three queries, not 3N.
        history: dict[str, list[Transition]] = {}
        for t in conn.execute(
            f"SELECT * FROM transitions WHERE job_id IN (SELECT id FROM jobs WHERE {where}) ORDER BY seq", params
        ):
            history.setdefault(t["job_id"], []).append(_transition(t))
        evals: dict[str, list[EvalRecord]] = {}
        for e in conn.execute(
            f"SELECT * FROM evals WHERE job_id IN (SELECT id FROM jobs WHERE {where}) ORDER BY step, ts", params
        ):
            evals.setdefault(e["job_id"], []).append(_eval(e))
        return [_record(r, tuple(history.get(r["id"], ())), tuple(evals.get(r["id"], ()))) for r in rows]

    def _load_one(self, conn: sqlite3.Connection, job_id: str) -> JobRecord:
        found = self._load(conn, "id = ?", (job_id,))
        if not found:
            raise JobNotFoundError(f"no job {job_id!r} in the job store")
        return found[0]

    def _state(self, conn: sqlite3.Connection, job_id: str) -> JobState:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in the job store")
        return JobState(row["state"])

    # -------------------------------------------------------------- jobs

    def submit(self, name: str, kind: str, spec: dict[str, Any], priority: int, resources: dict[str, Any],
               max_restarts: int, run_dir_for: Callable[[str], str], parent_id: str | None = None, *,
               owner: str = "", team: str = "", after: Iterable[str] = (),
               max_queued: int | None = None) -> JobRecord:
        """Queue a new job and return it (state QUEUED, one history row).

        ``run_dir_for(job_id)`` is called inside the transaction with the new
        id and must return the job's run directory (use :func:`safe_join`).
        ``after`` are job ids (or unique prefixes) that must SUCCEED first.
        ``max_queued`` is the team's quota of queued jobs: a submission that
        would pass it raises ``QuotaError`` (checked in the same transaction).
        """
        name = validate_name(name)
        kind = validate_name(kind, "job kind")
        priority = _check_int(priority, "priority")
        max_restarts = _check_int(max_restarts, "max_restarts", 0)
        resources = _check_resources(resources)
        if not isinstance(spec, dict):
            raise ValueError(f"spec must be a dict (the validated spec as data), got {type(spec).__name__}")
        spec_json = _dumps(spec, "spec")
        if not isinstance(owner, str) or not isinstance(team, str):
            raise ValueError("owner and team must be strings")
        after = [a for a in after]
        with self._write() as conn:
            if parent_id is not None:
                self._state(conn, parent_id)  # raises JobNotFoundError
                if not owner:  # a pipeline stage or sweep run belongs to whoever owns the parent
                    row = conn.execute("SELECT owner, team FROM jobs WHERE id = ?", (parent_id,)).fetchone()
                    owner, team = row["owner"], row["team"]
            deps = [self._resolve(conn, a) for a in after]
            if max_queued is not None:
                n = conn.execute("SELECT COUNT(*) FROM jobs WHERE team = ? AND state = ? AND parent_id IS NULL",
                                 (team, JobState.QUEUED.value)).fetchone()[0]
                if n >= max_queued:
                    raise QuotaError(f"team {team or '(none)'} already has {n} queued job(s), its quota "
                                     f"(queued_jobs: {max_queued}); wait for some to start or cancel one")
            now = self._clock()
            day = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d")
            # 24 random bits per day: a clash is rare but possible; we hold the write
            # lock, so checking and inserting cannot race another process.
            for _ in range(100):
                job_id = f"sy-{day}-{secrets.token_hex(3)}"
                if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                    break
            else:
                raise JobStoreError(f"could not find a free job id for {day}")
            run_dir = run_dir_for(job_id)
            if not isinstance(run_dir, str) or not run_dir:
                raise ValueError(f"run_dir_for({job_id!r}) must return a non-empty str, got {run_dir!r}")
            conn.execute(
                "INSERT INTO jobs (id, name, kind, spec_json, priority, state, submitted_at, updated_at,"
                " max_restarts, run_dir, reason, parent_id, resources_json, owner, team, after_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, kind, spec_json, priority, JobState.QUEUED.value, now, now, max_restarts,
                 run_dir, "submitted", parent_id, _dumps(resources, "resources"), owner, team,
                 _dumps(deps, "after")),
            )
            conn.execute(
                "INSERT INTO transitions (job_id, ts, from_state, to_state, reason) VALUES (?, ?, NULL, ?, ?)",
                (job_id, now, JobState.QUEUED.value, "submitted"),
            )
            return self._load_one(conn, job_id)

    def _resolve(self, conn: sqlite3.Connection, id_or_prefix: str) -> str:
        """The one job id that is or starts with ``id_or_prefix`` (inside a transaction)."""
        key = (id_or_prefix or "").strip().lower() if isinstance(id_or_prefix, str) else ""
        if not key:
            raise JobNotFoundError("give a job id (or the start of one)")
        rows = conn.execute("SELECT id FROM jobs WHERE id = ?", (key,)).fetchall() or \
            conn.execute("SELECT id FROM jobs WHERE substr(id, 1, ?) = ? LIMIT 6", (len(key), key)).fetchall()
        if not rows:
            raise JobNotFoundError(f"no job matches {id_or_prefix!r}; `switchyard list` shows the jobs")
        if len(rows) > 1:
            raise AmbiguousJobIdError(f"{id_or_prefix!r} matches several jobs; give more of the id")
        return rows[0]["id"]

    def get(self, id_or_prefix: str) -> JobRecord:
        """The job with this id, or the only job whose id starts with it."""
        key = (id_or_prefix or "").strip().lower()
        if not key:
            raise JobNotFoundError("give a job id (or the start of one)")
        with self._read() as conn:
            found = self._load(conn, "id = ?", (key,))
            if not found:
                # substr, not LIKE: '_' is legal in ids and is a LIKE wildcard.
                found = self._load(conn, "substr(id, 1, ?) = ?", (len(key), key))
        if not found:
            raise JobNotFoundError(f"no job matches {id_or_prefix!r}; `switchyard list` shows the jobs")
        if len(found) > 1:
            shown = ", ".join(r.id for r in found[:5]) + (" ..." if len(found) > 5 else "")
            raise AmbiguousJobIdError(
                f"{id_or_prefix!r} matches {len(found)} jobs ({shown}); give more of the id"
            )
        return found[0]

    def list(self, states: Iterable[JobState | str] | None = None, *,
             parent_id: str | None = None) -> list[JobRecord]:
        """Jobs in submission order, optionally only those in ``states`` / under ``parent_id``."""
        clauses, params = [], []
        if states is not None:
            wanted = sorted({JobState(s).value for s in states})
            if not wanted:
                return []
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            params += wanted
        if parent_id is not None:
            clauses.append("parent_id = ?")
            params.append(parent_id)
        with self._read() as conn:
            return self._load(conn, " AND ".join(clauses) or "1", tuple(params))

    def transition(self, job_id: str, to_state: JobState | str, reason: str, **fields: Any) -> JobRecord:
        """Move a job to ``to_state`` if ``LEGAL_TRANSITIONS`` allows it; return the new record.

        The history row, the state, ``reason`` and any ``fields`` (as for
        :meth:`update`) are written in one transaction. Raises
        ``IllegalTransitionError`` otherwise, including out of a terminal
        state: the caller lost a race (a cancel, say) and should re-read.
        Side effects: entering RESTARTING counts a restart; the first RUNNING
        sets ``started_at``; a terminal state sets ``finished_at``; STARTING
        clears ``blocked_since``; leaving STARTING/RUNNING clears ``workers``.
        """
        to = JobState(to_state)
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, got {type(reason).__name__}")
        sets = _encode_fields(fields)
        with self._write() as conn:
            row = conn.execute("SELECT state, started_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in the job store")
            cur = JobState(row["state"])
            if to not in LEGAL_TRANSITIONS[cur]:
                why = (f"{cur} is terminal" if cur.terminal
                       else "allowed: " + ", ".join(sorted(s.value for s in LEGAL_TRANSITIONS[cur])))
                raise IllegalTransitionError(f"job {job_id} cannot go from {cur} to {to} ({why})")
            now = self._clock()
            sets.update(state=to.value, reason=reason, updated_at=now)
            if to is JobState.RUNNING and row["started_at"] is None:
                sets["started_at"] = now
            if to.terminal:
                sets["finished_at"] = now
            if to is JobState.STARTING:
                sets.setdefault("blocked_since", None)
            if to not in _HAS_WORKERS:
                sets.setdefault("workers_json", "[]")
            extra = (", restarts = restarts + 1" if to is JobState.RESTARTING
                     else ", preemptions = preemptions + 1" if to is JobState.PREEMPTED else "")
            if to is not JobState.QUEUED:
                sets.setdefault("pending_json", None)
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in sets)}{extra} WHERE id = ?",
                (*sets.values(), job_id),
            )
            conn.execute(
                "INSERT INTO transitions (job_id, ts, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                (job_id, now, cur.value, to.value, reason),
            )
            return self._load_one(conn, job_id)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set progress fields without a state change; return the new record.

        Allowed: step, metrics, workers, best_checkpoint, report, reason,
        priority, blocked_since. Terminal jobs may still be updated (a final
        report or best checkpoint often lands just after the state).
        """
        sets = _encode_fields(fields)
        with self._write() as conn:
            self._state(conn, job_id)
            sets["updated_at"] = self._clock()
            conn.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in sets)} WHERE id = ?",
                         (*sets.values(), job_id))
            return self._load_one(conn, job_id)

    def set_owner(self, job_id: str, owner: str, team: str) -> None:
        """Give a job and everything under it (pipeline stages, sweep runs) an owner and team."""
        with self._write() as conn:
            self._state(conn, job_id)
            for jid in _with_descendants(conn, job_id):
                conn.execute("UPDATE jobs SET owner = ?, team = ? WHERE id = ?", (owner, team, jid))

    def request_cancel(self, job_id: str, reason: str = "cancelled by user") -> JobRecord:
        """Ask for a job (and its pipeline or sweep children) to be cancelled.

        A QUEUED job holds no resources, so it is CANCELLED here and now; that
        way a cancel works even with no controller running, and a controller
        that tries to start it afterwards gets ``IllegalTransitionError``.
        Other live jobs get ``cancel_requested`` set for the controller to act
        on. Terminal jobs are left as they are. Returns the job's record.
        """
        with self._write() as conn:
            now = self._clock()
            self._state(conn, job_id)
            for jid in _with_descendants(conn, job_id):
                state = self._state(conn, jid)
                if state.terminal:
                    continue
                if state is JobState.QUEUED:
                    conn.execute(
                        "UPDATE jobs SET state = ?, reason = ?, cancel_requested = 1, updated_at = ?,"
                        " finished_at = ? WHERE id = ?",
                        (JobState.CANCELLED.value, reason, now, now, jid),
                    )
                    conn.execute(
                        "INSERT INTO transitions (job_id, ts, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                        (jid, now, state.value, JobState.CANCELLED.value, reason),
                    )
                else:
                    conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, jid))
            return self._load_one(conn, job_id)

    # -------------------------------------------------------------- evals and history

    def add_eval(self, job_id: str, checkpoint: str, step: int, loss: float, perplexity: float | None = None,
                 extra: dict[str, Any] | None = None) -> EvalRecord:
        """Record an evaluation; evaluating the same checkpoint again replaces the row.

        ``perplexity`` defaults to exp(loss).
        """
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f"checkpoint must be a non-empty str, got {checkpoint!r}")
        step = _check_int(step, "step", 0)
        loss = float(loss)
        ppl = _perplexity(loss) if perplexity is None else float(perplexity)
        if ppl is not None and math.isnan(ppl):
            ppl = None
        extra_json = _dumps(extra or {}, "extra")
        with self._write() as conn:
            self._state(conn, job_id)
            now = self._clock()
            conn.execute(
                "INSERT OR REPLACE INTO evals (job_id, checkpoint, step, loss, perplexity, ts, extra_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, checkpoint, step, loss, ppl, now, extra_json),
            )
            conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, job_id))
        return EvalRecord(job_id, checkpoint, step, loss, ppl, now, json.loads(extra_json))

    def evals(self, job_id: str) -> list[EvalRecord]:
        """A job's evaluations by step."""
        with self._read() as conn:
            self._state(conn, job_id)
            rows = conn.execute("SELECT * FROM evals WHERE job_id = ? ORDER BY step, ts", (job_id,)).fetchall()
        return [_eval(r) for r in rows]

    def history(self, job_id: str) -> list[Transition]:
        """A job's transitions, oldest first (the first is the submission, from None to QUEUED)."""
        with self._read() as conn:
            self._state(conn, job_id)
            rows = conn.execute("SELECT * FROM transitions WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        return [_transition(r) for r in rows]

    # -------------------------------------------------------------- API tokens

    def create_token(self, user: str, admin: bool = False) -> str:
        """A new bearer token for ``user``; only its SHA-256 is stored, so print it now or lose it."""
        user = validate_name(user, "user name")
        token = "sy_" + secrets.token_urlsafe(32)
        with self._write() as conn:
            conn.execute("INSERT INTO tokens (hash, user, admin, created_at) VALUES (?, ?, ?, ?)",
                         (_token_hash(token), user, int(bool(admin)), self._clock()))
        return token

    def check_token(self, token: str) -> tuple[str, bool] | None:
        """(user, admin) for a valid token, else None."""
        if not isinstance(token, str) or not token:
            return None
        with self._read() as conn:
            row = conn.execute("SELECT user, admin FROM tokens WHERE hash = ?", (_token_hash(token),)).fetchone()
        return (row["user"], bool(row["admin"])) if row else None

    def revoke_tokens(self, user: str) -> int:
        """Delete every token of ``user``; returns how many."""
        with self._write() as conn:
            return conn.execute("DELETE FROM tokens WHERE user = ?", (user.lower(),)).rowcount

    # -------------------------------------------------------------- controller

    def set_controller(self, pid: int, address: str) -> ControllerInfo:
        """Record the controller that is now in charge (replaces any earlier one)."""
        pid = _check_int(pid, "pid", 0)
        with self._write() as conn:
            now = self._clock()
            conn.execute("INSERT OR REPLACE INTO controller (id, pid, address, heartbeat) VALUES (0, ?, ?, ?)",
                         (pid, address, now))
        return ControllerInfo(pid, address, now)

    def heartbeat(self, pid: int) -> bool:
        """Refresh the controller's heartbeat; False if ``pid`` is no longer the recorded controller."""
        with self._write() as conn:
            cur = conn.execute("UPDATE controller SET heartbeat = ? WHERE id = 0 AND pid = ?", (self._clock(), pid))
            return cur.rowcount == 1

    def controller(self) -> ControllerInfo | None:
        """The recorded controller, or None if none ever registered."""
        with self._read() as conn:
            row = conn.execute("SELECT pid, address, heartbeat FROM controller WHERE id = 0").fetchone()
        return ControllerInfo(row["pid"], row["address"], row["heartbeat"]) if row else None


# ---------------------------------------------------------------------- row decoding


def _with_descendants(conn: sqlite3.Connection, job_id: str) -> Iterator[str]:
    """The job, then every job under it (pipeline stages, sweep runs), each once."""
    pending, seen = [job_id], set()
    while pending:
        jid = pending.pop()
        if jid in seen:
            continue
        seen.add(jid)
        yield jid
        pending += [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE parent_id = ?", (jid,))]


def _encode_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Map update()/transition() keyword fields to columns, JSON-encoding where needed."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in _UPDATABLE:
            raise TypeError(f"cannot set job field {key!r}; allowed: {', '.join(sorted(_UPDATABLE))}")
        column, is_json = _UPDATABLE[key]
        if key in ("step", "priority"):
            value = _check_int(value, key, 0 if key == "step" else None)
        elif key == "workers" and not isinstance(value, list):
            raise ValueError(f"workers must be a list of {{rank, node, pid}}, got {type(value).__name__}")
        elif key == "metrics" and not isinstance(value, dict):
            raise ValueError(f"metrics must be a dict, got {type(value).__name__}")
        elif key == "blocked_since" and value is not None:
            value = float(value)
        elif key in ("best_checkpoint", "reason", "preempted_by") and not isinstance(value, str) and value is not None:
            raise ValueError(f"{key} must be a str, got {type(value).__name__}")
        out[column] = _dumps(value, key) if is_json and value is not None else value
    if out.get("reason", "") is None:
        out["reason"] = ""
    return out


def _token_hash(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def _transition(row: sqlite3.Row) -> Transition:
    return Transition(row["job_id"], row["ts"], JobState(row["from_state"]) if row["from_state"] else None,
                      JobState(row["to_state"]), row["reason"])


def _eval(row: sqlite3.Row) -> EvalRecord:
    loss = math.nan if row["loss"] is None else row["loss"]
    return EvalRecord(row["job_id"], row["checkpoint"], row["step"], loss, row["perplexity"], row["ts"],
                      json.loads(row["extra_json"]))


def _record(row: sqlite3.Row, history: tuple[Transition, ...], evals: tuple[EvalRecord, ...]) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        spec=json.loads(row["spec_json"]),
        priority=row["priority"],
        state=JobState(row["state"]),
        submitted_at=row["submitted_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        restarts=row["restarts"],
        max_restarts=row["max_restarts"],
        run_dir=row["run_dir"],
        step=row["step"],
        reason=row["reason"],
        best_checkpoint=row["best_checkpoint"],
        parent_id=row["parent_id"],
        workers=json.loads(row["workers_json"]),
        metrics=json.loads(row["metrics_json"]),
        report=json.loads(row["report_json"]) if row["report_json"] is not None else None,
        cancel_requested=bool(row["cancel_requested"]),
        resources=json.loads(row["resources_json"]),
        blocked_since=row["blocked_since"],
        history=history,
        evals=evals,
        owner=row["owner"],
        team=row["team"],
        after=tuple(json.loads(row["after_json"])),
        preemptions=row["preemptions"],
        preempted_by=row["preempted_by"],
        pending=json.loads(row["pending_json"]) if row["pending_json"] else None,
    )
