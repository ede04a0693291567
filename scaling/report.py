"""`switchyard fit`: read a results table (``scaling.fit_table``), run the three Chinchilla fits, write the report.

Outputs, in ``--out`` (any fsspec URI): ``fit.json`` and ``fit.md`` with every
parameter unrounded, intervals for every parameter and exponent of all three
approaches, approach 3's status (converged, boundary, not converged), the
run-to-run noise of repeated points, a closing line on whether the
approaches' intervals for a overlap, and three PNG plots: IsoFLOP profiles with their
parabolas, loss against compute with the frontier, and N_opt(C) with the runs.

The command's arguments and handler (``add_fit_command``, ``fit_command``) are
in ``scaling/fit_command.py``, so that building the CLI's parser does not import
scipy; both are importable from here.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from specs.errors import UsageError
from scaling.approach3 import Approach3Result, fit_approach3
from scaling.bootstrap import BootstrapResult, bootstrap, consistency
from scaling.fit import Approach1Result, Approach2Result, Curve, FitError, fit_approach1, fit_approach2, group_budgets
from scaling.fit_command import add_fit_command, fit_command  # noqa: F401  (re-exported)
from scaling.fit_table import FitTable

PLOTS = ("isoflops.png", "loss_vs_compute.png", "n_opt.png")


@dataclass(frozen=True)
class FitReport:
    table: FitTable
    """The input."""
    approach1: Approach1Result | None
    """Frontier fit, or None with approach1_skipped saying why."""
    approach1_skipped: str
    approach2: Approach2Result | None
    """IsoFLOP fit, or None with approach2_skipped saying why."""
    approach2_skipped: str
    approach3: Approach3Result
    """Parametric fit."""
    bootstrap: BootstrapResult | None
    """Intervals, or None when --bootstrap 0."""
    timing_s: dict[str, float]
    """Wall seconds per stage."""
    noise: dict[str, float] | None = None
    """Run-to-run noise measured on repeated points (``repeat_noise``), if the table has any."""

    def a_consistency(self) -> tuple[bool | None, str]:
        """Whether the approaches' intervals for a overlap, with the line the report ends on."""
        b = self.bootstrap
        if b is None:
            return None, "no bootstrap (--bootstrap 0): the approaches' exponents cannot be compared"
        return consistency({"1": b.approach1.get("a") if self.approach1 is not None else None,
                            "2": b.approach2.get("a") if self.approach2 is not None else None,
                            "3": b.approach3.get("a")})


# ----------------------------------------------------------------------------- fitting


def run_fits(table: FitTable, *, n_bootstrap: int = 100, seed: int = 0, starts: np.ndarray | None = None,
             level: float = 0.95) -> FitReport:
    """All three approaches and the bootstrap on one table (``starts``: approach 3's grid, default Chinchilla's)."""
    timing = {}
    t0 = time.perf_counter()
    a1, a1_skip = None, ""
    curves = table.curves or tuple(Curve(float(n), np.array([d]), np.array([y]), r)
                                   for n, d, y, r in zip(table.n, table.d, table.loss, table.run_id))
    try:
        a1 = fit_approach1(curves)
    except FitError as err:
        a1_skip = str(err)
    a2, a2_skip = None, ""
    try:
        a2 = fit_approach2(table.n, table.d, table.loss)
    except FitError as err:
        a2_skip = str(err)
    timing["approaches_1_2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        a3 = fit_approach3(table.n, table.d, table.loss, starts=starts)
    except FitError as err:
        raise UsageError(f"fit: {table.source}: {err}") from None
    timing["approach3"] = time.perf_counter() - t0
    boot = None
    if n_bootstrap:
        t0 = time.perf_counter()
        boot = bootstrap(table.n, table.d, table.loss, n_resamples=n_bootstrap, seed=seed, base=a3,
                         curves=curves, level=level)
        timing["bootstrap"] = time.perf_counter() - t0
    return FitReport(table, a1, a1_skip, a2, a2_skip, a3, boot, timing, repeat_noise(table))


def repeat_noise(table: FitTable, rtol: float = 1e-3) -> dict[str, float] | None:
    """Run-to-run noise from repeated points (same N and D, e.g. a sweep's ``repeats``), or None.

    The pooled standard deviation of log loss within groups of repeats: the
    noise floor any fit's residuals should be compared with.
    """
    key = np.stack([group_budgets(table.n, rtol), group_budgets(table.d, rtol)], axis=1)
    _, group = np.unique(key, axis=0, return_inverse=True)
    group = np.asarray(group).ravel()
    log_loss = np.log(table.loss)
    ss, dof, points = 0.0, 0, 0
    for g in np.unique(group):
        vals = log_loss[group == g]
        if vals.size >= 2:
            ss += float(np.sum((vals - vals.mean()) ** 2))
            dof += vals.size - 1
            points += 1
    if dof == 0:
        return None
    return {"repeated_points": points, "runs": int(dof + points), "sd_log_loss": math.sqrt(ss / dof)}


# ----------------------------------------------------------------------------- the report as data


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null (json would write invalid NaN)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _residual_sd(rep: FitReport) -> float:
    """Standard deviation of log(loss) about approach 3's law: compare with the repeat noise."""
    t = rep.table
    r = np.log(t.loss) - np.log(rep.approach3.params.loss(t.n, t.d))
    return float(np.sqrt(np.mean(r * r)))


def report_dict(rep: FitReport) -> dict[str, Any]:
    """Everything the JSON report holds; floats unrounded."""
    t = rep.table
    b = rep.bootstrap
    ivs = lambda group: {k: v.to_dict() for k, v in getattr(b, group).items()} if b is not None else {}  # noqa: E731
    out: dict[str, Any] = {"table": t.source, "n_runs": int(t.n.size), "columns": t.columns, "notes": list(t.notes)}
    if rep.approach1 is not None:
        a1 = rep.approach1
        out["approach1"] = {"a": a1.a, "b": a1.b, "n_opt": a1.n_opt.to_dict(), "d_opt": a1.d_opt.to_dict(),
                            "source": a1.source, "frontier_points": int(a1.flops.size),
                            "intervals": ivs("approach1")}
    else:
        out["approach1"] = {"skipped": rep.approach1_skipped}
    if rep.approach2 is not None:
        a2 = rep.approach2
        out["approach2"] = {
            "a": a2.a, "b": a2.b, "n_opt": a2.n_opt.to_dict(), "d_opt": a2.d_opt.to_dict(),
            "budgets": [{"C": p.budget, "n_opt": p.n_opt, "d_opt": p.d_opt, "loss_opt": p.loss_opt,
                         "n_runs": int(p.n.size), "coeffs_ln_n": list(p.coeffs), "used": p.used, "reason": p.reason}
                        for p in a2.profiles],
            "skipped": list(a2.skipped), "intervals": ivs("approach2")}
    else:
        out["approach2"] = {"skipped": rep.approach2_skipped}
    a3 = rep.approach3
    out["approach3"] = {**a3.params.to_dict(), "objective": a3.objective, "status": a3.status,
                        "converged": a3.converged, "boundary": list(a3.boundary),
                        "optimizer_converged": a3.optimizer_converged,
                        "message": a3.message, "n_starts": a3.n_starts, "n_converged_starts": a3.n_converged,
                        "n_near_best": a3.n_near_best, "huber_delta": a3.delta, "start": list(a3.start),
                        "residual_sd_log_loss": _residual_sd(rep), "intervals": ivs("approach3")}
    if b is not None:
        out["bootstrap"] = {"n_resamples": b.n_resamples, "level": b.level, "seed": b.seed, "note": b.note,
                            "n_ok_approach1": b.n_ok1, "n_ok_approach2": b.n_ok2,
                            "n_ok_approach3": b.n_ok3, "n_unconverged_approach3": b.n_unconverged3,
                            "n_boundary_approach3": b.n_boundary3,
                            "approach1": ivs("approach1"), "approach2": ivs("approach2"), "approach3": ivs("approach3")}
    else:
        out["bootstrap"] = None
    verdict, line = rep.a_consistency()
    out["consistency"] = {"a_intervals_overlap": verdict, "line": line}
    out["noise"] = rep.noise
    out["timing_s"] = rep.timing_s
    return _clean(out)


def _interval_text(rep: FitReport, group: str, name: str) -> str:
    b = rep.bootstrap
    iv = None if b is None else getattr(b, group).get(name)
    if iv is None:
        return "" if b is None else "too few refits"
    return f"[{iv.low!r}, {iv.high!r}]" + (" (widened to the estimate)" if iv.widened else "")


def render_markdown(rep: FitReport) -> str:
    """The Markdown report: parameters unrounded, intervals, the IsoFLOP table, the plots, and the consistency line."""
    t, a3 = rep.table, rep.approach3
    level = f"{100 * rep.bootstrap.level:g}%" if rep.bootstrap else "-"
    lines = [f"# Scaling-law fit: {t.source}", "",
             f"{t.n.size} runs; N from `{t.columns['n']}`, D from `{t.columns.get('d', t.columns.get('c'))}`"
             f"{' (D = C / 6N)' if 'c' in t.columns else ''}, loss from `{t.columns['loss']}`.", ""]
    lines += [f"- {note}" for note in t.notes] + ([""] if t.notes else [])
    if a3.boundary:
        verdict = f"**boundary solution**: {'; '.join(a3.boundary)} (the data do not pin it down; not converged)"
    else:
        verdict = f"converged (scipy L-BFGS-B): **{a3.converged}** ({a3.message})"
    lines += ["## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
              f"Huber loss (delta {a3.delta!r}) on log loss, summed over runs; L-BFGS from {a3.n_starts} starts, "
              f"{a3.n_converged} converged, {a3.n_near_best} reached the best objective. "
              f"Status: {verdict}. Objective {a3.objective!r}; residual SD of log loss {_residual_sd(rep)!r}.", "",
              f"| parameter | value | {level} bootstrap interval |", "|---|---|---|"]
    for name, value in a3.params.to_dict().items():
        if name.startswith("log_"):
            continue
        lines.append(f"| {name} | {value!r} | {_interval_text(rep, 'approach3', name)} |")
    lines += ["", "## Compute-optimal exponents: N_opt ~ C^a, D_opt ~ C^b", "",
              f"| approach | a | {level} interval | b | {level} interval |", "|---|---|---|---|---|"]
    if rep.approach1 is not None:
        lines.append(f"| 1 (frontier of {rep.approach1.source}) | {rep.approach1.a!r} | "
                     f"{_interval_text(rep, 'approach1', 'a')} | {rep.approach1.b!r} | "
                     f"{_interval_text(rep, 'approach1', 'b')} |")
    else:
        lines.append(f"| 1 | skipped: {rep.approach1_skipped} | | | |")
    if rep.approach2 is not None:
        lines.append(f"| 2 (IsoFLOP) | {rep.approach2.a!r} | {_interval_text(rep, 'approach2', 'a')} | "
                     f"{rep.approach2.b!r} | {_interval_text(rep, 'approach2', 'b')} |")
    else:
        lines.append(f"| 2 | skipped: {rep.approach2_skipped} | | | |")
    lines.append(f"| 3 (parametric{', boundary' if a3.boundary else ''}) | {a3.params.a!r} | "
                 f"{_interval_text(rep, 'approach3', 'a')} | {a3.params.b!r} | {_interval_text(rep, 'approach3', 'b')} |")
    lines += ["", f"Approach 3: N_opt(C) = G (C/6)^a with G = {a3.params.G!r}; D_opt(C) = (C/6)^b / G.", ""]
    if rep.approach2 is not None:
        lines += ["## IsoFLOP profiles", "",
                  "Only budgets whose parabola has its minimum inside the sizes trained enter approach 2.", "",
                  "| C | runs | N_opt | D_opt | loss at N_opt | used |", "|---|---|---|---|---|---|"]
        for p in rep.approach2.profiles:
            used = "yes" if p.used else f"no: {p.reason}"
            lines.append(f"| {p.budget!r} | {p.n.size} | {p.n_opt!r} | {p.d_opt!r} | {p.loss_opt!r} | {used} |")
        lines += [f"- skipped {s}" for s in rep.approach2.skipped]
        lines.append("")
    if rep.noise is not None:
        lines += [f"Run-to-run noise from {rep.noise['repeated_points']} repeated points ({rep.noise['runs']} runs): "
                  f"SD of log loss {rep.noise['sd_log_loss']!r} (approach 3's residual SD: {_residual_sd(rep)!r}).", ""]
    if rep.bootstrap is not None:
        b = rep.bootstrap
        lines += ["## Bootstrap", "",
                  f"{b.n_resamples} resamples (seed {b.seed}), {100 * b.level:g}% intervals: {b.note}. Approach 1 "
                  f"refitted {b.n_ok1} times, approach 2 {b.n_ok2} times, approach 3 {b.n_ok3} times "
                  f"({b.n_unconverged3} not converged and {b.n_boundary3} on a bound, kept). Every interval contains "
                  "its point estimate; one widened to reach it says so.", ""]
    lines += ["## Plots", "", "![IsoFLOP profiles](isoflops.png)", "", "![Loss against compute](loss_vs_compute.png)",
              "", "![N_opt against compute](n_opt.png)", ""]
    lines += ["## Consistency", "", f"Exponent a: {rep.a_consistency()[1]}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _compute_grid(t) -> np.ndarray:
    """C values spanning the table's budgets with a margin, for the fitted lines."""
    return np.geomspace(t.c.min() / 1.5, t.c.max() * 1.5, 100)


def _against_compute(fig, ax, ylabel: str) -> bytes:
    """Finish a plot whose x axis is compute: log scale, labels, legend; PNG bytes."""
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_isoflops(rep: FitReport) -> bytes:
    """Final loss against N per budget, with each budget's fitted parabola and its vertex."""
    fig, ax = _figure()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    profiles = rep.approach2.profiles if rep.approach2 is not None else ()
    if profiles:
        for i, p in enumerate(profiles):
            color = cmap(i / max(1, len(profiles) - 1))
            ax.scatter(p.n, p.loss, color=color, s=18,
                       label=f"C={p.budget:.3g}" + ("" if p.used else " (vertex outside: not used)"))
            grid = np.geomspace(p.n.min() / 1.2, p.n.max() * 1.2, 100)
            ax.plot(grid, p.predict(grid), color=color, lw=1, ls="-" if p.used else ":")
            ax.scatter([p.n_opt], [p.loss_opt], color=color, marker="*", s=120 if p.used else 60,
                       edgecolors="black", linewidths=0.6, zorder=3)
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.scatter(rep.table.n, rep.table.loss, s=12, color="grey")
        ax.set_title(f"no IsoFLOP parabolas: {rep.approach2_skipped}", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    if profiles:
        ax.set_title("IsoFLOP profiles (stars: parabola vertices)")
    return _png(fig)


def plot_loss_vs_compute(rep: FitReport) -> bytes:
    """Every run's final loss against C, the approach-1 frontier and approach 3's compute-optimal loss."""
    fig, ax = _figure()
    t = rep.table
    sc = ax.scatter(t.c, t.loss, c=np.log10(t.n), s=14, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 N")
    if rep.approach1 is not None:
        order = np.argsort(rep.approach1.flops)
        ax.plot(rep.approach1.flops[order], rep.approach1.frontier_loss[order], color="black", lw=1.2,
                label=f"frontier ({rep.approach1.source})")
    c = _compute_grid(t)
    p = rep.approach3.params
    ax.plot(c, p.loss(p.n_opt(c), p.d_opt(c)), color="tab:red", lw=1.2, ls="--",
            label="approach 3: L(N_opt, D_opt)")
    return _against_compute(fig, ax, "final loss")


def plot_n_opt(rep: FitReport) -> bytes:
    """The runs in (C, N), the IsoFLOP vertices and the fitted N_opt(C) lines of all approaches."""
    fig, ax = _figure()
    t = rep.table
    ax.scatter(t.c, t.n, s=10, color="lightgrey", label="runs")
    c = _compute_grid(t)
    if rep.approach1 is not None:
        a1 = rep.approach1
        ax.scatter(a1.flops, a1.frontier_n, s=6, color="tab:blue", alpha=0.5)
        ax.plot(c, a1.n_opt(c), color="tab:blue", label=f"approach 1: a={a1.a:.3f}")
    if rep.approach2 is not None:
        a2 = rep.approach2
        used = [p for p in a2.profiles if p.used]
        ax.scatter([p.budget for p in used], [p.n_opt for p in used], marker="*", s=80, color="tab:green")
        ax.plot(c, a2.n_opt(c), color="tab:green", label=f"approach 2: a={a2.a:.3f}")
    p = rep.approach3.params
    ax.plot(c, p.n_opt(c), color="tab:red", ls="--", label=f"approach 3: a={p.a:.3f}")
    ax.set_yscale("log")
    return _against_compute(fig, ax, "compute-optimal N")


# ----------------------------------------------------------------------------- writing and the command


def default_out_dir(path: str) -> str:
    """<sweep_dir>/fit for a directory, <dir>/<stem>_fit beside a table file."""
    fs, p = fsspec.core.url_to_fs(path)
    if fs.isdir(p):
        return posixpath.join(path.rstrip("/"), "fit")
    stem, _ = posixpath.splitext(path.rstrip("/"))
    return f"{stem}_fit"


def write_report(rep: FitReport, out_dir: str) -> dict[str, Any]:
    """Write fit.json, fit.md and the three plots under out_dir; return the report dict (with 'outputs')."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    join = lambda name: posixpath.join(out_dir.rstrip("/"), name)  # noqa: E731
    plots = {"isoflops.png": plot_isoflops(rep), "loss_vs_compute.png": plot_loss_vs_compute(rep),
             "n_opt.png": plot_n_opt(rep)}
    data = report_dict(rep)
    data["outputs"] = {"json": join("fit.json"), "markdown": join("fit.md"), "plots": [join(n) for n in PLOTS]}
    for name, png in plots.items():
        with fsspec.open(join(name), "wb") as f:
            f.write(png)
    with fsspec.open(join("fit.md"), "w") as f:
        f.write(render_markdown(rep))
    with fsspec.open(join("fit.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return data


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The fit in a few lines, from the report dict (so a fit.json fetched from the API prints the same)."""
    a3 = data["approach3"]
    out = [f"approach 3: E={a3['E']!r} A={a3['A']!r} B={a3['B']!r} alpha={a3['alpha']!r} beta={a3['beta']!r} "
           f"({a3['status']}{': ' + '; '.join(a3['boundary']) if a3['boundary'] else ''})"]
    for label, key in (("approach 1", "approach1"), ("approach 2", "approach2")):
        res = data[key]
        out.append(f"{label}: a={res['a']!r} b={res['b']!r}" if "a" in res else f"{label}: skipped ({res['skipped']})")
    out.append(f"approach 3: a={a3['a']!r} b={a3['b']!r} G={a3['G']!r}")
    out.append(f"a: {data['consistency']['line']}")
    return out
