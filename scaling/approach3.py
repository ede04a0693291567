"""Chinchilla's approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted to the runs' losses.

The fit is to log loss with a Huber loss (delta 1e-3) summed over runs, in the
log-sum-exp form log L = LSE(log A - alpha ln N, log B - beta ln D, log E), by
L-BFGS from Chinchilla's grid of 4500 starts. Then a = beta / (alpha + beta),
b = alpha / (alpha + beta), N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
G = (alpha A / (beta B))^(1 / (alpha + beta)).

Epoch AI's replication found Chinchilla's optimiser stopped early, so
convergence is checked: scipy's L-BFGS-B has the last word on the chosen
optimum, inside ``param_bounds``; an optimum on a bound is a boundary
solution, never "converged". No parameter is rounded.

Why the grid runs in a vectorised L-BFGS of our own: scipy's L-BFGS-B costs
about 7 ms per start on 300 runs here (some 60 iterations, most of it
per-iteration driver overhead, and 20x more when OpenBLAS's thread pool is
awake, scipy issue #22438), so 4500 starts take half a minute or more. The
batched optimiser below advances every start at once with the analytic
gradient (the same quasi-Newton method, with a backtracking/expanding Armijo
line search) in a few seconds, and the best converged endpoints are then
polished and certified by scipy's L-BFGS-B. ``fit_approach3(...,
method="scipy")`` runs scipy from every start instead, as the reference; a
test checks the two agree. The bootstrap's refits (``refit_weighted``) run
every resample as rows of one batch of the same optimiser.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from scaling.fit import FitError, check_points

HUBER_DELTA = 1e-3
"""Chinchilla's Huber threshold on log-loss residuals."""


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


def _search_direction(g, s_hist, y_hist, rho, gamma, it: int) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS's two-loop recursion, newest pair first (slots are a ring indexed by iteration): the
    direction and its slope per run. A run whose direction lost descent restarts from steepest descent
    (its pairs are dropped: ``rho`` is updated in place)."""
    memory = rho.shape[1]
    q = g.copy()
    coef = np.zeros_like(rho)
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
    if uphill.any():
        rho[uphill] = 0.0
        direction[uphill] = -g[uphill] / np.maximum(np.linalg.norm(g[uphill], axis=1), 1.0)[:, None]
        gd[uphill] = np.einsum("kp,kp->k", g[uphill], direction[uphill])
    return direction, gd


def _expand_steps(fg, live, x, f, direction, gd, grow, step, new: tuple, c1: float, c2: float,
                  max_expansions: int) -> None:
    """Steps growing x4 for the runs in ``grow`` while the curvature condition fails and f keeps falling;
    ``step`` and the accepted points ``new`` = (x, f, g) are updated in place."""
    x_new, f_new, g_new = new
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
        direction, gd = _search_direction(g, s_hist, y_hist, rho, gamma, it)
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
        _expand_steps(fg, live, x, f, direction, gd, grow, step, (x_new, f_new, g_new), c1, c2, max_expansions)
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
    n, d, loss = check_points(n, d, loss)
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


# ----------------------------------------------------------------------------- refits for the bootstrap


NAMES3 = ("E", "A", "B", "alpha", "beta", "a", "b", "G")
"""The values of approach 3 the bootstrap gives intervals for."""


def _values3(x: np.ndarray) -> dict[str, float] | None:
    try:
        values = LossParams.from_vector(x).to_dict()
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return values if all(math.isfinite(values[k]) for k in NAMES3) else None


def refit_weighted(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float, weights: np.ndarray,
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
