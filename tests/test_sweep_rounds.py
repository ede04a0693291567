"""Sweep submission and the adaptive round against the job store and storage, with results written by hand.

No Ray and no training: the runs' results rows come from a known law, so the
test can tell where each budget's optimum is. The controller calls
``extend_sweep`` when every run of a sweep has ended; here the test calls it.
"""
from __future__ import annotations

import numpy as np
import yaml

from data.storage import Storage
from orchestrator.job_store import JobStore
from orchestrator.sweep import extend_sweep, read_plan, submit_sweep, sweep_status
from scaling.approach3 import LossParams
from scaling.fit import isoflop_profiles
from scaling.table import append_row, make_row

TRUTH = LossParams(E=1.0, A=295.0, B=1000.0, alpha=0.3, beta=0.4)   # optimum ~3x above 20 tokens/param
SWEEP = {"name": "rounds", "family": "gpt2", "vary": "width", "n_layers": 2, "head_dim": 8, "width_step": 8,
         "budgets": [1e11, 3e11, 1e12], "sizes_per_budget": 5, "size_range": 6,
         "base": {"data": {"seq_len": 64}, "train": {"micro_batch": 4}, "resources": {"workers": 1}}}


def _finish(storage_dir: str, records) -> None:
    """Write every planned run's results row, its loss from TRUTH (what the controller does as runs end)."""
    for r in records:
        tokens = int(r.overrides["train.tokens"])
        append_row(storage_dir, make_row(run_id=r.name, family="gpt2", n_params=r.n_params,
                                         n_params_non_embedding=r.n_params // 2, tokens=tokens,
                                         attention_flops_per_token=0.0, spec_hash="h",
                                         final_loss=float(TRUTH.loss(r.n_params, tokens))))


def test_adaptive_round_is_submitted_recorded_and_kept_on_resubmit(cluster_cfg, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    out = submit_sweep(cluster_cfg, str(path), log=lambda *a, **k: None)
    assert out["runs"] == 15 and len(out["submitted"]) == 15
    store = JobStore(cluster_cfg.job_store)
    storage = Storage(cluster_cfg.storage, {})
    sdir = out["sweep_dir"]
    first = read_plan(storage, sdir)
    assert len(first) == 15 and {r.round for r in first} == {1}
    _finish(sdir, first)

    parent = store.get(out["id"])
    ids = extend_sweep(cluster_cfg, store, storage, parent)
    assert ids, "the rule-of-thumb grid misses this law's optimum: a round must be added"
    plan = read_plan(storage, sdir)
    new = [r for r in plan if r.round == 2]
    assert len(new) == len(ids) and {c.id for c in store.list(parent_id=parent.id)} >= set(ids)
    rounds = storage.read_json(f"{sdir}/rounds.json")
    assert rounds[0]["round"] == 2 and rounds[0]["runs"] == [r.name for r in new]
    assert all("beyond the larger end" in why for why in rounds[0]["reasons"])
    assert sweep_status(cluster_cfg, "rounds")["runs"] == 15 + len(new)

    # Resubmitting while round 2 is queued plans the same runs and submits none of them again.
    again = submit_sweep(cluster_cfg, str(path), log=lambda *a, **k: None)
    assert again["submitted"] == [] and again["runs"] == 15 + len(new)
    assert [r.name for r in read_plan(storage, sdir)] == [r.name for r in plan]

    # Round 2's results put every extended budget's vertex inside its sizes; the cap (1 round) ends it.
    _finish(sdir, new)
    n = np.array([r.n_params for r in plan], float)
    d = np.array([r.overrides["train.tokens"] for r in plan], float)
    profiles = isoflop_profiles(n, d, TRUTH.loss(n, d))[0]
    for b in {r.budget for r in new}:
        p = min(profiles, key=lambda p: abs(np.log(p.budget / b)))
        assert p.used, p.reason
    assert extend_sweep(cluster_cfg, store, storage, store.get(out["id"])) == []
