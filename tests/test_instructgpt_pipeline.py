"""The InstructGPT pipeline: file validation, stage expansion and links, the controller's policy, resume,
the report's gold figures, and SFT -> RM -> PPO -> report end to end through the controller."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import yaml

from orchestrator import instructgpt as pl
from orchestrator.controller import TRAINING_KINDS
from orchestrator.job_store import JobState, JobStore
from specs.job import SpecError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "instructgpt.yaml")


def tiny_pipeline(name: str = "igpt") -> dict:
    """A pipeline whose stages take seconds: tiny LLaMA, a few steps each, small built-in datasets."""
    return {
        "pipeline": "instructgpt",
        "name": name,
        "base": {
            "model": {"family": "llama", "preset": "tiny"},
            "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 400},
            "resources": {"workers": 2, "cpus_per_worker": 1},
            "parallel": {"zero_stage": 1},
            "eval": {"held_out_tokens": 2048, "batches": 2},
            "rlhf": {"data": {"builtin": {"n_sft": 64, "n_sft_heldout": 8, "n_rm": 16, "n_rm_heldout": 8,
                                          "n_samples": 1, "n_ppo": 16, "n_eval": 6}},
                     "ppo": {"max_new_tokens": 8}},
        },
        "sft": {"train": {"steps": 4, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1},
                "checkpoint": {"every": 4}},
        "rm": {"train": {"steps": 3, "micro_batch": 2, "lr": 1e-3, "warmup_steps": 1},
               "checkpoint": {"every": 3}, "rlhf": {"rm": {"n_bias": 8}}},
        "ppo": {"train": {"steps": 2, "lr": 1e-4},
                "checkpoint": {"every": 2},
                "rlhf": {"ppo": {"rollout_size": 8, "samples_per_prompt": 2, "minibatch_size": 4, "ppo_epochs": 1,
                                 "value_warmup": 1, "eval_prompts": 4}}},
        "report": {"samples_per_prompt": 2},
    }


def _cluster(tmp_path):
    from orchestrator.cluster_config import ClusterConfig

    return ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})


def _cli_submit(tmp_path, raw: dict, capsys, extra=()):
    from orchestrator.cli import main

    cfg = _cluster(tmp_path)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"storage": cfg.storage, "job_store": cfg.job_store}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    code = main(["--cluster", str(tmp_path / "cluster.yaml"), "submit", str(tmp_path / "p.yaml"), *extra])
    out = capsys.readouterr()
    return code, out, cfg


# ---------------------------------------------------------------------- the file


@pytest.mark.parametrize("change, field", [
    (lambda p: p.update(bsae={}), "bsae: unknown field"),
    (lambda p: p.update(pipeline="chatgpt"), "pipeline:"),
    (lambda p: p["sft"]["train"].update(lr=-1), "sft.train.lr"),
    (lambda p: p["rm"].update(model={"init_from": "/x"}), "rm.model.init_from"),
    (lambda p: p["ppo"].update(rlhf={"ppo": {"reward_model": "/x"}}), "ppo.rlhf.ppo.reward_model"),
    (lambda p: p["ppo"].update(rlhf={"data": {"prompts": "/x.jsonl"}}), "ppo.rlhf.data"),
    (lambda p: p["base"].update(name="x"), "base.name"),
    (lambda p: p["ppo"]["rlhf"]["ppo"].update(rollout_size=6, samples_per_prompt=2, minibatch_size=2),
     "ppo.rlhf.ppo.rollout_size"),
    (lambda p: p["base"]["model"].update(family="bert"), "base.model.family"),
    (lambda p: p["base"]["rlhf"]["data"].update(eval_prompts="/nowhere/e.jsonl"),
     "base.rlhf.data.eval_prompts: /nowhere/e.jsonl is outside the read roots of cluster.yaml"),
    (lambda p: p["report"].update(samples_per_prompt=0), "report.samples_per_prompt"),
])
def test_bad_pipeline_file_fails_in_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, change, field):
    raw = tiny_pipeline()
    change(raw)
    code, out, cfg = _cli_submit(tmp_path, raw, capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], out.err
    assert out.out == ""
    assert JobStore(cfg.job_store).list() == []
    assert not os.path.exists(os.path.join(cfg.storage, "pipelines"))


def test_the_example_is_valid_and_has_the_reference_settings():
    from specs.job import read_yaml

    spec = pl.load_pipeline(read_yaml(EXAMPLE), EXAMPLE, storage_root="/s")
    links = {"sft": "/s/sft-run", "rm": "/s/rm-run"}
    sft, rm, ppo = (pl.stage_spec(spec, s, "/s/pipelines/instructgpt", links, "x") for s in pl.STAGES)
    assert (sft.train.steps, sft.samples_per_step, sft.train.lr, sft.train.warmup_steps) == (800, 32, 2e-3, 50)
    assert (rm.train.steps, rm.samples_per_step, rm.train.lr, rm.rlhf.rm.center_coef) == (1500, 16, 1e-3, 0.1)
    p = ppo.rlhf.ppo
    assert (ppo.train.steps, p.rollout_size, p.samples_per_prompt, p.minibatch_size, ppo.train.lr, p.value_lr,
            p.kl_beta, p.kl_target, p.kl_horizon) == (100, 128, 4, 64, 1e-4, 1e-3, 0.1, 3.0, 2000)
    assert {s.resources.workers for s in (sft, rm, ppo)} == {2}


def test_stage_specs_merge_base_and_link_the_stages():
    raw = tiny_pipeline()
    raw["sft"]["model"] = {"init_from": "/pretrained/run"}
    spec = pl.load_pipeline(raw, "p.yaml", storage_root="/s")
    pdir = pl.pipeline_dir("/s", "igpt")
    links = {"sft": "/s/igpt-sft-1", "rm": "/s/igpt-rm-2"}
    specs = {s: pl.stage_spec(spec, s, pdir, links, "p.yaml") for s in pl.STAGES}
    assert [(s.name, s.kind) for s in specs.values()] == [("igpt-sft", "sft"), ("igpt-rm", "rm"), ("igpt-ppo", "ppo")]
    assert specs["sft"].model.init_from == "/pretrained/run"
    assert specs["rm"].model.init_from == specs["ppo"].model.init_from == "/s/igpt-sft-1"
    assert specs["ppo"].rlhf.ppo.reward_model == "/s/igpt-rm-2"
    assert {s.rlhf.data.dir for s in specs.values()} == {"/s/pipelines/igpt/data"}
    assert specs["sft"].train.steps == 4 and specs["rm"].train.steps == 3 and specs["ppo"].train.steps == 2
    assert specs["rm"].train.micro_batch == 2 and specs["sft"].train.micro_batch == 4
    assert {s.rlhf.ppo.max_new_tokens for s in specs.values()} == {8}  # base fragment reaches every stage
    assert spec.base["model"] == {"family": "llama", "preset": "tiny"}  # merging never edits the file's base


# ---------------------------------------------------------------------- the controller's policy and resume


def _finish(store, job_id, state=JobState.SUCCEEDED, metrics=None, reason="finished"):
    rec = store.get(job_id)
    os.makedirs(rec.run_dir, exist_ok=True)   # what the controller writes when a job starts
    with open(os.path.join(rec.run_dir, "spec.json"), "w") as f:
        json.dump(rec.spec, f)
    store.transition(job_id, JobState.STARTING, "start")
    store.transition(job_id, JobState.RUNNING, "run")
    store.transition(job_id, state, reason, step=4, metrics=metrics or {"loss": 1.0})


def _step(cfg, store, storage, parent_id, evaluating=frozenset()):
    """One controller decision, carried out the way Controller._advance_pipeline does."""
    parent = store.get(parent_id)
    state = pl.read_state(storage, parent.spec["pipeline_dir"])
    d = pl.decide(parent, store.list(parent_id=parent.id), state, set(evaluating),
                  storage.exists(f"{parent.spec['pipeline_dir']}/report.json"))
    if isinstance(d, pl.StageDone):
        pl.record_stage_done(store, storage, parent, state, d.stage, d.job_id)
    elif isinstance(d, pl.SubmitStage):
        pl.submit_stage(cfg, store, storage, parent, pl.PipelineSpec.model_validate(parent.spec["pipeline"]),
                        d.stage, state)
    elif isinstance(d, pl.Finish):
        store.transition(parent.id, d.state, d.reason)
    return d


def test_stages_follow_one_another_fail_the_pipeline_and_resume_in_their_run_directory(tmp_path):
    from data.storage import Storage

    cfg = _cluster(tmp_path)
    store, storage = JobStore(cfg.job_store), Storage(cfg.storage)
    out = pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)
    parent = store.get(out["id"])
    assert parent.kind == "pipeline" and parent.state == JobState.RUNNING and parent.resources["workers"] == 0
    [sft] = store.list(parent_id=parent.id)
    assert sft.kind in TRAINING_KINDS
    assert sft.spec["kind"] == "sft" and sft.name == "igpt-sft"
    assert isinstance(_step(cfg, store, storage, parent.id), pl.Wait)  # SFT queued
    _finish(store, sft.id, metrics={"loss": 1.2, "held_out_loss": 1.3})
    assert isinstance(_step(cfg, store, storage, parent.id, {sft.id}), pl.Wait)  # its evals still run
    assert _step(cfg, store, storage, parent.id) == pl.StageDone("sft", sft.id)
    assert _step(cfg, store, storage, parent.id) == pl.SubmitStage("rm")
    rm = store.list(parent_id=parent.id)[-1]
    assert rm.spec["kind"] == "rm" and rm.spec["model"]["init_from"] == sft.run_dir and rm.parent_id == parent.id
    assert rm.spec["rlhf"]["data"]["dir"] == sft.spec["rlhf"]["data"]["dir"] == out["pipeline_dir"] + "/data"
    store.transition(rm.id, JobState.STARTING, "start")
    store.transition(rm.id, JobState.RUNNING, "run")
    store.transition(rm.id, JobState.FAILED, "a rank's process died")
    d = _step(cfg, store, storage, parent.id)
    assert isinstance(d, pl.Finish) and d.state == JobState.FAILED and "stage rm" in d.reason
    assert store.get(parent.id).state == JobState.FAILED

    # Submitting it again continues: SFT is not rerun, RM gets its old run directory back (resume).
    again = pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)
    assert again["id"] != parent.id and again["done"] == ["sft"]
    assert again["submitted"]["stage"] == "rm" and again["submitted"]["resumed"]
    [rm2] = store.list(parent_id=again["id"])
    assert rm2.run_dir == rm.run_dir and rm2.spec == rm.spec
    state = json.load(open(os.path.join(out["pipeline_dir"], "pipeline.json")))
    assert state["stages"]["sft"]["run_dir"] == sft.run_dir and state["stages"]["rm"]["job_id"] == rm2.id
    # While it runs, submitting again submits nothing.
    assert pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)["submitted"] is None
    # A finished stage's settings cannot change under it.
    changed = tiny_pipeline()
    changed["sft"]["train"]["steps"] = 5
    store.request_cancel(again["id"])
    _step(cfg, store, storage, again["id"])
    assert store.get(again["id"]).state == JobState.CANCELLED
    with pytest.raises(SpecError, match="sft stage: train.steps differs"):
        pl.submit_pipeline(cfg, changed, "p.yaml", log=lambda *a: None)
    # RM with new settings starts afresh in a new run directory.
    changed = tiny_pipeline()
    changed["rm"]["train"]["lr"] = 2e-3
    third = pl.submit_pipeline(cfg, changed, "p.yaml", log=lambda *a: None)
    assert not third["submitted"]["resumed"] and third["submitted"]["run_dir"] != rm.run_dir


def test_cancelling_a_pipeline_waits_for_its_stage_then_cancels(tmp_path):
    from data.storage import Storage

    cfg = _cluster(tmp_path)
    store, storage = JobStore(cfg.job_store), Storage(cfg.storage)
    out = pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)
    [sft] = store.list(parent_id=out["id"])
    store.transition(sft.id, JobState.STARTING, "start")
    store.request_cancel(out["id"])
    assert store.get(sft.id).cancel_requested
    assert isinstance(_step(cfg, store, storage, out["id"]), pl.Wait)
    store.transition(sft.id, JobState.CANCELLED, "cancelled by user")
    d = _step(cfg, store, storage, out["id"])
    assert d == pl.Finish(JobState.CANCELLED, "cancelled by user")


def test_a_stage_that_succeeded_as_its_pipeline_was_cancelled_is_not_rerun(tmp_path):
    from data.storage import Storage

    cfg = _cluster(tmp_path)
    store, storage = JobStore(cfg.job_store), Storage(cfg.storage)
    out = pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)
    [sft] = store.list(parent_id=out["id"])
    _finish(store, sft.id)
    store.request_cancel(out["id"])
    assert _step(cfg, store, storage, out["id"], {sft.id}) == pl.Finish(JobState.CANCELLED, "cancelled by user")
    again = pl.submit_pipeline(cfg, tiny_pipeline(), "p.yaml", log=lambda *a: None)
    assert again["done"] == ["sft"] and again["submitted"]["stage"] == "rm"
    [rm] = store.list(parent_id=again["id"])
    assert rm.spec["model"]["init_from"] == sft.run_dir


def test_status_of_a_pipeline_and_evals_without_perplexity(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.cli_jobs import _eval_line

    code, out, cfg = _cli_submit(tmp_path, tiny_pipeline(), capsys)
    assert code == 0
    pid = out.out.strip()
    store = JobStore(cfg.job_store)
    [sft] = store.list(parent_id=pid)
    _finish(store, sft.id, metrics={"loss": 1.25, "held_out_loss": 1.5, "tokens_per_s": 9.0})
    argv = ["--cluster", str(tmp_path / "cluster.yaml"), "status"]
    assert main(argv + ["igpt", "--json"]) == 0  # by name as well as by id
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == pid and status["report"] is None
    assert [(s["stage"], s["state"]) for s in status["stages"]] == [("sft", "SUCCEEDED"), ("rm", "PENDING"),
                                                                   ("ppo", "PENDING")]
    assert status["stages"][0]["metrics"] == {"loss": 1.25, "held_out_loss": 1.5}
    assert status["stages"][0]["run_dir"] == sft.run_dir
    assert main(argv + [pid]) == 0
    text = capsys.readouterr().out
    assert "stage sft" in text and "held_out_loss=1.5" in text and sft.run_dir in text
    line = _eval_line({"step": 4, "loss": -0.5, "perplexity": None, "checkpoint": "c",
                       "extra": {"tokens": 10, "reward": 0.6, "kl": 0.2}}, best=True)
    assert line == "eval step 4: loss -0.5000 reward 0.6 kl 0.2 (best)"


def test_record_eval_keeps_no_perplexity_and_stores_extra(tmp_path):
    from data.storage import Storage
    from orchestrator.controller import Controller

    cfg = _cluster(tmp_path)
    store = JobStore(cfg.job_store)
    rec = store.submit("j", "pipeline-stage", {}, 0, {"workers": 1, "cpus_per_worker": 1}, 0,
                       run_dir_for=lambda i: str(tmp_path / "run"))
    os.makedirs(rec.run_dir)
    ctl = SimpleNamespace(store=store, storage=Storage(str(tmp_path)))
    for step, loss in ((2, -0.1), (4, -0.3)):
        Controller._record_eval(ctl, rec.id, {"checkpoint": f"c{step}", "step": step, "loss": loss,
                                              "perplexity": None, "tokens": 0,
                                              "extra": {"reward": -loss, "kl": 0.1}})
    evals = store.get(rec.id).evals
    assert [e.perplexity for e in evals] == [None, None]
    assert evals[1].extra == {"tokens": 0, "reward": 0.3, "kl": 0.1}
    best = json.load(open(tmp_path / "run" / "best_checkpoint.json"))
    assert best["path"] == "c4"


# ---------------------------------------------------------------------- the report's gold figures


def test_gold_summary_win_rate_ties_half_families_and_non_builtin_prompts():
    from workers.rlhf.report import gold_summary

    prompts = ["Reverse: cat dog\n", "Add: 2+3\n", "Add: 10+10\n", "Tell me a joke\n"]
    responses = {"sft": [["dog cat"], ["4"], ["20"], ["no"]],
                 "ppo": [["dog cat"], ["5"], ["19"], ["no"]]}
    g = gold_summary(prompts, responses)
    # reverse: tie (1 vs 1); 2+3: ppo exact (1) beats 4 (0.5 * (1 - 1/6)); 10+10: sft exact beats 19.
    assert g["ppo_win_rate_vs_sft"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert g["gold_prompts"] == 3 and "1 of 4" in g["gold_note"]
    assert g["gold_by_family"]["reverse"] == {"prompts": 1, "sft": 1.0, "ppo": 1.0}
    assert g["gold_by_family"]["add"]["prompts"] == 2
    assert g["sft_gold"] == pytest.approx((1 + 0.5 * (1 - 1 / 6) + 1) / 3)
    none = gold_summary(["Tell me a joke\n"], {"sft": [["a"]], "ppo": [["b"]]})
    assert none["sft_gold"] is None and none["ppo_win_rate_vs_sft"] is None and "no gold judge" in none["gold_note"]


# ---------------------------------------------------------------------- end to end


@pytest.mark.ray
def test_pipeline_runs_sft_rm_ppo_and_the_report_through_the_controller(controller):
    from data.storage import Storage

    cfg, _ = controller
    store, storage = JobStore(cfg.job_store), Storage(cfg.storage)
    name = f"igpt-{int(time.time() * 1000) % 100000}"
    t0 = time.time()
    out = pl.submit_pipeline(cfg, tiny_pipeline(name), "p.yaml", log=lambda *a: None)
    from tests.conftest import wait_for

    wait_for(lambda: store.get(out["id"]).terminal, timeout=400, every=1.0, what="pipeline end")
    parent = store.get(out["id"])
    stages = store.list(parent_id=parent.id)
    assert parent.state == JobState.SUCCEEDED, (parent.reason, [(s.name, s.state, s.reason) for s in stages])
    assert [s.spec["kind"] for s in stages] == ["sft", "rm", "ppo"]
    assert all(s.state == JobState.SUCCEEDED for s in stages)
    sft, rm, ppo = stages
    assert sft.finished_at <= rm.submitted_at and rm.finished_at <= ppo.submitted_at
    assert rm.spec["model"]["init_from"] == sft.run_dir and ppo.spec["model"]["init_from"] == sft.run_dir
    assert ppo.spec["rlhf"]["ppo"]["reward_model"] == rm.run_dir
    assert {"held_out_loss"} <= set(sft.metrics) and {"held_out_accuracy"} <= set(rm.metrics)
    assert {"reward", "kl"} <= set(ppo.metrics)
    assert [e.perplexity for e in ppo.evals] and all(e.perplexity is None for e in ppo.evals)

    report = json.load(open(os.path.join(out["pipeline_dir"], "report.json")))
    assert report == parent.report
    assert report["runs"] == {"sft": sft.run_dir, "rm": rm.run_dir, "ppo": ppo.run_dir}
    assert report["prompts"] == 6 and report["samples_per_prompt"] == 2 and report["gold_prompts"] == 6
    assert report["rm_heldout_comparisons"] == 8 and 0 <= report["rm_heldout_accuracy"] <= 1
    assert set(report["policies"]) == {"sft", "ppo", "ema"}
    for p in report["policies"].values():
        assert 0 <= p["gold"] <= 1 and p["reward"] == p["reward"]
    assert report["policies"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the SFT policy is the reference
    assert 0 <= report["ppo_win_rate_vs_sft"] <= 1
    assert sum(f["prompts"] for f in report["gold_by_family"].values()) == 6
    assert report["seconds"] > 0
    print(f"pipeline end to end: {time.time() - t0:.1f}s")
    status = pl.pipeline_status(store, storage, parent)
    assert [(s["stage"], s["state"], s["run_dir"]) for s in status["stages"]] == [
        ("sft", "SUCCEEDED", sft.run_dir), ("rm", "SUCCEEDED", rm.run_dir), ("ppo", "SUCCEEDED", ppo.run_dir)]
    text = "\n".join(pl.format_status(status))
    assert "PPO win-rate vs SFT" in text and "held_out_accuracy=" in text
    print(text)

    # Submitting the finished pipeline again reruns nothing.
    again = pl.submit_pipeline(cfg, tiny_pipeline(name), "p.yaml", log=lambda *a: None)
    assert again["id"] == parent.id and again["submitted"] is None and again["done"] == ["sft", "rm", "ppo"]
    assert len(store.list()) == 4
