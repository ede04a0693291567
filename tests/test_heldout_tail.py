"""A user's RLHF dataset without a held-out file is held out from its own tail, never from the built-in task."""
import pytest

from specs.job import validate_spec
from specs.rlhf import RLHFDataSpec

try:
    from workers.rlhf.datasets import stage_files
except ImportError:  # before the workers/ refactor
    from workers.rlhf.stages import stage_files


def test_source_of_each_dataset():
    d = RLHFDataSpec.model_validate({"demonstrations": "my/sft.jsonl", "prompts": "my/p.jsonl"})
    assert d.source_of("demonstrations") == "given"
    assert d.source_of("demonstrations_heldout") == "tail"  # not the built-in held-out demonstrations
    assert d.source_of("eval_prompts") == "tail"
    assert d.source_of("comparisons") == "builtin" and d.source_of("comparisons_heldout") == "builtin"
    d = RLHFDataSpec.model_validate({"comparisons": "c.jsonl", "comparisons_heldout": "h.jsonl", "builtin": None})
    assert d.source_of("comparisons_heldout") == "given" and d.source_of("demonstrations") == "none"
    assert d.source_of("eval_prompts") == "tail"


@pytest.mark.parametrize("kind, pool, held", [("sft", "demonstrations", "demonstrations_heldout"),
                                              ("rm", "comparisons", "comparisons_heldout"),
                                              ("ppo", "prompts", "eval_prompts")])
def test_stages_hold_out_the_tail_of_the_users_file(kind, pool, held):
    raw = {"kind": kind, "train": {"steps": 20}, "rlhf": {"data": {pool: f"/data/{pool}.jsonl"},
                                                          "ppo": {"reward_model": "/runs/rm"}}}
    if kind != "sft":
        raw["model"] = {"init_from": "/runs/sft"}
    files = stage_files(validate_spec(raw), "/runs/job")
    assert getattr(files, pool) == f"/data/{pool}.jsonl"
    assert getattr(files, held) is None and files.builtin[held] is False  # None: the tail of the pool


def test_the_pipeline_report_uses_the_same_tail(tmp_path):
    from orchestrator.instructgpt import load_pipeline, report_inputs

    raw = {"pipeline": "instructgpt", "name": "p",
           "base": {"model": {"family": "llama", "preset": "tiny"},
                    "rlhf": {"data": {"prompts": "/data/p.jsonl", "comparisons": "/data/c.jsonl"}}},
           "sft": {"train": {"steps": 2}}, "rm": {"train": {"steps": 2}}, "ppo": {"train": {"steps": 20}}}
    spec = load_pipeline(raw, "p.yaml", storage_root=str(tmp_path))
    out = report_inputs(spec, str(tmp_path / "p"))
    assert out["eval_prompts_uri"] == "/data/p.jsonl" and out["eval_prompts_tail"] is True
    assert out["rm_heldout_uri"] == "/data/c.jsonl" and out["rm_heldout_tail"] is True
    builtin = dict(raw, base={"model": {"family": "llama", "preset": "tiny"}})
    out = report_inputs(load_pipeline(builtin, "p.yaml", storage_root=str(tmp_path)), str(tmp_path / "p"))
    assert out["eval_prompts_tail"] is False and out["eval_prompts_uri"].endswith("eval_prompts.jsonl")
