"""Pipeline parallelism through run_job: a 2-stage pipeline trains exactly like the unsplit model (tier: ray)."""
import json
import os

import pytest
import torch

from data.storage import Storage
from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import checkpoint_dir, list_checkpoints, load_consolidated

pytestmark = pytest.mark.ray


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


BASE = {"train.steps": 4, "train.micro_batch": 2, "train.grad_accum": 2, "parallel.zero_stage": 1,
        "checkpoint.every": 2, "data.trace": True}


def _run(cluster_cfg, **overrides):
    result = run_job(tiny_spec(**{**BASE, **overrides}), cluster_cfg, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_stage_pipeline_matches_the_unsplit_model(ray_cluster, cluster_cfg, family):
    # Same seed, same global batch (2 x 2 samples per step), fp32: per-step losses must agree.
    # gpt2 ties its embeddings: the first and last stage share the token table (TiedLayerSpec).
    plain = _run(cluster_cfg, **{"model.family": family, "resources.workers": 1, "parallel.pp": 1})
    piped_overrides = {"model.family": family, "resources.workers": 2, "parallel.pp": 2}
    piped = _run(cluster_cfg, **piped_overrides)
    a, b = _rows(plain["run_dir"]), _rows(piped["run_dir"])
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-4)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-3)
    assert b[-1]["loss"] < b[0]["loss"]
    assert piped["final_eval"]["held_out_loss"] == pytest.approx(plain["final_eval"]["held_out_loss"], rel=1e-4)

    # Both stages read the same samples: those of data-parallel rank 0, the whole global batch.
    traces = [json.load(open(os.path.join(piped["run_dir"], "data_trace", f)))
              for f in sorted(os.listdir(os.path.join(piped["run_dir"], "data_trace")))]
    assert [t["dp_rank"] for t in traces] == [0, 0]
    assert traces[0]["steps"] == traces[1]["steps"] == [[s, 4 * (s - 1), 4 * s] for s in range(1, 5)]

    # The consolidated weights are the Decoder's, gathered from both stages, equal to the plain run's.
    st = Storage(cluster_cfg.storage)
    ck_a, ck_b = list_checkpoints(st, plain["run_dir"])[-1], list_checkpoints(st, piped["run_dir"])[-1]
    assert ck_b.manifest["pp"] == 2 and "model.safetensors" in ck_b.manifest["files"]
    wa, wb = load_consolidated(st, ck_a.path), load_consolidated(st, ck_b.path)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)

    if family == "llama":
        # Interrupted after step 2: each stage reloads its layers and ZeRO-1 shard; the losses carry on.
        os.remove(os.path.join(checkpoint_dir(piped["run_dir"], 4), "manifest.json"))
        resumed = run_job(tiny_spec(**{**BASE, **piped_overrides}), cluster_cfg, resume_dir=piped["run_dir"],
                          log=lambda *a, **k: None)
        assert resumed["state"] == "SUCCEEDED" and resumed["steps"] == 4
        by_step = {r["step"]: r["loss"] for r in _rows(piped["run_dir"])}
        assert [by_step[s] for s in range(1, 5)] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-4)
        assert [r["step"] for r in _rows(piped["run_dir"])] == [1, 2, 3, 4]    # one row per step
        assert [c.step for c in list_checkpoints(st, piped["run_dir"])][-1] == 4
