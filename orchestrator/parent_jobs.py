"""Sweeps and InstructGPT pipelines, as the controller moves them on: the parent records of other jobs.

A part of ``orchestrator.controller.Controller`` (a mixin: it uses the controller's ``store``, ``storage``,
``cluster``, ``eval_jobs``, ``_fits`` and ``_reports``).
"""
from __future__ import annotations

import logging
import time

import ray

from orchestrator.job_store import JobState
from specs.errors import UsageError

log = logging.getLogger(__name__)

PARENT_SETTLE_S = 60.0  # a pipeline or sweep parent still QUEUED/STARTING this long after its submit was interrupted


def failed_dependency(store, parent) -> str | None:
    """Why a sweep submitted with ``--after`` cannot run: a dependency that failed or was cancelled."""
    for dep in parent.after:
        try:
            state = store.get(dep).state
        except UsageError:
            state = JobState.CANCELLED  # gone from the store: it can never succeed
        if state in (JobState.FAILED, JobState.CANCELLED):
            return f"dependency {dep} ended {state.value}: the sweep's runs need it to succeed, so none ran"
    return None


class ParentJobs:
    # ------------------------------------------------------------------ sweeps

    def _record_sweep_result(self, job_id: str) -> None:
        from orchestrator.sweep import record_result

        try:
            record_result(self.store, self.storage, job_id)
        except Exception as err:  # the job's result stays in the store; the row can be re-derived
            log.warning("could not record sweep row for %s: %s", job_id, err)

    def _extend_sweep(self, parent) -> bool:
        """Submit a sweep's adaptive round (orchestrator.sweep.extend_sweep); True if it added runs."""
        from orchestrator.sweep import extend_sweep

        try:
            return bool(extend_sweep(self.cluster, self.store, self.storage, parent))
        except Exception as err:  # the sweep is fitted as it stands
            print(f"could not extend sweep {parent.name}: {err}", flush=True)
            return False

    def _finish_sweeps(self) -> None:
        """A sweep whose runs have all ended gets its fit (a Ray task), then SUCCEEDED or FAILED."""
        from orchestrator.sweep import fit_sweep

        for parent in self.store.list([JobState.RUNNING]):
            if parent.kind != "sweep":
                continue
            children = self.store.list(parent_id=parent.id)
            if not children or any(not c.terminal for c in children):
                continue
            ref = self._fits.get(parent.id)
            if ref is None and parent.cancel_requested:  # its runs were cancelled with it: no fit
                self.store.transition(parent.id, JobState.CANCELLED, parent.cancel_reason)
                continue
            dead = failed_dependency(self.store, parent)
            if ref is None and dead:  # its runs never ran (the scheduler failed them): nothing to fit
                self.store.transition(parent.id, JobState.FAILED, dead)
                continue
            if ref is None:
                if self._extend_sweep(parent):
                    continue  # an adaptive round was submitted: fit once it has ended
                task = ray.remote(fit_sweep).options(num_cpus=0, max_retries=0)
                self._fits[parent.id] = task.remote(self.storage, parent.spec["sweep_dir"])
                continue
            if not ray.wait([ref], timeout=0)[0]:
                continue
            self._fits.pop(parent.id)
            failed = [c for c in children if c.state != JobState.SUCCEEDED]
            try:
                ray.get(ref)
                fit_note = f"fit in {parent.spec['sweep_dir']}/fit"
            except Exception as err:
                fit_note = f"fit failed: {str(err).strip().splitlines()[-1][:200]}"
            if failed:
                self.store.transition(parent.id, JobState.FAILED, f"{len(failed)} of {len(children)} runs did not "
                                      f"succeed; {fit_note}")
            elif fit_note.startswith("fit failed"):
                self.store.transition(parent.id, JobState.FAILED, fit_note)
            else:
                self.store.transition(parent.id, JobState.SUCCEEDED, f"{len(children)} runs; {fit_note}")

    def _settle_parents(self) -> None:
        """A pipeline or sweep parent whose submit was interrupted (left QUEUED or STARTING): RUNNING when it
        has children still to run, else FAILED; never left waiting for a submit that will not finish."""
        from orchestrator import instructgpt as pl

        now = time.time()
        for parent in self.store.list([JobState.QUEUED, JobState.STARTING]):
            if parent.kind not in ("sweep", pl.RECORD_KIND):
                continue
            if parent.history and now - parent.history[-1].ts < PARENT_SETTLE_S:
                continue  # a submit may still be under way
            if any(not c.terminal for c in self.store.list(parent_id=parent.id)):
                if parent.state == JobState.QUEUED:
                    self.store.transition(parent.id, JobState.STARTING, "submission interrupted; its runs are queued")
                self.store.transition(parent.id, JobState.RUNNING, "submission completed by the controller")
            else:
                self.store.transition(parent.id, JobState.FAILED, "submission was interrupted before any run was "
                                      "queued; submit it again")

    # ------------------------------------------------------------------ InstructGPT pipelines

    def _advance_pipelines(self) -> None:
        """Each running pipeline: queue its next stage, record a finished one, run the report, or end it."""
        from orchestrator import instructgpt as pl

        for parent in self.store.list([JobState.RUNNING]):
            if parent.kind != pl.RECORD_KIND:
                continue
            try:
                self._advance_pipeline(parent)
            except Exception as err:  # a pipeline that cannot go on ends; the others carry on
                message = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                log.exception("pipeline %s stopped", parent.id)
                if not self.store.get(parent.id).terminal:
                    self.store.transition(parent.id, JobState.FAILED, f"pipeline stopped: {message}")

    def _advance_pipeline(self, parent) -> None:
        from orchestrator import instructgpt as pl

        pdir = parent.spec["pipeline_dir"]
        state = pl.read_state(self.storage, pdir) or {"name": parent.name, "stages": {}}
        ref = self._reports.get(parent.id)
        if ref is not None:
            if not ray.wait([ref], timeout=0)[0]:
                return
            self._reports.pop(parent.id)
            try:
                report = ray.get(ref)
            except Exception as err:
                why = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                self.store.transition(parent.id, JobState.FAILED, f"report failed: {why}")
                return
            self.storage.write_json(f"{pdir}/report.json", report)
            self.store.update(parent.id, report=report)
            self.store.transition(parent.id, JobState.SUCCEEDED, f"every stage done; report in {pdir}/report.json")
            return
        children = self.store.list(parent_id=parent.id)
        decision = pl.decide(parent, children, state, set(self.eval_jobs),
                             self.storage.exists(f"{pdir}/report.json"))
        if isinstance(decision, pl.Wait):
            return
        if isinstance(decision, pl.StageDone):
            pl.record_stage_done(self.store, self.storage, parent, state, decision.stage, decision.job_id)
        elif isinstance(decision, pl.SubmitStage):
            spec = pl.PipelineSpec.model_validate(parent.spec["pipeline"])
            rec = pl.submit_stage(self.cluster, self.store, self.storage, parent, spec, decision.stage, state,
                                  source=f"pipeline {parent.name}")
            self.store.update(parent.id, reason=f"stage {decision.stage} queued ({rec.id})")
        elif isinstance(decision, pl.RunReport):
            task = ray.remote(pl.run_report).options(num_cpus=0, max_retries=0)
            self._reports[parent.id] = task.remote(self.storage, pl.report_args(parent, state))
            self.store.update(parent.id, reason="every stage done; writing the report")
        elif isinstance(decision, pl.Finish):
            if decision.state == JobState.SUCCEEDED and parent.report is None:
                self.store.update(parent.id, report=self.storage.read_json(f"{pdir}/report.json"))
            self.store.transition(parent.id, decision.state, decision.reason)
