"""Scaling-law fits the way the Chinchilla paper does them, in numpy and scipy.

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
* Approach 3 (parametric): L(N, D) = E + A / N^alpha + B / D^beta, fitted to
  log loss with a Huber loss (delta 1e-3) summed over runs, in the log-sum-exp
  form log L = LSE(log A - alpha ln N, log B - beta ln D, log E), by L-BFGS
  from Chinchilla's grid of 4500 starts. Then a = beta / (alpha + beta),
  b = alpha / (alpha + beta), N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
  G = (alpha A / (beta B))^(1 / (alpha + beta)).

Epoch AI's replication found Chinchilla's optimiser stopped early and its
intervals were implausibly narrow, so this module checks convergence
(scipy's L-BFGS-B has the last word on the chosen optimum, inside
``param_bounds``; an optimum on a bound is a boundary solution, never
"converged"), and never rounds a parameter. Intervals come from a bootstrap
that redraws runs within each budget and refits all three approaches; each is
a percentile interval (BCa on request) widened to its point estimate when
that falls outside, and says so. Degenerate tables (``point_problem``) and
budgets with no usable vertex are refused or skipped with one line, never a
traceback.

Why the grid runs in a vectorised L-BFGS of our own: scipy's L-BFGS-B costs
about 7 ms per start on 300 runs here (some 60 iterations, most of it
per-iteration driver overhead, and 20x more when OpenBLAS's thread pool is
awake, scipy issue #22438), so 4500 starts take half a minute or more. The
batched optimiser below advances every start at once with the analytic
gradient (the same quasi-Newton method, with a backtracking/expanding Armijo
line search) in a few seconds, and the best converged endpoints are then
polished and certified by scipy's L-BFGS-B. ``fit_approach3(...,
method="scipy")`` runs scipy from every start instead, as the reference; a
test checks the two agree.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
"""Chinchilla's Huber threshold on log-loss residuals."""


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


def _check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class Approach1Result:
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

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent


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
class Approach2Result:
    profiles: tuple[IsoFlopProfile, ...]
    """Every budget with enough distinct sizes for a parabola, used or not."""
    n_opt: PowerLaw
    """N_opt(C) through the used vertices."""
    d_opt: PowerLaw
    """D_opt(C) through the used vertices."""
    skipped: tuple[str, ...] = ()
    """Budgets that could not give a parabola, with the reason."""

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent


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
    n, d, loss = _check_points(n, d, loss)
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


# ----------------------------------------------------------------------------- approach 3


@dataclass(frozen=True)
class LossParams:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    """Irreducible loss (nats per token)."""
    A: float
    """Model-size term coefficient."""
    B: float
    """Data term coefficient."""
    alpha: float
    """Exponent of N."""
    beta: float
    """Exponent of D."""

    @classmethod
    def from_vector(cls, p: Sequence[float]) -> "LossParams":
        log_a, log_b, log_e, alpha, beta = (float(v) for v in p)
        return cls(math.exp(log_e), math.exp(log_a), math.exp(log_b), alpha, beta)

    def vector(self) -> np.ndarray:
        return np.array([_log(self.A), _log(self.B), _log(self.E), self.alpha, self.beta])

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt in C: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt in C: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """(alpha A / (beta B))^(1 / (alpha + beta)): N_opt = G (C/6)^a."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def n_opt(self, c: np.ndarray | float) -> np.ndarray:
        return self.G * (np.asarray(c, float) / 6.0) ** self.a

    def d_opt(self, c: np.ndarray | float) -> np.ndarray:
        return (np.asarray(c, float) / 6.0) ** self.b / self.G

    def to_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "log_E": _log(self.E), "log_A": _log(self.A), "log_B": _log(self.B),
                "a": self.a, "b": self.b, "G": self.G}


def _log(x: float) -> float:
    """A fit can drive a coefficient to underflow (E -> 0 on data with no floor): keep its log finite."""
    return math.log(max(x, 1e-300))


@dataclass(frozen=True)
class Approach3Result:
    params: LossParams
    """The fitted law, unrounded."""
    objective: float
    """Summed Huber loss of the log-loss residuals at the optimum."""
    converged: bool
    """scipy L-BFGS-B reported convergence at the kept optimum and no parameter is on its bound."""
    message: str
    """scipy's termination message for the kept optimum."""
    n_points: int
    """Runs fitted."""
    n_starts: int
    """Starting points tried."""
    n_converged: int
    """Starts whose optimisation converged."""
    n_near_best: int
    """Converged starts that ended within 1e-6 (relative) of the best objective: the basin's reach."""
    start: tuple[float, ...]
    """The start (log_A, log_B, log_E, alpha, beta) that led to the kept optimum."""
    delta: float = HUBER_DELTA
    """Huber threshold used."""
    boundary: tuple[str, ...] = ()
    """Parameters that ended on a bound of ``param_bounds`` (e.g. 'E at its lower bound ...'): a boundary
    solution, which the data do not pin down, never reported as converged."""
    optimizer_converged: bool = False
    """scipy's own verdict, boundary or not."""

    @property
    def status(self) -> str:
        """'converged', 'boundary' or 'not converged'."""
        if self.boundary:
            return "boundary"
        return "converged" if self.converged else "not converged"


PARAM_NAMES = ("A", "B", "E", "alpha", "beta")
"""What each coordinate (log_A, log_B, log_E, alpha, beta) of a parameter vector fits."""


def param_bounds(loss: np.ndarray) -> np.ndarray:
    """Box (5, 2) for (log_A, log_B, log_E, alpha, beta), as scipy L-BFGS-B bounds.

    Wide enough that any law a sweep can pin down is inside: E from 0.1% of the
    lowest loss up to the highest loss; exponents 0 to 4; log A and log B
    -20 to 80. An optimum on a face of this box is a boundary solution (for
    example E -> 0 on data that show no floor), not a fitted value.
    """
    loss = np.asarray(loss, float)
    lo_e = math.log(float(loss.min())) - 7.0
    return np.array([[-20.0, 80.0], [-20.0, 80.0], [lo_e, math.log(float(loss.max()))], [0.0, 4.0], [0.0, 4.0]])


def at_bounds(x: np.ndarray, bounds: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """(K, 5) mask of coordinates on (within tol of) or beyond a face of the box."""
    x = np.atleast_2d(x)
    return (x <= bounds[:, 0] + tol) | (x >= bounds[:, 1] - tol)


def boundary_names(x: np.ndarray, bounds: np.ndarray) -> tuple[str, ...]:
    """Human-readable list of the parameters of one vector that sit on a bound."""
    out = []
    for i, on in enumerate(at_bounds(x, bounds)[0]):
        if on:
            side = "lower" if x[i] <= bounds[i, 0] + 1e-4 else "upper"
            value = bounds[i, 0 if side == "lower" else 1]
            shown = math.exp(value) if i < 3 else value
            out.append(f"{PARAM_NAMES[i]} at its {side} bound {shown:.4g}")
    return tuple(out)


def chinchilla_starts() -> np.ndarray:
    """Chinchilla's grid of 4500 starts, rows (log_A, log_B, log_E, alpha, beta).

    alpha, beta in 0..2 step 0.5; e in -1..1 step 0.5; a, b in 0..25 step 5.
    """
    a = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ab = np.arange(0.0, 2.01, 0.5)
    mesh = np.meshgrid(a, a, e, ab, ab, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def bootstrap_starts(best: LossParams) -> np.ndarray:
    """Warm start at the full-data optimum plus a 16-point grid (alpha, beta in {0.5, 1};
    log A, log B in {5, 10}; log E 0.5) in case a resample moves to another basin."""
    grid = np.array([[la, lb, 0.5, al, be] for la in (5.0, 10.0) for lb in (5.0, 10.0)
                     for al in (0.5, 1.0) for be in (0.5, 1.0)])
    return np.vstack([best.vector()[None, :], grid])


class HuberObjective:
    """Approach 3's objective on fixed runs: summed Huber loss of log-loss residuals, and its gradient.

    Called with K parameter rows at once, p (K, 5) as (log_A, log_B, log_E,
    alpha, beta), it returns f (K,) and grad (K, 5). f is divided by delta so
    it is of order sum |residual| / delta and relative stopping tests stay
    meaningful; that does not move the minimum (``objective`` undoes it).
    Work buffers are kept between calls: allocating fresh (K, n) arrays on
    every call costs more than the arithmetic.

    ``weights`` (R, n) gives parameter row r its own weight per run: a
    bootstrap resample drawn with replacement is the same runs weighted by how
    often each was drawn, so all resamples can be optimised in one batch.
    Calls then pass ``rows``, the weight row of each parameter row.
    """

    def __init__(self, n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = HUBER_DELTA,
                 weights: np.ndarray | None = None):
        self.weights = None if weights is None else np.asarray(weights, float)
        self.log_n = np.log(np.asarray(n, float))
        self.log_d = np.log(np.asarray(d, float))
        self.log_loss = np.log(np.asarray(loss, float))
        self.delta = float(delta)
        self._max_log = max(np.abs(self.log_n).max(), np.abs(self.log_d).max())
        self._work = np.empty((4, 0, self.log_n.size))

    def objective(self, p: Sequence[float]) -> float:
        """The unscaled summed Huber loss at one parameter vector."""
        return float(self(np.asarray(p, float)[None, :])[0][0]) * self.delta

    def __call__(self, p: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = np.atleast_2d(p)
        k, delta = p.shape[0], self.delta
        log_n, log_d = self.log_n, self.log_d
        if self._work.shape[1] < k:
            self._work = np.empty((4, k, log_n.size))
        u_n, u_d, s, c = (w[:k] for w in self._work)                   # each (K, n)
        np.multiply(p[:, 3:4], log_n, out=u_n)
        np.subtract(p[:, 0:1], u_n, out=u_n)                           # log of A / N^alpha
        np.multiply(p[:, 4:5], log_d, out=u_d)
        np.subtract(p[:, 1:2], u_d, out=u_d)                           # log of B / D^beta
        # Largest |term| bounded from the parameters alone: below ~700 exp cannot overflow.
        bound = np.abs(p[:, :3]).max() + np.abs(p[:, 3:]).max() * self._max_log
        if bound < 300.0:
            np.exp(u_n, out=u_n)
            np.exp(u_d, out=u_d)
            u_e = np.exp(p[:, 2:3])                                    # (K, 1): E is the same for every run
            np.add(u_n, u_d, out=s)
            s += u_e
            np.log(s, out=c)                                           # c = LSE
        else:                                                          # rare: shift by the largest term
            top = np.maximum(np.maximum(u_n, u_d), p[:, 2:3])
            u_n -= top
            u_d -= top
            np.exp(u_n, out=u_n)
            np.exp(u_d, out=u_d)
            u_e = np.exp(p[:, 2:3] - top)                              # (K, n)
            np.add(u_n, u_d, out=s)
            s += u_e
            np.log(s, out=c)
            c += top
        c -= self.log_loss                                             # c = residual r in log loss
        h = np.clip(c, -delta, delta)                                  # d(huber)/dr
        # Huber: h (r - h/2) is r^2/2 inside [-delta, delta] and delta (|r| - delta/2) outside.
        if self.weights is None:
            f = (np.einsum("kn,kn->k", h, c) - 0.5 * np.einsum("kn,kn->k", h, h)) / delta
        else:
            w = self.weights[np.arange(k) if rows is None else rows]
            hw = h * w
            f = (np.einsum("kn,kn->k", hw, c) - 0.5 * np.einsum("kn,kn->k", hw, h)) / delta
            h = hw
        # d(LSE)/d(term) = u / s, so each gradient is a sum of h * u / s.
        np.divide(h, s, out=h)
        u_n *= h
        u_d *= h
        g = np.empty((k, 5))
        g[:, 0] = u_n.sum(axis=1)
        g[:, 1] = u_d.sum(axis=1)
        g[:, 2] = u_e[:, 0] * h.sum(axis=1) if u_e.shape[1] == 1 else np.einsum("kn,kn->k", u_e, h)
        # einsum, not @: a BLAS matrix-vector product wakes OpenBLAS's thread pool, whose spinning threads
        # slowed scipy's L-BFGS-B (its own OpenBLAS) twentyfold on a busy 2-core machine.
        g[:, 3] = -np.einsum("kn,n->k", u_n, log_n)
        g[:, 4] = -np.einsum("kn,n->k", u_d, log_d)
        g /= delta
        return f, g


# Status codes of the batched optimiser.
_RUNNING, _CONV_GRAD, _CONV_F, _LINE_SEARCH, _MAX_ITER, _NON_FINITE = range(6)


def lbfgs_batch(fg, x0: np.ndarray, *, memory: int = 10, max_iter: int = 2000, gtol: float = 1e-7,
                ftol: float = 1e-12, c1: float = 1e-4, c2: float = 0.9, max_backtracks: int = 50,
                max_expansions: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent L-BFGS runs from each row of x0, advanced in lock step.

    fg(x (k, P), rows (k,)) -> (f (k,), g (k, P)); rows are the x0 row numbers
    of the k parameter rows, for objectives that differ per row. Line search:
    backtracking Armijo from step 1, or steps growing x4 while the curvature
    condition fails. A pair with s.y <= 0 is dropped instead of stored (keeps
    the inverse-Hessian estimate positive definite). Stopping per run as in
    scipy's L-BFGS-B: max |g| <= gtol, or f_old - f_new <= ftol * max(|f_old|,
    |f_new|, 1). Returns x (K, P), f (K,), status (K,) with 1, 2 = converged.
    """
    x_out = np.array(x0, dtype=float)
    k, dim = x_out.shape
    f_out, g = fg(x_out, np.arange(k))
    status = np.where(np.isfinite(f_out), _RUNNING, _NON_FINITE)
    status[(status == _RUNNING) & (np.abs(g).max(axis=1) <= gtol)] = _CONV_GRAD
    # State of the runs still going, compacted so each iteration works on contiguous arrays.
    live = np.flatnonzero(status == _RUNNING)
    x, f, g = x_out[live], f_out[live], g[live]
    s_hist = np.zeros((live.size, memory, dim))
    y_hist = np.zeros((live.size, memory, dim))
    rho = np.zeros((live.size, memory))          # 0 marks an empty or dropped pair
    # First step: steepest descent scaled to move about one unit in parameter space.
    gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1.0)
    for it in range(max_iter):
        if live.size == 0:
            break
        # Two-loop recursion, newest pair first; slots are a ring indexed by iteration.
        q = g.copy()
        coef = np.zeros((live.size, memory))
        slots = [(it - 1 - j) % memory for j in range(min(it, memory))]
        for sl in slots:
            c = rho[:, sl] * np.einsum("kp,kp->k", s_hist[:, sl], q)
            q -= c[:, None] * y_hist[:, sl]
            coef[:, sl] = c
        r = gamma[:, None] * q
        for sl in reversed(slots):
            bta = rho[:, sl] * np.einsum("kp,kp->k", y_hist[:, sl], r)
            r += s_hist[:, sl] * (coef[:, sl] - bta)[:, None]
        direction = -r
        gd = np.einsum("kp,kp->k", g, direction)
        uphill = ~(gd < 0)
        if uphill.any():                          # lost descent: restart from steepest descent
            rho[uphill] = 0.0
            direction[uphill] = -g[uphill] / np.maximum(np.linalg.norm(g[uphill], axis=1), 1.0)[:, None]
            gd[uphill] = np.einsum("kp,kp->k", g[uphill], direction[uphill])
        step = np.ones(live.size)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        done = np.zeros(live.size, dtype=bool)
        for _ in range(max_backtracks):
            todo = np.flatnonzero(~done)
            if todo.size == 0:
                break
            xt = x[todo] + step[todo, None] * direction[todo]
            ft, gt = fg(xt, live[todo])
            ok = np.isfinite(ft) & (ft <= f[todo] + c1 * step[todo] * gd[todo])
            acc = todo[ok]
            x_new[acc], f_new[acc], g_new[acc] = xt[ok], ft[ok], gt[ok]
            done[acc] = True
            step[todo[~ok]] *= 0.5
        # Where a full step was taken and the slope is still steep (weak Wolfe curvature test fails), try
        # longer steps. Without this the runs crawl across the flat, piecewise-linear stretches the
        # Huber loss has far from the optimum, one unit step per iteration.
        grow = done & (step == 1.0) & (np.einsum("kp,kp->k", g_new, direction) < c2 * gd)
        for _ in range(max_expansions):
            todo = np.flatnonzero(grow)
            if todo.size == 0:
                break
            longer = step[todo] * 4.0
            xt = x[todo] + longer[:, None] * direction[todo]
            ft, gt = fg(xt, live[todo])
            ok = np.isfinite(ft) & (ft < f_new[todo]) & (ft <= f[todo] + c1 * longer * gd[todo])
            acc = todo[ok]
            x_new[acc], f_new[acc], g_new[acc], step[acc] = xt[ok], ft[ok], gt[ok], longer[ok]
            grow[:] = False
            grow[acc] = np.einsum("kp,kp->k", gt[ok], direction[acc]) < c2 * gd[acc]
        sv, yv = x_new - x, g_new - g
        sy = np.einsum("kp,kp->k", sv, yv)
        yy = np.einsum("kp,kp->k", yv, yv)
        keep = done & (sy > 1e-12 * np.sqrt(np.einsum("kp,kp->k", sv, sv) * yy))
        slot = it % memory
        s_hist[:, slot], y_hist[:, slot] = sv, yv
        rho[:, slot] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        gamma[keep] = sy[keep] / yy[keep]
        new_status = np.full(live.size, _RUNNING)
        new_status[done & ((f - f_new) <= ftol * np.maximum(np.maximum(np.abs(f), np.abs(f_new)), 1.0))] = _CONV_F
        new_status[done & (np.abs(g_new).max(axis=1) <= gtol)] = _CONV_GRAD
        new_status[~done] = _LINE_SEARCH
        x, f, g = x_new, f_new, g_new
        finished = new_status != _RUNNING
        if finished.any():
            ids = live[finished]
            x_out[ids], f_out[ids], status[ids] = x[finished], f[finished], new_status[finished]
            run = ~finished
            live, x, f, g, gamma = live[run], x[run], f[run], g[run], gamma[run]
            s_hist, y_hist, rho = s_hist[run], y_hist[run], rho[run]
    x_out[live], f_out[live], status[live] = x, f, _MAX_ITER
    return x_out, f_out, status


def _blas_one_thread():
    """Context limiting OpenBLAS to one thread around scipy's L-BFGS-B, if threadpoolctl is installed.

    scipy >= 1.15's L-BFGS-B calls LAPACK on tiny matrices; with OpenBLAS's
    thread pool awake each call can cost milliseconds (scipy issue #22438:
    20x slower here on a busy 2-core machine). OPENBLAS_NUM_THREADS=1 does the same.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _scipy_lbfgsb(x0: np.ndarray, fg: HuberObjective, bounds: np.ndarray | None = None):
    def fun(p):
        f, g = fg(p[None, :])
        return float(f[0]), g[0]
    if bounds is not None:
        x0 = np.clip(x0, bounds[:, 0], bounds[:, 1])
    # Tighter than scipy's defaults (Epoch AI traced Chinchilla's odd fit to an optimiser stopping early):
    # ftol 1e-10 against the default 2.2e-9, and gtol 1e-4 on f / delta is 1e-7 on the summed Huber
    # loss, 100x below the default 1e-5. Tighter fails at the optimum: gradients of about 1e-5 (on
    # f / delta) remain where no step can lower f by more than rounding, and scipy calls that ABNORMAL.
    with _blas_one_thread():
        return minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=None if bounds is None else bounds.tolist(),
                        options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-10, "gtol": 1e-4})


def _minimise_rows(fg: HuberObjective, starts: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lbfgs_batch over all rows of ``starts`` in chunks; returns x, f and a converged mask."""
    parts = []
    for lo in range(0, len(starts), chunk):
        parts.append(lbfgs_batch(lambda p, rows, lo=lo: fg(p, rows + lo), starts[lo:lo + chunk]))
    x = np.concatenate([p[0] for p in parts])
    f = np.concatenate([p[1] for p in parts])
    ok = np.isin(np.concatenate([p[2] for p in parts]), (_CONV_GRAD, _CONV_F)) & np.isfinite(f)
    return x, f, ok


def _default_chunk(n_points: int) -> int:
    # Big batches cut Python overhead per start; past a few MB of work buffers, cache misses win.
    return max(128, 300_000 // n_points)


def fit_approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, starts: np.ndarray | None = None,
                  delta: float = HUBER_DELTA, method: str = "batched", polish: int = 3,
                  chunk: int | None = None) -> Approach3Result:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta from every start; keep the best converged optimum.

    method "batched": all starts in the vectorised L-BFGS, then scipy L-BFGS-B
    from the ``polish`` best converged endpoints; scipy's verdict sets
    ``converged``. method "scipy": scipy L-BFGS-B from every start (slow,
    the reference). ``starts`` defaults to Chinchilla's 4500-point grid;
    ``chunk`` is the number of starts per batch. scipy works inside
    ``param_bounds``; a kept optimum on a face of that box is reported in
    ``boundary`` and is not ``converged``.
    """
    n, d, loss = _check_points(n, d, loss)
    if n.size < 6:
        raise FitError(f"approach 3 fits 5 parameters and needs at least 6 runs, got {n.size}")
    fg = HuberObjective(n, d, loss, delta)
    bounds = param_bounds(loss)
    starts = chinchilla_starts() if starts is None else np.atleast_2d(np.asarray(starts, float))
    if method == "scipy":
        results = [_scipy_lbfgsb(s0, fg, bounds) for s0 in starts]
        f_end = np.array([r.fun for r in results])
        ok = np.array([bool(r.success) for r in results])
        pool = ok if ok.any() else np.ones_like(ok)
        best = int(np.argmin(np.where(pool, f_end, np.inf)))
        res, start = results[best], starts[best]
    elif method == "batched":
        x_end, f_end, ok = _minimise_rows(fg, starts, chunk or _default_chunk(n.size))
        pool = ok if ok.any() else np.isfinite(f_end)
        order = np.argsort(np.where(pool, f_end, np.inf))[:max(1, polish)]
        polished = [(_scipy_lbfgsb(x_end[i], fg, bounds), i) for i in order]
        good = [pr for pr in polished if pr[0].success] or polished
        res, idx = min(good, key=lambda pr: pr[0].fun)
        start = starts[idx]
    else:
        raise ValueError(f"method must be 'batched' or 'scipy', got {method!r}")
    best_f = float(res.fun)
    near = int(np.sum(ok & (f_end <= best_f + 1e-6 * max(abs(best_f), 1e-12))))
    edge = boundary_names(res.x, bounds)
    return Approach3Result(LossParams.from_vector(res.x), best_f * delta, bool(res.success) and not edge,
                           str(res.message), int(n.size), int(len(starts)), int(ok.sum()), near,
                           tuple(float(v) for v in start), delta, edge, bool(res.success))


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    low: float
    """Lower end."""
    high: float
    """Upper end."""
    median: float
    """Median of the bootstrap distribution."""
    estimate: float = math.nan
    """The full-data point estimate the interval belongs to (always inside [low, high])."""
    method: str = "percentile"
    """'percentile' or 'BCa' (bias-corrected and accelerated), with ', widened to the estimate' when
    those ends left the estimate out (a biased statistic, most of whose draws fall on one side of it):
    the end on the far side is moved to the estimate, so the interval only grows."""

    @property
    def widened(self) -> bool:
        return self.method.endswith("widened to the estimate")

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "median": self.median, "estimate": self.estimate,
                "method": self.method}


@dataclass(frozen=True)
class BootstrapResult:
    n_resamples: int
    """Resamples drawn: within every budget, its runs drawn with replacement, as many as it has."""
    level: float
    """Central coverage of each interval, e.g. 0.95."""
    seed: int
    """Seed of the resampling generator."""
    approach3: dict[str, Interval]
    """Intervals for E, A, B, alpha, beta, a, b, G."""
    approach2: dict[str, Interval]
    """Intervals for a and b of the IsoFLOP approach (empty if it has no point estimate or too few refits)."""
    n_ok3: int
    """Resamples whose approach-3 refit gave finite parameters (all enter the intervals)."""
    n_unconverged3: int
    """Of those, refits where no start met the stopping test (kept all the same)."""
    n_ok2: int
    """Resamples where approach 2 could be fitted (two budgets with a minimum inside)."""
    samples: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    """Raw bootstrap draws, keyed 'approach3.alpha', 'approach2.a', 'approach1.a', ..."""
    note: str = ""
    """How the resamples and refits were made."""
    approach1: dict[str, Interval] = field(default_factory=dict)
    """Intervals for a and b of the frontier approach."""
    n_ok1: int = 0
    """Resamples where approach 1 could be fitted."""
    n_boundary3: int = 0
    """Approach-3 refits that ended on a bound of ``param_bounds`` (kept, at the bound)."""


MIN_DRAWS = 10
"""Fewer successful refits than this give no interval: percentiles of a handful of draws mean nothing."""


INTERVAL_METHODS = ("percentile", "bca")


def percentile_interval(draws: np.ndarray, estimate: float, level: float) -> Interval:
    """Central percentile interval of the draws, widened to reach the estimate if it lies outside.

    Chosen as the default over BCa on measured coverage: on 5 x 7 IsoFLOP tables with 1% noise,
    90% intervals for alpha covered the truth in 38 of 40 draws as percentiles and 33 of 40 as BCa
    (the Huber fit's resampled optima tie and skew, which throws BCa's corrections off).
    """
    draws = np.asarray(draws, float)
    draws = draws[np.isfinite(draws)]
    lo, hi = (float(v) for v in np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]))
    return _widened(lo, hi, draws, estimate, "percentile")


def _widened(lo: float, hi: float, draws: np.ndarray, estimate: float, method: str) -> Interval:
    if not lo <= estimate <= hi:
        lo, hi = min(lo, estimate), max(hi, estimate)
        method += ", widened to the estimate"
    return Interval(lo, hi, float(np.median(draws)), float(estimate), method)


def bca_interval(draws: np.ndarray, estimate: float, jackknife: np.ndarray, level: float) -> Interval:
    """Efron's BCa interval from bootstrap draws, the full-data estimate and leave-one-out estimates.

    z0 = Phi^-1(share of draws below the estimate) corrects for a biased
    statistic, the acceleration a = sum(d^3) / (6 (sum d^2)^1.5) over
    jackknife deviations d for a skewed one. Plain percentile intervals of a
    biased statistic can exclude their own estimate; BCa does so only when
    nearly every draw falls on one side of it. Then the interval is widened to
    reach the estimate, and ``method`` says so.
    """
    from scipy.special import ndtr, ndtri           # the normal CDF and its inverse (scipy.stats costs 3 s to import)

    draws = np.sort(np.asarray(draws, float)[np.isfinite(draws)])
    m = draws.size
    share = (np.sum(draws < estimate) + 0.5 * np.sum(draws == estimate)) / m
    z0 = float(ndtri(np.clip(share, 0.5 / m, 1 - 0.5 / m)))
    jack = np.asarray(jackknife, float)
    jack = jack[np.isfinite(jack)]
    acc = 0.0
    if jack.size >= 3:
        dev = jack.mean() - jack
        den = 6.0 * float(np.sum(dev * dev)) ** 1.5
        acc = float(np.sum(dev ** 3)) / den if den > 0 else 0.0
    z = ndtri(np.array([(1 - level) / 2, (1 + level) / 2]))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = ndtr(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    if not (np.all(np.isfinite(q)) and q[0] < q[1]):                 # acceleration past its range: BC only
        q = ndtr(2 * z0 + z)
    lo, hi = (float(v) for v in np.quantile(draws, q))
    return _widened(lo, hi, draws, estimate, "BCa")


def stratified_picks(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, runs) run indices: each budget's runs redrawn with replacement from that budget only.

    Every resample keeps each budget's number of runs, so no budget vanishes
    (which would change what approaches 1 and 2 estimate, not only add noise).
    """
    picks = np.empty((n_resamples, labels.size), dtype=int)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        picks[:, idx] = idx[rng.integers(0, idx.size, (n_resamples, idx.size))]
    return picks


NAMES3 = ("E", "A", "B", "alpha", "beta", "a", "b", "G")


def _values3(x: np.ndarray) -> dict[str, float] | None:
    try:
        values = LossParams.from_vector(x).to_dict()
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return values if all(math.isfinite(values[k]) for k in NAMES3) else None


def _refit3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float, weights: np.ndarray,
            starts: np.ndarray, bounds: np.ndarray) -> tuple[list[dict | None], np.ndarray, np.ndarray]:
    """Approach 3 refitted once per weight row (runs weighted by how often a resample holds them).

    All rows and starts run as one batch of the vectorised L-BFGS; a refit
    whose best endpoint leaves the box of ``param_bounds`` is redone by scipy's
    L-BFGS-B inside it, so it ends on the bound as the full-data fit would.
    Returns each row's parameters (None if not finite), converged and on-bound masks.
    """
    rows, k = len(weights), len(starts)
    fg = HuberObjective(n, d, loss, delta, weights=np.repeat(weights, k, axis=0))
    x_end, f_end, ok = _minimise_rows(fg, np.tile(starts, (rows, 1)), _default_chunk(n.size))
    values: list[dict | None] = []
    conv = np.zeros(rows, dtype=bool)
    edge = np.zeros(rows, dtype=bool)
    for r in range(rows):
        sl = slice(r * k, (r + 1) * k)
        conv[r] = ok[sl].any()
        f_r = np.where(ok[sl] if conv[r] else np.isfinite(f_end[sl]), f_end[sl], np.inf)
        if not np.isfinite(f_r).any():
            values.append(None)
            continue
        x = x_end[sl][int(np.argmin(f_r))]
        if at_bounds(x, bounds).any():
            res = _scipy_lbfgsb(x, HuberObjective(n, d, loss, delta, weights=weights[r][None, :]), bounds)
            x, conv[r] = res.x, bool(res.success)
            edge[r] = bool(at_bounds(x, bounds).any())
        values.append(_values3(x))
    return values, conv, edge


def _exponents(fit_fn) -> dict[str, float] | None:
    try:
        res = fit_fn()
    except FitError:
        return None
    return {"a": res.a, "b": res.b} if math.isfinite(res.a) and math.isfinite(res.b) else None


def bootstrap(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, n_resamples: int = 100, seed: int = 0,
              level: float = 0.95, base: Approach3Result | None = None, starts: np.ndarray | None = None,
              rtol: float = 0.05, curves: Sequence[Curve] | None = None,
              method: str = "percentile") -> BootstrapResult:
    """Intervals for every parameter and exponent of approaches 1, 2 and 3, from a bootstrap within budgets.

    Each resample redraws every budget's runs with replacement from that
    budget (``stratified_picks``) and refits all three approaches. ``method``
    'percentile' (``percentile_interval``) or 'bca' (``bca_interval``, its
    acceleration from a leave-one-run-out jackknife). Approach 1 uses
    ``curves`` (aligned with the runs) when given, else the final losses.
    Approach-3 refits start from ``starts`` or, by default,
    ``bootstrap_starts(base.params)`` (the full-data optimum plus 16 grid
    points); a refit counts as converged when one of its starts met the
    optimiser's stopping test. Every interval contains its point estimate
    (see ``bca_interval``).
    """
    n, d, loss = _check_points(n, d, loss)
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {INTERVAL_METHODS}, got {method!r}")
    if base is None:
        base = fit_approach3(n, d, loss)
    finals = [Curve(float(ni), np.array([di]), np.array([li])) for ni, di, li in zip(n, d, loss)]
    curves = list(curves) if curves is not None else finals
    if len(curves) != n.size:
        raise ValueError(f"bootstrap: {len(curves)} curves for {n.size} runs")
    custom_starts = starts is not None
    starts = np.atleast_2d(np.asarray(starts, float)) if custom_starts else bootstrap_starts(base.params)
    bounds = param_bounds(loss)
    rng = np.random.default_rng(seed)
    labels = group_budgets(6.0 * n * d, rtol)
    picks = stratified_picks(labels, n_resamples, rng)                     # (resamples, runs)
    counts = np.stack([np.bincount(p, minlength=n.size) for p in picks])   # draws of each run
    values3, conv3, edge3 = _refit3(n, d, loss, base.delta, counts.astype(float), starts, bounds)

    def fit1(idx):
        return _exponents(lambda: fit_approach1([curves[i] for i in idx], rtol=rtol))

    def fit2(idx):
        return _exponents(lambda: fit_approach2(n[idx], d[idx], loss[idx], rtol=rtol))

    draws = {f"approach3.{k}": [v[k] for v in values3 if v is not None] for k in NAMES3}
    ok1 = [v for v in (fit1(p) for p in picks) if v is not None]
    ok2 = [v for v in (fit2(p) for p in picks) if v is not None]
    for k in ("a", "b"):
        draws[f"approach1.{k}"] = [v[k] for v in ok1]
        draws[f"approach2.{k}"] = [v[k] for v in ok2]
    samples = {k: np.array(v, float) for k, v in draws.items()}

    everyone = np.arange(n.size)
    if method == "bca":
        # Leave-one-run-out estimates for BCa's acceleration (approach 3 warm-started at the full-data optimum).
        jack_idx = [np.delete(everyone, i) for i in everyone]
        jack3, _, _ = _refit3(n, d, loss, base.delta, 1.0 - np.eye(n.size), base.params.vector()[None, :], bounds)
        jack1 = [fit1(idx) for idx in jack_idx]
        jack2 = [fit2(idx) for idx in jack_idx]

    point = {f"approach3.{k}": v for k, v in (base.params.to_dict().items()) if k in NAMES3}
    for name, fit_fn in (("approach1", lambda: fit1(everyone)), ("approach2", lambda: fit2(everyone))):
        est = fit_fn()
        if est is not None:
            point.update({f"{name}.{k}": v for k, v in est.items()})

    def jack_of(key: str) -> np.ndarray:
        group, k = key.split(".")
        src = {"approach1": jack1, "approach2": jack2, "approach3": jack3}[group]
        return np.array([v[k] if v is not None else np.nan for v in src], float)

    intervals: dict[str, dict[str, Interval]] = {"approach1": {}, "approach2": {}, "approach3": {}}
    for key, vals in samples.items():
        if key in point and vals.size >= MIN_DRAWS and math.isfinite(point[key]):
            group, k = key.split(".")
            intervals[group][k] = (bca_interval(vals, point[key], jack_of(key), level) if method == "bca"
                                   else percentile_interval(vals, point[key], level))
    n_ok3 = int(sum(v is not None for v in values3))
    unconverged = int(sum(v is not None and not c for v, c in zip(values3, conv3)))
    start_note = (f"approach-3 refits start from {len(starts)} given starts" if custom_starts else
                  f"approach-3 refits start from the full-data optimum plus a 16-point grid ({len(starts)} starts, "
                  "not the 4500-point grid), all resamples in one batch of the vectorised L-BFGS")
    how = ("BCa intervals (acceleration from a leave-one-run-out jackknife)" if method == "bca" else
           "percentile intervals")
    note = (f"runs resampled with replacement within each of the {np.unique(labels).size} budgets; {how}, each "
            f"widened to its point estimate where that fell outside; {start_note}")
    return BootstrapResult(n_resamples, level, seed, intervals["approach3"], intervals["approach2"], n_ok3,
                           unconverged, len(ok2), samples, note, intervals["approach1"], len(ok1),
                           int(edge3.sum()))


def consistency(intervals: dict[str, Interval | None]) -> tuple[bool | None, str]:
    """Whether the approaches' intervals for one exponent overlap, and a line saying so.

    ``intervals`` maps an approach's label to its interval (None where it has
    none). None as the verdict when fewer than two approaches have intervals.
    """
    have = {k: v for k, v in intervals.items() if v is not None}
    if len(have) < 2:
        return None, f"fewer than two approaches have an interval ({', '.join(have) or 'none'}): no comparison"
    lo = max(v.low for v in have.values())
    hi = min(v.high for v in have.values())
    if lo <= hi:
        return True, f"consistent: the intervals of approaches {', '.join(have)} overlap on [{lo:.4g}, {hi:.4g}]"
    pairs = [f"{a} [{have[a].low:.4g}, {have[a].high:.4g}] vs {b} [{have[b].low:.4g}, {have[b].high:.4g}]"
             for i, a in enumerate(have) for b in list(have)[i + 1:]
             if have[a].high < have[b].low or have[b].high < have[a].low]
    return False, "inconsistent: no common value; disjoint: " + "; ".join(pairs)
