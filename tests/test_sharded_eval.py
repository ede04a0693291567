"""Sharded checkpoint evaluation (eval.shards): a decoder cut by blocks into Ray actors gives the whole model's loss."""
from __future__ import annotations

import pytest

from specs.base import SpecError
from tests.conftest import tiny_spec
from workers.sharded_eval import block_ranges


def test_blocks_are_cut_into_contiguous_near_even_ranges():
    assert block_ranges(5, 2) == [(0, 3), (3, 5)]
    assert block_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert block_ranges(4, 1) == [(0, 4)]
    with pytest.raises(Exception, match=r"eval\.shards: 4 shards for 3 blocks"):
        block_ranges(3, 4)


def test_shards_are_refused_where_they_cannot_apply():
    with pytest.raises(SpecError, match=r"eval\.shards: 4 shards for 3 blocks"):
        tiny_spec(**{"eval.shards": 4})
    with pytest.raises(SpecError, match=r"eval\.shards: sharded evaluation cuts pretrain decoders"):
        tiny_spec(**{"eval.shards": 2, "model.family": "bert"})
    with pytest.raises(SpecError, match=r"eval\.few_shot: few-shot scoring needs the whole model"):
        tiny_spec(**{"eval.shards": 2, "eval.few_shot": {"k": [0]}})
    assert tiny_spec(**{"eval.shards": 3}).eval.shards == 3


def _check_shards(run_dir, family, shards, scored, held_out_loss):
    import json
    import os

    import ray

    from workers.tasks import build_model, config_from_dict

    assert scored["loss"] == pytest.approx(held_out_loss, rel=1e-5)
    assert scored["extra"]["shards"] == shards
    held = scored["extra"]["shard_parameters"]
    model = build_model(config_from_dict(family, json.load(open(os.path.join(run_dir, "model_config.json")))["model"]))
    whole = sum(p.numel() for p in model.parameters())
    head = model.lm_head.weight.numel() if model.cfg.tie_embeddings else 0   # the last shard's copy of the table
    assert len(held) == shards and sum(held) == whole + head and max(held) < whole   # each holds only its part
    # The shards' placement group is gone (a warm gang's may stay).
    from workers.sharded_eval import EVAL_GROUP_PREFIX

    assert not [g for g in ray.util.placement_group_table().values()
                if g["state"] == "CREATED" and g["name"].startswith(EVAL_GROUP_PREFIX)]


@pytest.mark.ray
def test_a_sharded_evaluation_equals_the_whole_models_loss(ray_cluster, cluster_cfg):
    """GPT-2 (learned positions, tied head) in 2 shards, as the controller runs it: a task holding nothing,
    driving shard actors that reserve a CPU each."""
    import ray

    from data.storage import Storage
    from orchestrator.runner import run_job
    from workers.checkpoint import checkpoint_dir
    from workers.evaluator import evaluate_checkpoint

    spec = tiny_spec(**{"name": "sharded-gpt2", "model.family": "gpt2", "train.steps": 4, "checkpoint.every": 4,
                        "eval.shards": 2, "eval.batches": 3})
    result = run_job(spec, cluster_cfg, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    run_dir, storage = result["run_dir"], Storage(cluster_cfg.storage)
    task = ray.remote(evaluate_checkpoint).options(num_cpus=0)
    scored = ray.get(task.remote(storage, run_dir, checkpoint_dir(run_dir, 4), 4, spec.eval.batches,
                                 spec.train.micro_batch))
    _check_shards(run_dir, "gpt2", 2, scored, result["final_eval"]["held_out_loss"])


@pytest.mark.ray
def test_the_controller_evaluates_every_checkpoint_in_shards(controller):
    """LLaMA (RoPE, untied head) in 3 shards through the controller: every checkpoint scored, the last one
    equal to the loop's own final evaluation."""
    from orchestrator.cli_jobs import submit_spec
    from orchestrator.job_store import JobState, JobStore
    from tests.conftest import wait_for

    cfg, _ = controller
    store = JobStore(cfg.job_store)
    spec = tiny_spec(**{"name": "sharded-llama", "resources.workers": 1, "train.steps": 8, "checkpoint.every": 4,
                        "eval.shards": 3, "eval.batches": 3})
    job = submit_spec(cfg, spec, priority=0)
    wait_for(lambda: store.get(job).terminal and len(store.get(job).evals) >= 2, timeout=300, what="2 evals")
    rec = store.get(job)
    assert rec.state == JobState.SUCCEEDED, rec.reason
    last = max(rec.evals, key=lambda e: e.step)
    scored = {"loss": last.loss, "extra": last.extra}
    _check_shards(rec.run_dir, "llama", 3, scored, rec.metrics["held_out_loss"])
