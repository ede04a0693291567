"""Spec validation: typed at the edge, one-line errors naming the field."""
import re
import subprocess
import sys

import pytest

from specs.errors import UsageError
from specs.job import SpecError, apply_overrides, load_spec, parse_override, validate_spec
from workers.parallel.deepspeed_config import deepspeed_config
from workers.parallel.engine import lr_lambda


def _err(raw):
    with pytest.raises(SpecError) as e:
        validate_spec(raw, "s.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_derived_values():
    s = validate_spec({"train": {"steps": 10, "micro_batch": 4, "grad_accum": 3}, "resources": {"workers": 4}})
    assert s.dp == 4 and s.samples_per_step == 48 and s.tokens_per_step == 48 * 128 and s.total_steps == 10
    t = validate_spec({"train": {"tokens": 100_000, "micro_batch": 4}, "resources": {"workers": 2}})
    assert t.total_steps == -(-100_000 // (4 * 2 * 128))


@pytest.mark.parametrize("raw, needle", [
    ({"modle": {}}, "modle: unknown field"),
    ({"train": {"steps": 5, "lr": "fast"}}, "train.lr"),
    ({"train": {"steps": 5, "micro_batch": 0}}, "train.micro_batch"),
    ({"train": {"steps": 5}, "parallel": {"pp": 2, "zero_stage": 2}, "resources": {"workers": 2}},
     "parallel.zero_stage: pipeline parallelism"),
    ({"train": {"steps": 5}, "parallel": {"zero_stage": 3}, "model": {"moe": {"num_experts": 4}}}, "MoE"),
    ({"train": {"steps": 5, "tokens": 10}}, "exactly one of train.steps or train.tokens"),
    ({"train": {"steps": 5}, "model": {"family": "gpt5"}}, "model.family"),
    ({"train": {"steps": 5}, "name": "../../etc"}, "name"),
    ({"train": {"steps": 5}, "parallel": {"pp": 3}, "resources": {"workers": 2}}, "parallel.pp"),
    ({"train": {"steps": 5}, "deepspeed": {"train_batch_size": 64}}, "deepspeed"),
    ({"train": {"steps": 5}, "train_steps": 5}, "train_steps: unknown field"),
])
def test_bad_specs_name_the_field(raw, needle):
    assert needle in _err(raw)


@pytest.mark.parametrize("raw, line", [
    ({"model": {"presett": "tiny"}}, "model.presett: unknown field; did you mean 'preset'? (see README 'Job specs')"),
    ({"modle": {}}, "modle: unknown field; did you mean 'model'?"),
    ({"rlhf": {"ppo": {"kl_bta": 0.1}}}, "rlhf.ppo.kl_bta: unknown field; did you mean 'kl_beta'?"),
    ({"model": {"size": "tiny"}}, "model.size: unknown field; model takes family, preset, d_model, n_layers, "),
])
def test_an_unknown_field_gets_the_nearest_known_one_or_its_sections_fields(raw, line):
    assert line in _err(raw)


def test_an_unknown_field_in_cluster_yaml_or_a_sweep_gets_the_same_help(tmp_path):
    from orchestrator.cluster_config import load_cluster_config
    from scaling.sweep_spec import SweepError, validate_sweep

    (tmp_path / "cluster.yaml").write_text("workers: {cpu: 1}\n")
    with pytest.raises(UsageError, match=re.escape("workers.cpu: unknown field; did you mean 'cpus'?")):
        load_cluster_config(str(tmp_path / "cluster.yaml"))
    with pytest.raises(SweepError, match="colour: unknown field; the top level takes name, family, "):
        validate_sweep({"name": "x", "budgets": [1e13], "colour": "red"})


def test_overrides_keep_types():
    assert parse_override("train.steps=50") == (["train", "steps"], 50)
    assert parse_override("parallel.offload_optimizer=true")[1] is True
    raw = apply_overrides({"train": {"steps": 5}}, ["train.lr=1e-4", "model.preset=small"])
    s = validate_spec(raw)
    assert s.train.lr == pytest.approx(1e-4) and s.model.preset == "small"
    with pytest.raises(SpecError):
        parse_override("no-equals-sign")


def test_deepspeed_block_merges_over_defaults():
    s = validate_spec({"train": {"steps": 5, "micro_batch": 2, "grad_accum": 2}, "resources": {"workers": 2},
                       "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}, "prescale_gradients": True}})
    cfg = deepspeed_config(s)
    assert cfg["train_batch_size"] == 8 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["prescale_gradients"] is True


def test_lr_schedule_warmup_then_cosine_to_floor():
    s = validate_spec({"train": {"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}})
    f = lr_lambda(s)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert 0.1 < f(55) < 1.0


def test_cli_bad_spec_exits_2_with_one_line_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  micro_bach: 4\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--cluster", str(cluster), "run", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [f"switchyard: error: {bad}: train.micro_bach: unknown field; did you mean 'micro_batch'? "
                     "(see README 'Job specs')"]
    assert not (tmp_path / "runs").exists()


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(str(tmp_path / "nope.yaml"))
    p = tmp_path / "x.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(p))
