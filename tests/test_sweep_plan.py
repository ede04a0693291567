"""Sweep specs (scaling.sweep_spec), the planner (scaling.plan) and the results table (scaling.table).

Pure unit tests: no Ray, no training. Parameter and FLOP counts are checked
against arithmetic done by hand, matrix by matrix.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from specs.errors import UsageError
from specs.job import apply_overrides, validate_spec
from scaling.plan import count_shape, format_plan, plan_sweep
from scaling.sweep_spec import SweepError, SweepSpec, budgets_from_total, load_sweep, run_name, validate_sweep
from scaling.table import COLUMNS, SCHEMA, append_row, make_row, read_results, results_path

BASE = {"train": {"warmup_fraction": 0.1, "lr": 1e-3, "micro_batch": 4},
        "resources": {"workers": 1}, "data": {"seq_len": 64}}
TOKENS_PER_STEP = 4 * 1 * 1 * 64            # micro_batch x grad_accum x workers x seq_len


@pytest.fixture(scope="module")
def plan():
    return plan_sweep(SweepSpec(name="t", family="llama", budgets=[1e13, 3e13, 1e14], base=BASE))


# ----------------------------------------------------------------------------- counting by hand


def test_llama_tiny_counts_by_hand():
    sc = count_shape("llama", 96, 3, 4, vocab_size=320, seq_len=128)
    d, ff, layers, vocab = 96, 256, 3, 320          # SwiGLU width: 32 * ceil(8 * 96 / 3 / 32) = 256
    attn = 4 * d * d                                # q, k, v, o, no biases, 4 kv heads = MHA
    mlp = 3 * d * ff                                # gate, up, down
    norms = 2 * d                                   # two RMSNorm weights per block
    non_embedding = layers * (attn + mlp + norms) + d             # + final norm
    assert non_embedding == 332_448
    total = non_embedding + vocab * d + vocab * d                  # untied embedding and lm_head
    assert (sc.n_params_non_embedding, sc.n_params) == (non_embedding, total) == (332_448, 393_888)
    assert sc.flops_per_token_6n == 6 * 393_888
    # Attention scores and values: 12 * layers * heads * head_dim * seq_len = 12 * 3 * 4 * 24 * 128.
    assert sc.flops_per_token_with_attention == 6 * 393_888 + 442_368


def test_gpt2_and_palm_tiny_counts_by_hand():
    gpt2 = count_shape("gpt2", 96, 3, 4, vocab_size=320, seq_len=128)
    attn = 4 * 96 * 96 + 4 * 96                     # weights + q, k, v, o biases
    mlp = 2 * 96 * 384 + 384 + 96                   # GELU 4x MLP with biases
    norms = 2 * (96 + 96)                           # two LayerNorms with bias
    non_emb = 3 * (attn + mlp + norms) + 2 * 96
    assert gpt2.n_params_non_embedding == non_emb == 335_712
    assert gpt2.n_params == non_emb + 320 * 96 + 128 * 96 == 378_720   # tied head, learned positions

    palm = count_shape("palm", 96, 3, 4, vocab_size=320, seq_len=128)
    attn = 96 * 96 + 2 * 96 * 24 + 96 * 96          # multi-query: one 24-wide k and v head
    block = attn + 3 * 96 * 256 + 96                # one norm per parallel block
    assert palm.n_params_non_embedding == 3 * block + 96 == 290_688
    assert palm.n_params == 290_688 + 320 * 96 == 321_408                # tied


# ----------------------------------------------------------------------------- the planner


def test_planned_n_times_d_times_6_is_the_budget(plan):
    assert len(plan.runs) == 15
    for r in plan.runs:
        # D is rounded to whole tokens: off by at most half a token's FLOPs, 3N.
        assert abs(6 * r.n_params * r.tokens - r.budget) <= 3 * r.n_params
        assert r.flops_6nd == 6 * r.n_params * r.tokens
        assert abs(r.flops_6nd / r.budget - 1) <= 1 / (2 * r.tokens)
        assert isinstance(r.tokens, int)


def test_sizes_spread_around_twenty_tokens_per_parameter(plan):
    for c in plan.budgets:
        runs = [r for r in plan.runs if r.budget == c]
        sizes = [r.n_params for r in runs]
        assert len(runs) == 5 and sizes == sorted(set(sizes))
        centre = math.sqrt(c / 120)
        middle = runs[2]
        assert 0.6 < middle.n_params / centre < 1.7
        assert 10 < middle.tokens / middle.n_params < 40
        assert sizes[-1] / sizes[0] > 4                 # spread over the size_range (8x by default)


def test_overrides_are_exact_and_make_valid_jobs(plan):
    for r in plan.runs:
        assert set(r.overrides) == {"name", "model.family", "model.preset", "model.d_model", "model.n_layers",
                                    "model.n_heads", "train.tokens", "train.warmup_steps"}
        o = r.overrides
        assert o["name"] == f"t-{r.name}" and o["model.preset"] is None and o["model.family"] == "llama"
        assert (o["model.d_model"], o["model.n_layers"], o["model.n_heads"]) == (
            r.shape.d_model, r.shape.n_layers, r.shape.d_model // 32)
        assert o["train.tokens"] == r.tokens
        steps = math.ceil(r.tokens / TOKENS_PER_STEP)
        assert r.steps == steps and o["train.warmup_steps"] == round(0.1 * steps)
        job = validate_spec(plan.job_spec(r))
        assert job.total_steps == steps and job.train.lr == 1e-3 and job.name == f"t-{r.name}"
        # The job's model has exactly the N the plan counted.
        again = count_shape("llama", job.model.d_model, job.model.n_layers, job.model.n_heads,
                            vocab_size=320, seq_len=job.data.seq_len)
        assert again.n_params == r.n_params
        assert r.flops_with_attention == (6 * r.n_params + 12 * r.shape.n_layers * r.shape.d_model * 64) * r.tokens
    assert plan.tokens_per_step == TOKENS_PER_STEP
    assert "warmup_fraction" not in plan.job_spec(plan.runs[0])["train"]


def test_run_names_are_deterministic_and_filesystem_safe(plan):
    names = [r.name for r in plan.runs]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"c[0-9.e]+-n[0-9]+", n) for n in names)
    assert names == [r.name for r in plan_sweep(plan.spec).runs]
    assert run_name(1e12, 123456) == "c1e12-n123456"
    assert run_name(3.16e12, 5) == "c3.16e12-n5"


def test_total_budget_is_spread_geometrically():
    spec = SweepSpec(name="g", family="palm", vary="width", total_budget=1e16, n_budgets=3, budget_ratio=3,
                     sizes_per_budget=4)
    plan = plan_sweep(spec)
    assert [b / plan.budgets[0] for b in plan.budgets] == pytest.approx([1, 3, 9])
    assert sum(r.budget for r in plan.runs) == pytest.approx(1e16, rel=1e-12)
    assert abs(plan.total_flops - 1e16) <= sum(3 * r.n_params for r in plan.runs)
    assert {r.shape.n_layers for r in plan.runs} == {4}            # width ladder: depth fixed
    assert budgets_from_total(700, 3, 2.0, 1) == [100, 200, 400]


def test_depth_ladder_keeps_width():
    plan = plan_sweep(SweepSpec(name="d", family="gpt2", vary="depth", d_model=128, budgets=[3e14, 1e15],
                                size_range=6))
    assert {r.shape.d_model for r in plan.runs} == {128}
    assert len({r.shape.n_layers for r in plan.runs if r.budget == 3e14}) == 5


def test_format_plan_lists_every_run_and_times():
    plan = plan_sweep(SweepSpec(name="p", budgets=[1e13], base=BASE))
    text = format_plan(plan, tokens_per_second=10_000)
    for r in plan.runs:
        assert r.name in text
    assert "est. time" in text and text.splitlines()[-1].startswith("total:")
    assert "est. time" not in format_plan(plan)


@pytest.mark.parametrize("raw, needle", [
    ({"name": "x", "budgets": [1e13], "sizes_per_budget": 2}, "sizes_per_budget"),
    ({"name": "x", "budgets": [1e13], "colour": "red"}, "colour: unknown field"),
    ({"name": "x", "budgets": [1e13], "total_budget": 1e15, "n_budgets": 2}, "budgets: give either"),
    ({"name": "x"}, "budgets: give either"),
    ({"name": "x", "budgets": [1e13], "base": {"model": {"d_model": 64}}}, "base.model.d_model: set by the planner"),
    ({"name": "x", "budgets": [1e13], "base": {"train": {"steps": 10}}}, "base.train.steps"),
    ({"name": "x", "family": "gpt2", "budgets": [1e13], "base": {"model": {"family": "llama"}}}, "contradicts"),
    ({"name": "Bad Name", "budgets": [1e13]}, "name"),
    ({"name": "x", "budgets": [1e13, 1.0001e13]}, "first 3 significant digits"),
    ({"name": "x", "budgets": [1e13], "priority": 10**7}, "priority"),
])
def test_bad_sweeps_name_the_field(raw, needle):
    with pytest.raises(SweepError, match=re.escape(needle)) as err:
        validate_sweep(raw)
    assert isinstance(err.value, UsageError) and "\n" not in str(err.value)
    with pytest.raises(ValidationError):
        SweepSpec(**raw)


def test_plan_errors_are_usage_errors():
    with pytest.raises(SweepError, match="ladder"):
        plan_sweep(SweepSpec(name="x", budgets=[1e9]))                 # far below the smallest model
    with pytest.raises(SweepError, match="valid job spec"):
        plan_sweep(SweepSpec(name="x", budgets=[1e13], base={"train": {"lr": -1}}))


def test_load_sweep_from_yaml(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: y\nfamily: llama\nvary: both\nbudgets: [1.0e+13, 3.0e+13]\nsizes_per_budget: 3\n"
                    "priority: 5\nbase:\n  train: {warmup_fraction: 0.02}\n  resources: {workers: 1}\n")
    spec = load_sweep(str(path))
    assert spec.priority == 5 and spec.budget_list() == [1e13, 3e13]
    assert len(plan_sweep(spec).runs) == 6
    with pytest.raises(SweepError, match="no such sweep file"):
        load_sweep(str(tmp_path / "missing.yaml"))


# ----------------------------------------------------------------------------- the results table


def _row(run_id: str, loss: float = 3.0, **kw) -> dict:
    return make_row(run_id=run_id, family="llama", n_params=1000, n_params_non_embedding=800, tokens=20_000,
                    attention_flops_per_token=500.0, final_loss=loss, spec_hash="abc", **kw)


def test_results_rows_round_trip(tmp_path):
    sweep = str(tmp_path / "sweep")
    append_row(sweep, _row("c1e12-n2", held_out_loss=3.1, curve_path="file:///x/metrics.jsonl"))
    path = append_row(sweep, _row("c1e12-n1"))
    assert path == results_path(sweep, "c1e12-n1")
    append_row(sweep, _row("c1e12-n1", loss=2.5))                     # a rerun replaces its row
    table = read_results(sweep)
    assert table.schema.names == list(COLUMNS)
    assert table.column("run_id").to_pylist() == ["c1e12-n1", "c1e12-n2"]
    assert table.column("final_loss").to_pylist() == [2.5, 3.0]
    assert table.column("held_out_loss").to_pylist() == [None, 3.1]
    assert table.column("flops_6nd").to_pylist() == [6 * 1000 * 20_000] * 2
    assert table.column("flops_6nd_non_embedding")[0].as_py() == 6 * 800 * 20_000
    assert table.column("flops_with_attention")[0].as_py() == (6 * 1000 + 500) * 20_000
    assert table.schema.field("tokens").type == pa.int64()
    assert sorted(p.name for p in (tmp_path / "sweep" / "results").iterdir()) == [
        "c1e12-n1.parquet", "c1e12-n2.parquet"]                       # no temporaries left behind


def test_readers_skip_partial_writes_and_read_any_fsspec_uri(tmp_path):
    sweep = str(tmp_path / "s")
    append_row(sweep, _row("a"))
    (tmp_path / "s" / "results" / ".b.parquet.123.tmp").write_bytes(b"half a file")
    assert read_results(sweep).num_rows == 1
    assert read_results(str(tmp_path / "empty")).schema == SCHEMA
    append_row("memory://sweeps/m", _row("a"))
    assert read_results("memory://sweeps/m").column("run_id").to_pylist() == ["a"]


def test_bad_rows_are_refused(tmp_path):
    row = _row("a")
    del row["spec_hash"]
    with pytest.raises(ValueError, match="spec_hash"):
        append_row(str(tmp_path), row)
    with pytest.raises(ValueError, match="filesystem-safe"):
        append_row(str(tmp_path), _row("a/b"))
    with pytest.raises(ValueError, match="final_loss"):
        append_row(str(tmp_path), {**_row("a"), "final_loss": None})


# ----------------------------------------------------------------------------- centring and the adaptive round

from scaling.approach3 import LossParams  # noqa: E402
from scaling.fit import isoflop_profiles  # noqa: E402
from scaling.plan import centres_from_results, extend_plan  # noqa: E402

# A law whose optimum sits ~3x above the 20-tokens-per-parameter guess on this ladder (a = 0.57).
TRUTH = LossParams(E=1.0, A=295.0, B=1000.0, alpha=0.3, beta=0.4)
TINY = dict(name="ad", family="gpt2", vary="width", n_layers=2, head_dim=8, width_step=8,
            budgets=[1e11, 3e11, 1e12], sizes_per_budget=5, size_range=6,
            base={"data": {"seq_len": 64}, "train": {"micro_batch": 4}, "resources": {"workers": 1}})


def _results(runs):
    n = np.array([r.n_params for r in runs], float)
    d = np.array([r.tokens for r in runs], float)
    return n, d, TRUTH.loss(n, d)


def _vertices(runs):
    n, d, loss = _results(runs)
    return {round(p.budget, -9): p for p in isoflop_profiles(n, d, loss, require_inside=True)[0]}


def test_a_budget_whose_vertex_is_outside_is_extended_and_its_second_vertex_lands_inside():
    spec = SweepSpec(**TINY)
    first = list(plan_sweep(spec).runs)
    outside = [p for p in _vertices(first).values() if not p.used]
    assert outside, "the rule of thumb should miss this law's optimum"
    assert all(p.n_opt > p.n.max() for p in outside)                  # the optimum lies above the sizes
    new, why = extend_plan(spec, first, *_results(first))
    assert {e.budget for e in why} == {r.budget for r in new} and all(e.side == "larger" for e in why)
    assert all(r.round == 2 for r in new) and len({r.name for r in first + new}) == len(first) + len(new)
    for e in why:
        old_max = max(r.n_params for r in first if r.budget == e.budget)
        added = [r for r in new if r.budget == e.budget]
        assert 1 <= len(added) <= spec.adaptive.extra_sizes
        assert all(r.n_params > old_max for r in added)
        assert all(abs(6 * r.n_params * r.tokens - r.budget) <= 3 * r.n_params for r in added)
        validate_spec(apply_overrides(spec.job_base(), added[0].overrides))
    second = _vertices(first + new)
    for e in why:
        p = second[round(e.budget, -9)]
        assert p.used and p.n.min() <= p.n_opt <= p.n.max(), p.reason
    # Nothing more to do once every vertex is inside; and the round cap holds.
    twice = SweepSpec(**{**TINY, "adaptive": {"rounds": 2}})
    again, _ = extend_plan(twice, first + new, *_results(first + new), round_no=3)
    assert {r.budget for r in again}.isdisjoint({e.budget for e in why})
    assert extend_plan(spec, first, *_results(first), round_no=spec.adaptive.rounds + 2) == ([], [])
    off = SweepSpec(**{**TINY, "adaptive": {"rounds": 0}})
    assert extend_plan(off, first, *_results(first)) == ([], [])


def test_a_prior_law_centres_every_budget_on_its_optimum():
    prior = {k: getattr(TRUTH, k) for k in ("E", "A", "B", "alpha", "beta")}
    spec = SweepSpec(**{**TINY, "prior": prior})
    plan = plan_sweep(spec)
    for c in plan.budgets:
        runs = [r for r in plan.runs if r.budget == c]
        assert runs[0].target_n == pytest.approx(TRUTH.n_opt(c), rel=1e-9)
        assert runs[0].n_params < TRUTH.n_opt(c) < runs[-1].n_params
    assert all(p.used for p in _vertices(list(plan.runs)).values())
    assert extend_plan(spec, list(plan.runs), *_results(plan.runs)) == ([], [])
    with pytest.raises(SweepError, match="prior.alpha"):
        validate_sweep({**TINY, "prior": {**prior, "alpha": -1}})


def test_budgets_without_runs_are_centred_on_the_optimum_finished_budgets_predict():
    prior = {k: getattr(TRUTH, k) for k in ("E", "A", "B", "alpha", "beta")}
    done = [r for r in plan_sweep(SweepSpec(**{**TINY, "prior": prior})).runs if r.budget < 1e12]
    centres = centres_from_results([1e11, 3e11, 1e12], *_results(done))
    assert set(centres) == {1e12}
    assert centres[1e12] == pytest.approx(TRUTH.n_opt(1e12), rel=0.35)
    plan = plan_sweep(SweepSpec(**TINY), history=_results(done))
    top = [r for r in plan.runs if r.budget == 1e12]
    assert top[0].target_n == centres[1e12] and top[0].n_params < TRUTH.n_opt(1e12) < top[-1].n_params
    # Budgets that have runs keep the centre they were planned with (their runs keep their names).
    low = [r for r in plan.runs if r.budget == 1e11]
    assert low[0].target_n == pytest.approx(math.sqrt(1e11 / 120))
    kept = plan_sweep(SweepSpec(**TINY), centres={1e12: 200000.0}, history=_results(done))
    assert [r.target_n for r in kept.runs if r.budget == 1e12][0] == 200000.0


def test_repeats_give_each_point_seeds():
    spec = SweepSpec(**{**TINY, "budgets": [3e11], "repeats": 3, "base": {**TINY["base"], "train": {"seed": 7}}})
    plan = plan_sweep(spec)
    assert len(plan.runs) == 15 and len({r.name for r in plan.runs}) == 15
    by_n: dict[int, list] = {}
    for r in plan.runs:
        by_n.setdefault(r.n_params, []).append(r)
    for runs in by_n.values():
        assert [r.overrides["train.seed"] for r in runs] == [7, 8, 9]
        assert [r.name.rsplit("-", 1)[1] for r in runs] == ["s0", "s1", "s2"]
        assert len({r.tokens for r in runs}) == 1


def test_the_example_sweep_plans_four_budgets_on_bpe_with_the_adaptive_round():
    import os

    spec = load_sweep(os.path.join(os.path.dirname(__file__), "..", "examples", "isoflop.yaml"))
    plan = plan_sweep(spec)
    assert len(plan.budgets) >= 4 and spec.adaptive.rounds >= 1
    job = validate_spec(plan.job_spec(plan.runs[0]))
    assert job.data.tokenizer == "bpe" and plan.vocab_size == job.data.vocab_size
    for c in plan.budgets:
        runs = [r for r in plan.runs if r.budget == c]
        assert len(runs) == spec.sizes_per_budget * spec.repeats                 # every size, once per seed
        assert runs[0].n_params < runs[0].target_n < runs[-1].n_params          # the grid straddles its centre
        assert min(r.steps for r in runs) >= 250                                # no budget too small to train
    assert spec.repeats == 2 and len({r.overrides["train.seed"] for r in plan.runs}) == 2
    # Planned compute stays near 5.5e13 FLOPs (with attention): the example took 33.5 minutes on 2 cores.
    assert sum(r.flops_with_attention for r in plan.runs) < 6.5e13
