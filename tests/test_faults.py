"""Fault injection on real jobs (tier: ray): a rank killed mid-checkpoint, a corrupt shard, a zombie writer of
an earlier attempt, storage that turns read-only or full. No run is lost or corrupted."""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import ray

from data.storage import Storage
from orchestrator.cli_jobs import submit_spec
from orchestrator.job_store import JobState, JobStore
from orchestrator.runner import JobRun, run_job, worker_resources
from specs.errors import UserError
from tests.conftest import tiny_spec, wait_for
from workers import checkpoint as ck

pytestmark = pytest.mark.ray


def _losses(run_dir):
    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = row["loss"]
    return [by_step[s] for s in sorted(by_step)]


def _rank_log(run_dir, rank=0):
    return open(os.path.join(run_dir, "logs", f"rank_{rank}.log")).read()


def _all_intact(storage, run_dir):
    done = ck.list_checkpoints(storage, run_dir)
    assert done, "no complete checkpoint"
    for c in done:
        assert ck.verify(storage, c) is None, c.path
    return done


def _flip_a_byte(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert os.path.getsize(path) == size


def _largest_shard(ckpt_path):
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(ckpt_path, "ds")) for n in ns]
    return max(files, key=os.path.getsize)


def test_a_corrupt_shard_of_the_same_size_falls_back_and_none_intact_is_refused(ray_cluster, cluster_cfg):
    spec = tiny_spec(**{"train.steps": 8, "checkpoint.every": 4})
    first = run_job(spec, cluster_cfg, log=lambda *a, **k: None)
    assert first["state"] == "SUCCEEDED"
    run_dir, st = first["run_dir"], Storage(cluster_cfg.storage)
    full = _losses(run_dir)
    _flip_a_byte(_largest_shard(ck.checkpoint_dir(run_dir, 8)))
    resumed = run_job(spec, cluster_cfg, resume_dir=run_dir, log=lambda *a, **k: None)
    assert resumed["state"] == "SUCCEEDED" and resumed["steps"] == 8
    log = _rank_log(run_dir)
    assert "step_00000008 skipped" in log and "sha256" in log
    assert f"resumed from {ck.checkpoint_dir(run_dir, 4)} (step 4" in log
    assert _losses(run_dir) == pytest.approx(full, rel=1e-5, abs=1e-5)   # steps 5-8 ran again, the same
    assert [c.step for c in _all_intact(st, run_dir)] == [4, 8]         # step 8 was written again, intact
    # A model of another shape (a requeue's --set model.d_model) fails at once, saying so; nothing is lost.
    wider = tiny_spec(**{"train.steps": 12, "checkpoint.every": 4, "model.d_model": 128})
    with pytest.raises(UserError, match=r"resume: the checkpoint at step 8 is of a model of another shape "
                                        r"\(size mismatch for \S+: copying a param with shape"):
        run_job(wider, cluster_cfg, resume_dir=run_dir, log=lambda *a, **k: None)
    assert _losses(run_dir) == pytest.approx(full, rel=1e-5, abs=1e-5)
    for step in (4, 8):                                                 # now nothing is intact
        _flip_a_byte(_largest_shard(ck.checkpoint_dir(run_dir, step)))
    with pytest.raises(UserError, match="has checkpoint folders .* but none is complete and intact"):
        run_job(spec, cluster_cfg, resume_dir=run_dir, log=lambda *a, **k: None)
    assert _losses(run_dir) == pytest.approx(full, rel=1e-5, abs=1e-5)   # the metrics were not truncated


def test_run_resume_of_a_run_the_controller_owns_is_refused(ray_cluster, cluster_cfg, tmp_path):
    spec = tiny_spec()
    store = JobStore(cluster_cfg.job_store)
    rec = store.submit("t", "train", spec.to_dict(), 0, {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
                       0, lambda i: str(tmp_path / "runs" / i))
    st = Storage(cluster_cfg.storage)
    with pytest.raises(UserError, match=f"belongs to job {rec.id} of the controller \\(QUEUED\\)"):
        run_job(spec, cluster_cfg, resume_dir=rec.run_dir, log=lambda *a, **k: None)   # the store says so
    moved = str(tmp_path / "moved")
    ck.begin_attempt(st, moved, "controller", rec.id)    # a run directory the store knows by another name
    with pytest.raises(UserError, match=f"belongs to job {rec.id} of the controller"):
        run_job(spec, cluster_cfg, resume_dir=moved, log=lambda *a, **k: None)
    store.request_cancel(rec.id)


def test_a_zombie_writer_of_attempt_1_is_ignored_while_attempt_2_runs(ray_cluster, cluster_cfg):
    st = Storage(cluster_cfg.storage)
    spec = tiny_spec(**{"train.steps": 400, "checkpoint.every": 2, "checkpoint.keep": 2,
                        "checkpoint.consolidated": False, "resources.workers": 1})
    run_dir = st.path(f"zombie-{os.getpid()}-{time.time_ns()}")
    st.makedirs(run_dir)
    st.write_json(f"{run_dir}/spec.json", spec.to_dict())
    res = worker_resources(spec, cluster_cfg)
    one = JobRun(spec, st, run_dir, res, owner="controller", job_id="j")
    two = JobRun(spec, st, run_dir, res, owner="controller", job_id="j")
    try:
        one.start(resume=False)
        first = ck.current_attempt(st, run_dir)["attempt"]
        wait_for(lambda: ck.latest_checkpoint(st, run_dir), what="attempt 1's first checkpoint")
        # Attempt 2 starts while attempt 1's ranks still train: say its controller lost touch with them.
        two.start(resume=True)
        second = ck.current_attempt(st, run_dir)
        assert second["attempt"] != first and second["number"] == 2
        with pytest.raises(ray.exceptions.RayTaskError, match="no longer the current one"):
            ray.get(one.refs, timeout=240)                     # its next save found the fence and stopped it
        wait_for(lambda: any(c.manifest.get("attempt") == second["attempt"]
                             for c in ck.list_checkpoints(st, run_dir)), what="attempt 2's checkpoint")
        two.group.stop()
        result = ray.get(two.refs, timeout=240)[0]
        assert result["stopped"] and result["steps"] > 0
    finally:
        one.shutdown()
        two.shutdown()
    done = _all_intact(st, run_dir)
    for c in done:  # attempt 1 published nothing once attempt 2 had begun
        assert c.manifest["attempt"] == second["attempt"] or c.manifest["time"] < second["time"], c.manifest
    assert done[-1].manifest["attempt"] == second["attempt"]
    assert f"attempt {first} is not the current one" in _rank_log(run_dir)
    assert len(done) <= 2 + 1   # retention ran (by attempt 2 only): keep=2, at most the resume point besides


def test_rank_0_killed_while_it_writes_a_checkpoint_resumes_from_the_previous_one(controller):
    cfg, _ = controller
    store, st = JobStore(cfg.job_store), Storage(cfg.storage)
    job = submit_spec(cfg, tiny_spec(name="kill9", **{"train.steps": 60, "checkpoint.every": 1,
                                                      "checkpoint.keep": 3, "checkpoint.consolidated": False,
                                                      "max_restarts": 2, "resources.workers": 1}), priority=0)
    wait_for(lambda: store.get(job).state == JobState.RUNNING and ck.latest_checkpoint(st, store.get(job).run_dir),
             what="first checkpoint")
    rec = store.get(job)
    pid = next(w["pid"] for w in rec.workers if w["rank"] == 0)
    staging = os.path.join(rec.run_dir, "checkpoints", ck.STAGING)
    killed_at = None
    deadline = time.time() + 180
    while killed_at is None and time.time() < deadline:
        os.kill(pid, signal.SIGSTOP)      # frozen, so what is on disk is what it is doing
        try:
            writing = [n for d, _, ns in os.walk(staging) for n in ns]
            steps = sorted(int(p.name[5:]) for a in (os.scandir(staging) if os.path.isdir(staging) else [])
                           for p in os.scandir(a.path) if p.name.startswith("step_")) if writing else []
            if steps and not os.path.exists(os.path.join(ck.checkpoint_dir(rec.run_dir, steps[-1]),
                                                         "manifest.json")):
                killed_at = steps[-1]
                os.kill(pid, signal.SIGKILL)
        except FileNotFoundError:  # the staging folder went meanwhile (published): look again
            pass
        finally:
            if killed_at is None:
                os.kill(pid, signal.SIGCONT)
        time.sleep(random.uniform(0.0, 0.05))
    assert killed_at is not None, "never caught rank 0 inside a checkpoint write"
    wait_for(lambda: store.get(job).terminal, timeout=400, what="job end")
    rec = store.get(job)
    assert rec.state == JobState.SUCCEEDED, rec.reason
    assert rec.restarts == 1
    log = _rank_log(rec.run_dir)
    resumed = [int(line.split("(step ")[1].split(",")[0]) for line in log.splitlines() if "resumed from" in line]
    assert resumed and resumed[-1] < killed_at, (resumed, killed_at)
    assert resumed[-1] == killed_at - 1, "the previous checkpoint, not an older one"
    _all_intact(st, rec.run_dir)
    assert _losses(rec.run_dir)[-1] is not None and len(_losses(rec.run_dir)) == 60


def _mount_tmpfs(path, size_mb):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path], capture_output=True)
    return r.returncode == 0


def test_a_full_disk_inside_torch_save_is_reported_as_a_full_disk(tmp_path):
    """torch.save's zip writer turns the refused write into RuntimeError("unexpected pos"): the writer reports
    the storage's ENOSPC, so the job fails with that reason instead of restarting."""
    import errno

    import torch

    from workers.checkpoint_writer import _torch_save, write_hashed

    disk = str(tmp_path / "disk")
    if not _mount_tmpfs(disk, 4):
        pytest.skip("needs root to mount a tmpfs")
    try:
        with pytest.raises(OSError) as err:
            write_hashed(Storage(disk), f"{disk}/model_states.pt", _torch_save(
                {f"w{i}": torch.zeros(300_000) for i in range(16)}, True))  # 19 MB: full inside a record
        assert err.value.errno == errno.ENOSPC, err.value
    finally:
        subprocess.run(["umount", "-l", disk])


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_storage_full_or_read_only_mid_run_fails_the_job_and_keeps_the_checkpoint(controller, fault):
    cfg, _ = controller
    store, st = JobStore(cfg.job_store), Storage(cfg.storage)
    job = submit_spec(cfg, tiny_spec(name=f"disk-{fault.replace('-', '')}",
                                     **{"train.steps": 400, "checkpoint.every": 2, "checkpoint.keep": 2,
                                        "max_restarts": 3, "resources.workers": 1}), priority=0)
    ckpts = os.path.join(store.get(job).run_dir, "checkpoints")
    if not _mount_tmpfs(ckpts, 256):  # its own small filesystem, before the first checkpoint
        store.request_cancel(job)
        pytest.skip("needs root to mount a tmpfs")
    try:
        run_dir = store.get(job).run_dir
        first = wait_for(lambda: ck.latest_checkpoint(st, run_dir), what="a checkpoint")
        if fault == "full":
            with open(os.path.join(ckpts, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
        else:
            wait_for(lambda: subprocess.run(["mount", "-o", "remount,ro", ckpts]).returncode == 0, every=0.05,
                     what="remount read-only")
        wait_for(lambda: store.get(job).terminal, timeout=300, what="job end")
        rec = store.get(job)
        assert rec.state == JobState.FAILED and rec.restarts == 0, (rec.state, rec.reason)
        latest = ck.latest_checkpoint(st, run_dir)
        why = "is full (no space left)" if fault == "full" else "is read-only"
        assert rec.reason.startswith("storage: ") and why in rec.reason, rec.reason
        assert f"the checkpoint at step {latest.step} is intact" in rec.reason, rec.reason
        assert latest.step >= first.step
        _all_intact(st, run_dir)
    finally:
        subprocess.run(["umount", "-l", ckpts])


def test_switchyard_run_stops_at_its_time_limit_with_a_checkpoint_and_resumes_there(ray_cluster, cluster_cfg):
    """`switchyard run` keeps resources.time_limit_s as the controller does: the ranks finish the step, save a
    checkpoint and stop; the run is FAILED, saying how to continue, and `--resume` continues at that step."""
    from orchestrator.runner import resume_spec

    spec = tiny_spec(**{"train.steps": 5000, "checkpoint.every": 1000, "resources.workers": 1,
                        "resources.time_limit_s": 3})
    lines: list[str] = []
    out = run_job(spec, cluster_cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert out["state"] == "FAILED" and 0 < out["steps"] < 5000, out
    run_dir, st = out["run_dir"], Storage(cluster_cfg.storage)
    assert ck.latest_checkpoint(st, run_dir).step == out["steps"]
    assert any(line == (f"time limit of 3 s reached (resources.time_limit_s): stopped at step {out['steps']} with a "
                        f"checkpoint; `switchyard run --resume {run_dir}` continues it (with --set "
                        "resources.time_limit_s=SECONDS for more)") for line in lines), lines
    end = out["steps"] + 3
    more = resume_spec(st, run_dir, ["resources.time_limit_s=600", f"train.steps={end}"])
    resumed = run_job(more, cluster_cfg, resume_dir=run_dir, log=lambda *a, **k: None)
    assert resumed["state"] == "SUCCEEDED" and resumed["steps"] == end, resumed
    assert f"(step {out['steps']}, position" in _rank_log(run_dir)
