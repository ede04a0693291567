"""The sweep YAML: the fields of an IsoFLOP sweep, validated at the edge into a frozen ``SweepSpec``.

Pure pydantic, with no torch: a laptop checks a sweep file here before it
sends it to the controller's API (``orchestrator.sweep.submit_remote``), and
the head checks it again and plans it (``scaling.plan``). A bad field is one
line naming it (``SweepError``); keys of ``base`` that the planner sets per run
are refused with what to do instead.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specs.errors import UsageError
from specs.job import SpecError, read_yaml
from specs.validate import PRIORITY_MAX, PRIORITY_MIN, unknown_field

SWEEP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")

# Keys of ``base`` the planner sets per run, with what to do instead.
_PLANNER_KEYS = {
    "name": "the planner names every job <sweep name>-<run>",
    "model.preset": "the planner sizes every model",
    "model.d_model": "widths come from the sweep's vary/width_step/d_model/aspect_ratio",
    "model.n_layers": "depths come from the sweep's vary/n_layers/aspect_ratio",
    "model.n_heads": "heads come from the sweep's head_dim",
    "model.d_ff": "the MLP width follows d_model",
    "model.moe": "sweeps of Switch (MoE) models are not planned (6N would need active parameters)",
    "train.steps": "each run trains for its own train.tokens = C / (6N)",
    "train.tokens": "each run trains for its own train.tokens = C / (6N)",
    "train.warmup_steps": "give base.train.warmup_fraction; the planner converts it per run",
}


class SweepError(UsageError):
    """A sweep that cannot be planned: one line naming the field and what to do."""


class PriorLaw(BaseModel):
    """A loss law L(N, D) = E + A / N^alpha + B / D^beta believed before the sweep (e.g. an earlier fit.json's
    approach 3): the planner centres each budget's sizes on its compute-optimal N."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    E: float = Field(ge=0, le=1e3, allow_inf_nan=False)
    """Irreducible loss."""
    A: float = Field(gt=0, le=1e30, allow_inf_nan=False)
    """Model-size coefficient."""
    B: float = Field(gt=0, le=1e30, allow_inf_nan=False)
    """Data coefficient."""
    alpha: float = Field(gt=0, le=4, allow_inf_nan=False)
    """Exponent of N."""
    beta: float = Field(gt=0, le=4, allow_inf_nan=False)
    """Exponent of D."""

    def n_opt(self, c: float) -> float:
        from scaling.approach3 import LossParams

        return float(LossParams(self.E, self.A, self.B, self.alpha, self.beta).n_opt(c))


class AdaptiveSpec(BaseModel):
    """The adaptive second round: budgets whose IsoFLOP vertex falls outside their sizes get more sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(1, ge=0, le=3)
    """Extension rounds after the first (0 = off)."""
    extra_sizes: int = Field(2, ge=1, le=8)
    """At most this many sizes added to a budget per round, on the side of its vertex."""


class SweepSpec(BaseModel):
    """A sweep YAML, validated at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Sweep name; every job is named <name>-<run> (a-z 0-9 . _ -, at most 32 characters)."""
    family: Literal["gpt2", "llama", "palm"] = "llama"
    """Decoder family of every model in the sweep."""
    vary: Literal["width", "depth", "both"] = "both"
    """How sizes grow: d_model at fixed n_layers, n_layers at fixed d_model, or both near aspect_ratio."""
    budgets: list[float] | None = None
    """Compute budgets C in FLOPs (6ND); give these or total_budget + n_budgets."""
    total_budget: float | None = Field(None, gt=0)
    """Total FLOPs of the whole sweep, spread over n_budgets geometric budgets."""
    n_budgets: int | None = Field(None, ge=2)
    """Number of budgets to spread total_budget over."""
    budget_ratio: float = Field(4.0, ge=1.1)
    """Ratio between consecutive budgets when they come from total_budget."""
    sizes_per_budget: int = Field(5, ge=3)
    """Models per budget (3 or more, so a parabola in log N has a vertex)."""
    size_range: float = Field(8.0, gt=1)
    """Largest over smallest target N at one budget; targets are evenly spaced in log N."""
    tokens_per_param: float = Field(20.0, gt=0, le=1e6, allow_inf_nan=False)
    """D/N at the centre of each budget's sizes when there is no prior and no finished budget to go by
    (Chinchilla found about 20)."""
    prior: PriorLaw | None = None
    """A law to centre every budget's sizes on (its compute-optimal N); without one, budgets with finished
    neighbours are centred on the optimum those predict, the rest on tokens_per_param."""
    adaptive: AdaptiveSpec = Field(default_factory=AdaptiveSpec)
    """Extend budgets whose vertex falls outside their sizes once their runs have finished."""
    repeats: int = Field(1, ge=1, le=16)
    """Runs per (budget, size), with train.seed = base seed + 0, 1, ...: they measure run-to-run noise,
    which the fit reports, and the bootstrap resamples them with the rest."""
    head_dim: int = Field(32, ge=2)
    """Width of one attention head; n_heads = d_model / head_dim."""
    width_step: int = Field(32, ge=1)
    """d_model takes multiples of this (must be a multiple of head_dim)."""
    n_layers: int = Field(4, ge=1)
    """Depth kept fixed when vary is 'width'."""
    d_model: int = Field(128, ge=2)
    """Width kept fixed when vary is 'depth' (a multiple of head_dim)."""
    aspect_ratio: float = Field(64.0, gt=0)
    """Target d_model / n_layers when vary is 'both'; shapes stay within a factor 2 of it."""
    vocab_size: int | None = Field(None, ge=1)
    """Embedding rows for counting N; default from base.data (320 for the byte tokenizer)."""
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    """Scheduling priority of every run (higher runs first, -1000000 to 1000000)."""
    base: dict[str, Any] = Field(default_factory=dict)
    """Partial job spec shared by every run (data, train recipe, resources, ...); may hold
    train.warmup_fraction, which the planner turns into each run's train.warmup_steps."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SWEEP_NAME_RE.match(v):
            raise ValueError("must be 1-32 of a-z 0-9 . _ - and start with a letter or digit")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one budget")
        if any(not (math.isfinite(c) and c > 0) for c in v):
            raise ValueError("every budget must be a positive number of FLOPs")
        labels = [budget_label(c) for c in v]
        if len(set(labels)) != len(labels):
            raise ValueError("budgets must differ in their first 3 significant digits")
        return sorted(float(c) for c in v)

    @model_validator(mode="after")
    def _combinations(self) -> "SweepSpec":
        if (self.budgets is None) == (self.total_budget is None):
            raise ValueError("budgets: give either budgets or total_budget with n_budgets")
        if self.total_budget is not None and self.n_budgets is None:
            raise ValueError("n_budgets: needed with total_budget")
        if self.budgets is not None and self.n_budgets is not None:
            raise ValueError("n_budgets: goes with total_budget, not with budgets")
        if self.family in ("llama", "palm") and self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.vary != "depth" and self.width_step % self.head_dim:
            raise ValueError(f"width_step: {self.width_step} must be a multiple of head_dim ({self.head_dim})")
        if self.vary == "depth" and self.d_model % self.head_dim:
            raise ValueError(f"d_model: {self.d_model} must be a multiple of head_dim ({self.head_dim})")
        _check_base(self.base, self.family)
        return self

    def budget_list(self) -> list[float]:
        """The budgets, ascending."""
        if self.budgets is not None:
            return list(self.budgets)
        return budgets_from_total(self.total_budget, self.n_budgets, self.budget_ratio, self.sizes_per_budget)

    def job_base(self) -> dict[str, Any]:
        """``base`` as a job spec: a copy without the planner's train.warmup_fraction."""
        out = copy.deepcopy(self.base)
        out.get("train", {}).pop("warmup_fraction", None)
        return out

    @property
    def warmup_fraction(self) -> float:
        """base.train.warmup_fraction, default 0.05."""
        return float(self.base.get("train", {}).get("warmup_fraction", 0.05))


def _check_base(base: dict[str, Any], family: str) -> None:
    for key, why in _PLANNER_KEYS.items():
        node: Any = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ValueError(f"base.{key}: set by the planner ({why}); remove it")
    for section in ("model", "data", "train", "resources"):
        if section in base and not isinstance(base[section], dict):
            raise ValueError(f"base.{section}: expected a mapping")
    fam = base.get("model", {}).get("family")
    if fam is not None and fam != family:
        raise ValueError(f"base.model.family: {fam!r} contradicts the sweep's family {family!r}; remove it")
    frac = base.get("train", {}).get("warmup_fraction", 0.05)
    if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise ValueError(f"base.train.warmup_fraction: must be a number in [0, 1), got {frac!r}")


def budgets_from_total(total: float, n_budgets: int, ratio: float, sizes_per_budget: int) -> list[float]:
    """Geometric budgets C0 * ratio^i whose runs (sizes_per_budget each) add up to ``total``."""
    c0 = total / (sizes_per_budget * sum(ratio ** i for i in range(n_budgets)))
    return [c0 * ratio ** i for i in range(n_budgets)]


def budget_label(c: float) -> str:
    """'1e12', '3.16e12', '250': three significant digits, no '+' (names must be filesystem-safe)."""
    return f"{c:.3g}".replace("e+", "e").replace("e0", "e")


def run_name(budget: float, n_params: int) -> str:
    """Deterministic, filesystem-safe run name, e.g. c1e12-n123456."""
    return f"c{budget_label(budget)}-n{n_params}"


# ----------------------------------------------------------------------------- loading


def validate_sweep(raw: Any, source: str = "sweep") -> SweepSpec:
    """A raw mapping (e.g. from YAML) -> SweepSpec, or SweepError with one line naming the field."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: expected a mapping with name, family, budgets, ...")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown_field(SweepSpec, tuple(e["loc"]), see="Scaling-law sweeps (Chinchilla)")
        head = f"{loc}: " if loc and not msg.startswith(("base.", "budgets:", "n_budgets:", "head_dim:",
                                                         "width_step:", "d_model:")) else ""
        raise SweepError(f"{source}: {head}{msg}") from None


def load_sweep(path: str) -> SweepSpec:
    """Read and validate a sweep YAML from any fsspec path."""
    try:
        raw = read_yaml(path)
    except SpecError as err:
        raise SweepError(str(err).replace("spec file", "sweep file")) from None
    return validate_sweep(raw, source=path)
