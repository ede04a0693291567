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
(scipy's L-BFGS-B has the last word on the chosen optimum), reports bootstrap
percentile intervals over resampled runs, and never rounds a parameter.

Why the grid runs in a vectorised L-BFGS of our own: scipy's L-BFGS-B spends
about 50 us per iteration in its driver whatever the problem size, which
makes 4500 independent starts take ~40 s on a few hundred points here. The
batched optimiser below runs every start at once with the analytic gradient
(the same quasi-Newton method, backtracking Armijo line search), and the best
converged endpoints are then polished and certified by scipy's L-BFGS-B.
``fit_approach3(..., method="scipy")`` runs scipy from every start instead,
as the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
"""Chinchilla's Huber threshold on log-loss residuals."""

PARAM_ORDER = ("log_A", "log_B", "log_E", "alpha", "beta")
"""Column order of the internal parameter vectors (Chinchilla's a, b, e, alpha, beta)."""


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


def _check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
    if not (n.size == d.size == loss.size):
        raise FitError(f"N, D and loss must have the same length, got {n.size}, {d.size}, {loss.size}")
    bad = ~(np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0))
    if bad.any():
        raise FitError(f"{int(bad.sum())} points have a non-positive or non-finite N, D or loss")
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


def fit_approach1(curves: Sequence[Curve], n_grid: int = 60, window: int = 5,
                  rtol: float = 0.05) -> Approach1Result:
    """Frontier of the smoothed training curves on a log FLOP grid, then power laws through it.

    A grid value counts only where two or more runs have curves covering it,
    so that "the lowest loss" is a choice. With one point per run (final
    losses only), the grid is the set of budgets (grouped with ``rtol``).
    Caveat from Chinchilla: a cosine schedule's mid-run loss is worse than a
    run trained to that length, which biases N_opt low; the frontier is only
    as good as the curves.
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

    if all(logc.size == 1 for _, logc, _ in prepared):
        source = "final"
        c_all = np.exp([logc[0] for _, logc, _ in prepared])
        labels = group_budgets(c_all, rtol)
        grid, rows = [], []
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab)
            if members.size < 2:
                continue
            best = members[np.argmin([prepared[i][2][0] for i in members])]
            grid.append(float(np.exp(np.log(c_all[members]).mean())))
            rows.append((prepared[best][0], prepared[best][2][0]))
        flops = np.array(grid)
        fr_n = np.array([r[0] for r in rows])
        fr_loss = np.array([r[1] for r in rows])
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
        covered = np.isfinite(table).sum(axis=0) >= 2
        best = np.argmin(table, axis=0)
        flops = np.exp(log_grid[covered])
        fr_n = np.array([prepared[j][0] for j in best[covered]])
        fr_loss = table[best[covered], np.flatnonzero(covered)]
    if flops.size < 2 or np.unique(fr_n).size < 2:
        raise FitError("approach 1: the frontier has fewer than two distinct model sizes; "
                       "runs must overlap in FLOPs")
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


def fit_approach2(n: np.ndarray, d: np.ndarray, loss: np.ndarray, rtol: float = 0.05,
                  min_sizes: int = 3, require_inside: bool = True) -> Approach2Result:
    """IsoFLOP parabolas per budget; power laws through their vertices.

    A vertex outside the sizes sampled at its budget is an extrapolation; with
    ``require_inside`` it is reported but left out of the power law.
    """
    n, d, loss = _check_points(n, d, loss)
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
        if not c2 > 0:
            skipped.append(f"C={budget:.6g}: loss is not convex in ln N (no minimum)")
            continue
        x_opt = -c1 / (2 * c2)
        n_opt = float(math.exp(x_opt))
        inside = ns.min() <= n_opt <= ns.max()
        used = inside or not require_inside
        reason = "" if used else f"minimum N={n_opt:.4g} outside the sampled {ns.min():.4g}..{ns.max():.4g}"
        profiles.append(IsoFlopProfile(budget, ns, ls, (c2, c1, c0), n_opt, budget / (6 * n_opt),
                                       float(c0 - c1 * c1 / (4 * c2)), used, reason))
    good = [p for p in profiles if p.used]
    if len(good) < 2:
        raise FitError(f"approach 2 needs at least two budgets with {min_sizes}+ sizes and a minimum inside "
                       f"them; got {len(good)}")
    budgets = np.array([p.budget for p in good])
    return Approach2Result(tuple(profiles), fit_power_law(budgets, [p.n_opt for p in good]),
                           fit_power_law(budgets, [p.d_opt for p in good]), tuple(skipped))


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
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

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
                "log_E": math.log(self.E), "log_A": math.log(self.A), "log_B": math.log(self.B),
                "a": self.a, "b": self.b, "G": self.G}


@dataclass(frozen=True)
class Approach3Result:
    params: LossParams
    """The fitted law, unrounded."""
    objective: float
    """Summed Huber loss of the log-loss residuals at the optimum."""
    converged: bool
    """scipy L-BFGS-B reported convergence at the kept optimum."""
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


def huber_objective(p: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss / delta and its gradient, for K parameter rows at once.

    p: (K, 5) rows (log_A, log_B, log_E, alpha, beta); log_n, log_d, log_loss: (n,).
    Returns f (K,) and grad (K, 5). Dividing by delta keeps f of order
    sum |residual| / delta so relative stopping tests stay meaningful; it does
    not move the minimum.
    """
    p = np.atleast_2d(p)
    k = p.shape[0]
    t_n = p[:, 0:1] - p[:, 3:4] * log_n                                # (K, n) log of the A/N^alpha term
    t_d = p[:, 1:2] - p[:, 4:5] * log_d                                # (K, n) log of the B/D^beta term
    # Largest |term| from the parameters alone (cheaper than scanning): below ~700 exp cannot overflow.
    bound = np.maximum(np.abs(p[:, 0]) + np.abs(p[:, 3]) * np.abs(log_n).max(),
                       np.abs(p[:, 1]) + np.abs(p[:, 4]) * np.abs(log_d).max())
    if max(bound.max(), np.abs(p[:, 2]).max()) < 300.0:
        u_n, u_d = np.exp(t_n), np.exp(t_d)
        u_e = np.exp(p[:, 2:3])                                        # (K, 1): E does not depend on the run
        s = u_n + u_d
        s += u_e
        lse = np.log(s)
    else:                                                              # shift by the largest term first
        top = np.maximum(np.maximum(t_n, t_d), p[:, 2:3])
        u_n, u_d, u_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(p[:, 2:3] - top)
        s = u_n + u_d
        s += u_e
        lse = np.log(s)
        lse += top
    r = lse
    r -= log_loss                                                      # residual in log loss (K, n)
    # Huber: with c = clip(r, -delta, delta), c (r - c/2) is r^2/2 inside and delta(|r| - delta/2) outside.
    c = np.clip(r, -delta, delta)
    r -= 0.5 * c
    r *= c
    f = r.sum(axis=1) / delta
    # d(huber)/dr = c; d(LSE)/d(term i) = u_i / s.
    c /= s
    c *= 1.0 / delta
    u_n *= c
    u_d *= c
    g = np.empty((k, 5))
    g[:, 0] = u_n.sum(axis=1)
    g[:, 1] = u_d.sum(axis=1)
    g[:, 2] = (c * u_e).sum(axis=1) if u_e.shape[1] > 1 else u_e[:, 0] * c.sum(axis=1)
    g[:, 3] = -(u_n @ log_n)
    g[:, 4] = -(u_d @ log_d)
    return f, g


# Status codes of the batched optimiser.
_RUNNING, _CONV_GRAD, _CONV_F, _LINE_SEARCH, _MAX_ITER, _NON_FINITE = range(6)


def lbfgs_batch(fg, x0: np.ndarray, *, memory: int = 10, max_iter: int = 2000, gtol: float = 1e-7,
                ftol: float = 1e-12, c1: float = 1e-4, c2: float = 0.9, max_backtracks: int = 50,
                max_expansions: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent L-BFGS runs from each row of x0, advanced in lock step.

    fg(x (k, P)) -> (f (k,), g (k, P)). Line search: backtracking Armijo from
    step 1, or growing steps (x4) while the curvature condition fails; a pair with s.y <= 0 is dropped instead of stored (keeps the
    inverse-Hessian estimate positive definite). Stopping per run as scipy's
    L-BFGS-B: max |g| <= gtol, or (f_old - f_new) <= ftol * max(|f_old|, |f_new|, 1).
    Returns x (K, P), f (K,), status (K,) with 1, 2 = converged.
    """
    x_out = np.array(x0, dtype=float)
    k, dim = x_out.shape
    f_out, g = fg(x_out)
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
            ft, gt = fg(xt)
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
            ft, gt = fg(xt)
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


def _prepare(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = _check_points(n, d, loss)
    if n.size < 6:
        raise FitError(f"approach 3 fits 5 parameters and needs at least 6 runs, got {n.size}")
    return np.log(n), np.log(d), np.log(loss)


def _scipy_lbfgsb(x0: np.ndarray, log_n, log_d, log_loss, delta: float):
    def fun(p):
        f, g = huber_objective(p[None, :], log_n, log_d, log_loss, delta)
        return float(f[0]), g[0]
    # Tighter than scipy's defaults (Epoch AI traced Chinchilla's odd fit to an optimiser stopping early):
    # ftol 1e-10 against the default 2.2e-9, and gtol 1e-5 on f / delta is 1e-8 on the summed Huber loss.
    # Much tighter fails at the optimum: the valley is so flat that f cannot drop by more than rounding.
    return minimize(fun, x0, jac=True, method="L-BFGS-B",
                    options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-10, "gtol": 1e-5})


def fit_approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, starts: np.ndarray | None = None,
                  delta: float = HUBER_DELTA, method: str = "batched", polish: int = 3) -> Approach3Result:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta from every start; keep the best converged optimum.

    method "batched": all starts in the vectorised L-BFGS, then scipy L-BFGS-B
    from the ``polish`` best converged endpoints; scipy's verdict sets
    ``converged``. method "scipy": scipy L-BFGS-B from every start (slow,
    the reference). ``starts`` defaults to Chinchilla's 4500-point grid.
    """
    log_n, log_d, log_loss = _prepare(n, d, loss)
    starts = chinchilla_starts() if starts is None else np.atleast_2d(np.asarray(starts, float))
    if method == "scipy":
        results = [_scipy_lbfgsb(s0, log_n, log_d, log_loss, delta) for s0 in starts]
        f_end = np.array([r.fun for r in results])
        ok = np.array([bool(r.success) for r in results])
        pool = ok if ok.any() else np.ones_like(ok)
        best = int(np.argmin(np.where(pool, f_end, np.inf)))
        res, start = results[best], starts[best]
    elif method == "batched":
        fg = lambda p: huber_objective(p, log_n, log_d, log_loss, delta)  # noqa: E731
        # Starts per batch: large batches cut per-call overhead; ~600k (start, run) pairs keep memory modest.
        chunk = max(256, 600_000 // log_n.size)
        parts = [lbfgs_batch(fg, starts[i:i + chunk]) for i in range(0, len(starts), chunk)]
        f_end = np.concatenate([p[1] for p in parts])
        x_end = np.concatenate([p[0] for p in parts])
        ok = np.isin(np.concatenate([p[2] for p in parts]), (_CONV_GRAD, _CONV_F)) & np.isfinite(f_end)
        pool = ok if ok.any() else np.isfinite(f_end)
        order = np.argsort(np.where(pool, f_end, np.inf))[:max(1, polish)]
        polished = [(_scipy_lbfgsb(x_end[i], log_n, log_d, log_loss, delta), i) for i in order]
        good = [pr for pr in polished if pr[0].success] or polished
        res, idx = min(good, key=lambda pr: pr[0].fun)
        start = starts[idx]
    else:
        raise ValueError(f"method must be 'batched' or 'scipy', got {method!r}")
    best_f = float(res.fun)
    near = int(np.sum(ok & (f_end <= best_f + 1e-6 * max(abs(best_f), 1e-12))))
    return Approach3Result(LossParams.from_vector(res.x), best_f * delta, bool(res.success),
                           str(res.message), int(log_n.size), int(len(starts)), int(ok.sum()), near,
                           tuple(float(v) for v in start), delta)


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    low: float
    """Lower percentile of the bootstrap distribution."""
    high: float
    """Upper percentile."""
    median: float
    """Median of the bootstrap distribution."""

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "median": self.median}


@dataclass(frozen=True)
class BootstrapResult:
    n_resamples: int
    """Resamples drawn (runs drawn with replacement, as many as there are runs)."""
    level: float
    """Central coverage of each interval, e.g. 0.95 for the 2.5th..97.5th percentiles."""
    seed: int
    """Seed of the resampling generator."""
    approach3: dict[str, Interval]
    """Intervals for E, A, B, alpha, beta, a, b, G."""
    approach2: dict[str, Interval]
    """Intervals for a and b of the IsoFLOP approach (empty if no resample could fit it)."""
    n_ok3: int
    """Resamples whose approach-3 refit gave finite parameters (all enter the intervals)."""
    n_unconverged3: int
    """Of those, refits scipy did not call converged."""
    n_ok2: int
    """Resamples where approach 2 could be fitted (two budgets with a minimum inside)."""
    samples: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    """Raw bootstrap draws, keyed 'approach3.alpha', 'approach2.a', ..."""
    note: str = ""
    """How the refits were started."""


def _interval(values: np.ndarray, level: float) -> Interval:
    tail = 100 * (1 - level) / 2
    lo, med, hi = np.percentile(values, [tail, 50.0, 100 - tail])
    return Interval(float(lo), float(hi), float(med))


def bootstrap(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, n_resamples: int = 100, seed: int = 0,
              level: float = 0.95, base: Approach3Result | None = None, starts: np.ndarray | None = None,
              rtol: float = 0.05) -> BootstrapResult:
    """Percentile intervals from refitting approaches 2 and 3 on runs resampled with replacement.

    Refits start from ``starts`` or, by default, ``bootstrap_starts(base.params)``
    (the full-data optimum plus 16 grid points) rather than the 4500-point
    grid, to keep a few hundred refits to seconds.
    """
    n, d, loss = _check_points(n, d, loss)
    if base is None:
        base = fit_approach3(n, d, loss)
    custom_starts = starts is not None
    starts = np.atleast_2d(np.asarray(starts, float)) if custom_starts else bootstrap_starts(base.params)
    rng = np.random.default_rng(seed)
    names3 = ("E", "A", "B", "alpha", "beta", "a", "b", "G")
    draws3: dict[str, list[float]] = {k: [] for k in names3}
    draws2: dict[str, list[float]] = {"a": [], "b": []}
    unconverged = 0
    for _ in range(n_resamples):
        pick = rng.integers(0, n.size, n.size)
        try:
            fit3 = fit_approach3(n[pick], d[pick], loss[pick], starts=starts, delta=base.delta, polish=1)
            values = fit3.params.to_dict()
            if all(math.isfinite(values[k]) for k in names3):
                for k in names3:
                    draws3[k].append(values[k])
                unconverged += not fit3.converged
        except (FitError, OverflowError):
            pass
        try:
            fit2 = fit_approach2(n[pick], d[pick], loss[pick], rtol=rtol)
            draws2["a"].append(fit2.a)
            draws2["b"].append(fit2.b)
        except FitError:
            pass
    arr3 = {k: np.array(v) for k, v in draws3.items()}
    arr2 = {k: np.array(v) for k, v in draws2.items()}
    iv3 = {k: _interval(v, level) for k, v in arr3.items() if v.size}
    iv2 = {k: _interval(v, level) for k, v in arr2.items() if v.size}
    samples = {f"approach3.{k}": v for k, v in arr3.items()} | {f"approach2.{k}": v for k, v in arr2.items()}
    note = (f"approach-3 refits start from {len(starts)} given starts" if custom_starts else
            f"approach-3 refits start from the full-data optimum plus a small grid ({len(starts)} starts, "
            "not the 4500-point grid); the best is polished by scipy L-BFGS-B")
    return BootstrapResult(n_resamples, level, seed, iv3, iv2, len(arr3["E"]), unconverged, len(arr2["a"]),
                           samples, note)
