"""Retention and compaction of finished jobs' history, so the job store does not grow without bound.

Policy (README paragraph; ``job_store_retention:`` in cluster.yaml):

    A finished job (SUCCEEDED, FAILED or CANCELLED) is kept, with its history
    of transitions and its evaluations, for ``finished_days`` (default 30)
    after it finished, and at most the ``max_finished`` (default 100,000)
    most recently finished are kept. A pipeline or sweep goes as one, with
    its stages or runs, once it and all of them are finished; a job that a
    live job waits for (``--after``) is kept until that one ends. Nothing in
    storage is touched: run directories, checkpoints and sweep tables stay
    where they are. The controller applies the policy at start and then
    every ``every_s`` (default one hour), at most ``batch`` jobs at a time,
    and returns the freed pages to the filesystem (SQLite's incremental
    vacuum on stores created since schema v3; older files reuse them).

    An API token that expired is deleted ``finished_days`` after it expired;
    until then ``switchyard token list`` shows it as expired. Tokens without
    an expiry stay until they are revoked.

Fair share is not disturbed: usage decays with a half-life of a day by
default, so a job finished 30 days ago weighs 2**-30 of what it did.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_CHUNK = 500  # ids per IN (...) statement


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished jobs stay in the job store (``job_store_retention:`` in cluster.yaml)."""

    finished_days: float = 30.0
    """A finished job is deleted this many days after it finished."""
    max_finished: int = 100_000
    """At most this many finished top-level jobs are kept (the most recently finished)."""
    batch: int = 5000
    """At most this many top-level jobs are deleted per compaction, so one pass never holds the store long."""


@dataclass(frozen=True)
class Compaction:
    """What one :func:`compact` did."""

    deleted: int
    """Jobs deleted, pipeline stages and sweep runs included."""
    kept_for_dependents: int
    """Finished jobs past the policy kept because a live job waits for them."""
    tokens: int = 0
    """API tokens deleted: those that expired more than ``finished_days`` ago."""


def compact(store: Any, policy: RetentionPolicy, now: float | None = None) -> Compaction:
    """Delete what ``policy`` no longer keeps from ``store`` (a ``JobStore``), in one write transaction."""
    now = time.time() if now is None else now
    with store._write() as conn:
        tokens = conn.execute("DELETE FROM tokens WHERE expires_at < ?",
                              (now - policy.finished_days * 86400.0,)).rowcount
        old = [r[0] for r in conn.execute(
            "SELECT id FROM jobs WHERE finished_at < ? AND parent_id IS NULL ORDER BY finished_at LIMIT ?",
            (now - policy.finished_days * 86400.0, policy.batch))]
        over = [r[0] for r in conn.execute(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND parent_id IS NULL"
            " ORDER BY finished_at DESC, id DESC LIMIT ? OFFSET ?", (policy.batch, policy.max_finished))]
        candidates = list(dict.fromkeys(old + over))[:policy.batch]
        if not candidates:
            return Compaction(0, 0, tokens)
        waited_for = {d for (after,) in conn.execute(
            f"SELECT after_json FROM jobs WHERE state NOT IN ({', '.join('?' * len(_TERMINAL))})"
            " AND after_json != '[]'", _TERMINAL) for d in json.loads(after)}
        doomed, kept = [], 0
        for root in candidates:
            tree = _tree(conn, root)
            if any(state not in _TERMINAL for state in tree.values()):
                continue  # a stage or run still going: the whole tree stays
            if waited_for.intersection(tree):
                kept += 1
                continue
            doomed += list(tree)
        for i in range(0, len(doomed), _CHUNK):
            part = doomed[i:i + _CHUNK]
            marks = ", ".join("?" * len(part))
            conn.execute(f"DELETE FROM transitions WHERE job_id IN ({marks})", part)
            conn.execute(f"DELETE FROM evals WHERE job_id IN ({marks})", part)
        # children before parents: parent_id is a foreign key
        for i in range(len(doomed), 0, -_CHUNK):
            part = doomed[max(0, i - _CHUNK):i]
            conn.execute(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(part))})", part)
    if doomed:
        _vacuum(store)
    return Compaction(len(doomed), kept, tokens)


def _tree(conn: Any, root: str) -> dict[str, str]:
    """The job ``root`` and everything under it, id -> state, parents before their children."""
    out: dict[str, str] = {}
    level = [root]
    while level:
        marks = ", ".join("?" * len(level))
        rows = conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", level).fetchall()
        out.update((r[0], r[1]) for r in rows)
        level = [r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE parent_id IN ({marks})", level)
                 if r[0] not in out]
    return out


def _vacuum(store: Any) -> None:
    """Give freed pages back to the filesystem (a no-op on pre-v3 files) and fold the WAL into the file."""
    conn = store._connect()
    try:
        conn.execute("PRAGMA incremental_vacuum").fetchall()  # it frees one page per row stepped
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
