"""Bad input gets exit code 2 and one line naming the field, and nothing is queued or written (issue 11).

The examples of the issue, each through the real CLI (``orchestrator.cli.main`` in-process) for both
``submit`` and ``run``; no Ray is started (``connect`` is made to fail the test if it is reached).
"""
from __future__ import annotations

import os

import pytest

from orchestrator.cli import main
from specs.errors import UsageError
from specs.validate import InputError, check_plain, load_plain_yaml

BASE = "name: ok\nmodel: {family: llama, preset: tiny}\ntrain: {steps: 10}\nresources: {workers: 2}\n"
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


class Sandbox:
    """A cluster.yaml with its own storage and job store under ``root``; runs the CLI in-process."""

    def __init__(self, root, extra: str = ""):
        self.root = root
        self.storage = root / "runs"
        self.store = root / "state" / "jobs.db"
        self.cluster = root / "cluster.yaml"
        self.cluster.write_text(f"storage: {self.storage}\njob_store: {self.store}\n{extra}")

    def cli(self, *argv: str, capsys) -> tuple[int, list[str]]:
        import orchestrator.ray_cluster as rc

        saved = {k: os.environ.get(k) for k in _ENV}
        real = rc.connect
        rc.connect = _no_ray
        try:
            try:
                code = main(["--cluster", str(self.cluster), *argv])
            except SystemExit as exit_:  # argparse
                code = exit_.code
        finally:
            rc.connect = real
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out = capsys.readouterr()
        return code, [ln for ln in (out.err + out.out).splitlines() if ln.strip()]

    def nothing_written(self) -> bool:
        from orchestrator.job_store import JobStore

        stored = self.store.exists() and JobStore(str(self.store)).list()
        written = self.storage.exists() and any(self.storage.iterdir())
        return not stored and not written


def _no_ray(*a, **k):
    raise AssertionError("bad input reached Ray")


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def refused(box, capsys, argv, needle):
    code, lines = box.cli(*argv, capsys=capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("switchyard: error: "), lines
    assert needle in lines[0], lines
    assert box.nothing_written()
    return lines[0]


ISSUE_SETS = [
    ("train.lr=.inf", "train.lr"),
    ("train.betas=[2,-1]", "train.betas"),
    ("train.betas=[.nan,.nan]", "train.betas"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.seed=18446744073709551616", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("resources.cpus_per_worker=.inf", "resources.cpus_per_worker"),
    ("max_restarts=9223372036854775808", "max_restarts"),
    ("deepspeed.fp16.enabled=true", "deepspeed.fp16"),
    ("deepspeed.flops_profiler.output_file=/tmp/x.txt", "deepspeed.flops_profiler"),
    ("train.steps='10'", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("name=2024-01-01", "date"),
    ("model.d_model=100", "model"),
]


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize("override, needle", ISSUE_SETS)
def test_issue_examples_are_refused_in_one_line(box, capsys, command, override, needle):
    spec = box.root / "s.yaml"
    spec.write_text(BASE)
    refused(box, capsys, [command, str(spec), "--set", override], needle)


ISSUE_FILES = [
    ("name: 2024-01-01\n", "line 1: a date/time is not allowed; quote it"),
    ("name: !!set {a: null}\n", "a set (!!set) is not allowed"),
    ("name: !!binary aGVsbG8=\n", "binary data (!!binary) is not allowed"),
    ("name: !!python/object/apply:os.system [echo hi]\n", "is not allowed"),
    ("train: {steps: 10}\ntrain: {steps: 20}\n", "line 2: duplicate key 'train'"),
    ("model: {family: llama, family: gpt2}\n", "duplicate key 'family'"),
    ("base: &b {steps: 1}\ntrain: *b\n", "anchors and aliases"),
    ("train: {<<: {steps: 1}}\n", "merge key"),
    ("x: " + "[" * 40 + "]" * 40 + "\n", "nested more than"),
]


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize("text, needle", ISSUE_FILES)
def test_non_plain_yaml_is_refused(box, capsys, command, text, needle):
    spec = box.root / "s.yaml"
    spec.write_text(text)
    refused(box, capsys, [command, str(spec)], needle)


def test_oversized_and_binary_files_are_refused(box, capsys):
    big = box.root / "big.yaml"
    big.write_text(BASE + "# " + "x" * (1 << 20) + "\n")
    refused(box, capsys, ["submit", str(big)], "larger than")
    raw = box.root / "raw.yaml"
    raw.write_bytes(b"name: \xff\xfe\n")
    refused(box, capsys, ["submit", str(raw)], "not UTF-8 text (invalid byte at offset 6)")
    refused(box, capsys, ["run", str(box.root)], "is a directory")


@pytest.mark.parametrize("argv, needle", [
    (["submit", "S", "--priority", "9223372036854775808"], "--priority"),
    (["submit", "S", "--priority", "-9223372036854775809"], "--priority"),
    (["submit", "S", "--priority", "1e3"], "--priority"),
    (["wait", "sy-x", "--timeout", "nan"], "--timeout"),
    (["wait", "sy-x", "--timeout", "inf"], "--timeout"),
    (["logs", "sy-x", "--rank", "-1"], "--rank"),
    (["submit"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_cli_arguments_are_one_line(box, capsys, argv, needle):
    (box.root / "S").write_text(BASE)
    argv = [str(box.root / "S") if a == "S" else a for a in argv]
    refused(box, capsys, argv, needle)


def test_valid_spec_still_queues(box, capsys):
    from orchestrator.job_store import JobStore

    spec = box.root / "s.yaml"
    spec.write_text(BASE.replace("train: {steps: 10}", "train: {steps: 10, lr: 1e-4, betas: [0.9, 0.99]}"))
    code, lines = box.cli("submit", str(spec), "--priority", "1000000", capsys=capsys)
    assert code == 0, lines
    rec = JobStore(str(box.store)).list()[0]
    assert rec.priority == 1_000_000 and rec.spec["train"]["lr"] == pytest.approx(1e-4)


# ---------------------------------------------------------------------- the loader and checks, directly


def test_plain_loader_reads_plain_data_and_yaml12_floats():
    assert load_plain_yaml("a: 1e-4\nb: [1, 2.5, x]\nc: {d: null, e: true}\nf: '2024-01-01'") == {
        "a": 1e-4, "b": [1, 2.5, "x"], "c": {"d": None, "e": True}, "f": "2024-01-01"}
    for bad in ("a: 1\na: 2", "a: 2024-01-01", "a: !!set {x}", "a: !!omap [b: 1]", "a: !tag 1", "? [1]\n: 2"):
        with pytest.raises(InputError) as e:
            load_plain_yaml(bad, "f.yaml")
        assert str(e.value).startswith("f.yaml: line ") and "\n" not in str(e.value)


def test_check_plain_refuses_non_finite_huge_and_non_plain():
    import datetime

    check_plain({"a": [1, 2.5, "x", None, True], "b": {"c": (1 << 63) - 1}})
    for bad, where in (({"a": float("nan")}, "a"), ({"a": [1, float("-inf")]}, "a.1"), ({"a": 1 << 63}, "a"),
                       ({"a": {"b": datetime.date(2024, 1, 1)}}, "a.b"), ({"a": {1, 2}}, "a"), ({1: 2}, "1")):
        with pytest.raises(UsageError) as e:
            check_plain(bad, "x")
        assert f"x: {where}:" in str(e.value)


def test_deepspeed_allow_list():
    from specs.job import SpecError, validate_spec
    from workers.parallel.deepspeed_config import DEEPSPEED_ALLOWED, check_deepspeed_block

    ok = {"zero_optimization": {"reduce_bucket_size": 10_000, "overlap_comm": True}, "communication_data_type": "bf16",
          "prescale_gradients": False, "gradient_predivide_factor": 2.0, "wall_clock_breakdown": True,
          "steps_per_print": 10}
    assert check_deepspeed_block(ok) == ok and set(ok) <= set(DEEPSPEED_ALLOWED)
    for block, needle in [
        ({"fp16": {"enabled": True}}, "deepspeed.fp16: not allowed: fp16 does not run on CPU"),
        ({"flops_profiler": {"enabled": True, "output_file": "/etc/x"}}, "deepspeed.flops_profiler: not allowed"),
        ({"tensorboard": {"enabled": True}}, "writes files"),
        ({"train_batch_size": 64}, "train.micro_batch"),
        ({"gradient_accumulation_steps": 4}, "train.grad_accum"),
        ({"zero_optimization": {"stage": 3}}, "parallel.zero_stage"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "deepspeed.zero_optimization.offload_param"),
        ({"zero_optimization": {"reduce_bucket_size": -1}}, "must be an integer"),
        ({"zero_optimization": {"reduce_bucket_size": True}}, "must be an integer"),
        ({"optimizer": {"type": "Adam"}}, "train.optimizer"),
        ({"gradient_clipping": 0.5}, "train.grad_clip"),
        ({"communication_data_type": "fp16"}, "'fp32', 'bf16'"),
        ({"gradient_predivide_factor": float("inf")}, "finite"),
        ({"bf16": {"enabled": True}}, "train.precision"),
        ({"elasticity": {}}, "batch"),
        ({"checkpoint": {"tag_validation": "Ignore"}}, "checkpoint section"),
    ]:
        with pytest.raises(SpecError) as e:
            validate_spec({"train": {"steps": 5}, "deepspeed": block}, "s.yaml")
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_deepspeed_config_rechecks_a_stored_block():
    """A spec stored before the allow-list (or built past validation) cannot reach DeepSpeed with a refused key."""
    from specs.job import validate_spec
    from workers.parallel.deepspeed_config import deepspeed_config

    spec = validate_spec({"train": {"steps": 5}})
    sneaky = spec.model_copy(update={"deepspeed": {"flops_profiler": {"output_file": "/tmp/x"}}})
    with pytest.raises(ValueError, match="flops_profiler"):
        deepspeed_config(sneaky)


def test_job_store_refuses_integers_sqlite_cannot_hold(tmp_path):
    from orchestrator.job_store import JobStore

    store = JobStore(str(tmp_path / "jobs.db"))
    res = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    for prio, restarts in ((1 << 63, 0), (-(1 << 63) - 1, 0), (0, 1 << 63), (True, 0)):
        with pytest.raises(ValueError, match="must be an integer from"):
            store.submit("j", "train", {}, prio, res, restarts, run_dir_for=lambda i: f"/tmp/{i}")
    assert store.list() == []


def test_pipeline_file_priority_and_numbers(box, capsys):
    pipe = box.root / "p.yaml"
    for body, needle in [("priority: 9223372036854775808\n", "priority"),
                         ("priority: 5000000\n", "priority"),
                         ("sft: {train: {steps: 5, lr: .inf}}\n", "sft.train.lr"),
                         ("report: {seed: 18446744073709551616}\n", "report.seed"),
                         ("priority: '3'\n", "priority")]:
        pipe.write_text("pipeline: instructgpt\nname: p\n" + body)
        refused(box, capsys, ["submit", str(pipe)], needle)


@pytest.mark.parametrize("text, needle", [
    ("storage: ./r\nstorage: ./s\n", "line 2: duplicate key 'storage'"),
    ("workers: {cpus: .inf}\n", "workers.cpus"),
    ("workers: {cpus: '2'}\n", "workers.cpus"),
    ("workers: {cpus: 100000}\n", "workers.cpus"),
    ("ray: {num_cpus: 18446744073709551616}\n", "ray.num_cpus"),
    ("storage: 2024-01-01\n", "a date/time is not allowed"),
    ("storage: !!binary aGk=\n", "binary data"),
    ("paths: {read: /data}\n", "paths.read"),
    ("paths: {reed: [/data]}\n", "paths.reed"),
    ("- 1\n", "expected a mapping"),
])
@pytest.mark.parametrize("command", [["list"], ["submit", "S"], ["run", "S"]])
def test_bad_cluster_yaml_is_one_line(tmp_path, capsys, text, needle, command):
    box = Sandbox(tmp_path)
    box.cluster.write_text(text)
    (tmp_path / "S").write_text(BASE)
    line = refused(box, capsys, [str(tmp_path / "S") if a == "S" else a for a in command], needle)
    assert str(box.cluster) in line


@pytest.mark.parametrize("text, needle", [("name: 2024-01-01\n", "date"), ("a: 1\na: 2\n", "duplicate key"),
                                          ("x: !!set {a: null}\n", "set")])
def test_sweep_files_are_read_as_plain_yaml(box, capsys, text, needle):
    sweep = box.root / "sweep.yaml"
    sweep.write_text(text)
    refused(box, capsys, ["sweep", str(sweep), "--dry-run"], needle)


def test_a_time_limit_over_the_cluster_s_cap_is_refused_at_submit(tmp_path, capsys):
    box = Sandbox(tmp_path, "workers: {max_time_limit_s: 3600}\n")
    spec = tmp_path / "S"
    spec.write_text(BASE.replace("resources: {workers: 2}", "resources: {workers: 2, time_limit_s: 7200}"))
    line = refused(box, capsys, ["submit", str(spec)], "resources.time_limit_s: 7200 s is over this cluster's limit")
    assert "workers.max_time_limit_s" in line
    refused(box, capsys, ["submit", str(spec), "--set", "resources.time_limit_s=0"], "resources.time_limit_s")
    code, lines = box.cli("submit", str(spec), "--set", "resources.time_limit_s=600", capsys=capsys)
    assert code == 0 and any(ln.startswith("sy-") for ln in lines), lines
