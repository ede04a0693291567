"""Few-shot evaluation of a decoder checkpoint: GPT-3's zero-, one- and few-shot accuracy, on the built-in task.

For each k of ``eval.few_shot.k`` every held-out question of the built-in
instruction task (``data.instruct``, held-out split) is put after k solved
examples of the same instruction family, drawn from the training split::

    Reverse: cat dog sun\\n      sun dog cat\\n       <- example 1 (prompt, gold answer, newline)
    Reverse: red sky\\n          sky red\\n           <- example k
    Reverse: fish moon\\n                             <- the question; the model completes it

The model answers greedily; the answer is the generated text up to its first
newline (or eos), and it counts as right when the gold judge
(``data.instruct.judge``) gives it full marks, i.e. exact match after
whitespace normalisation. The questions are the same for every k, and the
examples of a question are nested (the k=1 example is the first of the k=4
ones), so the accuracies differ only by the context. A prompt longer than the
model's context keeps its last ``seq_len - max_new_tokens`` tokens; the
number so cut is reported.

The figures join the checkpoint's evaluation extras (``workers/evaluator.py``)
as ``few_shot_<k>``, next to the held-out loss.
"""
from __future__ import annotations

import random
from collections import defaultdict

import torch

from data import instruct
from models.generate import SamplingConfig, generate

SHOT_END = "\n"
"""What follows each example's answer (the question's own prompt already ends with instruct.PROMPT_END)."""


def task_config(fs) -> instruct.TaskConfig:
    return instruct.TaskConfig(seed=fs.seed, families=tuple(fs.families or instruct.FAMILIES))


def questions_and_examples(fs) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Held-out questions and, per question, max(k) solved training examples of its family (nested for all k)."""
    cfg, most = task_config(fs), max(fs.k)
    questions = instruct.make_prompts(fs.prompts, "heldout", cfg)
    pool: dict[str, list[str]] = defaultdict(list)
    for p in instruct.make_prompts(max(64, 4 * most * len(cfg.families)), "train", cfg):
        pool[instruct.parse(p)[0]].append(p)
    examples = []
    for i, q in enumerate(questions):
        rng = random.Random(f"{fs.seed}:few-shot:{i}")
        family = pool[instruct.parse(q)[0]]
        picked = rng.sample(family, min(most, len(family)))
        examples.append([(p, instruct.gold_answer(p)) for p in picked])
    return questions, examples


def build_prompt(examples: list[tuple[str, str]], question: str) -> str:
    """k solved examples, each ``prompt + answer + SHOT_END``, then the question."""
    return "".join(p + a + SHOT_END for p, a in examples) + question


def answer_of(generated: str) -> str:
    """The model's answer: its text up to the first newline."""
    return generated.split("\n", 1)[0]


def is_right(question: str, answer: str) -> bool:
    """Exact match by the gold judge (full marks only)."""
    return instruct.judge(question, answer) == 1.0


@torch.no_grad()
def few_shot_accuracy(model, tok, fs, batch_size: int = 32) -> dict:
    """{"few_shot_<k>": accuracy for each k, "few_shot_questions": n, "few_shot_cut": prompts cut to fit}."""
    model.eval()
    seq_len = model.cfg.seq_len
    keep = seq_len - fs.max_new_tokens
    if keep < 1:
        raise ValueError(f"eval.few_shot.max_new_tokens: {fs.max_new_tokens} leaves no room for a prompt in the "
                         f"model's {seq_len} positions")
    sampling = SamplingConfig(max_new_tokens=fs.max_new_tokens, temperature=0.0, eos_id=tok.eos_id,
                              pad_id=tok.pad_id)
    questions, examples = questions_and_examples(fs)
    out: dict = {"few_shot_questions": len(questions)}
    cut = 0
    for k in fs.k:
        encoded = [tok.encode(build_prompt(ex[:k], q)) for q, ex in zip(questions, examples)]
        cut += sum(len(ids) > keep for ids in encoded)
        encoded = [ids[-keep:] for ids in encoded]
        right = 0
        for s in range(0, len(encoded), batch_size):
            gen = generate(model, encoded[s:s + batch_size], sampling)
            for q, ids, m in zip(questions[s:s + batch_size], gen.response_ids, gen.response_mask):
                right += is_right(q, answer_of(tok.decode(ids[m.bool()].tolist())))
        out[f"few_shot_{k}"] = right / len(questions)
    out["few_shot_cut"] = cut
    return out


def with_few_shot(result: dict, storage, spec, run_dir: str, model=None, tok=None) -> dict:
    """``result`` of a checkpoint evaluation with the few-shot accuracies in its extras, when eval.few_shot asks."""
    fs = spec.eval.few_shot
    if fs is None:
        return result
    from workers.weights import load_policy, run_tokenizer

    model = model if model is not None else load_policy(storage, result["checkpoint"])
    tok = tok if tok is not None else run_tokenizer(storage, run_dir)
    return {**result, "extra": {**(result.get("extra") or {}), **few_shot_accuracy(model, tok, fs)}}
