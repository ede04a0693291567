"""A Switch decoder through run_job: experts sharded over two ranks (ep=2) train like replicated ones (tier: ray)."""
import json
import os

import pytest
import torch

from data.storage import Storage
from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import list_checkpoints, load_consolidated

pytestmark = pytest.mark.ray

# Capacity factor 4 with 4 experts: capacity = all tokens, so no token is dropped and the two paths
# (SwitchMLP serves tokens in order, DeepSpeed's gate picks with topk) cannot differ in what they drop.
MOE = {"num_experts": 4, "every": 2, "capacity_factor_train": 4.0, "capacity_factor_eval": 4.0, "z_loss": 1e-3}


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _run(cluster_cfg, ep):
    spec = tiny_spec(**{"model.moe": MOE, "parallel.ep": ep, "train.steps": 5, "checkpoint.every": 5})
    result = run_job(spec, cluster_cfg, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


def test_expert_parallel_switch_llama_matches_replicated_experts(ray_cluster, cluster_cfg):
    ep1, ep2 = _run(cluster_cfg, ep=1), _run(cluster_cfg, ep=2)
    a, b = _rows(ep1["run_dir"]), _rows(ep2["run_dir"])
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert b[-1]["loss"] < b[0]["loss"]
    # tiny llama has 3 blocks; every=2 makes block 1 the Switch layer
    for rows in (a, b):
        share = rows[-1]["moe/1/expert_share"]
        assert len(share) == 4 and sum(share) == pytest.approx(1.0) and max(share) < 1.0
        assert rows[-1]["moe/1/dropped"] == 0.0
        assert "moe/0/expert_share" not in rows[-1]
    # shares are averaged over both ranks and match between the two runs
    assert b[-1]["moe/1/expert_share"] == pytest.approx(a[-1]["moe/1/expert_share"], abs=1e-6)

    # The ep=2 checkpoint's consolidated weights gather every expert back under SwitchMLP names.
    st = Storage(cluster_cfg.storage)
    (ck1,), (ck2,) = list_checkpoints(st, ep1["run_dir"]), list_checkpoints(st, ep2["run_dir"])
    w1, w2 = load_consolidated(st, ck1.path), load_consolidated(st, ck2.path)
    assert sorted(w1) == sorted(w2)
    assert "blocks.1.mlp.experts.3.up.weight" in w2 and "blocks.1.mlp.router.weight" in w2
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)
