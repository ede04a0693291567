"""Scaling-law fits the way the Chinchilla paper does them, in numpy and scipy: the shared pieces and
approaches 1 and 2.

Three approaches estimate how the compute-optimal model size N_opt and token
count D_opt grow with the training compute C = 6 N D (N counts all
parameters):

* Approach 1 (training-curve envelope): every run's loss curve is mapped onto
  FLOPs (6 N tokens_seen); at each FLOP value on a log grid the run with the
  lowest smoothed loss is the frontier; power laws N_opt = k C^a and
  D_opt = k' C^b are fitted through the frontier in log space.
* Approach 2 (IsoFLOP profiles): runs sharing a budget C lie on a parabola of
  final loss against ln N; its vertex is N_opt(C), D_opt = C / (6 N_opt).
  Power laws through the vertices give a and b.
* Approach 3 (parametric, ``scaling.approach3``): L(N, D) = E + A / N^alpha +
  B / D^beta, fitted to log loss with a summed Huber loss from Chinchilla's
  grid of starts.

Epoch AI's replication found Chinchilla's optimiser stopped early and its
intervals were implausibly narrow, so approach 3 checks convergence and never
rounds a parameter, and the intervals come from a bootstrap that redraws runs
within each budget and refits all three approaches (``scaling.bootstrap``).
Degenerate tables (``point_problem``) and budgets with no usable vertex are
refused or skipped with one line, never a traceback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class FitError(ValueError):
    """The data cannot support a fit: too few points, budgets or sizes."""


# ----------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * C^exponent, fitted as a line in log-log space."""

    exponent: float
    coefficient: float

    def __call__(self, c: np.ndarray | float) -> np.ndarray:
        return self.coefficient * np.asarray(c, dtype=float) ** self.exponent

    def to_dict(self) -> dict:
        return {"exponent": self.exponent, "coefficient": self.coefficient}


def fit_power_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least squares of ln y on ln C."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    if c.size < 2 or np.unique(c).size < 2:
        raise FitError("a power law needs points at two or more compute values")
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(float(slope), float(math.exp(intercept)))


def group_budgets(c: np.ndarray, rtol: float = 0.05) -> np.ndarray:
    """Integer budget labels (0 = smallest): C values within rtol of their neighbour share one.

    Planned runs hit their budget only to the rounding of D (and trainers
    round to whole steps), so budgets are matched with a tolerance.
    """
    c = np.asarray(c, float)
    order = np.argsort(c)
    gaps = np.diff(np.log(c[order])) > math.log1p(rtol)
    labels = np.empty(c.size, dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(gaps)])
    return labels


MAX_COUNT = 1e30
"""Largest N or D accepted (10^30 parameters or tokens): beyond it 6ND and N^alpha leave float range."""


def point_problem(n: np.ndarray, d: np.ndarray, loss: np.ndarray, labels: Sequence[str] | None = None) -> str | None:
    """One line naming what makes these runs unusable for a fit, or None if they are fine.

    Refused: non-finite values, N or D below 1 or above MAX_COUNT, non-positive
    loss, and tables with fewer than two distinct N or two distinct D (no law
    in N and D can be fitted to them). ``labels`` name the rows in the
    message (default: "row 0", "row 1", ...).
    """
    if not (n.size == d.size == loss.size):
        return f"N, D and loss must have the same length, got {n.size}, {d.size}, {loss.size}"
    if n.size == 0:
        return "no runs"
    checks = (
        (~(np.isfinite(n) & np.isfinite(d) & np.isfinite(loss)), "a non-finite N, D or loss"),
        ((n < 1) | (d < 1), "N or D below 1 (counts of parameters and tokens)"),
        ((n > MAX_COUNT) | (d > MAX_COUNT), f"N or D above {MAX_COUNT:g} (out of range for 6ND and N^alpha)"),
        (~(loss > 0), "a non-positive loss"),
    )
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            label = labels[i] if labels is not None else f"row {i}"
            return (f"{int(bad.sum())} runs have {what}; first is {label} "
                    f"(N={float(n[i])!r}, D={float(d[i])!r}, loss={float(loss[i])!r})")
    for values, name in ((n, "N"), (d, "D")):
        distinct = np.unique(values)
        if distinct.size < 2:
            return (f"all {values.size} runs have the same {name} ({float(distinct[0])!r}); a scaling law needs at least "
                    f"two distinct values of N and of D")
    return None


def check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
    problem = point_problem(n, d, loss)
    if problem is not None:
        raise FitError(problem)
    return n, d, loss


# ----------------------------------------------------------------------------- approach 1


@dataclass(frozen=True)
class Curve:
    """One run's training curve: loss after each number of tokens seen."""

    n_params: float
    """Total parameters N of the run's model."""
    tokens: np.ndarray
    """Tokens seen at each logged step, increasing."""
    loss: np.ndarray
    """Training loss at those steps."""
    run_id: str = ""
    """Name of the run, for reports."""


class _OptimumExponents:
    """``a`` and ``b`` of N_opt ~ C^a and D_opt ~ C^b, read off the fitted ``n_opt`` and ``d_opt`` power laws."""

    n_opt: PowerLaw
    d_opt: PowerLaw

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent


@dataclass(frozen=True)
class Approach1Result(_OptimumExponents):
    flops: np.ndarray
    """FLOP grid where the frontier was found (C = 6 N tokens)."""
    frontier_loss: np.ndarray
    """Lowest smoothed loss over all runs at each grid FLOP value."""
    frontier_n: np.ndarray
    """N of the run that gives the frontier at each grid value."""
    frontier_d: np.ndarray
    """Tokens at that point: C / (6 N)."""
    n_opt: PowerLaw
    """N_opt(C) fitted through the frontier."""
    d_opt: PowerLaw
    """D_opt(C) fitted through the frontier."""
    source: str
    """'curves' (training curves) or 'final' (one final point per run)."""


def smooth(loss: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends so no point is dropped."""
    loss = np.asarray(loss, float)
    if window <= 1 or loss.size < 3:
        return loss.copy()
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(loss)])
    idx = np.arange(loss.size)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, loss.size)
    return (csum[hi] - csum[lo]) / (hi - lo)


def fit_approach1(curves: Sequence[Curve], n_grid: int = 60, window: int = 5, rtol: float = 0.05,
                  interior_only: bool = True) -> Approach1Result:
    """Frontier of the smoothed training curves on a log FLOP grid, then power laws through it.

    A grid value counts only where two or more runs have curves covering it,
    so that "the lowest loss" is a choice; with ``interior_only`` the winner
    must also be neither the smallest nor the largest model covering it (else
    the true optimum may lie outside the sizes trained, which biases the
    exponent at the ends of the grid). With one point per run (final losses
    only) the grid is the set of budgets, grouped with ``rtol``.
    Caveat from Chinchilla: a cosine schedule's mid-run loss is worse than that
    of a run trained to that length, which biases N_opt low; the frontier is
    only as good as the curves.
    """
    prepared = []
    for cv in curves:
        t, y = np.asarray(cv.tokens, float), np.asarray(cv.loss, float)
        keep = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > 0)
        t, y = t[keep], y[keep]
        if t.size == 0:
            continue
        order = np.argsort(t, kind="stable")
        t, y = t[order], smooth(y[order], window)
        prepared.append((float(cv.n_params), np.log(6.0 * cv.n_params * t), y))
    if len(prepared) < 2:
        raise FitError("approach 1 needs curves from at least two runs")
    sizes = np.array([p[0] for p in prepared])

    if all(logc.size == 1 for _, logc, _ in prepared):
        source = "final"
        log_c = np.array([logc[0] for _, logc, _ in prepared])
        labels = group_budgets(np.exp(log_c), rtol)
        log_grid = np.array([log_c[labels == lab].mean() for lab in np.unique(labels)])
        # (runs, grid) final loss where the run belongs to the budget, inf elsewhere.
        table = np.full((len(prepared), log_grid.size), np.inf)
        for i, (_, _, y) in enumerate(prepared):
            table[i, labels[i]] = y[0]
    else:
        source = "curves"
        lo = min(logc[0] for _, logc, _ in prepared)
        hi = max(logc[-1] for _, logc, _ in prepared)
        log_grid = np.linspace(lo, hi, n_grid)
        # (runs, grid) interpolated smoothed loss; inf where a run does not cover the grid value.
        table = np.full((len(prepared), n_grid), np.inf)
        for i, (_, logc, y) in enumerate(prepared):
            inside = (log_grid >= logc[0]) & (log_grid <= logc[-1])
            table[i, inside] = np.interp(log_grid[inside], logc, y)
    covers = np.isfinite(table)
    best = np.argmin(table, axis=0)
    keep = covers.sum(axis=0) >= 2
    if interior_only:
        smallest = np.where(covers, sizes[:, None], np.inf).min(axis=0)
        largest = np.where(covers, sizes[:, None], -np.inf).max(axis=0)
        keep &= (sizes[best] > smallest) & (sizes[best] < largest)
    flops = np.exp(log_grid[keep])
    fr_n = sizes[best[keep]]
    fr_loss = table[best[keep], np.flatnonzero(keep)]
    if flops.size < 2 or np.unique(fr_n).size < 2:
        raise FitError("approach 1: the frontier has fewer than two distinct model sizes inside the sampled "
                       "range; runs must overlap in FLOPs, with sizes on both sides of the optimum")
    fr_d = flops / (6.0 * fr_n)
    return Approach1Result(flops, fr_loss, fr_n, fr_d, fit_power_law(flops, fr_n),
                           fit_power_law(flops, fr_d), source)


# ----------------------------------------------------------------------------- approach 2


@dataclass(frozen=True)
class IsoFlopProfile:
    budget: float
    """Compute budget C in FLOPs (geometric mean of the group's 6ND)."""
    n: np.ndarray
    """Model sizes of the runs at this budget."""
    loss: np.ndarray
    """Their final losses."""
    coeffs: tuple[float, float, float]
    """loss = c2 x^2 + c1 x + c0 with x = ln N."""
    n_opt: float
    """Vertex of the parabola: the compute-optimal N at this budget."""
    d_opt: float
    """C / (6 N_opt)."""
    loss_opt: float
    """Parabola value at the vertex."""
    used: bool
    """Whether the vertex entered the power-law fit."""
    reason: str = ""
    """Why it was left out, when it was."""

    def predict(self, n: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(n, float))
        c2, c1, c0 = self.coeffs
        return c2 * x * x + c1 * x + c0


@dataclass(frozen=True)
class Approach2Result(_OptimumExponents):
    profiles: tuple[IsoFlopProfile, ...]
    """Every budget with enough distinct sizes for a parabola, used or not."""
    n_opt: PowerLaw
    """N_opt(C) through the used vertices."""
    d_opt: PowerLaw
    """D_opt(C) through the used vertices."""
    skipped: tuple[str, ...] = ()
    """Budgets that could not give a parabola, with the reason."""


def fit_parabola(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """Least-squares loss = c2 x^2 + c1 x + c0 with x = ln N (solved on centred x for conditioning)."""
    x = np.log(np.asarray(n, float))
    mu = x.mean()
    k2, k1, k0 = np.polyfit(x - mu, np.asarray(loss, float), 2)
    # Expand k2 (x-mu)^2 + k1 (x-mu) + k0 back into powers of x.
    return float(k2), float(k1 - 2 * k2 * mu), float(k2 * mu * mu - k1 * mu + k0)


VERTEX_REACH = math.log(1e3)
"""A vertex more than 1000x beyond the sampled sizes (in N) is no minimum: the parabola is flat there."""


def fit_approach2(n: np.ndarray, d: np.ndarray, loss: np.ndarray, rtol: float = 0.05,
                  min_sizes: int = 3, require_inside: bool = True) -> Approach2Result:
    """IsoFLOP parabolas per budget; power laws through their vertices.

    A vertex outside the sizes sampled at its budget is an extrapolation; with
    ``require_inside`` it is reported but left out of the power law.
    """
    n, d, loss = check_points(n, d, loss)
    profiles, skipped = isoflop_profiles(n, d, loss, rtol, min_sizes, require_inside)
    good = [p for p in profiles if p.used]
    if len(good) < 2:
        raise FitError(f"approach 2 needs at least two budgets with {min_sizes}+ sizes and a minimum inside "
                       f"them; got {len(good)}")
    budgets = np.array([p.budget for p in good])
    return Approach2Result(tuple(profiles), fit_power_law(budgets, [p.n_opt for p in good]),
                           fit_power_law(budgets, [p.d_opt for p in good]), tuple(skipped))


def isoflop_profiles(n: np.ndarray, d: np.ndarray, loss: np.ndarray, rtol: float = 0.05, min_sizes: int = 3,
                     require_inside: bool = True) -> tuple[list[IsoFlopProfile], list[str]]:
    """One parabola per budget with a usable vertex, and a line for each budget without one."""
    c = 6.0 * n * d
    labels = group_budgets(c, rtol)
    profiles, skipped = [], []
    for lab in np.unique(labels):
        sel = labels == lab
        budget = float(np.exp(np.log(c[sel]).mean()))
        ns, ls = n[sel], loss[sel]
        if np.unique(ns).size < min_sizes:
            skipped.append(f"C={budget:.6g}: {np.unique(ns).size} distinct sizes, need {min_sizes}")
            continue
        c2, c1, c0 = fit_parabola(ns, ls)
        if not (math.isfinite(c2) and c2 > 0):
            skipped.append(f"C={budget:.6g}: loss is not convex in ln N (no minimum)")
            continue
        # The vertex in ln N, judged against the sampled span before exponentiating: a nearly flat
        # parabola puts it so far out that exp() gives 0 or inf (and D_opt = C / 6N divides by zero).
        x_opt = -c1 / (2 * c2)
        lo, hi = float(np.log(ns.min())), float(np.log(ns.max()))
        if not (math.isfinite(x_opt) and lo - VERTEX_REACH <= x_opt <= hi + VERTEX_REACH):
            skipped.append(f"C={budget:.6g}: no usable minimum (the parabola is nearly flat; its vertex is more "
                           f"than {math.exp(VERTEX_REACH):g}x outside the sampled N)")
            continue
        n_opt = float(math.exp(x_opt))
        inside = lo <= x_opt <= hi
        used = inside or not require_inside
        reason = "" if used else f"minimum N={n_opt:.4g} outside the sampled {ns.min():.4g}..{ns.max():.4g}"
        profiles.append(IsoFlopProfile(budget, ns, ls, (c2, c1, c0), n_opt, float(math.exp(math.log(budget / 6) - x_opt)),
                                       float(c0 - c1 * c1 / (4 * c2)), used, reason))
    return profiles, skipped
