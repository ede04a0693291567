"""A sweep of tiny runs end to end through the controller: table, fit and plots."""
import os

import pytest

from orchestrator.job_store import JobState, JobStore
from orchestrator.sweep import submit_sweep, sweep_status
from scaling.table import COLUMNS, read_results
from tests.conftest import wait_for

pytestmark = pytest.mark.ray
SWEEP = os.path.join(os.path.dirname(__file__), "data", "tiny_sweep.yaml")


def test_sweep_runs_through_the_controller_and_fits(controller):
    cfg, _ = controller
    out = submit_sweep(cfg, SWEEP, log=lambda *a, **k: None)
    assert out["runs"] == 9 and len(out["submitted"]) == 9
    # Submitting again while it runs resubmits nothing.
    again = submit_sweep(cfg, SWEEP, log=lambda *a, **k: None)
    assert again["submitted"] == []
    store = JobStore(cfg.job_store)
    wait_for(lambda: store.get(out["id"]).terminal, timeout=600, every=1.0, what="sweep end")
    parent = store.get(out["id"])
    assert parent.state == JobState.SUCCEEDED, parent.reason
    table = read_results(out["sweep_dir"])
    assert table.num_rows == 9 and tuple(table.column_names) == COLUMNS
    rows = table.to_pylist()
    for r in rows:
        assert r["flops_6nd"] == pytest.approx(6 * r["n_params"] * r["tokens"])
        assert r["held_out_loss"] is not None and 0 < r["final_loss"] < 6
        assert os.path.exists(r["curve_path"])
    fit_dir = os.path.join(out["sweep_dir"], "fit")
    for name in ("fit.json", "fit.md"):
        assert os.path.getsize(os.path.join(fit_dir, name)) > 0
    pngs = [f for f in os.listdir(fit_dir) if f.endswith(".png")]
    assert len(pngs) == 3
    status = sweep_status(cfg, "tinysweep")
    assert status["results"] == 9 and status["state"] == "SUCCEEDED" and status["fit"]
