"""The InstructGPT stages as jobs on real rank actors with DeepSpeed engines: SFT -> RM -> PPO, and a PPO resume."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data.storage import Storage
from specs.errors import UsageError
from orchestrator.runner import resume_spec, run_job
from tests.conftest import tiny_spec

BUILTIN = {"n_sft": 96, "n_sft_heldout": 16, "n_rm": 24, "n_rm_heldout": 12, "k": 3, "n_samples": 2, "n_ppo": 48,
           "n_eval": 8, "families": ["reverse", "upper"]}


def stage_spec(kind: str, data_dir: str, **overrides):
    base = {"kind": kind, "name": f"t-{kind}", "data.seq_len": 96, "rlhf.data.dir": data_dir,
            "rlhf.data.builtin": BUILTIN, "rlhf.ppo.max_new_tokens": 8, "checkpoint.every": 2}
    return tiny_spec(**{**base, **overrides})


def run(spec, cfg, resume=None):
    result = run_job(spec, cfg, resume_dir=resume, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chain(ray_cluster, tmp_path_factory):
    """SFT then RM on the built-in task, as two jobs; PPO tests start from them."""
    from orchestrator.cluster_config import ClusterConfig

    root = tmp_path_factory.mktemp("rlhf")
    cfg = ClusterConfig.model_validate({"storage": str(root / "runs"), "job_store": str(root / "jobs.db")})
    data_dir = str(root / "data")
    sft = run(stage_spec("sft", data_dir, **{"train.steps": 6, "train.micro_batch": 8}), cfg)
    rm = run(stage_spec("rm", data_dir, **{"train.steps": 4, "train.micro_batch": 3,
                                           "model.init_from": sft["run_dir"]}), cfg)
    return cfg, data_dir, sft, rm


def test_sft_and_rm_stages(chain):
    from workers.weights import load_policy, load_reward_model

    cfg, data_dir, sft, rm = chain
    assert set(os.listdir(data_dir)) >= {"sft_train.jsonl", "sft_heldout.jsonl", "rm_train.jsonl", "rm_heldout.jsonl",
                                         "ppo_prompts.jsonl", "eval_prompts.jsonl", "builtin.json"}
    assert sft["final_eval"]["held_out_loss"] > 0
    losses = [r["loss"] for r in rows(sft["run_dir"])]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0.0 <= rm["final_eval"]["held_out_accuracy"] <= 1.0 and rm["final_eval"]["held_out_loss"] > 0
    assert "accuracy" in rows(rm["run_dir"])[0]
    storage = Storage(cfg.storage)
    policy = load_policy(storage, sft["run_dir"])
    reward = load_reward_model(storage, rm["run_dir"])
    # The RM starts from the SFT trunk and carries a reward bias that centres demonstrations on zero.
    assert float(reward.reward_bias) != 0.0
    assert policy.cfg == reward.decoder.cfg
    with pytest.raises(ValueError, match="reward model, not a policy"):
        load_policy(storage, rm["run_dir"])


def test_demonstrations_score_zero_on_average(chain):
    from data.rlhf_files import read_demonstrations
    from workers.rlhf.steps import demo_batches
    from workers.weights import load_reward_model, run_tokenizer

    cfg, data_dir, sft, rm = chain
    storage = Storage(cfg.storage)
    reward, tok = load_reward_model(storage, rm["run_dir"]), run_tokenizer(storage, rm["run_dir"])
    demos = read_demonstrations(os.path.join(data_dir, "sft_train.jsonl"))[:512]
    with torch.no_grad():
        scores = torch.cat([reward(ids, lengths) for ids, lengths in demo_batches(tok, demos)])
    assert abs(float(scores.mean())) < 1e-3


def ppo_spec(chain, **overrides):
    cfg, data_dir, sft, rm = chain
    base = {"train.steps": 4, "train.lr": 1e-4, "model.init_from": sft["run_dir"],
            "rlhf.ppo.reward_model": rm["run_dir"], "rlhf.ppo.rollout_size": 8, "rlhf.ppo.samples_per_prompt": 2,
            "rlhf.ppo.minibatch_size": 4, "rlhf.ppo.value_warmup": 1, "rlhf.ppo.eval_prompts": 4}
    return stage_spec("ppo", data_dir, **{**base, **overrides})


def test_ppo_stage_resumes_where_it_stopped(chain):
    """Four rollouts straight, against two rollouts then a resume to four: the same rollouts, losses and weights."""
    from workers.weights import load_policy

    cfg = chain[0]
    storage = Storage(cfg.storage)
    whole = run(ppo_spec(chain), cfg)
    first = run(ppo_spec(chain, **{"train.steps": 2}), cfg)
    resumed = run(resume_spec(storage, first["run_dir"], ["train.steps=4"]), cfg, resume=first["run_dir"])
    assert resumed["steps"] == 4
    a, b = rows(whole["run_dir"]), rows(first["run_dir"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("score", "kl", "value_loss", "response_len"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-5), key
    assert "policy_loss" not in a[0] and "policy_loss" in a[1]          # one rollout of value warm-up
    assert {"t_generate", "t_score", "t_update", "beta", "clipfrac", "entropy"} <= set(a[-1])
    p1, p2 = load_policy(storage, whole["run_dir"]), load_policy(storage, first["run_dir"])
    for (k, v1), v2 in zip(p1.state_dict().items(), p2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5, msg=k)
    ckpt = os.path.join(first["run_dir"], "checkpoints", "step_00000004")
    assert {"model.safetensors", "value.safetensors", "ema.safetensors", "manifest.json"} <= set(os.listdir(ckpt))
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["data"]["position"] == 4 * 8 // 2 and manifest["kind"] == "ppo" and manifest["kl_beta"] > 0
    assert set(whole["final_eval"]) == {"reward", "kl", "kl_beta"}


def test_stage_user_errors(chain, tmp_path):
    cfg, data_dir, sft, rm = chain
    with pytest.raises(UsageError, match="rlhf.ppo.reward_model: .*holds a policy"):
        run_job(ppo_spec(chain, **{"rlhf.ppo.reward_model": sft["run_dir"]}), cfg, log=lambda *a, **k: None)
    # Built-in files made with other settings are refused on every rank (none is left waiting for rank 0).
    other = stage_spec("sft", data_dir, **{"rlhf.data.builtin": {**BUILTIN, "n_sft": 50}})
    with pytest.raises(UsageError, match="rlhf.data.dir: .* other rlhf.data.builtin settings"):
        run_job(other, cfg, log=lambda *a, **k: None)
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n')
    spec = stage_spec("sft", str(tmp_path / "d"), **{"rlhf.data.demonstrations": str(bad), "rlhf.data.builtin": None})
    with pytest.raises(UsageError, match=r"rlhf.data.demonstrations: .*demos.jsonl: row 2: field 'response'"):
        run_job(spec, cfg, log=lambda *a, **k: None)


def test_checkpoint_evaluation_of_each_stage(chain):
    """The controller's per-checkpoint evaluation task measures each stage on its own held-out data."""
    from workers.checkpoint import latest_checkpoint
    from workers.evaluator import evaluate_checkpoint

    cfg, data_dir, sft, rm = chain
    storage = Storage(cfg.storage)
    for result, extra in ((sft, set()), (rm, {"accuracy"})):
        ckpt = latest_checkpoint(storage, result["run_dir"])
        out = evaluate_checkpoint(storage, result["run_dir"], ckpt.path, ckpt.step, 2, 4)
        assert set(out["extra"]) == extra and out["step"] == ckpt.step
        if extra:   # the final checkpoint: the same held-out comparisons the stage measured at its end
            assert out["extra"]["accuracy"] == pytest.approx(rm["final_eval"]["held_out_accuracy"], abs=1e-6)
            assert out["loss"] == pytest.approx(rm["final_eval"]["held_out_loss"], rel=1e-5)
        else:
            assert out["loss"] == pytest.approx(sft["final_eval"]["held_out_loss"], rel=1e-5)
    ppo = run(ppo_spec(chain, **{"train.steps": 2, "name": "t-ppo-eval", "resources.workers": 1}), cfg)
    ckpt = latest_checkpoint(storage, ppo["run_dir"])
    out = evaluate_checkpoint(storage, ppo["run_dir"], ckpt.path, ckpt.step, 2, 4)
    assert set(out["extra"]) == {"reward", "kl", "kl_beta"}
    assert out["loss"] == pytest.approx(-(out["extra"]["reward"] - out["extra"]["kl_beta"] * out["extra"]["kl"]))


def test_sft_starts_from_a_pretrained_checkpoint(chain):
    """SFT from a pretraining run's checkpoint folder: the pretrained weights are where it starts."""
    from workers.checkpoint import latest_checkpoint, load_consolidated

    cfg, data_dir = chain[0], chain[1]
    storage = Storage(cfg.storage)
    pre = run(tiny_spec(**{"name": "t-pre", "data.seq_len": 96, "train.steps": 2, "resources.workers": 1}), cfg)
    ckpt = latest_checkpoint(storage, pre["run_dir"]).path
    sft = run(stage_spec("sft", data_dir, **{"name": "t-sft-pre", "train.steps": 1, "train.lr": 1e-9,
                                             "train.warmup_steps": 0, "model.init_from": ckpt,
                                             "resources.workers": 1}), cfg)
    before, after = load_consolidated(storage, ckpt), load_consolidated(storage, latest_checkpoint(storage, sft["run_dir"]).path)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6, msg=k)   # lr 1e-9: one step moves nothing


def test_ppo_with_ptx_and_zero3_frozen_models(chain):
    """PPO-ptx mixes the pretraining loss on data.corpus into the policy update; the frozen reference and
    reward model run as ZeRO-3 inference engines."""
    cfg = chain[0]
    result = run(ppo_spec(chain, **{"name": "t-ppo-ptx", "train.steps": 2, "rlhf.ppo.ptx_coef": 0.5,
                                    "rlhf.ppo.frozen_zero3": True, "rlhf.ppo.ema_decay": None}), cfg)
    last = rows(result["run_dir"])[-1]
    assert last["ptx_loss"] > 0 and "policy_loss" in last
    ckpt = os.path.join(result["run_dir"], "checkpoints", "step_00000002")
    assert "ema.safetensors" not in os.listdir(ckpt) and "value.safetensors" in os.listdir(ckpt)


def test_missing_weights_and_dataset_files_fail_before_anything_starts(cluster_cfg, tmp_path):
    cases = [({"kind": "rm", "model.init_from": str(tmp_path / "nope")},
              r"model.init_from: .*nope is not a run directory, a checkpoint folder or a Hugging Face folder"),
             ({"kind": "ppo", "model.init_from": str(tmp_path), "rlhf.ppo.reward_model": str(tmp_path / "rm"),
               "rlhf.ppo.value_warmup": 1},
              "model.init_from: "),
             ({"kind": "sft", "rlhf.data.demonstrations": str(tmp_path / "d.jsonl")},
              r"rlhf.data.demonstrations: no such dataset file .*d\.jsonl")]
    for overrides, match in cases:
        spec = tiny_spec(**{"name": "t-preflight", **overrides})
        with pytest.raises(UsageError, match=match):
            run_job(spec, cluster_cfg, log=lambda *a, **k: None)
    assert not [d for d in os.listdir(cluster_cfg.storage) if d.startswith("t-preflight")]
