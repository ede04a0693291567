"""Property: a spec with any field outside its domain is refused by `submit` and `run` alike, with exit
code 2, one line, and nothing in the job store or the storage (issue 11).

The fields come from the schema itself (every leaf of ``JobSpec``, nested sections included), so a field
added later is covered without editing this file. For each field the strategy draws a value outside its
domain: non-finite, below its minimum, above its maximum, past 64 bits, a wrong YAML type (string for a
number, bool for an int, list, mapping, null where null is not allowed), YAML that is not plain data
(date, set, binary), or a duplicate key. The value goes into an otherwise valid spec file, or into
``--set``, and both commands run through ``orchestrator.cli.main`` in-process; Ray is never reached.
"""
from __future__ import annotations

import os
import types
import typing
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orchestrator.cli import main
from specs.job import JobSpec

VALID = {"name": "ok", "model": {"family": "llama", "preset": "tiny"}, "train": {"steps": 10},
         "resources": {"workers": 2}}
SENTINEL = "@@BAD@@"
NOT_PLAIN = ["2024-01-01", "2024-01-01 10:00:00", "!!set {a: null}", "!!binary aGVsbG8=", "!!omap [a: 1]",
             "!custom 1", "!!python/name:os.system"]
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


# ---------------------------------------------------------------------- the schema's leaves


def _strip_optional(ann) -> tuple[Any, bool]:
    ann = _unannotated(ann)
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _unannotated(rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return ann, False


def _unannotated(ann):
    """Annotated[str, validators] -> str (the validators are what the bad values probe)."""
    return typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann


def _bounds(field) -> dict[str, float]:
    out = {}
    for m in field.metadata:
        for k in ("ge", "gt", "le", "lt"):
            if getattr(m, k, None) is not None:
                out[k] = getattr(m, k)
    return out


def leaves(model: type[BaseModel] = JobSpec, prefix: tuple = ()) -> list[tuple[tuple, Any, bool, dict]]:
    """(path, annotation, optional, bounds) of every leaf field; sections are recursed into (and listed too)."""
    out = []
    for name, field in model.model_fields.items():
        ann, optional = _strip_optional(field.annotation)
        path = prefix + (name,)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append((path, ann, optional, {}))
            out.extend(leaves(ann, path))
        else:
            out.append((path, ann, optional, _bounds(field)))
    return out


LEAVES = leaves()


def _y(v) -> str:
    """A plain value as an inline YAML snippet."""
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def bad_values(ann, optional: bool, bounds: dict) -> list[str]:
    """YAML snippets outside the field's domain."""
    base = list(NOT_PLAIN)
    if not optional:
        base.append("null")
    origin = typing.get_origin(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return base + ["5", "[1, 2]", "'text'", "true", "{no_such_field: 1}"]
    if ann is bool:
        return base + ["'yes'", "1", "0", "[true]", "{a: true}", "1.5"]
    if ann is int:
        vals = base + ["'7'", "true", "1.5", "[1]", "{a: 1}", "9223372036854775808", "-9223372036854775809",
                       "18446744073709551616", ".inf", ".nan"]
        if "ge" in bounds:
            vals.append(str(bounds["ge"] - 1))
        if "gt" in bounds:
            vals.append(str(bounds["gt"]))
        if "le" in bounds:
            vals.append(str(bounds["le"] + 1))
        if "lt" in bounds:
            vals.append(str(bounds["lt"]))
        return vals
    if ann is float:
        vals = base + [".inf", "-.inf", ".nan", "'0.5'", "true", "[0.5]", "{a: 0.5}", "1.0e999"]
        if "ge" in bounds:
            vals += [_y(bounds["ge"] - 1.0), _y(bounds["ge"] - 1e-9 * max(1.0, abs(bounds["ge"])))]
        if "gt" in bounds:
            vals += [_y(float(bounds["gt"])), _y(bounds["gt"] - 1.0)]
        if "le" in bounds:
            vals += [_y(bounds["le"] + 1.0), "1.0e308"]
        if "lt" in bounds:
            vals.append(_y(float(bounds["lt"])))
        return vals
    if ann is str:
        return base + ["5", "1.5", "true", "[a]", "{a: 1}", '"a\\0b"', '"x\\ny"', "'" + "y" * 5000 + "'"]
    if origin is Literal:
        choices = typing.get_args(ann)
        vals = base + ["[x]", "{a: 1}", "'no-such-choice'", "99", "-1", "1.5"]
        if all(isinstance(c, int) for c in choices):
            vals += ["'1'", "true"]
        return [v for v in vals if v not in (_y(c) for c in choices)]
    if origin is tuple:
        args = typing.get_args(ann)
        if args and args[-1] is Ellipsis:  # tuple[str, ...] or tuple[int, ...] (eval.few_shot.k)
            item = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is typing.Annotated else args[0]
            return base + ["5", "'x'", "[no-such-entry]", "{a: 1}", "[[a]]"] + (
                ["[-1]", "[1, 1]"] if item is int else ["[1]"])
        return base + ["[0.9]", "[0.9, 0.9, 0.9]", "[1.5, 0.9]", "[-0.1, 0.9]", "[.nan, 0.9]", "[0.9, .inf]",
                       "'0.9'", "0.9", "['0.9', 0.9]", "[true, 0.9]", "{a: 1}"]
    if origin is dict:  # the deepspeed block
        return base + ["5", "[1]", "'x'", "{fp16: {enabled: true}}", "{flops_profiler: {output_file: /tmp/x}}",
                       "{train_batch_size: 64}", "{zero_optimization: {stage: 3}}", "{optimizer: {type: Adam}}",
                       "{tensorboard: {enabled: true, output_path: /tmp}}", "{gradient_clipping: .inf}",
                       "{zero_optimization: {reduce_bucket_size: 18446744073709551616}}",
                       "{wall_clock_breakdown: .nan}"]
    raise AssertionError(f"no bad values for annotation {ann!r}: teach this test the new type")


CASES = [(path, v) for path, ann, optional, bounds in LEAVES for v in bad_values(ann, optional, bounds)]


def _doc(path: tuple, snippet: str, duplicate: bool) -> str:
    """VALID as block YAML with ``snippet`` at ``path`` (a duplicate of the key when asked)."""
    import copy

    raw = copy.deepcopy(VALID)
    node = raw
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[path[-1]] = SENTINEL
    text = yaml.safe_dump(raw, default_flow_style=False, sort_keys=False, width=1 << 20)
    (line,) = [ln for ln in text.splitlines() if SENTINEL in ln]
    if duplicate:
        indent = line[:len(line) - len(line.lstrip())]
        good = line.replace(repr(SENTINEL), "{}" if snippet.startswith("{") else "1")
        return text.replace(line, f"{good}\n{indent}{path[-1]}: {snippet}")
    return text.replace(repr(SENTINEL), snippet)


# ---------------------------------------------------------------------- running the CLI in-process


class Box:
    def __init__(self, root):
        self.root = root
        self.storage, self.store = root / "runs", root / "state" / "jobs.db"
        self.cluster = root / "cluster.yaml"
        self.cluster.write_text(f"storage: {self.storage}\njob_store: {self.store}\n")
        self.n = 0

    def cli(self, argv, capsys) -> tuple[int, list[str]]:
        import orchestrator.ray_cluster as rc

        def no_ray(*a, **k):
            raise AssertionError("bad input reached Ray")

        saved = {k: os.environ.get(k) for k in _ENV}
        real, rc.connect = rc.connect, no_ray
        try:
            try:
                code = main(["--cluster", str(self.cluster), *argv])
            except SystemExit as exit_:
                code = exit_.code
        finally:
            rc.connect = real
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        out = capsys.readouterr()
        return code, [ln for ln in (out.err + out.out).splitlines() if ln.strip()]

    def assert_nothing_written(self):
        from orchestrator.job_store import JobStore

        assert not (self.store.exists() and JobStore(str(self.store)).list()), "a job was queued"
        assert not (self.storage.exists() and any(self.storage.iterdir())), "the storage was written"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    return Box(tmp_path_factory.mktemp("fuzz"))


def _refused(box, argv, capsys, what):
    for command in ("submit", "run"):
        code, lines = box.cli([command, *argv], capsys)
        assert code == 2, f"{command} {what}: exit {code}, output {lines}"
        assert len(lines) == 1 and lines[0].startswith("switchyard: error: "), f"{command} {what}: {lines}"
        assert len(lines[0]) < 600
        box.assert_nothing_written()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(CASES), via=st.sampled_from(["file", "file", "set", "duplicate"]))
def test_any_field_outside_its_domain_is_refused_by_submit_and_run(box, capsys, case, via):
    path, snippet = case
    box.n += 1
    spec = box.root / f"s{box.n}.yaml"
    if via == "set":
        spec.write_text(yaml.safe_dump(VALID))
        argv = [str(spec), "--set", f"{'.'.join(path)}={snippet}"]
    else:
        spec.write_text(_doc(path, snippet, duplicate=via == "duplicate"))
        argv = [str(spec)]
    _refused(box, argv, capsys, f"{'.'.join(path)}={snippet} via {via}")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(section=st.sampled_from([None] + sorted({p[0] for p, ann, *_ in LEAVES
                                                if isinstance(ann, type) and issubclass(ann, BaseModel)})),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_keys_are_refused(box, capsys, section, key):
    known = JobSpec.model_fields if section is None else JobSpec.model_fields[section].annotation.model_fields
    if key in known:
        return
    raw = dict(VALID)
    if section is None:
        raw[key] = 1
    else:
        raw[section] = {**raw.get(section, {}), key: 1}
    spec = box.root / "unknown.yaml"
    spec.write_text(yaml.safe_dump(raw))
    _refused(box, [str(spec)], capsys, f"unknown key {section}.{key}")


def test_every_section_and_leaf_is_covered():
    """The walk reaches the nested sections (a refactor that hid them from the schema would hollow this test)."""
    paths = {".".join(p) for p, *_ in LEAVES}
    for must in ("train.lr", "train.betas", "train.seed", "resources.cpus_per_worker", "max_restarts", "deepspeed",
                 "rlhf.ppo.kl_beta", "rlhf.data.builtin.seed", "model.moe.num_experts", "checkpoint.keep"):
        assert must in paths, must
    assert len(CASES) > 1000


def test_valid_spec_is_queued(box, capsys, tmp_path):
    b = Box(tmp_path)
    spec = tmp_path / "ok.yaml"
    spec.write_text(yaml.safe_dump(VALID))
    code, lines = b.cli(["submit", str(spec), "--priority", "3"], capsys)
    assert code == 0, lines
    from orchestrator.job_store import JobStore

    (rec,) = JobStore(str(b.store)).list()
    assert rec.priority == 3 and rec.state.value == "QUEUED" and rec.run_dir.startswith(str(b.storage))
