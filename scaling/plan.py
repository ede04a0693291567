"""Scaling-law sweeps: the planner that turns a sweep (``scaling.sweep_spec``) into runs.

A sweep fixes a list of compute budgets C and, per budget, trains
``sizes_per_budget`` models whose sizes N are spread evenly in log N around
Chinchilla's rule of thumb N ~ sqrt(C / (6 * 20)) (about 20 tokens per
parameter), each for D = C / (6 N) tokens: the IsoFLOP design of Chinchilla's
approach 2, which ``scaling.fit`` then fits three ways.

The planner is pure: no Ray, no torch, no files. It walks a ladder of model shapes
(wider, deeper, or both), counts every shape's parameters exactly with
``models.transformer_config.param_counts`` using the vocabulary and sequence length
the jobs will use, picks the shapes nearest each target N, and returns one
``PlannedRun`` per job with the dotted job-spec overrides to apply to the
sweep's ``base``. Every run's job spec is validated here, so a bad base fails
before anything is submitted.

N*D*6 meets the budget to within rounding D to whole tokens:
|6 N D - C| <= 3 N, i.e. a relative error of at most 1 / (2 D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from models.transformer_config import decoder_config, flops_per_token, param_counts
from scaling.sweep_spec import SweepError, SweepSpec, run_name
from specs.job import DataSpec, ModelSpec, SpecError, apply_overrides, validate_spec


# ----------------------------------------------------------------------------- shapes and counts


@dataclass(frozen=True)
class ShapeCount:
    """One model shape with its exact sizes."""

    d_model: int
    """Residual width."""
    n_layers: int
    """Blocks."""
    n_heads: int
    """Query heads (d_model / head_dim)."""
    n_params: int
    """All parameters (Chinchilla's N)."""
    n_params_non_embedding: int
    """Without vocabulary-sized matrices and the position table (Kaplan's N)."""
    flops_per_token_6n: float
    """6 N: training FLOPs per token by Chinchilla's count."""
    flops_per_token_with_attention: float
    """6 N plus attention scores and values: 12 * n_layers * n_heads * head_dim * seq_len."""


def count_shape(family: str, d_model: int, n_layers: int, n_heads: int, *, vocab_size: int, seq_len: int,
                model: ModelSpec | None = None) -> ShapeCount:
    """Exact counts for one shape, honouring base model switches (n_kv_heads, parallel_block, tie_embeddings)."""
    m = model or ModelSpec(family=family)
    cfg = decoder_config(family, None, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         vocab_size=vocab_size, seq_len=seq_len, n_kv_heads=m.n_kv_heads,
                         parallel_block=m.parallel_block, tie_embeddings=m.tie_embeddings)
    counts, fpt = param_counts(cfg), flops_per_token(cfg)
    return ShapeCount(d_model, n_layers, n_heads, counts["total"], counts["non_embedding"],
                      fpt["6N"], fpt["with_attention"])


def job_vocab_size(data: DataSpec) -> int:
    """Embedding rows the job's model will have: the tokenizer's vocabulary padded to 64.

    For BPE this assumes training reaches data.vocab_size; on a small corpus it
    may stop short (the results table records the built model's real N).
    """
    from data.tokenizer import SPECIAL_TOKENS, VOCAB_MULTIPLE

    used = 256 + len(SPECIAL_TOKENS) if data.tokenizer == "byte" else data.vocab_size
    return -(-used // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def shape_ladder(spec: SweepSpec, max_params: float, *, vocab_size: int, seq_len: int,
                 model: ModelSpec | None = None) -> list[ShapeCount]:
    """Candidate shapes of the sweep's kind, smallest first, up to just past ``max_params``."""
    out: list[ShapeCount] = []

    def add(d: int, layers: int) -> ShapeCount | None:
        try:
            sc = count_shape(spec.family, d, layers, d // spec.head_dim, vocab_size=vocab_size,
                             seq_len=seq_len, model=model)
        except ValueError:               # e.g. base n_kv_heads does not divide this n_heads
            return None
        out.append(sc)
        return sc

    if spec.vary == "width":
        for k in range(1, 4097):
            sc = add(k * spec.width_step, spec.n_layers)
            if sc is not None and sc.n_params > max_params:
                break
    elif spec.vary == "depth":
        for layers in range(1, 1025):
            sc = add(spec.d_model, layers)
            if sc is not None and sc.n_params > max_params:
                break
    else:
        step = spec.width_step
        for layers in range(1, 1025):
            lo = max(step, step * math.ceil(spec.aspect_ratio * layers / 2 / step))
            hi = step * math.floor(spec.aspect_ratio * layers * 2 / step)
            sizes = [sc for d in range(lo, hi + 1, step) if (sc := add(d, layers)) is not None]
            if sizes and min(sc.n_params for sc in sizes) > max_params:
                break
    return sorted(out, key=lambda sc: (sc.n_params, sc.n_layers))


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedRun:
    """One job of the sweep."""

    name: str
    """Run id within the sweep, e.g. c1e12-n123456 (also its results file name)."""
    job_name: str
    """Job name: <sweep name>-<run id>."""
    budget: float
    """Requested compute budget C."""
    target_n: float
    """The N this slot aimed for (the chosen shape's N is the nearest on the ladder)."""
    shape: ShapeCount
    """Model shape and its exact sizes."""
    tokens: int
    """D = round(C / (6N)) tokens."""
    steps: int
    """Optimizer steps: ceil(D / tokens per step)."""
    warmup_steps: int
    """round(warmup_fraction * steps)."""
    overrides: dict[str, Any] = field(hash=False)
    """Dotted job-spec keys to set on the sweep's job base."""
    round: int = 1
    """1 for the planned grid, 2 and up for the adaptive rounds that extend it."""
    tokens_per_step: int = 0
    """Tokens per optimizer step of the run's job."""

    @property
    def n_params(self) -> int:
        return self.shape.n_params

    @property
    def n_params_non_embedding(self) -> int:
        return self.shape.n_params_non_embedding

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.shape.n_params * self.tokens

    @property
    def flops_6nd_non_embedding(self) -> float:
        return 6.0 * self.shape.n_params_non_embedding * self.tokens

    @property
    def flops_with_attention(self) -> float:
        return self.shape.flops_per_token_with_attention * self.tokens


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    """The sweep this plans."""
    budgets: tuple[float, ...]
    """Budgets, ascending."""
    runs: tuple[PlannedRun, ...]
    """Runs by budget, then by N."""
    vocab_size: int
    """Embedding rows used for counting."""
    seq_len: int
    """Sequence length used for counting attention FLOPs."""
    tokens_per_step: int
    """micro_batch x grad_accum x data-parallel workers x seq_len."""

    @property
    def total_flops(self) -> float:
        return sum(r.flops_6nd for r in self.runs)

    def job_spec(self, run: PlannedRun) -> dict[str, Any]:
        """The run's full raw job spec: the sweep's job base with the run's overrides."""
        return apply_overrides(self.spec.job_base(), run.overrides)


def _pick(ladder: list[ShapeCount], targets: np.ndarray, spec: SweepSpec, budget: float) -> list[ShapeCount]:
    """Distinct-N shapes for the sorted targets, minimising the summed |ln N - ln target| (dynamic programme).

    A greedy nearest pick fails on coarse ladders when two targets want the
    same shape; assigning all targets at once keeps the spread. Each pick must
    land within one spacing of its target, or the ladder cannot serve the budget.
    """
    n = np.array([sc.n_params for sc in ladder], dtype=float)          # ascending
    miss = np.abs(np.log(n)[None, :] - np.log(targets)[:, None])         # (k, M)
    # With vary=both many shapes have similar N: prefer the one nearest the target aspect ratio.
    tilt = np.array([abs(math.log(sc.d_model / sc.n_layers / spec.aspect_ratio)) for sc in ladder])
    cost = miss + (0.05 * tilt if spec.vary == "both" else 0.0)
    first_same = np.searchsorted(n, n, side="left")                      # picks need strictly larger N
    k, m = cost.shape
    total = cost[0].copy()
    back = np.zeros((k, m), dtype=int)
    for j in range(1, k):
        run_min = np.minimum.accumulate(total)
        run_arg = np.zeros(m, dtype=int)
        for i in range(1, m):                                            # argmin of the running minimum
            run_arg[i] = i if total[i] < run_min[i - 1] else run_arg[i - 1]
        prev = first_same - 1                                            # best among strictly smaller N
        ok = prev >= 0
        new = np.full(m, np.inf)
        new[ok] = cost[j, ok] + run_min[prev[ok]]
        back[j, ok] = run_arg[prev[ok]]
        total = new
    if not np.isfinite(total).any():
        raise SweepError(f"budgets: the {spec.vary} ladder has fewer than {k} distinct sizes; extend the ladder")
    picks = [int(np.argmin(total))]
    for j in range(k - 1, 0, -1):
        picks.append(int(back[j, picks[-1]]))
    picks.reverse()
    spacing = math.log(spec.size_range) / (k - 1)
    for j, i in enumerate(picks):
        if miss[j, i] > spacing:
            raise SweepError(f"budgets: the {spec.vary} ladder has no free shape near N={targets[j]:,.0f} for "
                             f"C={budget:.4g} (best N={ladder[i].n_params:,}); change the budgets, size_range "
                             f"or the ladder (head_dim, width_step, n_layers, d_model, aspect_ratio)")
    return [ladder[i] for i in picks]


def _section(cls: type[BaseModel], raw: dict[str, Any], name: str) -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise SweepError(f"base.{name}.{loc}: {e['msg'].removeprefix('Value error, ')}") from None


@dataclass(frozen=True)
class _Context:
    job_base: dict[str, Any]
    data: DataSpec
    model: ModelSpec
    vocab: int


def _context(spec: SweepSpec) -> _Context:
    job_base = spec.job_base()
    data = _section(DataSpec, job_base.get("data", {}), "data")
    model = _section(ModelSpec, {**job_base.get("model", {}), "family": spec.family, "preset": None}, "model")
    return _Context(job_base, data, model, spec.vocab_size or job_vocab_size(data))


def _ladder(spec: SweepSpec, ctx: _Context, max_target: float) -> list[ShapeCount]:
    ladder = shape_ladder(spec, max_target, vocab_size=ctx.vocab, seq_len=ctx.data.seq_len, model=ctx.model)
    if not ladder:
        raise SweepError("the shape ladder is empty; check head_dim, width_step and base.model.n_kv_heads")
    return ladder


def _runs_for(spec: SweepSpec, ctx: _Context, budget: float, centre: float, shapes: list[ShapeCount],
              names: set[str], round_no: int = 1) -> list[PlannedRun]:
    """One PlannedRun per shape (and per repeat) at this budget, each with its validated job overrides."""
    out = []
    seed0 = int(ctx.job_base.get("train", {}).get("seed", 0) or 0)
    for sc in shapes:
        base_name = run_name(budget, sc.n_params)
        if base_name in names:
            base_name = f"{base_name}-l{sc.n_layers}d{sc.d_model}"
        for rep in range(spec.repeats):
            name = base_name if spec.repeats == 1 else f"{base_name}-s{rep}"
            names.add(name)
            tokens = max(1, round(budget / (6.0 * sc.n_params)))
            overrides: dict[str, Any] = {
                "name": f"{spec.name}-{name}",
                "model.family": spec.family,
                "model.preset": None,
                "model.d_model": sc.d_model,
                "model.n_layers": sc.n_layers,
                "model.n_heads": sc.n_heads,
                "train.tokens": tokens,
            }
            if spec.repeats > 1:
                overrides["train.seed"] = seed0 + rep
            source = f"sweep {spec.name}, run {name}"
            try:
                # Validate once to learn the step count the trainer will use, then again with the warm-up.
                job = validate_spec(apply_overrides(ctx.job_base, overrides), source=source)
                steps = job.total_steps
                overrides["train.warmup_steps"] = round(spec.warmup_fraction * steps)
                validate_spec(apply_overrides(ctx.job_base, overrides), source=source)
            except SpecError as err:
                raise SweepError(f"base does not make a valid job spec: {err}") from None
            out.append(PlannedRun(name, overrides["name"], budget, float(centre), sc, tokens, steps,
                                  overrides["train.warmup_steps"], overrides, round_no, job.tokens_per_step))
    return out


def default_centre(spec: SweepSpec, budget: float) -> float:
    """The N a budget's sizes are centred on from the spec alone: the prior's N_opt, else sqrt(C / (6 tokens_per_param))."""
    if spec.prior is not None:
        return spec.prior.n_opt(budget)
    return math.sqrt(budget / (6.0 * spec.tokens_per_param))


def centres_from_results(budgets: list[float], n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict[float, float]:
    """Predicted N_opt for the budgets that have no runs yet, from the IsoFLOP vertices of those that have.

    With two or more interior vertices: the power law through them
    (approach 2). With one: that vertex scaled by (C / C_vertex)^0.5, the
    exponent published fits are near. With none: nothing (the planner then
    uses ``default_centre``).
    """
    from scaling.fit import fit_power_law, isoflop_profiles, point_problem

    n, d, loss = (np.asarray(v, float).ravel() for v in (n, d, loss))
    if n.size < 3 or point_problem(n, d, loss) is not None:
        return {}
    used = [p for p in isoflop_profiles(n, d, loss)[0] if p.used]
    if not used:
        return {}
    if len(used) >= 2:
        law = fit_power_law(np.array([p.budget for p in used]), np.array([p.n_opt for p in used]))
        predict = lambda c: float(law(c))  # noqa: E731
    else:
        predict = lambda c: float(used[0].n_opt * (c / used[0].budget) ** 0.5)  # noqa: E731
    have = 6.0 * n * d
    return {b: predict(b) for b in budgets if not np.any(np.abs(np.log(have / b)) <= math.log1p(0.05))}


def plan_sweep(spec: SweepSpec, *, centres: dict[float, float] | None = None,
               history: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SweepPlan:
    """Pick sizes_per_budget shapes per budget, centred on its predicted optimum, and give each run its job.

    A budget's centre is, first, ``centres[budget]`` (what an earlier submit
    of the same sweep planned, so resubmitting never renames its runs); else,
    without a ``prior``, the optimum ``history`` (N, D, loss of finished runs)
    predicts for budgets it has no runs at (``centres_from_results``); else
    ``default_centre``. The sizes span size_range evenly in log N around it.
    """
    ctx = _context(spec)
    budgets = spec.budget_list()
    k = spec.sizes_per_budget
    offsets = spec.size_range ** np.linspace(-0.5, 0.5, k)
    learned = centres_from_results(budgets, *history) if history is not None and spec.prior is None else {}
    given = centres or {}
    chosen = [given.get(c, learned.get(c, default_centre(spec, c))) for c in budgets]
    ladder = _ladder(spec, ctx, max(chosen) * offsets[-1] * spec.size_range ** (1.0 / (k - 1)) * 1.5)
    runs: list[PlannedRun] = []
    names: set[str] = set()
    for budget, centre in zip(budgets, chosen):
        runs += _runs_for(spec, ctx, budget, centre, _pick(ladder, centre * offsets, spec, budget), names)
    return SweepPlan(spec, tuple(budgets), tuple(runs), ctx.vocab, ctx.data.seq_len,
                     runs[-1].tokens_per_step if runs else 0)


@dataclass(frozen=True)
class Extension:
    """Why a budget gets more sizes in an adaptive round."""

    budget: float
    """The budget extended."""
    side: str
    """'larger' or 'smaller': where its vertex (or its lowest loss, with no vertex) lies."""
    reason: str
    """One line for the log and the sweep record."""


def extend_plan(spec: SweepSpec, planned: list[PlannedRun], n: np.ndarray, d: np.ndarray, loss: np.ndarray,
                round_no: int = 2) -> tuple[list[PlannedRun], list[Extension]]:
    """The adaptive round: more sizes for every budget whose IsoFLOP minimum lies outside the sizes it trained.

    ``planned`` are the runs so far (any round), ``n, d, loss`` their results.
    A budget whose parabola's vertex is beyond its largest (smallest) size, or
    that has no convex parabola and its lowest loss at that end, gets up to
    ``adaptive.extra_sizes`` new sizes past that end at the budget's own log
    spacing: enough to reach one step beyond the vertex when it is near,
    all of them when it is far. Returns the new runs and why.
    """
    from scaling.fit import fit_parabola

    if spec.adaptive.rounds < 1 or round_no - 1 > spec.adaptive.rounds:
        return [], []
    ctx = _context(spec)
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    k = spec.sizes_per_budget
    step = math.log(spec.size_range) / (k - 1)
    names = {r.name for r in planned}
    jobs: list[tuple[float, float, list[float], str]] = []
    extensions: list[Extension] = []
    for budget in sorted({r.budget for r in planned}):
        sel = np.abs(np.log(6.0 * n * d / budget)) <= math.log1p(0.05)
        ns, ls = n[sel], loss[sel]
        sizes = np.unique(ns)
        if sizes.size < 3:
            continue
        lo, hi = float(np.log(sizes.min())), float(np.log(sizes.max()))
        c2, c1, _ = fit_parabola(ns, ls)
        vertex = -c1 / (2 * c2) if c2 > 0 else None
        best = float(np.log(ns[int(np.argmin(ls))]))
        if vertex is not None and vertex > hi:
            side, far = "larger", vertex - hi
        elif vertex is not None and vertex < lo:
            side, far = "smaller", lo - vertex
        elif vertex is None and best >= hi - 1e-9:
            side, far = "larger", math.inf
        elif vertex is None and best <= lo + 1e-9:
            side, far = "smaller", math.inf
        else:
            continue
        count = min(spec.adaptive.extra_sizes, max(1, math.ceil(far / step) + 1))
        sign = 1.0 if side == "larger" else -1.0
        edge = hi if side == "larger" else lo
        targets = [math.exp(edge + sign * step * j) for j in range(1, count + 1)]
        where = (f"vertex N={math.exp(vertex):,.0f}" if vertex is not None else "no convex minimum; lowest loss")
        reason = (f"C={budget:.4g}: {where} beyond the {side} end of its sizes "
                  f"({math.exp(lo):,.0f}..{math.exp(hi):,.0f}); adding {count} {side} sizes")
        jobs.append((budget, math.exp(vertex) if vertex is not None else math.exp(edge), targets, side))
        extensions.append(Extension(budget, side, reason))
    if not jobs:
        return [], []
    ladder = _ladder(spec, ctx, max(max(t) for _, _, t, _ in jobs) * 2.0)
    taken = {r.n_params for r in planned}
    new: list[PlannedRun] = []
    for budget, centre, targets, side in jobs:
        free = [sc for sc in ladder if sc.n_params not in taken]
        shapes = []
        for t in targets:
            if not free:
                break
            sc = min(free, key=lambda s: abs(math.log(s.n_params / t)))
            if abs(math.log(sc.n_params / t)) > step:
                continue                              # the ladder has nothing near this size
            if (side == "larger") != (sc.n_params > max(r.n_params for r in planned if r.budget == budget)):
                continue
            shapes.append(sc)
            free.remove(sc)
        shapes.sort(key=lambda s: s.n_params)
        # A budget needs enough tokens for its smallest new size to train at least one step; _runs_for validates.
        new += _runs_for(spec, ctx, budget, centre, shapes, names, round_no)
    return new, extensions


# ----------------------------------------------------------------------------- printing


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_plan(plan: SweepPlan, tokens_per_second: float | None = None,
                flops_per_second: float | None = None) -> str:
    """The plan as a text table; with a throughput, an estimated time per run and in total.

    ``flops_per_second`` (attention-inclusive FLOPs) scales with model size and
    is the better estimate; ``tokens_per_second`` assumes every size runs at
    the same token rate, which only holds for a narrow range of sizes.
    """
    s = plan.spec
    lines = [f"sweep {s.name}: {s.family}, vary {s.vary}, {len(plan.budgets)} budgets x "
             f"{s.sizes_per_budget} sizes = {len(plan.runs)} runs; vocab {plan.vocab_size}, "
             f"seq_len {plan.seq_len}, {plan.tokens_per_step} tokens/step, priority {s.priority}"]
    header = (f"{'run':<28} {'L':>3} {'d':>5} {'h':>3} {'N':>13} {'N non-emb':>13} {'D tokens':>15} "
              f"{'D/N':>6} {'C=6ND':>9} {'C attn':>9} {'steps':>8} {'warmup':>6}")
    timed = tokens_per_second is not None or flops_per_second is not None
    if timed:
        header += f" {'est. time':>10}"
    lines.append(header)
    total_time = 0.0
    for r in plan.runs:
        row = (f"{r.name:<28} {r.shape.n_layers:>3} {r.shape.d_model:>5} {r.shape.n_heads:>3} "
               f"{r.n_params:>13,} {r.n_params_non_embedding:>13,} {r.tokens:>15,} {r.tokens / r.n_params:>6.1f} "
               f"{r.flops_6nd:>9.3g} {r.flops_with_attention:>9.3g} {r.steps:>8,} {r.warmup_steps:>6,}")
        if timed:
            t = (r.flops_with_attention / flops_per_second if flops_per_second is not None
                 else r.tokens / tokens_per_second)
            total_time += t
            row += f" {_duration(t):>10}"
        lines.append(row)
    with_attention = sum(r.flops_with_attention for r in plan.runs)
    total = f"total: C=6ND {plan.total_flops:.4g} FLOPs, with attention {with_attention:.4g}"
    if timed:
        total += f"; estimated {_duration(total_time)} run one after another"
    lines.append(total)
    return "\n".join(lines)
