"""The values the policies exchange with the controller: the decisions they return and the jobs they read.

Plain frozen dataclasses, no Ray and no job store, so tests build them by
hand. ``orchestrator.scheduler`` re-exports every name here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from orchestrator.packing import Bundle, bundles_of


# ---------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Start:
    """Create the job's placement group and start its workers."""

    job_id: str


@dataclass(frozen=True)
class Wait:
    """Leave the job queued; ``reason`` is for people (``switchyard status``)."""

    job_id: str
    reason: str
    waiting_for: str = "capacity"
    """What it waits for: capacity, quota, dependency, backfill (held for an aged head) or preemption."""
    starts_by: float | None = None
    """The head of the queue only: when it can start at the latest (Unix time), from the time limits of the
    jobs holding the room it needs; None when that is not known (a job in the way has no time limit)."""


@dataclass(frozen=True)
class Preempt:
    """Checkpoint the running job ``job_id`` at its next step, stop it and requeue it, to make room for ``by``."""

    job_id: str
    by: str
    reason: str


@dataclass(frozen=True)
class Restart:
    """Tear the workers down and run the job again from its latest checkpoint."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Fail:
    """Move the job to FAILED with ``reason``."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    """Move the job to CANCELLED (someone asked)."""

    job_id: str


Decision = Union[Start, Wait, Preempt, Restart, Fail, Cancel]

# ---------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class QueuedJob:
    """What the scheduler needs to know about one QUEUED job."""

    job_id: str
    priority: int
    """Higher runs first."""
    submitted_at: float
    """Unix time (s); earlier runs first within a priority."""
    bundles: tuple[Bundle, ...]
    """One per worker."""
    blocked_since: float | None = None
    """When it was first told to Wait (None: not yet); the backfill aging clock."""
    cancel_requested: bool = False
    team: str = ""
    """The owner's team: its quota and fair share apply."""
    deps: tuple[tuple[str, str], ...] = ()
    """(job id, state) of each job it must wait for (``--after``)."""
    max_run_s: float | None = None
    """Once started, it holds its workers at most this long (its time limit with the time a start and a
    stop may take); None: no bound. Only a bounded job may go ahead of an aged head (see ``scheduler``)."""

    @classmethod
    def from_resources(cls, job_id: str, priority: int, submitted_at: float, resources: Mapping[str, Any],
                       blocked_since: float | None = None, cancel_requested: bool = False, team: str = "",
                       deps: tuple[tuple[str, str], ...] = (), max_run_s: float | None = None) -> QueuedJob:
        """Build from the job store's ``{workers, cpus_per_worker, gpus_per_worker}``."""
        return cls(job_id, priority, submitted_at, bundles_of(resources), blocked_since, cancel_requested, team,
                   tuple(deps), max_run_s)

    @classmethod
    def from_record(cls, record: Any, dep_states: Mapping[str, str] | None = None) -> QueuedJob:
        """Build from a ``JobRecord`` (duck-typed, so this module does not import the store).

        ``dep_states`` maps the ids in ``record.after`` to their states now.
        """
        deps = tuple((d, str((dep_states or {}).get(d, "UNKNOWN"))) for d in getattr(record, "after", ()))
        return cls.from_resources(record.id, record.priority, record.submitted_at, record.resources,
                                  record.blocked_since, record.cancel_requested, getattr(record, "team", ""), deps)


@dataclass(frozen=True)
class RunningJob:
    """What the scheduler needs to know about a job holding workers (STARTING, RUNNING or PREEMPTED)."""

    job_id: str
    priority: int
    bundles: tuple[Bundle, ...]
    nodes: tuple[str, ...]
    """The node of each bundle (same order as ``bundles``)."""
    running_since: float | None
    """When its current stretch of RUNNING began; None while it is still starting."""
    preemptions: int = 0
    team: str = ""
    stopping: bool = False
    """Already told to stop for a preemption: its room is spoken for."""
    ends_by: float | None = None
    """When it will have given its workers back at the latest (Unix time): its time limit, or the deadline of
    a stop under way. None: not known (no time limit)."""
