"""Start-up progress: the phases a starting job goes through, with elapsed times and what a phase waits for,
as `switchyard run`, `status` and `logs` show them (workers/phases.py)."""
import json
import os

import pytest

from data.storage import Storage
from workers import phases


def test_record_detail_finish_describe_and_watch(tmp_path):
    storage, run = Storage(str(tmp_path)), str(tmp_path / "run")
    os.makedirs(run)
    watcher = phases.Watcher(storage, run)
    assert watcher.poll() == [] and phases.describe(phases.read(storage, run)) is None
    phases.enter(storage, run, "connecting", "127.0.0.1:6379", now=100.0, fresh=True)
    phases.enter(storage, run, "waiting_for_gang", "2 x 1 CPU in one placement group; 0 of 2 CPUs free now", now=101.0)
    rec = phases.read(storage, run)
    assert [h["phase"] for h in rec["history"]] == ["connecting", "waiting_for_gang"]
    assert rec["history"][0]["end"] == 101.0 and rec["history"][1]["end"] is None
    line = phases.describe(rec, now=104.0)
    assert line == "waiting for the gang for 3 s (starting for 4 s): 2 x 1 CPU in one placement group; 0 of 2 CPUs free now"
    lines = watcher.poll()
    assert lines[0] == "startup +0.0s: connecting to Ray (127.0.0.1:6379)"
    assert lines[1].startswith("startup +1.0s: waiting for the gang (2 x 1 CPU")
    phases.enter(storage, run, "preparing_data", "builtin:stdlib", now=105.0)
    assert watcher.poll() == ["startup +5.0s: preparing data (builtin:stdlib)"]
    phases.set_detail(storage, run, "data prepare: 1/4 shards of 1 file(s)")
    assert watcher.poll()[0].endswith("preparing data: data prepare: 1/4 shards of 1 file(s)")
    assert watcher.poll() == []  # nothing new
    phases.finish(storage, run, now=110.0)
    rec = phases.read(storage, run)
    assert rec["done"] and rec["seconds"] == 10.0 and phases.describe(rec) is None
    assert phases.summary(rec) == ("start-up 10.0 s: connecting to Ray 1.0 s, waiting for the gang 4.0 s, "
                                   "preparing data 5.0 s")
    assert watcher.poll() == [phases.summary(rec)] and watcher.done
    # The next attempt (a restart) starts a new record; a rank recorder writes only on rank 0.
    phases.enter(storage, run, "reusing_gang", now=200.0)
    assert [h["phase"] for h in phases.read(storage, run)["history"]] == ["reusing_gang"]
    phases.for_rank(1, storage, run).enter("building_engines")
    assert phases.read(storage, run)["phase"] == "reusing_gang"
    r0 = phases.for_rank(0, storage, run)
    assert r0 is phases.for_rank(0, storage, run)
    r0.enter("building_engines", "pretrain")
    r0.stepped()
    r0.stepped()
    assert phases.read(storage, run)["done"]


def test_the_step_bar_clock_starts_at_the_first_step(monkeypatch):
    from orchestrator.runner import _progress_bar

    monkeypatch.setenv("SWITCHYARD_PROGRESS", "1")

    bar = _progress_bar(100, "t", initial=3)
    try:
        assert bar.n == 3 and bar.format_dict["initial"] == 3
        bar.n = 4
        d = bar.format_dict
        assert d["elapsed"] < 5.0  # made when the first step is seen, not when the job was submitted
    finally:
        bar.close()


@pytest.mark.ray
def test_cold_start_prints_each_phase_and_status_shows_them(ray_cluster, tmp_path):
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.cli_jobs import job_status
    from orchestrator.runner import run_job
    from tests.conftest import tiny_spec

    # A storage of its own: the token cache is built in this job (a cold start prepares its data).
    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    lines: list[str] = []
    spec = tiny_spec(**{"resources.workers": 1, "train.steps": 2, "checkpoint.every": 2, "eval.batches": 1})
    out = run_job(spec, cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert out["state"] == "SUCCEEDED", (out, lines)
    startup = [line for line in lines if line.startswith(("startup", "start-up"))]
    labels = ["connecting to Ray", "waiting for the gang", "starting workers", "preparing data",
              "joining torch.distributed", "building engines", "running the first step"]
    at = [next(i for i, line in enumerate(startup) if line.split(": ", 1)[-1].startswith(label) or
               f": {label}" in line) for label in labels]
    assert at == sorted(at), startup
    gang = next(line for line in startup if "waiting for the gang" in line)
    assert "1 x 1 CPU in one placement group" in gang and "CPUs free now" in gang  # says what it waits for
    assert startup[-1].startswith("start-up ") and "preparing data" in startup[-1]
    rec = json.load(open(os.path.join(out["run_dir"], phases.FILE)))
    assert rec["done"] and [h["phase"] for h in rec["history"]] == [
        "connecting", "waiting_for_gang", "starting_workers", "preparing_data", "joining", "building_engines",
        "first_step"]
    data = next(h for h in rec["history"] if h["phase"] == "preparing_data")
    assert "tokenized" in data["detail"]  # data/prepare.py's own progress became the phase's detail
    assert all(h["end"] >= h["start"] for h in rec["history"])

    # Resumed: the checkpoint load is a phase of its own; status shows where the start-up time went.
    lines.clear()
    out2 = run_job(tiny_spec(**{"resources.workers": 1, "train.steps": 3, "checkpoint.every": 2,
                                "eval.batches": 1}), cfg, resume_dir=out["run_dir"],
                   log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert out2["state"] == "SUCCEEDED", (out2, lines)
    rec = json.load(open(os.path.join(out["run_dir"], phases.FILE)))
    assert "loading_checkpoint" in [h["phase"] for h in rec["history"]]
    assert any("loading a checkpoint" in line for line in lines)

    from orchestrator.job_store import JobState, JobStore

    store = JobStore(cfg.job_store)  # a job whose run directory is this one, starting: status shows its phase
    rec = store.submit("t", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0, run_dir_for=lambda job_id: out["run_dir"])
    store.transition(rec.id, JobState.STARTING, "test")
    phases.enter(Storage(cfg.storage), out["run_dir"], "waiting_for_gang", "1 x 1 CPU in one placement group",
                 fresh=True)
    st = job_status(store, rec.id, Storage(cfg.storage))
    assert st["startup"]["phase"] == "waiting_for_gang"
    assert st["startup"]["current"].startswith("waiting for the gang for ") and "1 x 1 CPU" in st["startup"]["current"]


def test_status_and_logs_show_the_phase_of_a_starting_job(tmp_path, capsys):
    import argparse

    import yaml

    from orchestrator import cli_jobs, job_logs
    from orchestrator.job_store import JobState, JobStore

    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")}))
    run = str(tmp_path / "runs" / "t-sy-1")
    os.makedirs(os.path.join(run, "logs"))
    store = JobStore(str(tmp_path / "jobs.db"))
    rec = store.submit("t", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0,
                       run_dir_for=lambda job_id: run)
    store.transition(rec.id, JobState.STARTING, "test")
    storage = Storage(str(tmp_path / "runs"))
    phases.enter(storage, run, "waiting_for_gang", "1 x 1 CPU in one placement group; 0 of 2 CPUs free now", fresh=True)
    args = argparse.Namespace(cluster=str(cfg_path), job=rec.id, json=False, rank=None, follow=False, tail=None)
    assert cli_jobs.cmd_status(args) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"starting: waiting for the gang for \d+ s \(starting for \d+ s\): 1 x 1 CPU in one placement "
                     r"group; 0 of 2 CPUs free now", out), out
    phases.enter(storage, run, "preparing_data", "builtin:stdlib")
    phases.set_detail(storage, run, "data prepare: 2/4 shards of 1 file(s), 1.0/2.0 MB, 0.50 M tokens/s, ETA 2s")
    with open(os.path.join(run, "logs", "rank_0.log"), "w") as f:
        f.write("[switchyard] rank 0/1 pid 1 on host\n")
    assert job_logs.cmd_logs(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("startup +0.0s: waiting for the gang (1 x 1 CPU")
    assert out[1].startswith("startup +") and "preparing data (data prepare: 2/4 shards" in out[1]  # latest detail
    assert out[2:] == ["[switchyard] rank 0/1 pid 1 on host"]


def test_a_rank_imports_deepspeed_without_transformers_which_stays_importable():
    """A rank's way to its first step (``workers.rank.PRELOAD``, DeepSpeed first, as ``RankWorker`` imports
    it) leaves transformers (installed here, for the HF tests) unimported: about a quarter of DeepSpeed's
    import, paid by every rank. Anything importing transformers later gets it."""
    import subprocess
    import sys

    probe = ("import importlib, sys\n"
             "from workers.rank import PRELOAD, import_deepspeed\n"
             "import_deepspeed()\n"
             "for name in PRELOAD:\n"
             "    importlib.import_module(name)\n"
             "assert 'deepspeed.runtime.engine' in sys.modules\n"
             "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'transformers' in m)[:5]\n"
             "import transformers\n"
             "print('transformers', transformers.__version__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("transformers "), out.stdout[-500:]
