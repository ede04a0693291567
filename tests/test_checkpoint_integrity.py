"""Checkpoint integrity on plain files (no Ray): checksums, the attempt fence, refusals, retention, NaN evals,
storage faults, one controller per store, --json after a divergence."""
import errno
import json
import logging
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from data.storage import Storage
from specs.errors import UserError
from workers import checkpoint as ck


def _write(storage, run_dir, step, attempt=None, payload=b"0123456789", model=False):
    """A checkpoint as the ranks leave it: files staged by ``upload_hashed``, published by ``publish``."""
    local = os.path.join(storage.local_path(run_dir), f".src-{step}")
    os.makedirs(os.path.join(local, "ds"), exist_ok=True)
    with open(os.path.join(local, "ds", "shard.pt"), "wb") as f:
        f.write(payload)
    if model:
        with open(os.path.join(local, "model.safetensors"), "wb") as f:
            f.write(b"weights")
    files = ck.upload_hashed(storage, local, ck.staging_dir(run_dir, attempt, step))
    verdict = ck.publish(storage, run_dir, step, {"data": {}}, [{"files": files}], 1, 1, attempt, None)
    return ck.checkpoint_dir(run_dir, step), verdict


@pytest.fixture
def run(tmp_path):
    st = Storage(str(tmp_path))
    run_dir = str(tmp_path / "run")
    st.makedirs(run_dir)
    return st, run_dir


def test_manifest_has_each_files_sha256_and_the_attempt(run):
    st, run_dir = run
    attempt = ck.begin_attempt(st, run_dir, "run")
    path, verdict = _write(st, run_dir, 4, attempt)
    assert verdict is None
    m = st.read_json(f"{path}/manifest.json")
    assert m["files"] == {"ds/shard.pt": 10}
    assert len(m["sha256"]["ds/shard.pt"]) == 64 and m["attempt"] == attempt
    assert not st.exists(f"{run_dir}/checkpoints/{ck.STAGING}")   # staging is gone once published
    assert ck.verify(st, ck.latest_checkpoint(st, run_dir)) is None


def test_a_corrupt_shard_of_the_same_size_falls_back_to_the_previous_checkpoint(run, caplog):
    st, run_dir = run
    _write(st, run_dir, 4)
    newest, _ = _write(st, run_dir, 8)
    shard = os.path.join(newest, "ds", "shard.pt")
    with open(shard, "r+b") as f:  # one flipped byte, the size unchanged
        f.write(b"X")
    assert os.path.getsize(shard) == 10
    assert [c.step for c in ck.list_checkpoints(st, run_dir)] == [4, 8]   # sizes alone cannot see it
    with caplog.at_level(logging.WARNING, logger="workers.checkpoint"):
        chosen = ck.resume_choice(st, run_dir)
    assert chosen.step == 4
    assert any("step_00000008 skipped: ds/shard.pt has sha256" in r.getMessage() for r in caplog.records)


def test_resume_is_refused_when_folders_exist_but_none_is_complete(run):
    st, run_dir = run
    assert ck.resume_choice(st, run_dir) is None          # a run that never checkpointed starts at step 0
    path, _ = _write(st, run_dir, 4)
    os.remove(os.path.join(path, "manifest.json"))        # died before the manifest
    bad, _ = _write(st, run_dir, 8)
    with open(os.path.join(bad, "ds", "shard.pt"), "r+b") as f:
        f.write(b"Y")
    with pytest.raises(UserError, match=r"resume: .* has checkpoint folders \(step_00000004, step_00000008\) "
                                        r"but none is complete and intact"):
        ck.resume_choice(st, run_dir)


def test_folders_that_never_got_their_manifest_start_the_run_at_step_0(run, caplog):
    """A crash while the first checkpoint was being published (files moved, no manifest) saved nothing."""
    st, run_dir = run
    path, _ = _write(st, run_dir, 8)
    os.remove(os.path.join(path, "manifest.json"))
    with caplog.at_level(logging.WARNING, logger="workers.checkpoint"):
        assert ck.resume_choice(st, run_dir) is None
    assert any("never published (no manifest): step_00000008 ignored" in r.getMessage() for r in caplog.records)


def test_a_writer_of_an_earlier_attempt_publishes_nothing(run):
    st, run_dir = run
    first = ck.begin_attempt(st, run_dir, "controller", "job-1")
    _write(st, run_dir, 4, first)
    second = ck.begin_attempt(st, run_dir, "controller", "job-1")
    assert second != first and st.read_json(f"{run_dir}/attempt.json")["number"] == 2
    path, verdict = _write(st, run_dir, 8, first)                     # the zombie keeps writing
    assert verdict[0] == "fenced" and f"attempt {first}" in verdict[1] and second in verdict[1]
    assert not st.exists(path)                                        # its files never reached step_8
    assert [c.step for c in ck.list_checkpoints(st, run_dir)] == [4]
    _, verdict = _write(st, run_dir, 8, second)
    assert verdict is None and ck.latest_checkpoint(st, run_dir).manifest["attempt"] == second


def test_retention_never_deletes_a_checkpoint_the_controller_has_not_evaluated(run):
    st, run_dir = run
    ck.begin_attempt(st, run_dir, "controller", "job-1")
    paths = [_write(st, run_dir, s, model=True)[0] for s in (2, 4, 6, 8)]
    st.write_text(f"{run_dir}/evals.jsonl", json.dumps({"checkpoint": paths[1], "loss": 1.0}) + "\n")
    assert ck.retain(st, run_dir, keep=1) == [paths[1]]               # only the evaluated one goes
    assert [c.step for c in ck.list_checkpoints(st, run_dir)] == [2, 6, 8]
    ck.begin_attempt(st, run_dir, "run")                              # `switchyard run`: nothing evaluates
    assert ck.retain(st, run_dir, keep=1) == [paths[0], paths[2]]


def test_status_says_how_many_checkpoints_wait_for_their_evaluation(run, capsys, tmp_path):
    from orchestrator.cli import main
    from orchestrator.cli_jobs import job_status
    from orchestrator.job_store import JobStore

    st, run_dir = run
    store = JobStore(str(tmp_path / "jobs.db"))
    rec = store.submit("t", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0,
                       lambda i: run_dir)
    ck.begin_attempt(st, run_dir, "controller", rec.id)
    paths = [_write(st, run_dir, s, model=True)[0] for s in (2, 4, 6)]
    st.write_text(f"{run_dir}/evals.jsonl", json.dumps({"checkpoint": paths[0], "loss": 1.0}) + "\n")
    out = job_status(store, rec.id, st)
    assert out["evals_pending"] == 2
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"storage: {tmp_path}\njob_store: {tmp_path / 'jobs.db'}\n")
    assert main(["--cluster", str(cfg), "status", rec.id]) == 0
    assert "eval: 2 checkpoint(s) not evaluated yet" in capsys.readouterr().out
    ck.begin_attempt(st, run_dir, "run")                              # `switchyard run`: nothing evaluates
    assert job_status(store, rec.id, st)["evals_pending"] == 0


def test_a_nan_evaluation_is_never_the_best(tmp_path):
    from orchestrator.controller import Controller
    from orchestrator.job_store import JobStore

    st, store = Storage(str(tmp_path)), JobStore(str(tmp_path / "jobs.db"))
    rec = store.submit("t", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0,
                       lambda i: str(tmp_path / i))
    st.makedirs(rec.run_dir)
    fake = SimpleNamespace(store=store, storage=st)
    Controller._record_eval(fake, rec.id, {"checkpoint": "a", "step": 2, "loss": float("nan")})
    assert store.get(rec.id).best_checkpoint is None and not st.exists(f"{rec.run_dir}/best_checkpoint.json")
    Controller._record_eval(fake, rec.id, {"checkpoint": "b", "step": 4, "loss": 2.5})
    Controller._record_eval(fake, rec.id, {"checkpoint": "c", "step": 6, "loss": float("nan")})
    assert store.get(rec.id).best_checkpoint == "b"
    assert st.read_json(f"{rec.run_dir}/best_checkpoint.json")["path"] == "b"


def test_storage_faults_are_one_line_naming_what_is_intact():
    full = ck.storage_fault(OSError(errno.ENOSPC, "No space left on device", "/s/run/x"), "/s/run", 4)
    assert isinstance(full, UserError) and "\n" not in str(full)
    assert "/s/run is full (no space left)" in str(full) and "the checkpoint at step 4 is intact" in str(full)
    ro = ck.storage_fault(OSError(errno.EROFS, "Read-only file system", "/s/run/x"), "/s/run", -1)
    assert "is read-only" in str(ro) and "no checkpoint was written" in str(ro)
    assert ck.storage_fault(OSError(errno.ECONNRESET, "reset"), "/s/run", 4) is None  # a retryable fault


def test_a_second_controller_is_refused_while_the_first_lives(tmp_path):
    from orchestrator.controller import refuse_second_controller
    from orchestrator.job_store import JobStore

    store = JobStore(str(tmp_path / "jobs.db"))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.set_controller(other.pid, "127.0.0.1:6379")
        with pytest.raises(UserError, match=f"another controller \\(pid {other.pid}"):
            refuse_second_controller(store, os.getpid())
        refuse_second_controller(store, other.pid)                    # itself, restarted by Ray: fine
    finally:
        other.kill()
        other.wait()
    refuse_second_controller(store, os.getpid())                      # it died: this one may take over


def test_json_output_writes_non_finite_numbers_as_null():
    from orchestrator import json_output

    text = json_output.dumps({"loss": float("nan"), "evals": [{"ppl": float("inf")}, 1.5], "t": (-math.inf,)})
    assert json.loads(text) == {"loss": None, "evals": [{"ppl": None}, 1.5], "t": [None]}
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(json_output.dumps({"when": time}, default=str))["when"].startswith("<module")


def _bare_controller(tmp_path, clock):
    """A Controller without its __init__ (no Ray): a store, a storage, no jobs running."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import Controller
    from orchestrator.job_store import JobStore

    ctl = Controller.__new__(Controller)
    ctl.cluster = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "j.db"),
                                                "workers": {"start_timeout_s": 5}})
    ctl.store = JobStore(ctl.cluster.job_store, clock=clock)
    ctl.storage = Storage(str(tmp_path / "runs"))
    ctl.active, ctl.eval_jobs = {}, {}
    return ctl


def _record(store, name, kind="train", parent=None, tmp=""):
    return store.submit(name, kind, {}, 0, {"workers": 1 if kind == "train" else 0, "cpus_per_worker": 1,
                                            "gpus_per_worker": 0}, 0, lambda i: f"{tmp}/{i}", parent_id=parent)


def test_parents_of_an_interrupted_submit_never_stay_starting(tmp_path, monkeypatch):
    from orchestrator import controller as controller_module
    from orchestrator.job_store import JobState

    now = [1000.0]
    ctl = _bare_controller(tmp_path, lambda: now[0])
    monkeypatch.setattr(controller_module.time, "time", lambda: now[0])
    with_run = _record(ctl.store, "sw", "sweep", tmp=str(tmp_path))
    ctl.store.transition(with_run.id, JobState.STARTING, "sweep submitted")   # ... and the submit died here
    _record(ctl.store, "sw-run", parent=with_run.id, tmp=str(tmp_path))
    empty = _record(ctl.store, "pl", "pipeline", tmp=str(tmp_path))            # died before its first stage
    ctl._settle_parents()
    assert ctl.store.get(with_run.id).state == JobState.STARTING             # a submit may still be under way
    now[0] += 120
    ctl._settle_parents()
    assert ctl.store.get(with_run.id).state == JobState.RUNNING
    assert ctl.store.get(empty.id).state == JobState.FAILED
    assert "submission was interrupted" in ctl.store.get(empty.id).reason


class _SlowStart:
    """A JobRun whose start blocks (a long data preparation) until its ranks are killed."""

    def __init__(self):
        import threading

        self.killed, self.shutdowns = threading.Event(), 0

    def start(self):
        if not self.killed.wait(30):
            return
        raise RuntimeError("the rank actor died")  # what ray.get of a killed rank raises

    def shutdown(self):
        self.shutdowns += 1
        self.killed.set()


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_start_past_its_deadline_fails_and_a_start_can_be_cancelled(tmp_path, monkeypatch, how):
    import threading

    from orchestrator import controller as controller_module
    from orchestrator.controller import Active
    from orchestrator.job_store import JobState

    now = [1000.0]
    ctl = _bare_controller(tmp_path, lambda: now[0])
    monkeypatch.setattr(controller_module.time, "time", lambda: now[0])
    rec = _record(ctl.store, "slow", tmp=str(tmp_path))
    ctl.store.transition(rec.id, JobState.STARTING, "resources available")
    run = _SlowStart()
    act = Active(rec.id, run, since=now[0])

    def start():
        try:
            run.start()
        except BaseException as err:
            act.start_error = err

    act.starter = threading.Thread(target=start, daemon=True)
    act.starter.start()
    ctl.active[rec.id] = act
    ctl._handle_stops()
    ctl._watch_running()
    assert run.shutdowns == 0 and ctl.store.get(rec.id).state == JobState.STARTING
    if how == "deadline":
        now[0] += 6                                   # past workers.start_timeout_s = 5
    else:
        ctl.store.request_cancel(rec.id)
    ctl._handle_stops()
    ctl._watch_running()                              # the ranks are killed: the starter ends
    act.starter.join(10)
    ctl._watch_running()
    rec = ctl.store.get(rec.id)
    assert rec.id not in ctl.active and run.shutdowns >= 2
    if how == "deadline":
        assert rec.state == JobState.FAILED and rec.restarts == 0
        assert rec.reason.startswith("startup: not running after 5 s (workers.start_timeout_s)")
    else:
        assert rec.state == JobState.CANCELLED and rec.reason == "cancelled by user while starting"
