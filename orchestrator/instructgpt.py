"""The InstructGPT pipeline: SFT -> reward model -> PPO -> report, as three jobs under one parent record.

A pipeline file is YAML with ``pipeline: instructgpt``::

    pipeline: instructgpt
    name: igpt
    priority: 0
    base: {model: ..., data: ..., resources: ..., rlhf: {data: ...}}   # every stage's job spec starts here
    sft:  {train: ...}                                                 # merged over base for each stage
    rm:   {train: ..., rlhf: {rm: ...}}
    ppo:  {train: ..., rlhf: {ppo: ...}}
    report: {samples_per_prompt: 4, prompts: null}

``switchyard submit FILE`` validates the file and all three stage specs
(links to stages that have not run yet are placeholders), creates a parent
record of kind ``pipeline`` and queues the SFT stage. The controller
(``Controller._advance_pipelines``) asks :func:`decide` what to do with each
running pipeline and does it: queue the next stage once the previous one
SUCCEEDED (and its checkpoints are evaluated, so its best checkpoint is
known), fail the pipeline when a stage fails, and after PPO run the report
(``workers.rlhf.report``) into ``<pipeline_dir>/report.json``.

``<pipeline_dir>/pipeline.json`` maps each stage to its job, run directory,
spec and outcome. It outlives the job store, so submitting the same pipeline
again continues it: finished stages are not rerun, and an interrupted or
failed stage is queued again with the same run directory (and the same spec),
so it resumes from its own latest complete checkpoint.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from data.storage import Storage
from specs.errors import UsageError
from orchestrator.job_store import JobRecord, JobState, JobStore, safe_join
from specs.job import NAME_RE, SEED_MAX, JobSpec, SpecError, _format_error, _Section, apply_overrides, validate_spec
from specs.validate import PRIORITY_MAX, PRIORITY_MIN, InputError, check_plain

STAGES = ("sft", "rm", "ppo")
RECORD_KIND = "pipeline"
STAGE_KIND = "pipeline-stage"
STAGE_METRICS = {"sft": ("loss", "held_out_loss"), "rm": ("loss", "held_out_loss", "held_out_accuracy"),
                 "ppo": ("loss", "reward", "kl")}
"""The result keys `status` shows per stage (a stage job's metrics: its final loss and final_eval)."""


# ---------------------------------------------------------------------- the pipeline file


class ReportSpec(_Section):
    samples_per_prompt: int = Field(4, ge=1, le=64)
    """Responses sampled per evaluation prompt and policy; a prompt's gold score is their mean."""
    prompts: int | None = Field(None, ge=1, le=10_000_000)
    """Evaluate on the first N held-out prompts (null = all of them)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the report's sampling."""
    max_new_tokens: int | None = Field(None, ge=1, le=1 << 16)
    """Longest sampled response (null = the PPO stage's rlhf.ppo.max_new_tokens)."""


class PipelineSpec(_Section):
    pipeline: Literal["instructgpt"]
    """The recipe: instructgpt (SFT -> reward model -> PPO -> report)."""
    name: str
    """Pipeline name; stage jobs are <name>-sft, <name>-rm, <name>-ppo."""
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    """Priority of every stage job (higher runs first, -1000000 to 1000000); `submit --priority` overrides it."""
    base: dict[str, Any] = Field(default_factory=dict)
    """A job-spec fragment every stage starts from (model, data, resources, parallel, rlhf.data, ...)."""
    sft: dict[str, Any] = Field(default_factory=dict)
    """Merged over base for the SFT stage (train, rlhf.sft, model.init_from for a pretrained start)."""
    rm: dict[str, Any] = Field(default_factory=dict)
    """Merged over base for the reward-model stage (train, rlhf.rm)."""
    ppo: dict[str, Any] = Field(default_factory=dict)
    """Merged over base for the PPO stage (train = rollouts and policy lr, rlhf.ppo)."""
    report: ReportSpec = ReportSpec()
    """The final report's evaluation settings."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.lower()
        if not NAME_RE.match(v) or len(v) > 60:
            raise ValueError("must be 1-60 of a-z 0-9 . _ - and start with a letter or digit")
        return v

    @field_validator("base", "sft", "rm", "ppo", mode="before")
    @classmethod
    def _fragment(cls, v):
        return {} if v is None else v


# Fields the pipeline sets itself: (fragment, dotted path) -> what to do instead.
_FORBIDDEN = {
    ("*", "name"): "the stage jobs are named <pipeline name>-<stage>; set the top-level name",
    ("*", "kind"): "the pipeline sets each stage's kind",
    ("base", "model.init_from"): "a pretrained start belongs under sft.model.init_from "
                                 "(rm and ppo start from the SFT stage)",
    ("rm", "model.init_from"): "the pipeline starts the RM from the SFT stage's run directory; leave it out",
    ("ppo", "model.init_from"): "the pipeline starts PPO from the SFT stage's run directory; leave it out",
    ("*", "rlhf.ppo.reward_model"): "the pipeline links PPO to the RM stage's run directory; leave it out",
    ("sft", "rlhf.data"): "the stages share their datasets; set them under base.rlhf.data",
    ("rm", "rlhf.data"): "the stages share their datasets; set them under base.rlhf.data",
    ("ppo", "rlhf.data"): "the stages share their datasets; set them under base.rlhf.data",
}


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _check_fragments(spec: PipelineSpec, source: str) -> None:
    for where in ("base",) + STAGES:
        frag = getattr(spec, where)
        for (owner, path), why in _FORBIDDEN.items():
            if owner in ("*", where) and _get(frag, path) is not None:
                raise SpecError(f"{source}: {where}.{path}: {why}")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a deep copy of ``base``: dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _section(d: dict, key: str) -> dict:
    if not isinstance(d.get(key), dict):
        d[key] = {}
    return d[key]


def pipeline_dir(storage_root: str, name: str) -> str:
    return safe_join(storage_root, "pipelines", name)


def data_dir(spec: PipelineSpec, pdir: str) -> str:
    """The one folder every stage writes and reads the built-in task's files in."""
    return _get(spec.base, "rlhf.data.dir") or f"{pdir}/data"


def placeholder(pdir: str, stage: str) -> str:
    """Stands in for a link to a stage that has not run yet (validation only; never reaches a job)."""
    return f"{pdir}/pending-{stage}"


def stage_raw(spec: PipelineSpec, stage: str, pdir: str, links: dict[str, str]) -> dict:
    """The raw job spec of one stage: base + fragment, then kind, name, the shared data folder and the links.

    ``links`` maps earlier stages to their run directories (rm and ppo need sft, ppo needs rm).
    """
    raw = deep_merge(spec.base, getattr(spec, stage))
    raw["name"] = f"{spec.name}-{stage}"
    raw["kind"] = stage
    rlhf = _section(raw, "rlhf")
    _section(rlhf, "data")["dir"] = data_dir(spec, pdir)
    if stage in ("rm", "ppo"):
        _section(raw, "model")["init_from"] = links["sft"]
    if stage == "ppo":
        _section(rlhf, "ppo")["reward_model"] = links["rm"]
    return raw


def stage_spec(spec: PipelineSpec, stage: str, pdir: str, links: dict[str, str], source: str) -> JobSpec:
    """A stage's validated job spec; an error names the field where the file sets it (base.x or <stage>.x)."""
    try:
        return validate_spec(stage_raw(spec, stage, pdir, links), source="")
    except SpecError as err:
        message = str(err).removeprefix(": ")
        field, sep, rest = message.partition(": ")
        for where in (stage, "base"):
            if sep and " " not in field and _get(getattr(spec, where), field) is not None:
                raise SpecError(f"{source}: {where}.{field}: {rest}") from None
        raise SpecError(f"{source}: {stage} stage: {message}") from None


def report_inputs(spec: PipelineSpec, pdir: str) -> dict:
    """Where the report reads its held-out prompts and comparisons (the files the stages used)."""
    from data.rlhf_files import RLHFDataFiles

    from specs.rlhf import HELD_OUT_OF, RLHFDataSpec

    d = RLHFDataSpec.model_validate(_get(spec.base, "rlhf.data") or {})
    files = RLHFDataFiles.under(data_dir(spec, pdir))

    def held_out(own: str, pool: str, default: str) -> tuple[str, bool]:
        # The user's held-out file; else the tail of the user's own pool file; else the built-in held-out
        # file (RLHFDataSpec.source_of, the rule the stages follow too).
        source = d.source_of(own)
        if source == "given":
            return getattr(d, own), False
        return (getattr(d, HELD_OUT_OF[own]), True) if source == "tail" else (default, False)

    prompts, prompts_tail = held_out("eval_prompts", "prompts", files.eval_prompts)
    comps, comps_tail = held_out("comparisons_heldout", "comparisons", files.rm_heldout)
    return {"eval_prompts_uri": prompts, "eval_prompts_tail": prompts_tail,
            "rm_heldout_uri": comps, "rm_heldout_tail": comps_tail}


def load_pipeline(raw: Any, source: str, overrides: list[str] | None = None, storage_root: str = "<storage>"
                  ) -> PipelineSpec:
    """Validate a pipeline file and every stage's full job spec; SpecError (one line naming the field) if not."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with pipeline, name, base, sft, rm, ppo")
    raw = apply_overrides(raw, overrides or [])
    try:
        spec = PipelineSpec.model_validate(raw, strict=True)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_error(err, PipelineSpec, see='InstructGPT pipeline')}") from None
    try:  # non-finite numbers and integers past 64 bits anywhere in the file (stage fragments included)
        check_plain(raw, source)
    except InputError as err:
        raise SpecError(str(err)) from None
    _check_fragments(spec, source)
    pdir = pipeline_dir(storage_root, spec.name)
    links = {s: placeholder(pdir, s) for s in STAGES}
    specs = {s: stage_spec(spec, s, pdir, links, source) for s in STAGES}
    d = specs["sft"].rlhf.data
    if d.builtin is None:  # every stage's file must be given, since nothing writes them
        for need in ("demonstrations", "comparisons", "prompts"):
            if getattr(d, need) is None:
                raise SpecError(f"{source}: base.rlhf.data.{need}: with rlhf.data.builtin null, the pipeline "
                                "needs this file (or keep rlhf.data.builtin)")
    return spec


def check_data_files(spec: PipelineSpec, storage: Storage, source: str) -> None:
    """A dataset file the user named must exist before anything is queued."""
    import fsspec

    for field, uri in (_get(spec.base, "rlhf.data") or {}).items():
        if field in ("builtin", "dir") or not isinstance(uri, str):
            continue
        same = fsspec.utils.get_protocol(uri) == fsspec.utils.get_protocol(storage.root)
        fs, path = fsspec.core.url_to_fs(uri, **(storage.options if same else {}))
        if not fs.exists(path):
            raise SpecError(f"{source}: base.rlhf.data.{field}: no such file {uri}")


# ---------------------------------------------------------------------- pipeline.json


def read_state(storage: Storage, pdir: str) -> dict | None:
    uri = f"{pdir}/pipeline.json"
    return storage.read_json(uri) if storage.exists(uri) else None


def write_state(storage: Storage, pdir: str, state: dict) -> None:
    storage.write_json(f"{pdir}/pipeline.json", state)  # temp file + rename: never half written


def done_stages(state: dict | None) -> list[str]:
    stages = (state or {}).get("stages", {})
    return [s for s in STAGES if stages.get(s, {}).get("state") == JobState.SUCCEEDED.value]


def links_of(state: dict | None) -> dict[str, str]:
    """Run directories of the stages that finished: what later stages link to."""
    stages = (state or {}).get("stages", {})
    return {s: stages[s]["run_dir"] for s in done_stages(state)}


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return path or "(spec)"


# ---------------------------------------------------------------------- submit (CLI side)


def find_parent(store: JobStore, name: str) -> JobRecord | None:
    """The newest pipeline record of this name."""
    found = store.by_name(name, RECORD_KIND)
    return found[-1] if found else None


def submit_stage(cluster, store: JobStore, storage: Storage, parent: JobRecord, spec: PipelineSpec, stage: str,
                 state: dict, source: str = "pipeline") -> JobRecord:
    """Queue one stage as a child of ``parent`` and record it in pipeline.json.

    A stage that ran before with the same spec gets its old run directory back, so it resumes
    from its latest complete checkpoint; with a changed spec it starts afresh in a new one.
    """
    from orchestrator.preflight import preflight
    from workers.resources import worker_resources

    pdir = parent.spec["pipeline_dir"]
    job_spec = stage_spec(spec, stage, pdir, links_of(state), source)
    preflight(job_spec, storage)
    res = worker_resources(job_spec, cluster)
    before = state.setdefault("stages", {}).get(stage) or {}
    reuse = before.get("run_dir") if before.get("spec") == job_spec.to_dict() else None
    rec = store.submit(job_spec.name, STAGE_KIND, job_spec.to_dict(), parent.priority,
                       {"workers": res.workers, "cpus_per_worker": res.cpus, "gpus_per_worker": res.gpus},
                       job_spec.max_restarts, parent_id=parent.id, after=parent.after,
                       run_dir_for=lambda job_id: reuse or safe_join(cluster.storage, f"{job_spec.name}-{job_id}"))
    state["stages"][stage] = {"job_id": rec.id, "run_dir": rec.run_dir, "state": "SUBMITTED",
                              "spec": job_spec.to_dict(), "resumed": reuse is not None, "submitted_at": time.time()}
    write_state(storage, pdir, state)
    return rec


def _check_stage_paths(cluster, spec, pdir: str, source: str) -> None:
    """Every stage's paths inside cluster.yaml's read/write roots, before anything is written (the ranks check
    again); the error names the field where the file sets it, as ``stage_spec`` does."""
    from specs.paths import PathNotAllowedError, check_job_paths

    roots = cluster.path_roots() if hasattr(cluster, "path_roots") else None
    for stage in STAGES:
        try:
            check_job_paths(stage_spec(spec, stage, pdir, {s: placeholder(pdir, s) for s in STAGES}, source), roots,
                            where="")
        except PathNotAllowedError as err:
            field, _, rest = str(err).removeprefix(": ").partition(": ")
            where = next((w for w in (stage, "base") if _get(getattr(spec, w), field) is not None), None)
            raise SpecError(f"{source}: {where}.{field}: {rest}" if where else f"{source}: {stage} stage: {field}: "
                            f"{rest}") from None


def _catch_up_stages(state: dict, store: JobStore) -> None:
    """Record in ``state`` the stages whose jobs succeeded after their pipeline stopped."""
    for entry in state["stages"].values():
        if entry.get("state") != JobState.SUCCEEDED.value and entry.get("job_id"):
            try:
                rec = store.get(entry["job_id"])
            except UsageError:  # an earlier job store
                continue
            if rec.state == JobState.SUCCEEDED:
                entry.update(state=rec.state.value, step=rec.step, metrics=dict(rec.metrics),
                             best_checkpoint=rec.best_checkpoint, finished_at=rec.finished_at)


def submit_pipeline(cluster, raw: Any, source: str = "pipeline", priority: int | None = None,
                    overrides: list[str] | None = None, log=print, *, owner: str | None = None,
                    after: list[str] | tuple[str, ...] = ()) -> dict:
    """Validate a pipeline file and start (or continue) it; returns {id, name, pipeline_dir, submitted, done}.

    Nothing is written unless the file and every stage spec are valid and the data files exist. The
    pipeline and its stages belong to ``owner`` (default: the local user). Its stages wait for ``after``
    (``--after``); a dependency that fails or is cancelled fails the stage, and so the pipeline, saying so.
    """
    spec = load_pipeline(raw, source, overrides, cluster.storage)
    storage = Storage(cluster.storage, dict(cluster.storage_options))
    store = JobStore(cluster.job_store)
    pdir = pipeline_dir(cluster.storage, spec.name)
    _check_stage_paths(cluster, spec, pdir, source)
    check_data_files(spec, storage, source)
    from orchestrator.preflight import preflight

    preflight(stage_spec(spec, "sft", pdir, {s: placeholder(pdir, s) for s in STAGES}, source), storage)
    state = read_state(storage, pdir) or {"name": spec.name, "stages": {}}
    _catch_up_stages(state, store)
    done = done_stages(state)
    links = links_of(state)
    for stage in done:  # a finished stage is never rerun, so its settings must not have changed
        now = stage_spec(spec, stage, pdir, links, source).to_dict()
        if now != state["stages"][stage]["spec"]:
            where = _first_difference(state["stages"][stage]["spec"], now)
            raise SpecError(f"{source}: {stage} stage: {where} differs from the finished stage in "
                            f"{state['stages'][stage]['run_dir']}; rename the pipeline to run it again")
    out = {"name": spec.name, "pipeline_dir": pdir, "done": done, "submitted": None}
    parent = find_parent(store, spec.name)
    if parent is not None and parent.state in (JobState.QUEUED, JobState.STARTING):  # a submit stopped half way
        if any(not c.terminal for c in store.list(parent_id=parent.id)):
            if parent.state == JobState.QUEUED:
                store.transition(parent.id, JobState.STARTING, "pipeline submitted")
            parent = store.transition(parent.id, JobState.RUNNING, "submission completed")
        else:
            store.transition(parent.id, JobState.FAILED, "submission was interrupted")
            parent = store.get(parent.id)
    if parent is not None and not parent.terminal:
        log(f"pipeline {spec.name} ({parent.id}) is still {parent.state.value}; nothing submitted")
        return {**out, "id": parent.id}
    if parent is not None and parent.state == JobState.SUCCEEDED:
        log(f"pipeline {spec.name} ({parent.id}) already SUCCEEDED; nothing to rerun (report: {pdir}/report.json)")
        return {**out, "id": parent.id}
    priority = spec.priority if priority is None else priority
    parent_spec = {"pipeline": spec.model_dump(mode="json"), "pipeline_dir": pdir, "source": source}
    # QUEUED while its first stage is queued: the controller only advances RUNNING pipelines, so it
    # cannot queue the same stage a second time in between.
    from orchestrator.cli_jobs import local_user

    owner = owner or local_user()
    parent = store.submit(spec.name, RECORD_KIND, parent_spec, priority,
                          {"workers": 0, "cpus_per_worker": 0, "gpus_per_worker": 0}, 0,
                          run_dir_for=lambda _id: pdir, owner=owner, team=cluster.team_of(owner), after=after)
    state.update(name=spec.name, parent_id=parent.id, pipeline=parent_spec["pipeline"])
    storage.makedirs(pdir)
    write_state(storage, pdir, state)
    nxt = next((s for s in STAGES if s not in done), None)
    try:
        if nxt is not None:
            rec = submit_stage(cluster, store, storage, parent, spec, nxt, state, source)
            out["submitted"] = {"stage": nxt, "id": rec.id, "run_dir": rec.run_dir,
                                "resumed": state["stages"][nxt]["resumed"]}
    except BaseException as err:
        store.transition(parent.id, JobState.FAILED, f"could not queue stage {nxt}: {err}")
        raise
    store.transition(parent.id, JobState.STARTING, "pipeline submitted")
    what = (f"stage {nxt} queued" + (" (resuming its run directory)" if out["submitted"]["resumed"] else "")
            if nxt else "every stage already finished")
    store.transition(parent.id, JobState.RUNNING, what)
    log(f"pipeline {spec.name}: {what}" + (f"; finished before: {', '.join(done)}" if done else "")
        + f"; files in {pdir}")
    return {**out, "id": parent.id}


# ---------------------------------------------------------------------- the controller's policy


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class SubmitStage:
    stage: str


@dataclass(frozen=True)
class StageDone:
    stage: str
    job_id: str


@dataclass(frozen=True)
class RunReport:
    pass


@dataclass(frozen=True)
class Finish:
    state: JobState
    reason: str


def stage_of(rec: JobRecord, pipeline_name: str) -> str:
    return rec.name[len(pipeline_name) + 1:]


def decide(parent: JobRecord, children: list[JobRecord], state: dict | None, evaluating: set[str],
           report_written: bool) -> Wait | SubmitStage | StageDone | RunReport | Finish:
    """What the controller does next with a RUNNING pipeline. Pure: reads records, returns a decision.

    ``evaluating``: job ids whose checkpoints still await evaluation (the next stage loads the
    previous one's best checkpoint, so it waits for them).
    """
    live = [c for c in children if not c.terminal]
    if parent.cancel_requested:
        return Wait("stopping the running stage") if live else Finish(JobState.CANCELLED, parent.cancel_reason)
    if live:
        return Wait(f"stage {stage_of(live[0], parent.name)} {live[0].state.value}")
    done = done_stages(state)
    for c in children:
        stage = stage_of(c, parent.name)
        if c.state == JobState.SUCCEEDED and stage not in done:
            if c.id in evaluating:
                return Wait(f"stage {stage}: evaluating its checkpoints")
            return StageDone(stage, c.id)
    nxt = next((s for s in STAGES if s not in done), None)
    if nxt is None:
        return Finish(JobState.SUCCEEDED, "every stage and the report done") if report_written else RunReport()
    tried = [c for c in children if stage_of(c, parent.name) == nxt]
    if tried:
        last = tried[-1]
        return Finish(JobState.FAILED, f"stage {nxt} ({last.id}) {last.state.value}: {last.reason}"[:400])
    return SubmitStage(nxt)


def record_stage_done(store: JobStore, storage: Storage, parent: JobRecord, state: dict, stage: str,
                      job_id: str) -> None:
    rec = store.get(job_id)
    entry = state.setdefault("stages", {}).setdefault(stage, {})
    entry.update(job_id=rec.id, run_dir=rec.run_dir, state=JobState.SUCCEEDED.value, step=rec.step,
                 metrics=dict(rec.metrics), best_checkpoint=rec.best_checkpoint, finished_at=rec.finished_at)
    entry.setdefault("spec", rec.spec)
    write_state(storage, parent.spec["pipeline_dir"], state)


def report_args(parent: JobRecord, state: dict) -> dict:
    """Keyword arguments of workers.rlhf.report.pipeline_report for a pipeline whose stages all finished."""
    spec = PipelineSpec.model_validate(parent.spec["pipeline"])
    pdir = parent.spec["pipeline_dir"]
    runs = {s: state["stages"][s]["run_dir"] for s in STAGES}
    ppo = state["stages"]["ppo"]["spec"]["rlhf"]["ppo"]
    return {"sft_run": runs["sft"], "rm_run": runs["rm"], "ppo_run": runs["ppo"], **report_inputs(spec, pdir),
            "samples_per_prompt": spec.report.samples_per_prompt, "seed": spec.report.seed,
            "max_new_tokens": spec.report.max_new_tokens or ppo["max_new_tokens"],
            "max_prompts": spec.report.prompts}


def run_report(storage: Storage, kwargs: dict) -> dict:
    """The report as a Ray task of the controller: no reserved CPUs, a niced process, one torch thread."""
    import os

    try:
        os.nice(10)
    except OSError:
        pass
    import torch

    torch.set_num_threads(1)
    from workers.rlhf.report import pipeline_report

    return pipeline_report(storage, **kwargs)


# ---------------------------------------------------------------------- status


def pipeline_status(store: JobStore, storage: Storage, rec: JobRecord) -> dict:
    """A pipeline parent's status: the record plus its stages (over every submission) and the report."""
    out = rec.to_status_dict()
    pdir = rec.spec.get("pipeline_dir") or rec.run_dir
    state = read_state(storage, pdir) or {}
    children = {c.id: c for c in store.list(parent_id=rec.id)}
    stages = []
    for stage in STAGES:
        entry = state.get("stages", {}).get(stage) or {}
        job = children.get(entry.get("job_id"))
        if job is None and entry.get("job_id"):
            try:
                job = store.get(entry["job_id"])
            except UsageError:  # an earlier job store: pipeline.json still knows the outcome
                job = None
        metrics = dict(job.metrics) if job is not None else dict(entry.get("metrics") or {})
        stages.append({
            "stage": stage, "name": f"{rec.name}-{stage}", "id": entry.get("job_id"),
            "state": job.state.value if job is not None else (entry.get("state") or "PENDING"),
            "step": job.step if job is not None else entry.get("step"),
            "run_dir": entry.get("run_dir"),
            "metrics": {k: metrics[k] for k in STAGE_METRICS[stage] if k in metrics},
        })
    out["stages"] = stages
    out["pipeline_dir"] = pdir
    report = rec.report
    if report is None and storage.exists(f"{pdir}/report.json"):
        report = storage.read_json(f"{pdir}/report.json")
    out["report"] = report
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_status(out: dict) -> list[str]:
    """Lines for `switchyard status PIPELINE`: stages, then a short report summary."""
    lines = [f"{out['id']}  pipeline {out['name']}  {out['state']}  priority {out['priority']}  "
             f"owner {out.get('owner') or '-'} ({out.get('team') or '-'})", f"pipeline_dir: {out['pipeline_dir']}"]
    if out.get("after"):
        lines.append(f"after: {', '.join(out['after'])} (its stages wait for them to succeed)")
    for s in out["stages"]:
        metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in s["metrics"].items())
        lines.append(f"stage {s['stage']:<3} {s['state']:<10} step {_fmt(s['step']):>6}  {metrics}")
        if s["run_dir"]:
            lines.append(f"          run_dir: {s['run_dir']}")
    r = out.get("report")
    if r:
        pol = r.get("policies", {})
        lines.append(f"report ({r.get('prompts')} prompts x {r.get('samples_per_prompt')} samples, "
                     f"{_fmt(r.get('seconds'))} s): RM held-out accuracy {_fmt(r.get('rm_heldout_accuracy'))}, "
                     f"PPO win-rate vs SFT {_fmt(r.get('ppo_win_rate_vs_sft'))}")
        for name, p in sorted(pol.items(), key=lambda kv: ("sft", "ppo", "ema").index(kv[0])):
            judged = (f"  exact match {_fmt(p.get('exact_match'))}  F1 {_fmt(p.get('f1'))}"
                      if p.get("f1") is not None else "")
            lines.append(f"  {name:<4} gold {_fmt(p.get('gold'))}  reward {_fmt(p.get('reward'))}  "
                         f"kl {_fmt(p.get('kl'))} nats/seq{judged}")
        ref = r.get("reference_judge") or {}
        if ref.get("reference_prompts"):
            lines.append(f"  reference judge ({ref['reference_prompts']} prompts, token F1): PPO win-rate vs SFT "
                         f"{_fmt(ref.get('ppo_win_rate_vs_sft'))}"
                         + (f", EMA {_fmt(ref['ema_win_rate_vs_sft'])}" if "ema_win_rate_vs_sft" in ref else ""))
        if r.get("gold_note"):
            lines.append(f"  note: {r['gold_note']}")
    return lines


def print_submit_note(out: dict) -> None:
    sub = out.get("submitted")
    if sub:
        print(f"stage {sub['stage']}: job {sub['id']} -> {sub['run_dir']}", file=sys.stderr)
