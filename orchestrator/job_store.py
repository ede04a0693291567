"""The job store: one SQLite file that is the source of truth for every job.

Every job's state, its history of transitions, its evaluations and the
controller's whereabouts live here, so the controller can die and come back
and lose nothing. Several processes open the same file at once: each CLI
invocation and the controller actor. That shapes the design:

- WAL journal mode, so readers (``switchyard status``) never block the
  controller's writes and vice versa. WAL needs a local filesystem (shared
  memory for its index), so the path must be local, not an fsspec URI.
- One connection per thread and process, opened on first use and kept: a
  ``JobStore`` is safe to share between threads, a forked child opens its
  own, and it pickles into a Ray actor as just a path. Keeping it open is what
  keeps the WAL file alive: when the last connection to a file closes, SQLite
  checkpoints the WAL into it and syncs, which made every write ten times
  slower when each operation opened and closed its own.
- Every write is one ``BEGIN IMMEDIATE`` transaction. Taking the write lock
  up front, rather than upgrading a read lock half way, is what lets the busy
  timeout queue writers instead of failing them with SQLITE_BUSY, and it makes
  read-check-write sequences (a legal-transition check, id allocation)
  atomic across processes.
- Reads run in one deferred transaction, so a job, its history and its evals
  come from the same snapshot.

State changes go through :meth:`JobStore.transition`, which checks
``LEGAL_TRANSITIONS`` and writes the history row in the same transaction.
Terminal states (SUCCEEDED, FAILED, CANCELLED) are final for the controller;
only :meth:`JobStore.requeue`, when someone asks, puts a FAILED or CANCELLED
job back in the queue.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from orchestrator.job_records import (  # noqa: F401  (re-exported: the rest of the tree imports them from here)
    LEGAL_TRANSITIONS,
    SAFE_NAME_RE,
    CANCEL_CHECKPOINT,
    AmbiguousJobIdError,
    ControllerInfo,
    EvalRecord,
    IllegalTransitionError,
    InvalidNameError,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStoreError,
    QuotaError,
    TOKEN_ID_CHARS,
    TOKEN_MAX_LIFETIME_S,
    RunHistory,
    TokenInfo,
    TokenNotFoundError,
    Transition,
    _HAS_WORKERS,
    _eval,
    _record,
    _transition,
    safe_join,
    validate_name,
)
from orchestrator.job_schema import (  # noqa: F401
    _MIGRATE_V1,
    _MIGRATE_V2,
    _MIGRATE_V3,
    _MIGRATE_V4,
    _SCHEMA,
    SCHEMA_VERSION,
    _check_int,
    _check_resources,
    _dumps,
    _encode_fields,
    _perplexity,
)
from orchestrator.job_queries import JobQueries, _filters
from orchestrator.job_tokens import JobTokens
from specs.errors import UsageError


# ---------------------------------------------------------------------- the store


class JobStore(JobQueries, JobTokens):
    """The SQLite job store at ``path``. Cheap to construct; opens its connections on first use.

    Writes take ids exactly; only :meth:`get` resolves a unique prefix (for
    people typing ids at the CLI). Pages, name lookups, fair share's run
    history and the controller's notes on waiting jobs come from
    ``job_queries.JobQueries``, API tokens from ``job_tokens.JobTokens``; ``queue_view`` and ``job_retention`` read and
    write through ``_read`` and ``_write`` too.
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
        self._local = threading.local()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"JobStore({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

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

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use; a forked child never uses its parent's."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn, local.pid = self._connect(), os.getpid()
        return local.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for every SELECT inside
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                # Only possible before the first table: pages freed by retention can then go back to
                # the filesystem (job_retention.compact); older files reuse them instead.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            # journal_mode is stored in the file: the first process to open it switches
            # it to WAL and everyone after inherits it. It cannot run inside a transaction.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JobStoreError(f"{self.path}: could not switch the job store to WAL mode (got {mode})")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._migrate(conn)
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the file to ``SCHEMA_VERSION`` in one transaction; the version is re-read under the write
        lock, so two processes opening an old (or new) file at once migrate it once."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"{self.path}: job store schema v{version} is newer than this Switchyard "
                    f"(v{SCHEMA_VERSION}); upgrade Switchyard"
                )
            steps = {0: _SCHEMA + _MIGRATE_V2, 1: _MIGRATE_V1 + _MIGRATE_V2, 2: _MIGRATE_V2}.get(version, "")
            steps += (_MIGRATE_V3 if version < 4 else "") + (_MIGRATE_V4 if version < 5 else "")
            statement = ""
            for line in steps.splitlines(keepends=True):  # whole statements, a trigger's body included
                statement += line
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -------------------------------------------------------------- loading

    def _load(self, conn: sqlite3.Connection, where: str, params: tuple, newest: int | None = None,
              skip: int = 0) -> list[JobRecord]:
        """Jobs matching ``where`` in submission order, history and evals too; with ``newest``, only that many
        of the newest after skipping the ``skip`` newest (a page, read from the new end of the index)."""
        if newest is None:
            select = f"SELECT {{}} FROM jobs WHERE {where} ORDER BY submitted_at, id"
            rows = conn.execute(select.format("*"), params).fetchall()
            if not rows:
                return []
            # Same filter as a subquery, so a listing of many jobs costs three queries, not 3N.
            ids, id_params = select.format("id"), params
        else:
            rows = conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY submitted_at DESC, id DESC LIMIT ?"
                                " OFFSET ?", (*params, newest, skip)).fetchall()[::-1]
            if not rows:
                return []
            ids, id_params = ", ".join("?" * len(rows)), tuple(r["id"] for r in rows)
        history: dict[str, list[Transition]] = {}
        for t in conn.execute(f"SELECT * FROM transitions WHERE job_id IN ({ids}) ORDER BY seq", id_params):
            history.setdefault(t["job_id"], []).append(_transition(t))
        evals: dict[str, list[EvalRecord]] = {}
        for e in conn.execute(f"SELECT * FROM evals WHERE job_id IN ({ids}) ORDER BY step, ts", id_params):
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
            _check_queued_quota(conn, team, max_queued)
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
        where, params = _filters(states, parent_id=parent_id)
        with self._read() as conn:
            return self._load(conn, where, params)

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

    def request_cancel(self, job_id: str, by: str | None = None, checkpoint: bool = False) -> JobRecord:
        """Ask for a job (and its pipeline or sweep children) to be cancelled, ``by`` whom.

        A QUEUED job holds no resources, so it is CANCELLED here and now; that
        way a cancel works even with no controller running, and a controller
        that tries to start it afterwards gets ``IllegalTransitionError``.
        Other live jobs get ``cancel_requested`` (and ``cancelled_by``) set for
        the controller to act on; its CANCELLED transition names who asked.
        With ``checkpoint`` a running job's ranks finish the step and save a
        checkpoint first (``CANCEL_CHECKPOINT``); a cancel without it, even a
        later one, stops them at once. Terminal jobs are left as they are.
        Returns the job's record.
        """
        reason = f"cancelled by {by or 'user'}"
        with self._write() as conn:
            now = self._clock()
            self._state(conn, job_id)
            for jid in _with_descendants(conn, job_id):
                state = self._state(conn, jid)
                if state.terminal:
                    continue
                if state is JobState.QUEUED:
                    conn.execute(
                        "UPDATE jobs SET state = ?, reason = ?, cancel_requested = 1, cancelled_by = ?,"
                        " updated_at = ?, finished_at = ? WHERE id = ?",
                        (JobState.CANCELLED.value, reason, by, now, now, jid),
                    )
                    conn.execute(
                        "INSERT INTO transitions (job_id, ts, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                        (jid, now, state.value, JobState.CANCELLED.value, reason),
                    )
                else:
                    conn.execute("UPDATE jobs SET cancel_requested = CASE WHEN cancel_requested = 1 THEN 1 ELSE ? END,"
                                 " cancelled_by = ?, updated_at = ? WHERE id = ?",
                                 (CANCEL_CHECKPOINT if checkpoint else 1, by, now, jid))
            return self._load_one(conn, job_id)

    def requeue(self, job_id: str, by: str | None = None, *, spec: dict[str, Any] | None = None,
                resources: dict[str, Any] | None = None, max_restarts: int | None = None, note: str = "",
                max_queued: int | None = None) -> JobRecord:
        """Put a FAILED or CANCELLED training job of its own (no pipeline or sweep) back in the queue, ``by``
        whom, with its id and run directory and a fresh restart budget (``orchestrator/job_control.py``).

        ``spec``, ``resources`` and ``max_restarts`` replace the job's (``--set``; ``note`` names the fields in
        the history); ``max_queued`` is the team's quota of queued jobs, as for :meth:`submit`."""
        if resources is not None:
            resources = _check_resources(resources)
        if max_restarts is not None:
            max_restarts = _check_int(max_restarts, "max_restarts", 0)
        reason = f"requeued by {by or 'user'}" + (f" with {note}" if note else "")
        with self._write() as conn:
            row = conn.execute("SELECT state, parent_id, kind, team FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in the job store")
            state = JobState(row["state"])
            if state not in (JobState.FAILED, JobState.CANCELLED) or row["parent_id"] is not None \
                    or row["kind"] != "train":
                raise IllegalTransitionError(f"{job_id} is {state.value} ({row['kind']}): only a FAILED or "
                                             "CANCELLED job of its own can be requeued")
            _check_queued_quota(conn, row["team"], max_queued)
            now = self._clock()
            conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = NULL, restarts = 0,"
                " cancel_requested = 0, cancelled_by = NULL, preempted_by = NULL, pending_json = NULL,"
                " blocked_since = NULL, workers_json = '[]', spec_json = COALESCE(?, spec_json),"
                " resources_json = COALESCE(?, resources_json), max_restarts = COALESCE(?, max_restarts)"
                " WHERE id = ?",
                (JobState.QUEUED.value, reason, now, None if spec is None else _dumps(spec, "spec"),
                 None if resources is None else _dumps(resources, "resources"), max_restarts, job_id))
            conn.execute(
                "INSERT INTO transitions (job_id, ts, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                (job_id, now, state.value, JobState.QUEUED.value, reason))
            return self._load_one(conn, job_id)

    def set_priority(self, job_id: str, priority: int) -> list[str]:
        """Give a live job (and its pipeline stages or sweep runs that are still live) a new priority; the
        next scheduling tick orders the queue by it. Returns the ids changed; a terminal job changes nothing."""
        priority = _check_int(priority, "priority")
        with self._write() as conn:
            now, changed = self._clock(), []
            self._state(conn, job_id)
            for jid in _with_descendants(conn, job_id):
                if not self._state(conn, jid).terminal:
                    conn.execute("UPDATE jobs SET priority = ?, updated_at = ? WHERE id = ?", (priority, now, jid))
                    changed.append(jid)
            return changed

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

    def clear_controller(self, pid: int) -> bool:
        """The controller ``pid`` stopped on purpose: no record is left to refuse the next one; False if it
        was not the recorded one."""
        with self._write() as conn:
            return conn.execute("DELETE FROM controller WHERE id = 0 AND pid = ?", (pid,)).rowcount == 1

    def controller(self) -> ControllerInfo | None:
        """The recorded controller, or None if none ever registered."""
        with self._read() as conn:
            row = conn.execute("SELECT pid, address, heartbeat FROM controller WHERE id = 0").fetchone()
        return ControllerInfo(row["pid"], row["address"], row["heartbeat"]) if row else None


# ---------------------------------------------------------------------- helpers


def _check_queued_quota(conn: sqlite3.Connection, team: str, max_queued: int | None) -> None:
    """QuotaError when ``team`` already has ``max_queued`` top-level jobs queued (None: no quota)."""
    if max_queued is None:
        return
    n = conn.execute("SELECT COUNT(*) FROM jobs WHERE team = ? AND state = ? AND parent_id IS NULL",
                     (team, JobState.QUEUED.value)).fetchone()[0]
    if n >= max_queued:
        raise QuotaError(f"team {team or '(none)'} already has {n} queued job(s), its quota "
                         f"(queued_jobs: {max_queued}); wait for some to start or cancel one")


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
