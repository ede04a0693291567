"""How long Chinchilla approach 3 takes with the full 4500-start grid on ~300 runs, against scipy.

Runs come from Epoch AI's refit (E 1.8172, A 482.01, B 2085.43, alpha 0.3478,
beta 0.3658) on 10 IsoFLOP budgets x 30 sizes with 0.5% noise. Prints a few
lines, then one JSON object on the last line: wall and CPU seconds of the
full-grid fit, of a bootstrap, and of scipy's L-BFGS-B (the reference
optimiser, Epoch AI's and ours for the polish) run from ``--scipy K`` evenly
spaced starts of the grid, scaled to the whole grid: the baseline, measured
in the same run.

Targets, all in ``met``: the full-grid fit converges; its CPU time is at most
MAX_FIT_RATIO x scipy's over the grid; the bootstrap of N resamples
(approaches 1-3 refitted) costs at most MAX_BOOTSTRAP_RATIO x N full-grid
fits. CPU seconds, not wall: on a shared machine wall time measures the
neighbours. BLAS runs one thread (OPENBLAS_NUM_THREADS=1 unless set, and
scipy's calls inside threadpoolctl's limit): scipy issue #22438, its
L-BFGS-B slows down many times while OpenBLAS's thread pool is awake.

Run: ``.venv/bin/python benchmarks/fit_speed.py [--points-per-budget 30] [--bootstrap 100] [--scipy 100]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS

import numpy as np  # noqa: E402

from scaling.approach3 import LossParams, chinchilla_starts, fit_approach3  # noqa: E402
from scaling.bootstrap import bootstrap  # noqa: E402

EPOCH = LossParams(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
MAX_FIT_RATIO = 0.25
"""The batched fit's CPU over scipy's from every start of the grid (0.20 measured on main, 2026-12-07)."""
MAX_BOOTSTRAP_RATIO = 0.02
"""The bootstrap's CPU over that many full-grid fits (0.005 measured on main, 2026-12-07)."""


def runs(n_budgets: int, per_budget: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d = [], []
    for c in np.geomspace(6e18, 3e21, n_budgets):
        ns = np.sqrt(c / 120) * np.geomspace(0.25, 4.0, per_budget)
        n += list(ns)
        d += list(c / (6 * ns))
    n, d = np.array(n), np.array(d)
    return n, d, EPOCH.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, sigma, n.size))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, default=10)
    ap.add_argument("--points-per-budget", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=100, help="resamples to time (0 = skip)")
    ap.add_argument("--scipy", type=int, default=100, metavar="K",
                    help="the baseline: scipy L-BFGS-B from K evenly spaced grid starts, scaled to the grid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.scipy < 1:
        ap.error("--scipy K: the baseline needs at least 1 start")

    n, d, loss = runs(args.budgets, args.points_per_budget, 0.005, args.seed)
    fit_approach3(n[:20], d[:20], loss[:20], starts=chinchilla_starts()[:10])        # warm imports and caches
    res, wall, cpu = timed(lambda: fit_approach3(n, d, loss))
    p = res.params
    print(f"approach 3, {res.n_starts} starts on {n.size} runs: {wall:.2f} s wall, {cpu:.2f} s CPU; "
          f"converged={res.converged}, {res.n_converged} starts converged, {res.n_near_best} at the best")
    print(f"  E={p.E!r} A={p.A!r} B={p.B!r} alpha={p.alpha!r} beta={p.beta!r}")
    out = {"points": int(n.size), "starts": res.n_starts, "fit_wall_s": wall, "fit_cpu_s": cpu,
           "converged": res.converged, "n_converged_starts": res.n_converged, "n_near_best": res.n_near_best,
           "params": {"E": p.E, "A": p.A, "B": p.B, "alpha": p.alpha, "beta": p.beta, "a": p.a, "b": p.b}}
    met = res.converged
    if args.bootstrap:
        _, bwall, bcpu = timed(lambda: bootstrap(n, d, loss, n_resamples=args.bootstrap, base=res))
        boot_ratio = bcpu / (args.bootstrap * cpu)
        print(f"bootstrap, {args.bootstrap} resamples: {bwall:.2f} s wall, {bcpu:.2f} s CPU "
              f"({boot_ratio:.4f} of {args.bootstrap} full-grid fits; target <= {MAX_BOOTSTRAP_RATIO})")
        out.update(bootstrap_resamples=args.bootstrap, bootstrap_wall_s=bwall, bootstrap_cpu_s=bcpu,
                   bootstrap_ratio=boot_ratio)
        met = met and boot_ratio <= MAX_BOOTSTRAP_RATIO
    starts = chinchilla_starts()[:: max(1, 4500 // args.scipy)]
    _, swall, scpu = timed(lambda: fit_approach3(n, d, loss, starts=starts, method="scipy"))
    scale = res.n_starts / len(starts)
    ratio = cpu / (scpu * scale)
    print(f"scipy L-BFGS-B from {len(starts)} starts: {scpu:.2f} s CPU; x{scale:.0f} for the grid ~ "
          f"{scpu * scale:.1f} s: the batched fit takes {ratio:.3f} of it (target <= {MAX_FIT_RATIO})")
    out.update(scipy_starts=len(starts), scipy_wall_s=swall, scipy_cpu_s=scpu,
               scipy_full_grid_cpu_s=scpu * scale, fit_ratio=ratio,
               openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"))
    met = met and ratio <= MAX_FIT_RATIO
    out.update(met=bool(met), targets={"fit_ratio": MAX_FIT_RATIO, "bootstrap_ratio": MAX_BOOTSTRAP_RATIO,
                                       "converged": True})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
