"""The scheduling and failure policies: pure functions that return decisions.

Nothing here touches Ray or the job store. The controller takes a snapshot
(queued jobs, free and total resources per node), calls :func:`schedule`, and
executes the ``Start`` / ``Wait`` / ``Fail`` / ``Cancel`` values it gets back;
on a fault it calls :func:`on_failure` and executes the ``Restart`` or
``Fail``. Tests check the policy with plain values and no cluster. Packing
lives in ``orchestrator/packing.py``, preemption in ``preemption.py``, quotas
and fair share in ``fair_share.py``; their names are re-exported here.

Scheduling policy (README paragraph):

    priority, in submission order. A job is admitted as a gang: all of its
    workers start together in one Ray placement group, or none do, so a
    3-worker job never starts on room for 2. Each worker is one bundle of CPUs
    and GPUs that must fit on a single node; a job may span nodes. Before
    anything is placed, a job that could not fit even on the empty cluster is
    failed at once with a message saying what it needs and what the cluster
    has, instead of waiting forever. When the job at the head of the queue
    does not fit in what is free, smaller jobs behind it may start in the gap
    (backfill), but only for a bounded time: once the head has waited longer
    than the backfill window (default 120 s), nothing behind it starts until it
    does, so resources drain to it and it cannot be starved by a stream of
    small jobs. A window of 0 turns this backfill off (strict priority order).

    Time limits (``resources.time_limit_s``, or cluster.yaml's
    ``workers.max_time_limit_s``) tell the scheduler when the running jobs
    will have given their workers back at the latest, and so when the blocked
    head can start at the latest: ``switchyard status`` shows that time.
    While the room drains to an aged head, a job behind it may still start in
    the free room if its own time limit ends before then, so it never delays
    the head (EASY backfill). Jobs with no time limit, or a longer one, wait.


How the controller drives it: call ``schedule`` each tick with the QUEUED
jobs. For every ``Wait``, set the job's ``blocked_since`` to now if it is not
set yet; a ``Start`` clears it (``JobStore.transition`` to STARTING does).
``blocked_since`` is the aging clock: a job that waited behind an aged head
is itself aged when it reaches the head, which is fair. Pass the cluster's
total resources from ``ray.cluster_resources``-style per-node totals: they
decide which jobs are impossible.

Cost: everything that costs more than a comparison (packing a gang onto the
nodes, looking for preemption victims, the text of a reason) is computed once
per distinct job shape between two starts and reused: free resources only
shrink within a pass, and two jobs of the same bundles and priority get the
same answer from the same free view. The controller's tick calls
:func:`plan_tick`, which also stops deciding once the rest of the queue can
only wait (:class:`Plan`), so a tick over 100,000 queued jobs decides a
thousand or two of them (``benchmarks/controller_scale.py``). The decisions
and the jobs they are about live in ``orchestrator/decisions.py``.

Dependencies: a job submitted with ``--after A,B`` waits until A and B have
SUCCEEDED; if either ends FAILED or CANCELLED, the job fails with the reason.
"""
from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from orchestrator.decisions import (  # noqa: F401  (re-exported)
    Cancel,
    Decision,
    Fail,
    Preempt,
    QueuedJob,
    Restart,
    RunningJob,
    Start,
    Wait,
)
from orchestrator.fair_share import (  # noqa: F401  (re-exported)
    TeamQuota,
    add_use,
    decayed_usage,
    fair_shares,
    over_quota,
    quota_exceeded,
    team_usage,
)
from orchestrator.packing import (  # noqa: F401  (re-exported)
    Bundle,
    Resources,
    bundles_of,
    describe_bundles,
    describe_cluster,
    earliest_fit,
    fits,
    free_summary,
    give_back,
    place,
    span,
    subtract,
    units,
)
from orchestrator.preemption import PreemptionPolicy, choose_victims  # noqa: F401  (re-exported)

DEFAULT_BACKFILL_WINDOW_S = 120.0
FREEZE_CHECK_EVERY = 64
"""A tick's pass checks every this many jobs whether the rest can only wait (see ``Plan``)."""


# ---------------------------------------------------------------------- scheduling


def queue_key(job: QueuedJob, shares: Mapping[str, float]) -> tuple:
    """Where ``job`` stands in the queue: priority (higher first), then its team's fair share (lower first),
    then submission time, then id (so no two jobs tie)."""
    return (-job.priority, shares.get(job.team, 0.0), job.submitted_at, job.job_id)


def queue_order(jobs: Iterable[QueuedJob], shares: Mapping[str, float] | None = None) -> list[QueuedJob]:
    """The jobs sorted by :func:`queue_key`."""
    shares = shares or {}
    return sorted(jobs, key=lambda j: queue_key(j, shares))


_DEP_FAILED = ("FAILED", "CANCELLED")
_ALWAYS = -1  # a _no_room entry that holds for the rest of the pass
_UNSEEN = object()  # a shape the pass has not looked at yet


def schedule(queue: Iterable[QueuedJob], free_per_node: Mapping[str, Resources],
             total_per_node: Mapping[str, Resources], *, now: float,
             backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S, running: Iterable[RunningJob] = (),
             preemption: PreemptionPolicy | None = None, quotas: Mapping[str, TeamQuota] | None = None,
             shares: Mapping[str, float] | None = None) -> list[Decision]:
    """One decision per queued job, in queue order, with any ``Preempt`` just before the job it makes room for.

    ``free_per_node`` is what is available now; ``total_per_node`` is each
    node's capacity and decides which jobs can never fit. Starts are
    planned against a running copy of ``free_per_node``, so the ``Start``
    decisions of one call fit together. ``running`` are the jobs holding
    workers (what preemption may stop and what counts against quotas);
    ``preemption`` None turns preemption off. ``quotas`` per team, ``shares``
    per team from :func:`fair_shares`.
    """
    plan = plan_tick(queue, free_per_node, total_per_node, now=now, backfill_window_s=backfill_window_s,
                     running=running, preemption=preemption, quotas=quotas, shares=shares, exact=None)
    return plan.decisions


def plan_tick(queue: Iterable[QueuedJob], free_per_node: Mapping[str, Resources],
              total_per_node: Mapping[str, Resources], *, now: float,
              backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S, running: Iterable[RunningJob] = (),
              preemption: PreemptionPolicy | None = None, quotas: Mapping[str, TeamQuota] | None = None,
              shares: Mapping[str, float] | None = None, exact: int | None = 1000,
              always: frozenset[str] = frozenset(), ordered: bool = False,
              counts: Mapping[tuple[int, int], int] | None = None) -> Plan:
    """:func:`schedule` for the controller's tick: the same decisions, but it stops deciding once the rest
    of the queue can only wait (see :class:`Plan`), after the first ``exact`` jobs (None: never stops).
    Jobs in ``always`` are decided wherever they are (the controller checks elastic resumes on them).
    ``ordered``: ``queue`` is already in :func:`queue_order` for ``shares`` (``QueueView.jobs``); ``counts``:
    how many of its jobs there are per (priority, id(bundles)), as :func:`shape_counts` gives them
    (``QueueView.counts`` keeps them)."""
    jobs = list(queue) if ordered else queue_order(queue, shares)
    if not any(units(r.get("CPU", 0)) or units(r.get("GPU", 0)) for r in total_per_node.values()):
        # No nodes (yet): the cluster is still coming up or is unreachable. Failing
        # every job as impossible would be wrong, so everyone waits.
        return Plan([Cancel(j.job_id) if j.cancel_requested else Wait(j.job_id, "the cluster reports no resources yet")
                     for j in jobs], jobs, len(jobs), None)
    p = _Pass(free={n: dict(r) for n, r in free_per_node.items()}, total=total_per_node, now=now,
              window_s=backfill_window_s, running=list(running), preemption=preemption, quotas=quotas or {})
    for r in p.running:
        add_use(p.in_use, r.team, r.bundles)
    remaining = None if exact is None else Counter(counts) if counts is not None else shape_counts(jobs)
    cut = len(jobs)
    for i, job in enumerate(jobs):
        if remaining is not None and i >= exact and i % FREEZE_CHECK_EVERY == 0 and p.frozen(remaining):
            cut = i
            break
        p.decide(job)
        if remaining is not None:
            remaining[(job.priority, id(job.bundles))] -= 1
    plan = Plan(p.decisions, jobs, cut, p)
    seen = p._impossible
    for i in range(cut, len(jobs)):  # the rest: only the jobs whose decision is more than a wait
        job = jobs[i]
        if (job.cancel_requested or job.deps or not job.bundles or job.blocked_since is None
                or job.job_id in always or seen.get(id(job.bundles), _UNSEEN) is not None
                and p.impossible(job.bundles) is not None):
            plan.decide(i)
    return plan


def shape_counts(jobs: Iterable[QueuedJob]) -> Counter:
    """How many jobs there are per (priority, id(bundles)): what a pass must have seen before it may stop."""
    return Counter((j.priority, id(j.bundles)) for j in jobs)


@dataclass
class Plan:
    """One tick's decisions, possibly stopped early.

    A pass may stop at job ``cut`` once nothing after it can start or be
    preempted for: backfill is closed (a job is preempting, or the head has
    waited past the window), or every (priority, shape) still to come has
    been seen not to fit, with no victims at that priority or above, since
    the last start (fewer candidates cannot do better). From there
    on the pass's state is frozen, so each remaining job's decision depends
    on that job alone and can be made in any order, or not at all: it is a
    ``Wait``, and only the jobs for which it may be more (cancelled, waiting
    on ``--after``, never seen before, of an impossible shape, or in
    ``always``) are decided. :meth:`wait_for` decides any other on demand
    (the controller's rate-limited pending notes).
    """

    decisions: list[Decision]
    """In queue order: every job before the cut, then those of the rest that were decided."""
    order: list[QueuedJob]
    """The whole queue in queue order."""
    cut: int
    _pass: _Pass | None
    _uncounted: list[int] = field(default_factory=list)
    """Queue indexes of jobs that got a Fail or Cancel (they take no position), ascending."""
    positions: dict[str, int] = field(default_factory=dict)
    """Queue position (1 = next to start) of every job that got a Start or Wait here."""
    _index: dict[str, int] | None = None
    _decided: set[str] = field(default_factory=set)
    """Jobs after the cut that were decided."""

    def __post_init__(self) -> None:
        taken = 0
        for i, d in enumerate(d for d in self.decisions if not isinstance(d, Preempt)):
            if isinstance(d, (Start, Wait)):
                self.positions[d.job_id] = i + 1 - taken
            else:
                self._uncounted.append(i)
                taken += 1

    @property
    def started(self) -> list[RunningJob]:
        """This pass's starts, with when they end at the latest."""
        return self._pass.started if self._pass is not None else []

    def decide(self, index: int) -> Decision:
        """Decide the rest job at queue ``index`` (no effect on the pass: its state is frozen) and record it."""
        assert self._pass is not None and index >= self.cut
        before = len(self._pass.decisions)
        self._pass.decide(self.order[index])
        d = self._pass.decisions[before]
        if isinstance(d, Preempt) or len(self._pass.decisions) != before + 1:
            raise AssertionError(f"a frozen pass decided {d}")
        if isinstance(d, (Start, Wait)):
            self.positions[d.job_id] = index + 1 - bisect.bisect_left(self._uncounted, index)
        else:
            bisect.insort(self._uncounted, index)
        self._decided.add(d.job_id)
        return d

    def undecided(self, job_id: str) -> bool:
        """Whether ``job_id`` is one of the jobs after the cut that got no decision."""
        if self._index is None:
            self._index = {j.job_id: i for i, j in enumerate(self.order[self.cut:], self.cut)}
        return job_id in self._index and job_id not in self._decided

    def wait_for(self, job_id: str) -> tuple[Wait, int]:
        """The ``Wait`` of an undecided job after the cut and its position, decided now (not recorded)."""
        if not self.undecided(job_id):
            raise KeyError(f"{job_id} is not an undecided job after the cut")
        d = self.decide(self._index[job_id])  # type: ignore[index]
        self._pass.decisions.pop()  # type: ignore[union-attr]
        self._decided.discard(job_id)
        assert isinstance(d, Wait), d
        return d, self.positions.pop(job_id)

@dataclass
class _Pass:
    """One scheduling pass: the free view it plans against, what it has decided, and what it can reuse.

    Free resources only shrink during a pass (each ``Start`` takes some), so
    an answer that depends only on a job's bundles (and priority) and the free
    view is kept until the next start (``free_version``) and reused by every
    job of the same shape, which is what keeps a pass over a long queue of
    similar jobs linear.
    """

    free: dict[str, dict[str, float]]
    total: Mapping[str, Resources]
    now: float
    window_s: float
    running: list[RunningJob]
    preemption: PreemptionPolicy | None
    quotas: Mapping[str, TeamQuota]
    in_use: dict[str, list[float]] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    head: QueuedJob | None = None
    """The first job that wanted to start but did not fit."""
    head_by: float | None = None
    """When ``head`` can start at the latest, from the time limits of the jobs in its way (None: not known)."""
    started: list[RunningJob] = field(default_factory=list)
    """This pass's starts, with when they end at the latest (``QueuedJob.max_run_s``)."""
    reserved_for: QueuedJob | None = None
    """A job that preempted others: the room they leave is its own."""
    victims_taken: set[str] = field(default_factory=set)
    free_version: int = 0
    """Bumped at every start: memo entries of an older version are stale."""
    # Memos keyed by id(bundles): the queue's jobs are alive all pass, and jobs of one shape share
    # one tuple (packing.bundles_of), so an identity lookup finds a shape without hashing its bundles.
    _impossible: dict[int, str | None] = field(default_factory=dict)
    _no_room: dict[int, int] = field(default_factory=dict)
    _placed: dict[int, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    """id(bundles) -> (free_version, nodes) of a placement found and not taken (a job behind an aged head whose
    time limit is too long for the gap): the next job of that shape reuses it."""
    _blocked_note: dict[tuple[int, int, int], str] = field(default_factory=dict)
    _text: dict[tuple[str, int], str] = field(default_factory=dict)
    _cands: dict[int, tuple[list, list, list, list[str]]] = field(default_factory=dict)
    _rooms: dict[tuple[int, str], dict[str, dict[str, float]]] = field(default_factory=dict)
    _no_victims: dict[tuple[int, int], int] = field(default_factory=dict)
    """(free_version, shape) -> the highest priority seen to find no room by preempting (nor any below it)."""
    _blocker: tuple[int, int] | None = None
    """A (priority, shape) still to come that could start or preempt, when ``frozen`` last looked."""
    _held_key: tuple[int, int] = (0, 0)
    _held_text: str | None = None

    def decide(self, job: QueuedJob) -> None:
        """Append ``job``'s decision (and any ``Preempt`` before it)."""
        if job.cancel_requested:
            self.decisions.append(Cancel(job.job_id))
            return
        if job.deps and self._dependency(job):
            return
        if not job.bundles:
            # A job with no workers (a pipeline or sweep parent) needs no placement.
            self.decisions.append(Start(job.job_id))
            return
        impossible = self.impossible(job.bundles)
        if impossible is not None:
            self.decisions.append(Fail(job.job_id, impossible))
            return
        quota = self.quotas.get(job.team)
        over = quota_exceeded(job, self.in_use, quota) if quota is not None else None
        if over:
            self.decisions.append(Wait(job.job_id, over, "quota"))
            return
        held = self._held_for() if self.head is not None or self.reserved_for is not None else None
        if held is not None:
            if not self._in_the_gap(job):
                self.decisions.append(Wait(job.job_id, held, "backfill"))
            return
        nodes = self._place(job.bundles)
        if nodes is not None:
            self._take(job, nodes)
            return
        why_not = ""
        if self.preemption is not None and self.preemption.enabled:
            why_not = self._preempt_for(job)
            if why_not is None:
                return
        by = None
        if self.head is None:
            self.head = job
            self.head_by = by = earliest_fit(job.bundles, self.total, self.running + self.started, self.now)
        self.decisions.append(Wait(job.job_id, self._capacity_reason(job.bundles, why_not), starts_by=by))

    def _place(self, bundles: tuple[Bundle, ...]) -> tuple[str, ...] | None:
        """Where a gang of ``bundles`` fits in the free view now, or None (both kept per shape)."""
        key = id(bundles)
        if self._no_room.get(key) in (self.free_version, _ALWAYS):
            return None
        hit = self._placed.get(key)
        if hit is not None and hit[0] == self.free_version:
            return hit[1]
        nodes = place(bundles, self.free)
        if nodes is None:
            # A gang of identical bundles is packed exactly, so once it does not fit it never will
            # in this pass (free only shrinks); a mixed one is tried again after the next start.
            self._no_room[key] = _ALWAYS if len(set(bundles)) == 1 else self.free_version
        else:
            self._placed[key] = (self.free_version, nodes)
        return nodes

    def _in_the_gap(self, job: QueuedJob) -> bool:
        """Start ``job``, behind an aged head, if it fits now and will have ended by the time the head can
        start (True); it then never delays the head. Never while jobs are preempted for another."""
        if self.reserved_for is not None or self.head_by is None or self.head_by <= self.now:
            return False
        nodes = self._place(job.bundles)  # first, so a pass can tell when no shape still to come fits
        if nodes is None or job.max_run_s is None or self.now + job.max_run_s > self.head_by:
            return False
        self._take(job, nodes)
        return True

    def frozen(self, remaining: Mapping[tuple[int, int], int]) -> bool:
        """Whether no job still to come (``remaining`` counts them by priority and shape) can start or be
        preempted for, so the state of the pass can no longer change (see :class:`Plan`)."""
        if self.reserved_for is not None:
            return True
        held = self.head is not None and self._held_for() is not None
        if held and (self.head_by is None or self.head_by <= self.now):
            return True  # no gap: nothing behind the head may start
        # Behind an aged head only jobs that fit the free room may start (in its gap), and none preempts.
        preempting = not held and self.preemption is not None and self.preemption.enabled

        def open_(combo: tuple[int, int]) -> bool:
            priority, shape = combo
            return remaining.get(combo, 0) > 0 and (
                self._impossible.get(shape, _UNSEEN) is not None or self._no_room.get(shape) != _ALWAYS
                or preempting and self._no_victims.get((self.free_version, shape), priority - 1) < priority)

        if self._blocker is not None and open_(self._blocker):
            return False  # the combination that kept the pass going last time still does
        self._blocker = next((c for c in remaining if open_(c)), None)
        return self._blocker is None

    def impossible(self, bundles: tuple[Bundle, ...]) -> str | None:
        """Why a gang of ``bundles`` could never fit (kept per shape), or None."""
        why = self._impossible.get(id(bundles), _UNSEEN)
        return self._impossible_reason(bundles) if why is _UNSEEN else why  # type: ignore[return-value]

    def _take(self, job: QueuedJob, nodes: tuple[str, ...]) -> None:
        """Start ``job`` on ``nodes``: its bundles leave the free view (and every view built on it)."""
        subtract(self.free, job.bundles, nodes)
        for room in self._rooms.values():
            subtract(room, job.bundles, nodes)
        add_use(self.in_use, job.team, job.bundles)
        self.free_version += 1
        ends = None if job.max_run_s is None else self.now + job.max_run_s
        self.started.append(RunningJob(job.job_id, job.priority, job.bundles, nodes, None, team=job.team, ends_by=ends))
        self.decisions.append(Start(job.job_id))

    def _dependency(self, job: QueuedJob) -> bool:
        """Decide a job whose ``--after`` jobs have not all succeeded (True), or leave it to the rest (False)."""
        failed = [(d, s) for d, s in job.deps if s in _DEP_FAILED]
        if failed:
            self.decisions.append(Fail(job.job_id, "dependency " + ", ".join(f"{d} ended {s}" for d, s in failed)
                                       + ": this job needs it to succeed, so it does not run"))
            return True
        pending = [(d, s) for d, s in job.deps if s != "SUCCEEDED"]
        if pending:
            self.decisions.append(Wait(job.job_id, "waiting for " + ", ".join(f"{d} ({s})" for d, s in pending)
                                       + " to succeed", "dependency"))
            return True
        return False

    def _impossible_reason(self, bundles: tuple[Bundle, ...]) -> str | None:
        """Why a gang of ``bundles`` could not fit even on the empty cluster, or None."""
        if id(bundles) not in self._impossible:
            why = None
            if not fits(bundles, self.total):
                gpus = any(b.gpus for b in bundles)
                why = (f"needs {describe_bundles(bundles)} but the cluster has {describe_cluster(self.total, gpus)}. "
                       "Each worker must fit on one node: ask for fewer or smaller workers, or add nodes")
            self._impossible[id(bundles)] = why
        return self._impossible[id(bundles)]

    def _held_for(self) -> str | None:
        """Why nothing may start now because the room is another job's (preempting, or an aged head), or None.

        The answer changes only when the head or the reserved job is first set, so it is kept until then."""
        key = (id(self.reserved_for), id(self.head))
        if key != self._held_key:
            self._held_key, self._held_text = key, self._held_reason()
        return self._held_text

    def _held_reason(self) -> str | None:
        if self.reserved_for is not None:
            return f"held for {self.reserved_for.job_id}: jobs are being preempted to make room for it"
        head = self.head
        if head is not None and _aged(head, self.now, self.window_s):
            return held_reason(head, self.head_by, self.now, self.window_s)
        return None

    def _preempt_for(self, job: QueuedJob) -> str | None:
        """Preempt lower-priority jobs to make room for ``job`` (None: decided), else the note why not.

        The note depends only on the job's priority and bundles and the free
        view, and no victim has been taken while it can be reused (taking one
        reserves the room, and everyone after waits for it).
        """
        key = (self.free_version, job.priority, id(job.bundles))
        if key in self._blocked_note:
            return self._blocked_note[key]
        stopping, lower, allowed, blocked = self._candidates(job.priority)
        if stopping and fits(job.bundles, self._room(job.priority, "stopping", stopping)):
            self.reserved_for = job
            self.decisions.append(Wait(job.job_id, (
                "waiting for " + ", ".join(r.job_id for r in stopping)
                + " to checkpoint and stop (preempted to make room)"), "preemption"))
            return None
        chosen = choose_victims(job.bundles, self.free, allowed)
        if chosen:
            self.reserved_for = job
            for v in chosen:
                self.victims_taken.add(v.job_id)
                self.decisions.append(Preempt(v.job_id, job.job_id, (
                    f"preempted by {job.job_id} (priority {job.priority} > {v.priority})")))
            self.decisions.append(Wait(job.job_id, (
                "preempting " + ", ".join(v.job_id for v in chosen) + " to make room"), "preemption"))
            return None
        note = ""
        if blocked and fits(job.bundles, self._room(job.priority, "lower", lower)):
            note = "; not preempting: " + "; ".join(blocked[:3])
        self._blocked_note[key] = note
        if len(set(job.bundles)) == 1:  # exact packing: fewer candidates (a lower priority) cannot do better
            shape = (self.free_version, id(job.bundles))
            self._no_victims[shape] = max(self._no_victims.get(shape, job.priority), job.priority)
        return note

    def _candidates(self, priority: int) -> tuple[list[RunningJob], list[RunningJob], list[RunningJob], list[str]]:
        """For a job of ``priority``: running jobs of lower priority already stopping; the others, those of them
        the policy lets go, and why not for the rest. Kept per priority: it depends on nothing else while no
        victim has been taken."""
        if priority not in self._cands:
            assert self.preemption is not None
            stopping = [r for r in self.running if r.stopping and r.priority < priority]
            lower = [r for r in self.running if r.priority < priority and not r.stopping
                     and r.job_id not in self.victims_taken]
            whys = [(r, self.preemption.why_not(r, self.now)) for r in lower]
            self._cands[priority] = (stopping, lower, [r for r, why in whys if why is None],
                                     [why for _, why in whys if why])
        return self._cands[priority]

    def _room(self, priority: int, which: str, jobs: list[RunningJob]) -> dict[str, dict[str, float]]:
        """The free view with ``jobs`` (the ``which`` candidates for ``priority``) given back; starts take from
        it as they take from the free view."""
        key = (priority, which)
        if key not in self._rooms:
            self._rooms[key] = give_back(self.free, jobs)
        return self._rooms[key]

    def _capacity_reason(self, bundles: tuple[Bundle, ...], why_not: str) -> str:
        """'waiting for resources: needs ..., free now: ...' (the free summary is kept until the next start)."""
        key = ("free", self.free_version)
        if key not in self._text:
            self._text[key] = free_summary(self.free)
        need = ("needs", id(bundles))
        if need not in self._text:
            self._text[need] = describe_bundles(bundles)
        return f"waiting for resources: needs {self._text[need]}, free now: {self._text[key]}{why_not}"


def held_reason(head: QueuedJob, head_by: float | None, now: float, window_s: float) -> str:
    """Why a job waits behind ``head``, which has waited past the backfill window and can start by ``head_by``."""
    waited = now - head.blocked_since if head.blocked_since is not None else 0.0
    why = (f"held for {head.job_id}, which has waited {waited:.0f} s (backfill window {window_s:g} s): "
           "free resources are reserved for it")
    if head_by is not None and head_by - now < 1.0:
        why += "; only short-lived holders (checkpoint evaluations, idle warm workers) are in its way"
    elif head_by is not None:
        why += (f"; it can start in about {span(head_by - now)} at the latest, and only a job whose time "
                "limit ends before then may go ahead of it (resources.time_limit_s)")
    return why


def _aged(head: QueuedJob, now: float, window_s: float) -> bool:
    """Whether the blocked head has waited past the backfill window (a head never seen blocked starts now)."""
    since = now if head.blocked_since is None else head.blocked_since
    return now - since >= window_s


# ---------------------------------------------------------------------- failures


class ErrorKind(str, Enum):
    USER = "user"
    """The job itself is wrong (a bad spec field at run time, a missing data file): a restart cannot fix it."""
    INFRA = "infra"
    """The cluster failed the job (a rank died, a node was lost, an actor died): a restart may fix it."""


def on_failure(restarts: int, max_restarts: int, error_kind: ErrorKind | str, message: str, *,
               job_id: str) -> Restart | Fail:
    """What to do about a failed job that has already been restarted ``restarts`` times.

    User errors fail at once. Infrastructure errors restart until
    ``max_restarts`` restarts have been used, then fail with the last error.
    """
    kind = ErrorKind(error_kind)
    if kind is ErrorKind.USER:
        return Fail(job_id, f"{message} (a job error: restarting cannot fix it)")
    if restarts < max_restarts:
        return Restart(job_id, f"restart {restarts + 1} of {max_restarts} after: {message}")
    return Fail(job_id, f"gave up after {restarts} restart{'' if restarts == 1 else 's'} "
                        f"(max_restarts={max_restarts}); last error: {message}")
