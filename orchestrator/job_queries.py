"""The job store's queries for a long queue and a long history: pages, names, run history, waiting notes.

A mixin of ``JobStore`` (``orchestrator/job_store.py``), kept apart so the
store's core (connections, schema, submit, transitions) reads on its own;
every method here runs in one of the store's transactions.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from orchestrator.job_records import JobRecord, JobState, RunHistory, Transition, _transition
from orchestrator.job_schema import _check_int, _encode_fields


class JobQueries:
    """Queries that serve ``list`` pages, name lookups, fair share and the controller's pending notes."""

    def page(self, states: Iterable[JobState | str] | None = None, *, limit: int, page: int = 1,
             owner: str | None = None) -> tuple[list[JobRecord], int]:
        """One page of jobs and how many match in all: page 1 is the newest ``limit``, in submission order.

        Newest first because a long store's oldest jobs are rarely what someone
        listing it wants; within a page the order is the same as :meth:`list`.
        """
        limit, page = _check_int(limit, "limit", 1), _check_int(page, "page", 1)
        where, params = _filters(states, owner=owner)
        with self._read() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0]
            return self._load(conn, where, params, newest=limit, skip=(page - 1) * limit), total

    def ran_since(self, since: float | None) -> list[RunHistory]:
        """Jobs that have run and did not finish before ``since`` (None: every job that ever ran), with only
        what fair share reads, through the ``jobs_finished`` index rather than the whole store."""
        where, params = "(started_at IS NOT NULL OR preemptions > 0)", ()
        if since is not None:
            where, params = where + " AND (finished_at IS NULL OR finished_at >= ?)", (since,)
        with self._read() as conn:
            jobs = conn.execute(f"SELECT id, kind, team, resources_json FROM jobs WHERE {where}", params).fetchall()
            history: dict[str, list[Transition]] = {}
            for t in conn.execute(f"SELECT * FROM transitions WHERE job_id IN (SELECT id FROM jobs WHERE {where})"
                                  " ORDER BY seq", params):
                history.setdefault(t["job_id"], []).append(_transition(t))
        return [RunHistory(r["id"], r["kind"], r["team"], json.loads(r["resources_json"]),
                           tuple(history.get(r["id"], ()))) for r in jobs]

    def by_name(self, name: str, kind: str) -> list[JobRecord]:
        """The jobs of this ``kind`` named ``name``, oldest first (through the ``jobs_name`` index)."""
        with self._read() as conn:
            return self._load(conn, "name = ? AND kind = ?", (name, kind))

    def note_waiting(self, notes: dict[str, dict[str, Any]]) -> None:
        """The controller's notes on waiting jobs, ``{job_id: {blocked_since?, pending?}}``, in one transaction.

        Only jobs still QUEUED are touched (one may have started or been
        cancelled since the scheduler looked), ``updated_at`` stays (nothing a
        person did changed), and so does ``rev`` (``queue_view.py``).
        """
        by_columns: dict[tuple[str, ...], list[tuple]] = {}
        for job_id, fields in notes.items():
            sets = _encode_fields(fields)
            if set(sets) - {"blocked_since", "pending_json"}:
                raise TypeError(f"note_waiting sets blocked_since and pending only, got {sorted(fields)}")
            by_columns.setdefault(tuple(sets), []).append((*sets.values(), job_id, JobState.QUEUED.value))
        with self._write() as conn:
            for columns, rows in by_columns.items():
                conn.executemany(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ? AND state = ?",
                                 rows)


def _filters(states: Iterable[JobState | str] | None, parent_id: str | None = None,
             owner: str | None = None) -> tuple[str, tuple]:
    """A WHERE clause and its parameters for jobs in ``states`` (None: any), under ``parent_id``, of ``owner``."""
    clauses, params = [], []
    if states is not None:
        wanted = sorted({JobState(s).value for s in states})
        clauses.append(f"state IN ({', '.join('?' * len(wanted))})" if wanted else "0")
        params += wanted
    for column, value in (("parent_id", parent_id), ("owner", owner)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(clauses) or "1", tuple(params)
