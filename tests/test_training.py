"""Real training on Ray actors with real DeepSpeed engines (tier: ray)."""
import json
import os

import pytest

from data.storage import Storage
from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import checkpoint_dir, list_checkpoints

pytestmark = pytest.mark.ray


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    by_step = {}
    for r in rows:  # a resumed run re-logs the steps it redoes; the latest row counts
        by_step[r["step"]] = r["loss"]
    return [by_step[s] for s in sorted(by_step)]


def _run(cluster_cfg, resume=None, **overrides):
    result = run_job(tiny_spec(**overrides), cluster_cfg, resume_dir=resume, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


def test_zero_stages_give_the_same_loss_curve(ray_cluster, cluster_cfg):
    curves, logs = {}, {}
    for stage in (0, 1, 2, 3):
        r = _run(cluster_cfg, **{"parallel.zero_stage": stage, "train.steps": 6, "checkpoint.every": 100})
        curves[stage] = _losses(r["run_dir"])
        logs[stage] = "".join(open(os.path.join(r["run_dir"], "logs", f"rank_{i}.log")).read() for i in (0, 1))
    assert curves[0][-1] < curves[0][0]
    for stage in (1, 2, 3):
        assert curves[stage] == pytest.approx(curves[0], rel=1e-4, abs=1e-4), stage
    for stage, text in logs.items():  # the libraries' warnings about each other's calls stay out of the log
        assert "Warning" not in text, (stage, text)


def test_resume_after_checkpoint_repeats_the_same_losses(ray_cluster, cluster_cfg):
    r = _run(cluster_cfg, **{"parallel.zero_stage": 2})
    run_dir = r["run_dir"]
    full = _losses(run_dir)
    st = Storage(cluster_cfg.storage)
    assert [c.step for c in list_checkpoints(st, run_dir)] == [4, 8]
    # Interrupted after step 4's checkpoint: step 8's checkpoint never got its manifest.
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    resumed = _run(cluster_cfg, resume=run_dir, **{"parallel.zero_stage": 2})
    assert resumed["steps"] == 8
    assert resumed["first_loss"] == r["first_loss"]  # the run's first loss, not the resumed part's (step 5)
    assert _losses(run_dir) == pytest.approx(full, rel=1e-5, abs=1e-5)
    # The resumed part really ran steps 5-8 (step 8's checkpoint is complete again), and the metrics
    # keep one row per step: the first attempt's rows of the replayed steps were dropped.
    assert [c.step for c in list_checkpoints(st, run_dir)] == [4, 8]
    rows = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows == [1, 2, 3, 4, 5, 6, 7, 8]


def test_resume_on_another_worker_count_reads_every_sample_once(ray_cluster, cluster_cfg):
    # 2 ranks x micro 4 = 8 samples per step; resumed on 1 rank with grad_accum 2 keeps the global batch.
    r = _run(cluster_cfg, **{"parallel.zero_stage": 2, "data.trace": True})
    run_dir = r["run_dir"]
    full = _losses(run_dir)
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    _run(cluster_cfg, resume=run_dir, **{"parallel.zero_stage": 2, "data.trace": True,
                                         "resources.workers": 1, "train.grad_accum": 2})
    traces = [json.load(open(os.path.join(run_dir, "data_trace", f)))
              for f in sorted(os.listdir(os.path.join(run_dir, "data_trace")))]
    first = [t for t in traces if t["world_size"] == 2]
    second = [t for t in traces if t["world_size"] == 1]
    assert len(first) == 2 and len(second) == 1
    seen = [p for t in first for step, lo, hi in t["steps"] if step <= 4 for p in range(lo, hi)]
    seen += [p for t in second for step, lo, hi in t["steps"] for p in range(lo, hi)]
    assert sorted(seen) == list(range(64))           # no sample twice, none skipped
    assert [s[0] for s in second[0]["steps"]] == [5, 6, 7, 8]
    # Same samples and the re-partitioned optimizer state: the losses carry on as before.
    assert _losses(run_dir) == pytest.approx(full, rel=1e-3, abs=1e-3)
