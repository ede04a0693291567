"""Job records: states, the legal transitions between them, names and the frozen rows the store returns.

Everything here is plain data with no SQLite connection, so the scheduler,
the CLI and tests can use records without opening a store. The job store
(``orchestrator/job_store.py``) re-exports these names.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from specs.errors import UsageError

SAFE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""Job ids, job names and run-dir parts: safe as one path segment anywhere."""


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


class TokenNotFoundError(UsageError, LookupError):
    """No API token with that id or id prefix."""


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
# STARTING|RUNNING -> QUEUED   stopped with the controller (`switchyard down`); resumes at the next `up`
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
        {JobState.SUCCEEDED, JobState.QUEUED, JobState.RESTARTING, JobState.PREEMPTED, JobState.FAILED,
         JobState.CANCELLED}
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


def effective_time_limit(*limits: float | None) -> float | None:
    """The time limit that applies of a job's ``resources.time_limit_s`` and cluster.yaml's cap: the shorter
    of those given, None when neither is."""
    given = [t for t in limits if t is not None]
    return min(given) if given else None


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
class TokenInfo:
    """An API token as the store knows it: never the token itself, only who holds it."""

    id: str
    """The first ``TOKEN_ID_CHARS`` hex digits of the token's SHA-256: what `token list` shows and
    `token revoke --id` takes (a prefix of it works too)."""
    user: str
    admin: bool
    created_at: float
    expires_at: float | None = None
    """Unix time after which the API refuses it; None: it never expires."""

    def to_dict(self) -> dict:
        return {"id": self.id, "user": self.user, "admin": self.admin, "created_at": self.created_at,
                "expires_at": self.expires_at}


TRAINING_KINDS = ("train", "sweep-run", "pipeline-stage")
"""Job kinds that hold workers and train (pipelines and sweeps are records of their stages and runs)."""
TOKEN_ID_CHARS = 12
CANCEL_CHECKPOINT = 2
"""``jobs.cancel_requested`` of a cancel that saves a checkpoint first (1: stop at once)."""
TOKEN_MAX_LIFETIME_S = 3650 * 86400  # `token create --expires` takes at most ten years


@dataclass(frozen=True)
class ControllerInfo:
    """Where the controller actor lives and when it last said so."""

    pid: int
    address: str
    """Ray address the controller is attached to."""
    heartbeat: float
    """Unix time (s) of its last ``set_controller`` or ``heartbeat``."""


def _run_intervals(history: tuple[Transition, ...]) -> list[tuple[float, float | None]]:
    """(start, end) of every stretch in RUNNING or PREEMPTED (still stopping), end None while it lasts."""
    out: list[tuple[float, float | None]] = []
    start = None
    for t in history:
        busy = t.to_state in (JobState.RUNNING, JobState.PREEMPTED)
        if busy and start is None:
            start = t.ts
        elif not busy and start is not None:
            out.append((start, t.ts))
            start = None
    if start is not None:
        out.append((start, None))
    return out


@dataclass(frozen=True)
class RunHistory:
    """What fair share reads of a job that has run (``JobStore.ran_since``): no spec, no evaluations."""

    id: str
    kind: str
    team: str
    resources: dict[str, Any]
    history: tuple[Transition, ...]

    @property
    def run_intervals(self) -> list[tuple[float, float | None]]:
        return _run_intervals(self.history)


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
    {position, waiting_for: capacity|quota|dependency|backfill|preemption, reason, at}, and for the first jobs
    waiting for room ``starts_by`` when the time limits of the jobs ahead tell when it can start."""
    cancelled_by: str | None = None
    """Who asked for the cancel (the API token's user, or the local user on the head); None if no one
    did, or the cancel came from an older Switchyard."""
    cancel_checkpoint: bool = False
    """The cancel asked the ranks to finish the step and save a checkpoint first (``cancel --checkpoint``)."""

    @property
    def cancel_reason(self) -> str:
        """The reason its CANCELLED transition gives: 'cancelled by alice' (by whom, as sacct says it)."""
        return f"cancelled by {self.cancelled_by or 'user'}"

    @property
    def run_intervals(self) -> list[tuple[float, float | None]]:
        """(start, end) of every stretch in RUNNING or PREEMPTED (still stopping), end None while it lasts."""
        return _run_intervals(self.history)

    def time_limit(self, cap: float | None) -> float | None:
        """The time limit that applies to it: its ``resources.time_limit_s``, or cluster.yaml's ``cap``
        (``workers.max_time_limit_s``), the shorter of the two; None when neither is set."""
        return effective_time_limit((self.spec.get("resources") or {}).get("time_limit_s"), cap)

    def run_seconds(self, now: float | None = None) -> float:
        """Time spent RUNNING (or PREEMPTED, still stopping) over all attempts, up to ``now`` for a live stretch."""
        now = time.time() if now is None else now
        return sum((end or now) - start for start, end in self.run_intervals)

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
            "cancel_checkpoint": self.cancel_checkpoint,
            "cancelled_by": self.cancelled_by,
            "report": self.report,
            "owner": self.owner,
            "team": self.team,
            "after": list(self.after),
            "preemptions": self.preemptions,
            "preempted_by": self.preempted_by,
            "pending": dict(self.pending) if self.pending else None,
        }


# ---------------------------------------------------------------------- row decoding


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
        cancel_checkpoint=row["cancel_requested"] == CANCEL_CHECKPOINT,
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
        cancelled_by=row["cancelled_by"],
    )
