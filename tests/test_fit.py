"""Chinchilla fits (scaling.fit, scaling.approach3, scaling.bootstrap) and the `fit` command (scaling.report).

Synthetic runs come from Epoch AI's refit of Chinchilla's law over an IsoFLOP
grid like the paper's (8 budgets from 6e18 to 3e21 FLOPs, 12 sizes each
spread 16x around the 20-tokens-per-parameter guess), with 0.5% multiplicative
noise and a fixed seed. Pure numpy/scipy: no Ray, no torch.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize_scalar

from specs.errors import UsageError
from scaling.approach3 import HuberObjective, LossParams, chinchilla_starts, fit_approach3
from scaling.bootstrap import bootstrap
from scaling.fit import Curve, FitError, fit_approach1, fit_approach2, group_budgets
from scaling.fit_table import load_table
from scaling.report import PLOTS, add_fit_command

EPOCH = LossParams(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
TRUE_A = EPOCH.beta / (EPOCH.alpha + EPOCH.beta)          # 0.51261...


def isoflop_grid(n_budgets: int = 8, sizes: int = 12, spread: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    n, d = [], []
    for c in np.geomspace(6e18, 3e21, n_budgets):
        ns = np.sqrt(c / 120) * np.geomspace(spread ** -0.5, spread ** 0.5, sizes)
        n += list(ns)
        d += list(c / (6 * ns))
    return np.array(n), np.array(d)


def noisy_runs(sigma: float = 0.005, seed: int = 0, n_budgets: int = 8,
               sizes: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d = isoflop_grid(n_budgets, sizes)
    rng = np.random.default_rng(seed)
    return n, d, EPOCH.loss(n, d) * np.exp(rng.normal(0.0, sigma, n.size))


@pytest.fixture(scope="module")
def runs():
    return noisy_runs()


@pytest.fixture(scope="module")
def fit3(runs):
    return fit_approach3(*runs)          # the full 4500-start grid, once for the module


# ----------------------------------------------------------------------------- the law and the objective


def test_compute_optimal_formulas_minimise_the_law_at_fixed_compute():
    for c in (1e18, 1e21, 1e24):
        res = minimize_scalar(lambda x: float(EPOCH.loss(math.exp(x), c / (6 * math.exp(x)))),
                              bounds=(5, 40), method="bounded", options={"xatol": 1e-10})
        assert EPOCH.n_opt(c) == pytest.approx(math.exp(res.x), rel=1e-6)
        assert EPOCH.n_opt(c) * EPOCH.d_opt(c) * 6 == pytest.approx(c, rel=1e-12)
    assert EPOCH.a + EPOCH.b == pytest.approx(1.0)
    assert EPOCH.a == pytest.approx(0.5126121, abs=1e-6)


def test_objective_gradient_matches_finite_differences(runs):
    fg = HuberObjective(*runs)
    for p in ([6.0, 7.0, 0.5, 0.3, 0.4], [2.0, 3.0, 1.0, 0.1, 0.1], [400.0, 7.0, 0.5, -30.0, 0.4]):
        p = np.array(p)
        g = fg(p[None])[1][0]
        num = approx_fprime(p, lambda q: float(fg(q[None])[0][0]), 1e-7)
        assert np.abs(g - num).max() <= 1e-4 * max(1.0, np.abs(g).max())


def test_weighted_objective_equals_the_resampled_runs(runs):
    n, d, loss = runs
    pick = np.random.default_rng(3).integers(0, n.size, n.size)
    weights = np.bincount(pick, minlength=n.size)[None, :].repeat(2, axis=0)
    p = np.array([[6.0, 7.0, 0.5, 0.3, 0.4], [6.2, 7.5, 0.6, 0.34, 0.36]])
    fw, gw = HuberObjective(n, d, loss, weights=weights)(p, np.array([0, 1]))
    fr, gr = HuberObjective(n[pick], d[pick], loss[pick])(p)
    np.testing.assert_allclose(fw, fr, rtol=1e-10)
    np.testing.assert_allclose(gw, gr, rtol=1e-8, atol=1e-10)


def test_chinchilla_grid_has_4500_starts():
    starts = chinchilla_starts()
    assert starts.shape == (4500, 5)
    assert sorted(set(starts[:, 0])) == [0, 5, 10, 15, 20, 25]
    assert sorted(set(starts[:, 2])) == [-1, -0.5, 0, 0.5, 1]
    assert sorted(set(starts[:, 3])) == [0, 0.5, 1, 1.5, 2]


# ----------------------------------------------------------------------------- approach 3


def test_approach3_is_exact_on_noise_free_points():
    n, d = isoflop_grid(6, 8)
    res = fit_approach3(n, d, EPOCH.loss(n, d))
    assert res.converged
    p = res.params
    assert p.alpha == pytest.approx(EPOCH.alpha, rel=1e-6)
    assert p.beta == pytest.approx(EPOCH.beta, rel=1e-6)
    assert p.E == pytest.approx(EPOCH.E, rel=1e-6)
    assert p.A == pytest.approx(EPOCH.A, rel=1e-5)
    assert p.B == pytest.approx(EPOCH.B, rel=1e-5)


def test_approach3_recovers_epoch_refit_from_noisy_isoflops(fit3):
    p = fit3.params
    assert fit3.converged and fit3.n_starts == 4500 and fit3.n_near_best > 10
    assert p.alpha == pytest.approx(EPOCH.alpha, abs=0.015)
    assert p.beta == pytest.approx(EPOCH.beta, abs=0.015)
    assert p.E == pytest.approx(EPOCH.E, abs=0.03)
    assert p.a == pytest.approx(TRUE_A, abs=0.01)
    assert p.a + p.b == pytest.approx(1.0)


def test_batched_optimiser_agrees_with_scipy_from_every_start(runs):
    starts = chinchilla_starts()[::150]                     # 30 starts keep the scipy reference quick
    ref = fit_approach3(*runs, starts=starts, method="scipy")
    fast = fit_approach3(*runs, starts=starts)
    assert ref.converged and fast.converged
    assert fast.objective == pytest.approx(ref.objective, rel=1e-9)
    np.testing.assert_allclose(LossParams.vector(fast.params), LossParams.vector(ref.params), rtol=1e-5)


def test_approach3_needs_six_runs():
    n, d = isoflop_grid(1, 5)
    with pytest.raises(FitError, match="at least 6"):
        fit_approach3(n, d, EPOCH.loss(n, d))


# ----------------------------------------------------------------------------- approaches 1 and 2


def test_approach2_recovers_a(runs):
    res = fit_approach2(*runs)
    assert len(res.profiles) == 8 and all(p.used for p in res.profiles)
    assert res.a == pytest.approx(TRUE_A, abs=0.015)
    assert res.a + res.b == pytest.approx(1.0)
    # Each vertex sits near the true compute-optimal N of its budget.
    for p in res.profiles:
        assert p.n_opt == pytest.approx(EPOCH.n_opt(p.budget), rel=0.3)


def test_approach2_skips_budgets_with_too_few_sizes():
    n, d = isoflop_grid(3, 6)
    n, d = n[:-4], d[:-4]                                  # the last budget keeps 2 sizes
    res = fit_approach2(n, d, EPOCH.loss(n, d))
    assert len(res.profiles) == 2 and len(res.skipped) == 1
    with pytest.raises(FitError):
        fit_approach2(n[:8], d[:8], EPOCH.loss(n[:8], d[:8]))


def test_group_budgets_tolerates_rounding():
    c = np.array([1e18, 1.001e18, 0.999e18, 3e18, 3.0003e18])
    assert group_budgets(c).tolist() == [0, 0, 0, 1, 1]


def test_approach1_frontier_of_training_curves():
    rng = np.random.default_rng(0)
    curves = []
    for n in np.geomspace(3e7, 3e9, 16):
        t = np.geomspace(1e8, 2e11, 200)
        curves.append(Curve(n, t, EPOCH.loss(n, t) * np.exp(rng.normal(0, 0.003, t.size))))
    res = fit_approach1(curves)
    assert res.source == "curves"
    assert res.a == pytest.approx(TRUE_A, abs=0.03)
    np.testing.assert_allclose(res.frontier_d * res.frontier_n * 6, res.flops, rtol=1e-12)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_contain_the_truth(runs, fit3):
    boot = bootstrap(*runs, n_resamples=40, seed=0, base=fit3)
    assert boot.n_ok3 == 40 and boot.n_ok2 >= 35
    for name in ("E", "alpha", "beta", "a", "b"):
        iv = boot.approach3[name]
        assert iv.low < iv.high
        assert iv.contains(getattr(EPOCH, name)), (name, iv)
    assert boot.approach2["a"].contains(TRUE_A)
    # Approach 1 on final losses picks the best trained size per budget: coarse, but its interval is its own.
    assert boot.n_ok1 >= 35 and boot.approach1["a"].contains(boot.approach1["a"].estimate)
    # Honest: BCa ends are quantiles of the draws, each interval holds its estimate, and none is degenerate.
    draws = boot.samples["approach3.alpha"]
    iv = boot.approach3["alpha"]
    assert iv.method == "percentile" and iv.estimate == fit3.params.alpha
    assert np.min(draws) <= iv.low < iv.estimate < iv.high <= np.max(draws)
    assert np.std(draws) > 1e-3


# ----------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard")
    add_fit_command(parser.add_subparsers(dest="command"))
    return parser


def _write_csv(path, header: str, rows) -> str:
    path.write_text(header + "\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n")
    return str(path)


def test_fit_command_writes_reports_and_prints_json_last(tmp_path, capsys):
    n, d, loss = noisy_runs(n_budgets=5, sizes=8)          # fewer runs: this fit runs the full grid again
    table = _write_csv(tmp_path / "runs.csv", "params,tokens,final_loss", zip(n, d, loss))
    out = tmp_path / "report"
    args = _parser().parse_args(["fit", table, "--out", str(out), "--json", "--bootstrap", "12", "--seed", "2"])
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    a3 = data["approach3"]
    assert a3["converged"] and a3["n_starts"] == 4500 and a3["alpha"] == pytest.approx(EPOCH.alpha, abs=0.05)
    assert set(data["bootstrap"]["approach3"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert data["approach2"]["a"] == pytest.approx(TRUE_A, abs=0.05)
    assert data["approach1"]["source"] == "final"
    assert data["columns"] == {"n": "params", "d": "tokens", "loss": "final_loss"}
    assert json.loads((out / "fit.json").read_text())["approach3"] == a3
    md = (out / "fit.md").read_text()
    assert repr(a3["alpha"]) in md                          # unrounded in the markdown too
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_table_derives_tokens_from_compute(tmp_path, runs):
    n, d, loss = runs
    table = _write_csv(tmp_path / "c.csv", "N,C,loss", zip(n, 6 * n * d, loss))
    t = load_table(table)
    np.testing.assert_allclose(t.d, d, rtol=1e-12)
    assert t.columns == {"n": "N", "c": "C", "loss": "loss"} and any("C / (6 * N)" in s for s in t.notes)


def test_load_table_reads_a_sweep_directory_with_curves(tmp_path):
    from scaling.table import append_row, make_row

    rng = np.random.default_rng(1)
    for i, n in enumerate(np.geomspace(1e5, 1e6, 6)):
        tokens = np.arange(1, 41) * 50_000 * (i + 1)
        curve = tmp_path / f"r{i}.jsonl"
        curve.write_text("".join(json.dumps({"step": s, "tokens": int(t), "loss": float(EPOCH.loss(n, t))}) + "\n"
                                 for s, t in enumerate(tokens)) + json.dumps({"step": 40, "eval_loss": 3.0}) + "\n")
        append_row(str(tmp_path / "sweep"), make_row(
            run_id=f"r{i}", family="llama", n_params=int(n), n_params_non_embedding=int(n * 0.8),
            tokens=int(tokens[-1]), attention_flops_per_token=1e4, final_loss=float(rng.uniform(3, 4)),
            held_out_loss=float(EPOCH.loss(n, tokens[-1])), curve_path=str(curve), spec_hash="x"))
    t = load_table(str(tmp_path / "sweep"))
    assert t.columns["loss"] == "held_out_loss" and t.columns["n"] == "n_params"
    assert t.curves is not None and len(t.curves) == 6 and t.curves[0].tokens.size == 40


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("params,tokens,accuracy\n1,2,3\n", "no loss column"),
    ("tokens,loss\n1,2\n", "no model-size column"),
    ("params,loss\n1,2\n", "no tokens or compute column"),
    ("params,tokens,loss\n" + "".join(f"{10 ** i},{10 ** (i + 1)},3.0\n" for i in range(1, 6)), "need at least 6"),
    ("params,tokens,loss\n" + "x,1,2\n" * 7, "not numeric"),
])
def test_bad_tables_are_usage_errors(tmp_path, content, needle):
    path = tmp_path / "t.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=needle) as err:
        load_table(str(path))
    assert "\n" not in str(err.value)
    args = _parser().parse_args(["fit", str(path), "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError):
        args.func(args)
    assert not (tmp_path / "o").exists()                   # nothing half-written


def test_bootstrap_of_one_is_refused(tmp_path, runs):
    table = _write_csv(tmp_path / "runs.csv", "n,d,loss", zip(*runs))
    args = _parser().parse_args(["fit", table, "--bootstrap", "1"])
    with pytest.raises(UsageError, match="--bootstrap"):
        args.func(args)
