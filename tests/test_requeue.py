"""`switchyard requeue`: a FAILED or CANCELLED job back in the queue, on the head (store and CLI, no Ray).

The controller resuming a requeued job from its checkpoint is in tests/test_controller.py; the API's
route and the laptop's CLI are in tests/test_api.py.
"""
import json
import os

import pytest

from orchestrator.job_store import IllegalTransitionError, JobState, JobStore, QuotaError

SPEC = {
    "name": "rq",
    "model": {"family": "llama", "preset": "tiny"},
    "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 300},
    "train": {"steps": 40, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def _failed(store, job_id, reason="rank 0 died: out of memory"):
    store.transition(job_id, JobState.STARTING, "resources available")
    store.transition(job_id, JobState.RUNNING, "running", step=12, workers=[{"rank": 0, "node": "n", "pid": 1}])
    return store.transition(job_id, JobState.FAILED, reason)


def test_the_store_requeues_only_a_failed_or_cancelled_job_of_its_own(tmp_path):
    store = JobStore(str(tmp_path / "jobs.db"))
    res = {"workers": 1, "cpus_per_worker": 1}
    job = store.submit("a", "train", {"x": 1}, 3, res, 2, run_dir_for=lambda j: f"/runs/a-{j}", team="nlp").id
    with pytest.raises(IllegalTransitionError):  # QUEUED: nothing to requeue
        store.requeue(job, "alice")
    for _ in range(2):
        store.transition(job, JobState.STARTING, "go")
        store.transition(job, JobState.RUNNING, "up")
        store.transition(job, JobState.RESTARTING, "rank died")
        store.transition(job, JobState.QUEUED, "waiting to restart")
    _failed(store, job)
    before = store.get(job)
    assert before.finished_at is not None and before.restarts == 2  # its budget (max_restarts 2) is spent
    store.update(job, pending={"position": 1})
    rec = store.requeue(job, "alice")
    assert rec.state is JobState.QUEUED and rec.finished_at is None and rec.workers == [] and rec.pending is None
    assert rec.restarts == 0  # a fresh budget
    assert rec.reason == "requeued by alice" and rec.history[-1].from_state is JobState.FAILED
    assert (rec.step, rec.priority, rec.run_dir, rec.spec) == (12, 3, before.run_dir, {"x": 1})  # kept
    with pytest.raises(IllegalTransitionError):
        store.requeue(job, "alice")
    # A cancel's marks go: the controller must not cancel it again.
    store.request_cancel(job, by="ops")
    rec = store.get(job)
    assert rec.state is JobState.CANCELLED and rec.cancelled_by == "ops"
    rec = store.requeue(job, "bob", spec={"x": 2}, resources={"workers": 2, "cpus_per_worker": 1}, max_restarts=7,
                        note="train.micro_batch=2")
    assert rec.state is JobState.QUEUED and not rec.cancel_requested and rec.cancelled_by is None
    assert (rec.spec, rec.resources["workers"], rec.max_restarts) == ({"x": 2}, 2, 7)
    assert rec.history[-1].reason == "requeued by bob with train.micro_batch=2"
    # The team's quota of queued jobs holds, as at submit; a pipeline stage or sweep run is refused.
    store.request_cancel(job)
    other = store.submit("c", "train", {}, 0, res, 0, run_dir_for=lambda j: f"/runs/c-{j}", team="nlp").id
    with pytest.raises(QuotaError, match="queued_jobs: 1"):
        store.requeue(job, max_queued=1)
    assert store.get(job).state is JobState.CANCELLED
    parent = store.submit("s", "sweep", {}, 0, {"workers": 0, "cpus_per_worker": 0}, 0, run_dir_for=lambda j: f"/runs/s-{j}").id
    child = store.submit("s-r1", "sweep-run", {}, 0, res, 0, run_dir_for=lambda j: f"/runs/r-{j}",
                         parent_id=parent).id
    store.request_cancel(parent)
    for j in (parent, child):
        with pytest.raises(IllegalTransitionError):
            store.requeue(j)
    assert store.get(other).state is JobState.QUEUED


def test_a_cancel_with_a_checkpoint_is_marked_and_a_plain_cancel_after_it_stops_at_once(tmp_path):
    store = JobStore(str(tmp_path / "jobs.db"))
    res = {"workers": 1, "cpus_per_worker": 1}
    job = store.submit("a", "train", {}, 0, res, 0, run_dir_for=lambda j: f"/runs/a-{j}").id
    store.transition(job, JobState.STARTING, "go")
    store.transition(job, JobState.RUNNING, "up")
    rec = store.request_cancel(job, by="alice", checkpoint=True)
    assert rec.state is JobState.RUNNING and rec.cancel_requested and rec.cancel_checkpoint
    assert rec.to_status_dict()["cancel_checkpoint"] is True
    rec = store.request_cancel(job, by="alice", checkpoint=True)  # asking again changes nothing
    assert rec.cancel_checkpoint
    rec = store.request_cancel(job, by="ops")  # a plain cancel now: stop at once
    assert rec.cancel_requested and not rec.cancel_checkpoint and rec.cancelled_by == "ops"
    assert not store.request_cancel(job, checkpoint=True).cancel_checkpoint  # never back to waiting for one
    queued = store.submit("b", "train", {}, 0, res, 0, run_dir_for=lambda j: f"/runs/b-{j}").id
    assert store.request_cancel(queued, checkpoint=True).state is JobState.CANCELLED  # nothing to save


@pytest.fixture
def head(tmp_path):
    cfg = tmp_path / "head.yaml"
    cfg.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\nadmins: [ops]\n")
    spec = tmp_path / "rq.yaml"
    spec.write_text(json.dumps(SPEC))
    return str(cfg), str(spec), JobStore(str(tmp_path / "jobs.db"))


def _one_line_exit_2(capsys, args):
    from orchestrator.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_requeue_on_the_head_changes_spec_fields_and_refuses_what_it_cannot_do(head, capsys, monkeypatch):
    from orchestrator.cli import main

    cfg, spec_file, store = head
    assert main(["--cluster", cfg, "submit", spec_file]) == 0
    job = capsys.readouterr().out.strip()
    err = _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", job])
    assert "is QUEUED, not over; only a FAILED or CANCELLED job is requeued" in err
    run_dir = store.get(job).run_dir
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump(store.get(job).spec, f)
    _failed(store, job)

    # Bad overrides change nothing: a bad value, a new name, a corpus that is not there.
    for bad, said in ((["--set", "train.micro_batch=0"], "train.micro_batch"),
                      (["--set", "name=other"], "keeps its name"),
                      (["--set", "data.corpus=/nowhere/corpus.txt"], "/nowhere/corpus.txt")):
        assert said in _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", job, *bad])
    assert store.get(job).state is JobState.FAILED

    monkeypatch.setenv("USER", "mallory")  # only its owner or an admin
    monkeypatch.setenv("LOGNAME", "mallory")
    assert "only its owner or an admin" in _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", job])
    monkeypatch.setenv("USER", "ops")
    monkeypatch.setenv("LOGNAME", "ops")
    assert main(["--cluster", cfg, "requeue", job, "--set", "train.micro_batch=2", "--set", "max_restarts=5"]) == 0
    out = capsys.readouterr()
    assert out.out == (f"{job}: QUEUED again (was FAILED at step 12); it resumes from its latest complete "
                       "checkpoint\n")
    assert "no controller is running" in out.err
    rec = store.get(job)
    assert rec.state is JobState.QUEUED and rec.spec["train"]["micro_batch"] == 2 and rec.max_restarts == 5
    assert rec.history[-1].reason == "requeued by ops with train.micro_batch=2, max_restarts=5"
    with open(os.path.join(run_dir, "spec.json")) as f:  # what `run --resume` and `export` read
        assert json.load(f)["train"]["micro_batch"] == 2
    assert main(["--cluster", cfg, "list"]) == 0  # its step out of its total, as `status` says too
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(job))
    assert row.split()[4:7] == ["0", "12/40", "0"], row  # priority, step, restarts (a fresh budget)

    store.transition(job, JobState.STARTING, "go")
    store.transition(job, JobState.RUNNING, "up")
    store.transition(job, JobState.SUCCEEDED, "done")
    err = _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", job[:12]])
    assert "SUCCEEDED, so there is nothing to resume" in err and f"model.init_from: {run_dir}" in err
    assert "no job matches" in _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", "sy-19990101"])


def test_a_sweep_or_pipeline_is_continued_by_its_file_not_requeued(head, capsys):
    cfg, _, store = head
    res = {"workers": 1, "cpus_per_worker": 1}
    sweep = store.submit("iso", "sweep", {}, 0, {"workers": 0, "cpus_per_worker": 0}, 0, run_dir_for=lambda j: f"/r/iso-{j}").id
    run = store.submit("iso-r1", "sweep-run", {}, 0, res, 0, run_dir_for=lambda j: f"/r/r1-{j}", parent_id=sweep).id
    pipe = store.submit("ig", "pipeline", {}, 0, {"workers": 0, "cpus_per_worker": 0}, 0, run_dir_for=lambda j: f"/r/ig-{j}").id
    stage = store.submit("ig-sft", "pipeline-stage", {}, 0, res, 0, run_dir_for=lambda j: f"/r/s-{j}",
                         parent_id=pipe).id
    for j in (sweep, pipe):
        store.request_cancel(j)
    for job, said in ((run, "is a run of sweep iso; submit its file again (`switchyard sweep SWEEP.yaml`)"),
                      ("iso", "is sweep iso; submit its file again"),
                      (stage, "is a stage of pipeline ig; submit its file again (`switchyard submit PIPELINE.yaml`)"),
                      (pipe, "is pipeline ig")):
        assert said in _one_line_exit_2(capsys, ["--cluster", cfg, "requeue", job])
