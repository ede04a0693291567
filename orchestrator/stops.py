"""Stopping live jobs, as the controller does it: cancels, ``cancel --checkpoint``, and time limits.

A part of ``orchestrator.controller.Controller`` (a mixin: it uses the controller's ``store``, ``cluster``
and ``active``). Each tick, for every job it runs:

- a cancel stops the ranks at once (a start in flight is aborted) and the job is CANCELLED;
- ``cancel --checkpoint`` of a running job asks its ranks to finish the step, save a checkpoint and
  return; ``_watch_running`` then records CANCELLED, naming the step;
- a job whose time running, summed over its attempts, reaches ``resources.time_limit_s`` (or cluster.yaml's
  ``workers.max_time_limit_s``) is stopped the same way and FAILS, saying how to continue it
  (``switchyard requeue JOB --set resources.time_limit_s=...``); ``switchyard run`` keeps a spec's own limit
  for its one run (``runner.run_job``);
- ranks asked to stop that have not after ``preemption.stop_timeout_s`` are killed, and a plain cancel
  meanwhile kills them at once.
"""
from __future__ import annotations

import logging
import time

from orchestrator.job_store import JobState
from orchestrator.starts import Active

log = logging.getLogger(__name__)


class JobStops:
    def _handle_stops(self) -> None:
        """Cancels and time limits of live jobs. A cancel stops the ranks now; ``cancel --checkpoint`` and a
        spent ``resources.time_limit_s`` ask them to finish the step and save a checkpoint first, and kill them
        if that takes longer than a preemption may (``preemption.stop_timeout_s``)."""
        for job_id, act in list(self.active.items()):
            if act.starter is not None and act.starter.is_alive():
                rec = self.store.get(job_id)
                if act.abort is None and rec.cancel_requested:
                    self._abort_start(act, JobState.CANCELLED, f"{rec.cancel_reason} while starting")
                continue  # the starter ends soon; _watch_running then stops whatever it made
            rec = self.store.get(job_id)
            if rec.terminal:
                continue
            checkpointed = rec.state == JobState.RUNNING and act.preempt is None and act.started
            if rec.cancel_requested and not (rec.cancel_checkpoint and checkpointed):
                self._kill(job_id, act, JobState.CANCELLED, rec.cancel_reason)
            elif act.stopping is not None:
                state, why, then, since = act.stopping
                limit = self.cluster.preemption.stop_timeout_s
                if time.time() - since > limit:
                    self._kill(job_id, act, state, f"{why}: did not stop within {limit:g} s and was killed{then}")
            elif rec.cancel_requested:
                self._checkpoint_and_stop(job_id, act, JobState.CANCELLED, rec.cancel_reason)
            elif checkpointed and (over := self._time_limit_spent(rec)) is not None:
                self._checkpoint_and_stop(job_id, act, JobState.FAILED, over,
                                          f"; `switchyard requeue {job_id} --set resources.time_limit_s=SECONDS` "
                                          "continues it")

    def _checkpoint_and_stop(self, job_id: str, act: Active, state: JobState, why: str, then: str = "") -> None:
        """Ask the ranks to finish the step, save a checkpoint and return; _watch_running then records ``state``
        with ``why``, the step, and ``then`` (what to do next)."""
        act.stopping = (state, why, then, time.time())
        act.run.group.stop()
        log.info("stopping %s at its next step boundary, with a checkpoint: %s", job_id, why)

    def _kill(self, job_id: str, act: Active, state: JobState, why: str) -> None:
        act.run.shutdown()
        self.active.pop(job_id)
        self.store.transition(job_id, state, why)

    def _time_limit_spent(self, rec) -> str | None:
        """The reason to stop ``rec`` when its time running (all attempts) is past its limit, else None."""
        limit = rec.time_limit(self.cluster.workers.max_time_limit_s)
        if limit is None or rec.run_seconds() < limit:
            return None
        return f"time limit of {limit:g} s reached (resources.time_limit_s)"
