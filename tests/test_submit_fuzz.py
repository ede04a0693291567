"""Malformed submissions are refused with one clear line and leave nothing in the store."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli_jobs import submit_raw
from orchestrator.cluster_config import ClusterConfig
from specs.errors import UsageError
from orchestrator.job_store import JobStore

VALID = {"name": "ok", "model": {"family": "llama", "preset": "tiny"}, "train": {"steps": 10},
         "resources": {"workers": 2}}

not_int = st.one_of(st.text(min_size=1).filter(lambda s: not s.strip().lstrip("-").isdigit()), st.lists(st.integers()),
                    st.dictionaries(st.text(), st.integers(), min_size=1), st.floats(allow_nan=True).filter(lambda f: f != int(f) if f == f and abs(f) < 1e300 else True))
BAD_FIELDS = [
    (("train", "steps"), st.one_of(st.integers(max_value=0), not_int)),
    (("train", "micro_batch"), st.one_of(st.integers(max_value=0), not_int)),
    (("train", "lr"), st.one_of(st.floats(max_value=0), st.text(alphabet="xyz", min_size=1))),
    (("resources", "workers"), st.one_of(st.integers(max_value=0), st.integers(min_value=5000))),
    (("model", "family"), st.text(min_size=1).filter(lambda s: s not in ("gpt2", "llama", "palm", "bert", "roberta", "albert"))),
    (("parallel", "zero_stage"), st.integers().filter(lambda x: x not in (0, 1, 2, 3))),
    (("name",), st.one_of(st.just("../escape"), st.just("/abs"), st.text(alphabet="/\\ ..:*", min_size=1))),
    (("data", "seq_len"), st.integers(max_value=7)),
    (("checkpoint", "keep"), st.integers(max_value=0)),
]
UNKNOWN_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda k: k not in ("name", "kind", "model", "data", "train", "resources", "parallel", "deepspeed",
                        "checkpoint", "eval", "max_restarts"))
IMPOSSIBLE = [
    {"parallel": {"pp": 2, "zero_stage": 2}, "resources": {"workers": 2}},
    {"parallel": {"zero_stage": 3}, "model": {"family": "llama", "preset": "tiny", "moe": {"num_experts": 4}}},
    {"parallel": {"ep": 2}},
    {"train": {"steps": 10, "tokens": 100}},
    {"parallel": {"offload_optimizer": True, "zero_stage": 0}},
]


@st.composite
def malformed(draw):
    import copy

    raw = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["field", "unknown", "impossible", "shape"]))
    if kind == "field":
        path, values = draw(st.sampled_from(BAD_FIELDS))
        node = raw
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = draw(values)
    elif kind == "unknown":
        section = draw(st.sampled_from([None, "model", "train", "data", "resources"]))
        target = raw if section is None else raw.setdefault(section, {})
        target[draw(UNKNOWN_KEY)] = draw(st.integers())
    elif kind == "impossible":
        for k, v in draw(st.sampled_from(IMPOSSIBLE)).items():
            raw[k] = {**raw.get(k, {}), **v}
    else:
        raw = draw(st.one_of(st.lists(st.integers()), st.text(), st.integers(),
                             st.fixed_dictionaries({"train": st.text()})))
    return raw


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    return ClusterConfig.model_validate({"storage": str(d / "runs"), "job_store": str(d / "jobs.db")})


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=malformed())
def test_malformed_specs_are_refused_and_leave_nothing(cluster, raw):
    with pytest.raises(UsageError) as err:
        submit_raw(cluster, raw, priority=0, source="fuzz.yaml")
    msg = str(err.value)
    assert msg and "\n" not in msg and len(msg) < 400
    assert JobStore(cluster.job_store).list() == []


def test_valid_spec_is_stored(cluster, tmp_path):
    cfg = cluster.model_copy(update={"job_store": str(tmp_path / "jobs.db")})
    job = submit_raw(cfg, VALID, priority=3)
    rec = JobStore(cfg.job_store).get(job)
    assert rec.priority == 3 and rec.state.value == "QUEUED" and rec.run_dir.startswith(cfg.storage)
