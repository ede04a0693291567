"""Few-shot evaluation (eval.few_shot, workers/few_shot.py): prompt construction, scoring, and a checkpoint's
accuracies by k next to its held-out loss."""
from __future__ import annotations

import json
import random

import pytest
import torch

from data import instruct
from data.tokenizer import byte_tokenizer
from models.generate import Generation
from models.transformer import Decoder, decoder_config
from specs.job import FewShotSpec
from workers import few_shot
from workers.few_shot import SHOT_END, answer_of, build_prompt, few_shot_accuracy, is_right, questions_and_examples

TOK = byte_tokenizer()
FS = FewShotSpec(k=(0, 1, 3), prompts=12, families=("reverse", "add", "upper"), max_new_tokens=8, seed=3)


def test_examples_are_solved_training_prompts_of_the_questions_family_nested_over_k():
    questions, examples = questions_and_examples(FS)
    assert (questions, examples) == questions_and_examples(FS)                  # deterministic in the seed
    assert len(questions) == 12 and all(instruct.split_of(q) == "heldout" for q in questions)
    for q, ex in zip(questions, examples):
        assert len(ex) == 3
        for prompt, answer in ex:
            assert instruct.split_of(prompt) == "train" and prompt != q
            assert instruct.parse(prompt)[0] == instruct.parse(q)[0] and answer == instruct.gold_answer(prompt)
    q, ex = questions[0], examples[0]
    assert build_prompt(ex[:0], q) == q
    assert build_prompt(ex[:2], q) == ex[0][0] + ex[0][1] + SHOT_END + ex[1][0] + ex[1][1] + SHOT_END + q
    assert build_prompt(ex[:3], q).startswith(ex[0][0] + ex[0][1] + SHOT_END) and build_prompt(ex[:3], q).endswith(q)


def test_answers_end_at_the_first_newline_and_count_only_when_exact():
    q = "Reverse: cat dog sun\n"
    assert answer_of("sun dog cat\nReverse: red sky\n") == "sun dog cat"
    assert is_right(q, "sun dog cat") and is_right(q, " sun  dog cat ")
    assert not is_right(q, "sun cat dog") and not is_right(q, "")


def test_accuracy_by_k_scores_each_question_on_its_own_prompt(monkeypatch):
    """A stand-in for generation that answers right exactly when the prompt holds at least one example:
    k=0 must score 0 and k>=1 must score 1, so a prompt built without its examples, or an answer scored
    against another question, shows."""
    model = Decoder(decoder_config("llama", "tiny", vocab_size=TOK.padded_vocab_size, seq_len=256))
    seen = []

    def fake_generate(model_, rows, sampling, *args, **kwargs):
        answers = []
        for ids in rows:
            text = TOK.decode(ids)
            question = text.rstrip("\n").rsplit("\n", 1)[-1] + "\n"                  # the prompt's last line
            shots = (text.count("\n") - 1) // 2
            seen.append(shots)
            answers.append(instruct.gold_answer(question) if shots else "0 0 0")
        ids = [TOK.encode(a + "\nAdd: 1+1\n2")[:sampling.max_new_tokens] for a in answers]
        width = max(len(i) for i in ids)
        resp = torch.tensor([i + [TOK.pad_id] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i in ids])
        z = torch.zeros(len(ids), dtype=torch.long)
        return Generation(resp, z, resp, mask, torch.zeros_like(mask), z.bool())

    monkeypatch.setattr(few_shot, "generate", fake_generate)
    fs = FewShotSpec(k=(0, 1, 3), prompts=12, families=("reverse", "upper"), max_new_tokens=32, seed=3)
    out = few_shot_accuracy(model, TOK, fs, batch_size=5)
    assert out == {"few_shot_questions": 12, "few_shot_0": 0.0, "few_shot_1": 1.0, "few_shot_3": 1.0, "few_shot_cut": 0}
    assert seen == [0] * 12 + [1] * 12 + [3] * 12


@pytest.mark.ray
def test_checkpoint_evaluation_reports_few_shot_accuracy_by_k(ray_cluster, tmp_path):
    """A tiny decoder pre-trained on solved instructions, evaluated as the controller does: the held-out loss
    and, next to it, zero/one/few-shot accuracy on the same held-out questions for every k."""
    from data.storage import Storage
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.runner import run_job
    from tests.conftest import tiny_spec
    from workers.evaluator import evaluate_checkpoint

    task = instruct.TaskConfig(seed=1, families=("reverse", "upper"))
    by_family: dict[str, list[str]] = {}
    for p in instruct.make_prompts(800, "train", task):
        by_family.setdefault(instruct.parse(p)[0], []).append(p)
    rng = random.Random(0)
    with open(tmp_path / "shots.jsonl", "w") as f:
        for _ in range(400):
            shots = rng.sample(by_family[rng.choice(sorted(by_family))], rng.randint(1, 4))
            f.write(json.dumps({"text": "".join(p + instruct.gold_answer(p) + SHOT_END for p in shots)}) + "\n")
    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    asked = {"k": [0, 1, 2], "prompts": 16, "families": ["reverse", "upper"], "max_new_tokens": 12, "seed": 0}
    spec = tiny_spec(name="fewshot", **{"data.corpus": str(tmp_path / "shots.jsonl"), "data.max_docs": None,
                                        "data.seq_len": 128, "train.steps": 12, "checkpoint.every": 12,
                                        "eval.few_shot": asked})
    result = run_job(spec, cfg, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    ckpt = f"{result['run_dir']}/checkpoints/step_00000012"
    ev = evaluate_checkpoint(Storage(cfg.storage), result["run_dir"], ckpt, 12, 2, 4)
    print("few-shot", {k: v for k, v in ev["extra"].items() if k.startswith("few_shot")}, "loss", ev["loss"])
    assert ev["loss"] > 0 and ev["extra"]["few_shot_questions"] == 16
    for k in (0, 1, 2):
        assert 0.0 <= ev["extra"][f"few_shot_{k}"] <= 1.0
    assert 0 <= ev["extra"]["few_shot_cut"] <= 3 * 16
