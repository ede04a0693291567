"""Encoders (BERT, RoBERTa with Switch layers) train with masked LM through run_job on two ranks (tier: ray)."""
import json
import os

import pytest

from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import checkpoint_dir

pytestmark = pytest.mark.ray


def _rows(run_dir):
    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _run(cluster_cfg, resume=None, **overrides):
    base = {"train.steps": 8, "train.lr": 3e-3, "checkpoint.every": 4, "data.seq_len": 64}
    result = run_job(tiny_spec(**{**base, **overrides}), cluster_cfg, resume_dir=resume, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


def test_switch_roberta_mlm_loss_falls_with_expert_parallelism(ray_cluster, cluster_cfg):
    # RoBERTa with Switch layers in every block, experts sharded over both ranks (ep=2).
    r = _run(cluster_cfg, **{"model.family": "roberta", "model.moe": {"num_experts": 4, "every": 1},
                             "parallel.ep": 2})
    rows = _rows(r["run_dir"])
    mlm = [row["mlm_loss"] for row in rows]
    assert mlm[-1] < mlm[0] - 0.3
    for row in rows:                                   # no NSP: loss = MLM + the routers' small aux losses
        assert 0 < row["loss"] - row["mlm_loss"] < 0.1
    share = rows[-1]["moe/0/expert_share"]
    assert len(share) == 4 and sum(share) == pytest.approx(1.0)
    assert 0.0 <= rows[-1]["moe/2/dropped"] < 1.0
    cfg = json.load(open(os.path.join(r["run_dir"], "model_config.json")))
    assert cfg["kind"] == "encoder" and cfg["model"]["type_vocab_size"] == 0 and not cfg["model"]["nsp"]
    assert r["final_eval"]["held_out_loss"] < mlm[0]                      # held-out MLM loss


def test_bert_mlm_and_nsp_train_and_resume_exactly(ray_cluster, cluster_cfg):
    r = _run(cluster_cfg, **{"model.family": "bert"})
    run_dir = r["run_dir"]
    rows = _rows(run_dir)
    mlm = [row["mlm_loss"] for row in rows]
    assert mlm[-1] < mlm[0] - 0.3
    assert all(row["loss"] > row["mlm_loss"] + 0.2 for row in rows)      # + the NSP loss (about ln 2 at first)
    # Interrupted after step 4: the resumed run sees the same pairs and masks, so the same losses.
    full = [row["loss"] for row in rows]
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    _run(cluster_cfg, resume=run_dir, **{"model.family": "bert"})
    assert [row["loss"] for row in _rows(run_dir)] == pytest.approx(full, rel=1e-5, abs=1e-5)
