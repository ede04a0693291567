"""The job store's SQLite schema, its migrations, and the checks on values before they are written.

``SCHEMA_VERSION`` is stored in the file (``PRAGMA user_version``); a store
opened by an older Switchyard is migrated forward in one transaction, and one
written by a newer Switchyard is refused.
"""
from __future__ import annotations

import json
import math
from typing import Any

SCHEMA_VERSION = 5

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
    hash       TEXT PRIMARY KEY,  -- sha256 of the bearer token (the token itself is never stored)
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

# v2 -> v3: the queue at scale (issue #15). ``rev`` is the store-wide change counter: a trigger gives a
# job one more than the largest rev whenever it is inserted or a column the scheduler reads changes, so
# the controller reads only the jobs changed since its last tick (jobs_rev). Progress (step, metrics) and
# the controller's own notes (pending, blocked_since) leave rev alone: they would only echo back. The other
# indexes serve the queue and pages of one state (jobs_state_submitted), pages in submission order, name
# lookups, the queued-jobs quota at submit, and retention of finished jobs.
_MIGRATE_V2 = """
ALTER TABLE jobs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_rev ON jobs(rev);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs(submitted_at, id);
CREATE INDEX IF NOT EXISTS jobs_state_submitted ON jobs(state, submitted_at, id);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name, kind, submitted_at);
CREATE INDEX IF NOT EXISTS jobs_team_state ON jobs(team, state);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at, started_at);
DROP INDEX IF EXISTS jobs_state;
CREATE TRIGGER IF NOT EXISTS jobs_rev_insert AFTER INSERT ON jobs BEGIN
    UPDATE jobs SET rev = (SELECT MAX(rev) FROM jobs) + 1 WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS jobs_rev_update
AFTER UPDATE OF state, priority, resources_json, spec_json, cancel_requested, team, after_json, reason,
                preempted_by ON jobs BEGIN
    UPDATE jobs SET rev = (SELECT MAX(rev) FROM jobs) + 1 WHERE id = NEW.id;
END;
"""

# v3 -> v4: who asked for a cancel (the CANCELLED transition names them); API tokens that expire.
_MIGRATE_V3 = """
ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;
ALTER TABLE tokens ADD COLUMN expires_at REAL;
"""

# v4 -> v5: the last transition the webhooks looked at, so a controller started after `switchyard down` sends
# what changed while none ran (orchestrator/notify.py).
_MIGRATE_V4 = """
CREATE TABLE IF NOT EXISTS webhook_cursor (
    id  INTEGER PRIMARY KEY CHECK (id = 0),  -- singleton row
    seq INTEGER NOT NULL
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

