"""The queue as the controller's scheduler sees it, kept current from the job store's change counter.

A tick used to load every queued job in full (spec, history, evaluations),
then read each one again to note why it waits: with 10,000 queued jobs that
was seconds per tick. ``QueueView`` reads the whole queue once, through the
``jobs_state_submitted`` index and only the columns scheduling needs, and from
then on one indexed query per tick returns only the jobs whose ``rev`` moved (a
submission, a state change, a priority change: see the trigger in
``job_schema.py``). The states of the jobs that queued jobs wait for
(``--after``) are kept the same way, and so are the queue's order (changed
jobs move to their places) and its job counts per shape, which tell a
scheduling pass when it may stop (``scheduler.Plan``).

What the controller writes back about waiting jobs (``blocked_since`` and the
pending reason) it also applies here, and sends in one transaction per tick
(:meth:`QueueView.flush`). Those columns leave ``rev`` alone, so the
controller's own notes never come back as changes.

Pending reasons (README paragraph): a job's position in the queue shifts
whenever a job ahead of it starts, which would rewrite every row behind it.
Within the first ``EXACT_POSITIONS`` (500) a new position, or a change in
what the job waits for, is written at once, and a reason whose text alone
changed (free CPUs, seconds waited) at most every ``NEAR_REFRESH_S`` (5 s).
Further back, any change is written at most every ``FAR_REFRESH_S`` (60 s).
Those rate-limited rewrites are capped at ``REFRESH_PER_TICK`` (1000) per
tick, the longest unwritten first, so no tick pays for the whole queue; a
long queue seen for the first time is annotated over its first ticks.
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import scheduler as sched
from orchestrator.estimates import ESTIMATE_EVERY_S, ESTIMATED, start_estimates
from orchestrator.job_records import effective_time_limit

EXACT_POSITIONS = 500
"""Pending positions up to this are rewritten as soon as they change."""
NEAR_REFRESH_S = 5.0
"""A reason whose text alone changed (free CPUs, seconds waited) is rewritten at most this often near the head."""
FAR_REFRESH_S = 60.0
"""Past EXACT_POSITIONS, a changed position or reason is rewritten at most this often."""
REFRESH_PER_TICK = 1000
"""At most this many rate-limited pending rows are rewritten per tick (the oldest first)."""
MOVE_AT_MOST = 0.02
"""Jobs changed since the last tick up to this fraction of the queue move to their places; more: sort it all."""
_CHUNK = 500  # ids per IN (...) query: well under SQLite's variable limit

_COLUMNS = """id, kind, state, priority, submitted_at, resources_json, blocked_since, cancel_requested, team,
    after_json, pending_json, preempted_by, reason, started_at, rev,
    json_extract(spec_json, '$.resources.elastic') AS elastic,
    json_extract(spec_json, '$.resources.time_limit_s') AS time_limit_s,
    (SELECT reason FROM transitions t WHERE t.job_id = jobs.id ORDER BY seq DESC LIMIT 1) AS last_transition"""


@dataclass(slots=True)
class QueueRow:
    """What the controller needs of one QUEUED job to schedule it and say why it waits.

    Not frozen: the view sets ``blocked_since`` and ``pending`` in place as it writes them to the store.
    """

    id: str
    kind: str
    priority: int
    submitted_at: float
    resources: dict[str, Any]
    blocked_since: float | None
    cancel_requested: bool
    team: str
    after: tuple[str, ...]
    pending: dict[str, Any] | None
    preempted_by: str | None
    reason: str
    ran_before: bool
    """It reached RUNNING at least once (a requeued job that lost a node waits instead of failing)."""
    elastic: bool
    """``resources.elastic`` in its spec: it may resume on fewer workers."""
    last_transition: str
    """The reason of its latest transition."""
    time_limit_s: float | None
    """``resources.time_limit_s`` in its spec."""


def _row(r: Any) -> QueueRow:
    return QueueRow(r["id"], r["kind"], r["priority"], r["submitted_at"], json.loads(r["resources_json"]),
                    r["blocked_since"], bool(r["cancel_requested"]), r["team"], tuple(json.loads(r["after_json"])),
                    json.loads(r["pending_json"]) if r["pending_json"] else None, r["preempted_by"], r["reason"],
                    r["started_at"] is not None, bool(r["elastic"]), r["last_transition"] or "", r["time_limit_s"])


class QueueView:
    """The QUEUED jobs of ``kinds`` and the states of what they wait for, updated by :meth:`refresh`."""

    def __init__(self, kinds: Iterable[str], max_time_limit_s: float | None = None, start_and_stop_s: float = 0.0):
        """``max_time_limit_s``: cluster.yaml's cap (and default) of a job's time limit. A queued job with a limit
        holds its workers at most that long once started, plus ``start_and_stop_s`` (``QueuedJob.max_run_s``:
        the whole limit, even when earlier attempts used some of it)."""
        self.kinds = frozenset(kinds)
        self.max_time_limit_s, self.start_and_stop_s = max_time_limit_s, start_and_stop_s
        self.rev: int | None = None
        """The largest change counter seen; None before the first read."""
        self.rows: dict[str, QueueRow] = {}
        self.dep_states: dict[str, str] = {}
        """State of every job that some queued job waits for."""
        self._jobs: dict[str, sched.QueuedJob] = {}
        self.counts: Counter = Counter()
        """Queued jobs per (priority, id(bundles)), for ``scheduler.plan_tick``."""
        self.elastic: set[str] = set()
        """Queued jobs whose spec allows an elastic resume (the controller looks at each every tick)."""
        self._due: list[tuple[float, str]] = []  # heap of (pending last written, job id): oldest first
        self._dependents: dict[str, set[str]] = {}  # job id -> the queued jobs that wait for it
        self._missing: set[str] = set()  # dependencies whose state is not known yet
        self._dirty: set[str] = set()  # jobs changed since the order was last brought up to date
        self._order: list[sched.QueuedJob] = []
        self._keys: list[tuple] = []  # queue_key of each job in _order
        self._key_of: dict[str, tuple] = {}
        self._order_shares: tuple | None = None  # the shares _order was sorted for
        self._writes: dict[str, dict[str, Any]] = {}  # job id -> fields to write at flush
        self._refresh: list[tuple[float, str, dict[str, Any]]] = []  # (last written, job id, pending): rate-limited
        self.starts: dict[str, float | None] = {}
        """When the first waiting jobs can start (:meth:`estimate`); their pending notes carry it."""
        self._estimated_at = -ESTIMATE_EVERY_S

    # -------------------------------------------------------------- reading

    def refresh(self, store: Any) -> int:
        """Apply what changed in ``store`` since the last call (all of the queue the first time); how many rows."""
        with store._read() as conn:
            if self.rev is None:
                rev = conn.execute("SELECT COALESCE(MAX(rev), 0) FROM jobs").fetchone()[0]
                rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'QUEUED'").fetchall()
            else:
                rows = conn.execute(f"SELECT {_COLUMNS}, state FROM jobs WHERE rev > ?", (self.rev,)).fetchall()
                rev = max([r["rev"] for r in rows], default=self.rev)
            for r in rows:
                self._apply(r)
            missing = sorted(self._missing)
            for i in range(0, len(missing), _CHUNK):
                part = missing[i:i + _CHUNK]
                found = dict(conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({', '.join('?' * len(part))})",
                                          part).fetchall())
                for d in part:
                    self.dep_states[d] = found.get(d, "CANCELLED")  # gone from the store: it can never succeed
                    self._dirty |= self._dependents.get(d, set())
            self._missing.clear()
        self.rev = rev
        return len(rows)

    def _apply(self, r: Any) -> None:
        jid = r["id"]
        self._dirty.add(jid)
        if jid in self.dep_states and self.dep_states[jid] != r["state"]:
            self.dep_states[jid] = r["state"]
            self._dirty |= self._dependents.get(jid, set())
        old = self.rows.pop(jid, None)
        for d in old.after if old is not None else ():
            self._dependents.get(d, set()).discard(jid)
        gone = self._jobs.get(jid)
        if gone is not None:
            self._count(gone, -1)
        if r["state"] != "QUEUED" or r["kind"] not in self.kinds:
            self._jobs.pop(jid, None)
            self.elastic.discard(jid)
            return
        row = _row(r)
        self.rows[jid] = row
        (self.elastic.add if row.elastic else self.elastic.discard)(jid)
        heapq.heappush(self._due, ((row.pending or {}).get("at", 0.0), jid))
        limit = effective_time_limit(row.time_limit_s, self.max_time_limit_s)
        self._jobs[jid] = job = sched.QueuedJob.from_resources(
            row.id, row.priority, row.submitted_at, row.resources, row.blocked_since, row.cancel_requested, row.team,
            max_run_s=None if limit is None else limit + self.start_and_stop_s)
        self._count(job, 1)
        for d in row.after:
            self._dependents.setdefault(d, set()).add(jid)
            if d not in self.dep_states:
                self._missing.add(d)

    def _count(self, job: sched.QueuedJob, n: int) -> None:
        key = (job.priority, id(job.bundles))
        self.counts[key] += n
        if not self.counts[key]:
            del self.counts[key]

    def jobs(self, shares: Mapping[str, float] | None = None) -> list[sched.QueuedJob]:
        """The queued jobs in queue order, each with the current states of its dependencies.

        The order is kept between calls: the jobs that changed since the last call move to their new places
        (a bisection each), and only new fair shares (every 10 s) or more than MOVE_AT_MOST changes sort it all.
        The list is the view's own: read it, do not change it.
        """
        shares = shares or {}
        key = tuple(sorted(shares.items()))
        if key != self._order_shares or len(self._dirty) > MOVE_AT_MOST * len(self._order):
            self._order_shares = key
            self._order = sched.queue_order((self._with_deps(j) for j in self._jobs.values()), shares)
            self._keys = [sched.queue_key(j, shares) for j in self._order]
            self._key_of = dict(zip((j.job_id for j in self._order), self._keys))
        else:
            for jid in self._dirty:
                old = self._key_of.pop(jid, None)
                if old is not None:
                    i = bisect.bisect_left(self._keys, old)
                    del self._keys[i], self._order[i]
                job = self._jobs.get(jid)
                if job is not None:
                    job = self._with_deps(job)
                    new = self._key_of[jid] = sched.queue_key(job, shares)
                    i = bisect.bisect_left(self._keys, new)
                    self._keys.insert(i, new)
                    self._order.insert(i, job)
        self._dirty.clear()
        return self._order

    def _with_deps(self, job: sched.QueuedJob) -> sched.QueuedJob:
        after = self.rows[job.job_id].after
        if not after:
            return job
        return dataclasses.replace(job, deps=tuple((d, self.dep_states.get(d, "UNKNOWN")) for d in after))

    # -------------------------------------------------------------- writing back

    def estimate(self, plan: sched.Plan, holders: Iterable[sched.RunningJob], total: Mapping[str, Any],
                 now: float) -> None:
        """Every ESTIMATE_EVERY_S, play the queue forward for the first ESTIMATED jobs waiting for room
        (``orchestrator/estimates.py``), with ``holders`` and this tick's starts keeping theirs."""
        if now - self._estimated_at < ESTIMATE_EVERY_S:
            return
        self._estimated_at = now
        waits = [d.job_id for d in plan.decisions
                 if isinstance(d, sched.Wait) and d.waiting_for in ("capacity", "backfill") and d.job_id in self._jobs]
        self.starts = start_estimates((self._jobs[j] for j in waits[:ESTIMATED]), total,
                                      [*holders, *plan.started], now)

    def note_blocked(self, job_id: str, now: float) -> None:
        """The scheduler told ``job_id`` to wait for the first time: its backfill aging clock starts now."""
        self._writes.setdefault(job_id, {})["blocked_since"] = now

    def note_pending(self, job_id: str, position: int, decision: sched.Wait, now: float) -> None:
        """Record why a queued job waits (status and list show it), by the policy in the module docstring."""
        row = self.rows[job_id]
        by = row.preempted_by if row.preempted_by and row.last_transition.startswith("preempted by") else None
        old = row.pending or {}
        starts_by = decision.starts_by if decision.starts_by is not None else self.starts.get(job_id)
        starts_by = None if starts_by is None else round(starts_by)
        if (old.get("position") == position and old.get("reason") == decision.reason
                and old.get("waiting_for") == decision.waiting_for and old.get("preempted_by") == by
                and old.get("starts_by") == starts_by):
            return  # the usual case deep in a long queue: nothing to write
        pending = {"position": position, "waiting_for": decision.waiting_for, "reason": decision.reason, "at": now}
        if by:
            pending["preempted_by"] = by
        if starts_by is not None:
            pending["starts_by"] = starts_by
        near = min(position, old.get("position") or position) <= EXACT_POSITIONS
        key = lambda p: (p.get("position"), p.get("waiting_for"), p.get("preempted_by"))
        if near and key(old) != key(pending):
            self._writes.setdefault(job_id, {})["pending"] = pending  # at once
        elif key(old) != key(pending) or old.get("reason") != pending["reason"] or old.get("starts_by") != starts_by:
            at = old.get("at") or 0.0  # never written: first in line
            if now - at >= (NEAR_REFRESH_S if near else FAR_REFRESH_S):
                self._refresh.append((at, job_id, pending))

    def due(self, now: float, plan: sched.Plan, limit: int = REFRESH_PER_TICK) -> list[str]:
        """Up to ``limit`` jobs the ``plan`` left undecided whose pending note is FAR_REFRESH_S old or was never
        written, the oldest first: the controller notes them from ``plan.wait_for``."""
        out: list[str] = []
        seen: set[str] = set()
        keep: list[tuple[float, str]] = []
        while self._due and len(out) < limit and now - self._due[0][0] >= FAR_REFRESH_S:
            at, job_id = heapq.heappop(self._due)
            row = self.rows.get(job_id)
            if row is None or (row.pending or {}).get("at", 0.0) != at or job_id in seen:
                continue  # gone, or written since: a newer entry stands for it
            seen.add(job_id)
            if plan.undecided(job_id):
                out.append(job_id)
            keep.append((at, job_id))  # decided ones are noted by the controller; both stay due until written
        for entry in keep:
            heapq.heappush(self._due, entry)
        return out

    def flush(self, store: Any) -> int:
        """Write this tick's notes in one transaction (the oldest REFRESH_PER_TICK refreshes among them)."""
        for _, job_id, pending in sorted(self._refresh)[:REFRESH_PER_TICK]:
            self._writes.setdefault(job_id, {}).setdefault("pending", pending)
        writes, self._writes, self._refresh = self._writes, {}, []
        for job_id, fields in writes.items():
            row = self.rows.get(job_id)
            if row is not None:
                row.pending = fields.get("pending", row.pending)
                row.blocked_since = fields.get("blocked_since", row.blocked_since)
                if "pending" in fields:
                    heapq.heappush(self._due, (fields["pending"]["at"], job_id))
            if "blocked_since" in fields and job_id in self._jobs:
                self._jobs[job_id] = dataclasses.replace(self._jobs[job_id], blocked_since=fields["blocked_since"])
                self._dirty.add(job_id)
        if writes:
            store.note_waiting(writes)
        return len(writes)
