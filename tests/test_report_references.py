"""The InstructGPT report's reference judge: a user's eval_prompts rows with ``reference`` get exact match,
token F1 and a win-rate of PPO (and EMA) over SFT; rows without references keep the gold-judge behaviour."""
import json

import pytest
import torch

from data.rlhf_files import RowError, read_eval_prompts, read_prompts, write_comparisons
from data.records import Comparison
from workers.rlhf import report as rp


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reference_field_is_a_string_or_a_list(tmp_path):
    uri = _jsonl(tmp_path / "e.jsonl", [{"prompt": "Capital of France?", "reference": "Paris"},
                                        {"prompt": "A colour of the sky?", "reference": ["blue", "grey"]},
                                        {"prompt": "Tell me a joke"}, {"prompt": "Null?", "reference": None}])
    assert read_eval_prompts(uri) == [("Capital of France?", ("Paris",)), ("A colour of the sky?", ("blue", "grey")),
                                      ("Tell me a joke", None), ("Null?", None)]
    assert read_prompts(uri)[0] == "Capital of France?"  # the PPO loader ignores the field
    for bad, what in [(5, "expected a string or a non-empty list"), ([], "non-empty list"),
                      (["ok", 3], "item 1 is int")]:
        uri = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "reference": "a"}, {"prompt": "q", "reference": bad}])
        with pytest.raises(RowError, match=f"row 2: field 'reference': .*{what}"):
            read_eval_prompts(uri)


def test_exact_match_and_token_f1_normalise_like_squad():
    assert rp.exact_match("The Eiffel tower!\n", ("eiffel Tower",)) == 1.0
    assert rp.exact_match("Eiffel", ("eiffel tower", "the tower")) == 0.0
    assert rp.token_f1("eiffel", ("eiffel tower",)) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rp.token_f1("tower", ("paris", "the tower")) == 1.0          # the best-matching reference counts
    assert rp.token_f1("", ("x",)) == 0.0 and rp.token_f1("the", ("a",)) == 1.0  # both empty once normalised


def test_reference_summary_scores_policies_and_win_rate_ties_half():
    refs = [("yes",), None, ("red car",), ("blue",)]
    responses = {"sft": [["yes", "no"], ["?"], ["red"], ["blue"]],
                 "ppo": [["yes", "yes"], ["!"], ["red car", "car"], ["blue"]],
                 "ema": [["no", "no"], ["!"], ["x"], ["blue"]]}
    s = rp.reference_summary(refs, responses)
    assert s["reference_prompts"] == 3
    assert s["policies"]["sft"]["exact_match"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["policies"]["ppo"]["exact_match"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s["policies"]["sft"]["f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert s["policies"]["ppo"]["f1"] == pytest.approx((1 + (1 + 2 / 3) / 2 + 1) / 3)
    assert s["ppo_win_rate_vs_sft"] == pytest.approx((1 + 1 + 0.5) / 3)   # the blue prompt ties
    assert s["ema_win_rate_vs_sft"] == pytest.approx((0 + 0 + 0.5) / 3)
    none = rp.reference_summary([None, None], {"sft": [["a"], ["b"]], "ppo": [["a"], ["b"]]})
    assert none["reference_prompts"] == 0 and none["ppo_win_rate_vs_sft"] is None
    assert none["policies"]["ppo"] == {"exact_match": None, "f1": None}


def test_report_on_a_users_files_with_references(tmp_path, monkeypatch):
    """pipeline_report on user files: tiny llama policies (PPO's samples replaced by the references, so the
    judge has something to find), a tiny reward model; win-rates, exact match and F1 per policy."""
    from data.storage import Storage
    from data.tokenizer import byte_tokenizer
    from models.heads import ScalarHeadModel
    from models.transformer import Decoder, decoder_config

    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = decoder_config("llama", "tiny", vocab_size=tok.padded_vocab_size, seq_len=128)
    models = {"sft": Decoder(cfg).eval(), "ppo": Decoder(cfg).eval(), "ema": Decoder(cfg).eval()}
    rm = ScalarHeadModel(Decoder(cfg)).eval()
    prompts = [{"prompt": "Capital of France?\n", "reference": "Paris"},
               {"prompt": "Name a primary colour.\n", "reference": ["red", "blue", "yellow"]},
               {"prompt": "Two plus two, in words?\n", "reference": "four"},
               {"prompt": "Say anything.\n"}]
    eval_uri = _jsonl(tmp_path / "eval.jsonl", prompts)
    comps_uri = write_comparisons(str(tmp_path / "c.jsonl"), [Comparison("Q?\n", ("good", "bad", "ugly"), (0, 1, 2))])

    monkeypatch.setattr(rp, "run_tokenizer", lambda storage, run: tok)
    monkeypatch.setattr(rp, "load_policy", lambda storage, run, which="model": models["ema" if which == "ema" else run.rsplit("/", 1)[-1]])
    monkeypatch.setattr(rp, "load_reward_model", lambda storage, run: rm)
    storage = Storage(str(tmp_path))
    storage.write_json(f"{tmp_path}/ppo/spec.json", {"rlhf": {"ppo": {"ema_decay": 0.992}}})
    real_sample = rp.sample_responses
    refs = {p["prompt"]: p.get("reference") for p in prompts}

    def sample(model, tok_, ps, n, sampling, gen):
        out = real_sample(model, tok_, ps, n, sampling, gen)
        if model is models["ppo"]:  # PPO "learned" the task: its samples are the first reference
            return [[([r] if isinstance(r, str) else r)[0]] * n if r else o for p, o in zip(ps, out)
                    for r in [refs[p]]]
        return out

    monkeypatch.setattr(rp, "sample_responses", sample)
    report = rp.pipeline_report(storage, "sft", "rm", f"{tmp_path}/ppo", eval_uri, comps_uri,
                                samples_per_prompt=2, max_new_tokens=8)
    assert report["prompts"] == 4
    assert report["judged_prompts"] == {"gold": 0, "reference": 3, "none": 1}
    judge = report["reference_judge"]
    assert judge["reference_prompts"] == 3 and judge["metric"] == "token_f1"
    assert report["policies"]["ppo"]["exact_match"] == 1.0 and report["policies"]["ppo"]["f1"] == 1.0
    for name in ("sft", "ema"):
        assert 0 <= report["policies"][name]["exact_match"] <= report["policies"][name]["f1"] <= 1
    assert judge["ppo_win_rate_vs_sft"] > 0.5 and 0 <= judge["ema_win_rate_vs_sft"] <= 1
    # The gold judge covers none of these prompts, as before.
    assert report["gold_prompts"] == 0 and report["ppo_win_rate_vs_sft"] is None
    assert report["policies"]["sft"]["gold"] is None

    from orchestrator.instructgpt import format_status
    text = "\n".join(format_status({"id": "p1", "name": "p", "state": "SUCCEEDED", "priority": 0,
                                    "pipeline_dir": str(tmp_path), "stages": [], "report": report}))
    assert "reference judge (3 prompts, token F1): PPO win-rate vs SFT" in text and "exact match 1" in text


@pytest.mark.ray
def test_pipeline_stages_on_user_files_then_the_report_judges_references(ray_cluster, tmp_path):
    """SFT -> RM -> PPO as jobs on a user's own files (no built-in task), then the report on the trained
    checkpoints: per-policy exact match and F1, a win-rate by the reference judge, no gold judge."""
    from data.storage import Storage
    from orchestrator.cluster_config import ClusterConfig
    from tests.test_rlhf_stages import run, stage_spec

    answers = {"colour of grass": "green", "colour of snow": "white", "colour of the sky": "blue",
               "colour of coal": "black", "colour of blood": "red", "colour of a lemon": "yellow"}
    qa = [(f"Q{i}: the {q}?\nA: ", a) for i in range(8) for q, a in answers.items()]
    files = {
        "demonstrations": _jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": a} for p, a in qa]),
        "comparisons": _jsonl(tmp_path / "cmp.jsonl", [{"prompt": p, "chosen": a, "rejected": "no idea"}
                                                       for p, a in qa[:24]]),
        "prompts": _jsonl(tmp_path / "ppo.jsonl", [{"prompt": p} for p, _ in qa]),
        "eval_prompts": _jsonl(tmp_path / "eval.jsonl",
                               [{"prompt": p, "reference": [a, f"{a}."]} for p, a in qa[-6:]]
                               + [{"prompt": "Say anything.\nA: "}]),
    }
    data = {"rlhf.data.builtin": None, **{f"rlhf.data.{k}": v for k, v in files.items()}}
    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    dirs = str(tmp_path / "data")
    one = {"resources.workers": 1, "eval.batches": 1}
    sft = run(stage_spec("sft", dirs, **{**data, **one, "train.steps": 6, "train.micro_batch": 8}), cfg)
    rm = run(stage_spec("rm", dirs, **{**data, **one, "train.steps": 2, "train.micro_batch": 4,
                                       "model.init_from": sft["run_dir"]}), cfg)
    ppo = run(stage_spec("ppo", dirs, **{**data, **one, "train.steps": 2, "train.lr": 1e-4,
                                         "model.init_from": sft["run_dir"], "rlhf.ppo.reward_model": rm["run_dir"],
                                         "rlhf.ppo.rollout_size": 4, "rlhf.ppo.samples_per_prompt": 2,
                                         "rlhf.ppo.minibatch_size": 4, "rlhf.ppo.value_warmup": 1,
                                         "rlhf.ppo.eval_prompts": 2}), cfg)
    report = rp.pipeline_report(Storage(cfg.storage), sft["run_dir"], rm["run_dir"], ppo["run_dir"],
                                files["eval_prompts"], files["comparisons"], samples_per_prompt=2, max_new_tokens=8,
                                rm_heldout_tail=True)
    assert report["prompts"] == 7 and report["judged_prompts"] == {"gold": 0, "reference": 6, "none": 1}
    assert report["reference_judge"]["reference_prompts"] == 6
    assert set(report["policies"]) == {"sft", "ppo", "ema"}
    for p in report["policies"].values():
        assert 0 <= p["exact_match"] <= p["f1"] <= 1 and p["gold"] is None
    for name in ("ppo", "ema"):
        w = report["reference_judge"][f"{name}_win_rate_vs_sft"]
        assert 0 <= w <= 1 and (w * 12) == int(w * 12)  # per-prompt wins, ties half, over 6 prompts
    assert report["ppo_win_rate_vs_sft"] is None and "no gold judge" in report["gold_note"]  # gold: as before
