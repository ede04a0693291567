"""The built-in instruction task (judge, splits, comparisons) and the RLHF dataset files."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import instruct
from data.instruct import TaskConfig, comparisons, demonstrations, gold_answer, judge, make_prompts, split_of
from data.rlhf_files import (BuiltinDataConfig, Comparison, Demonstration, RowError, read_comparisons,
                             read_demonstrations, read_prompts, write_builtin_comparisons, write_builtin_prompts,
                             write_comparisons, write_demonstrations, write_prompts)


# ----------------------------------------------------------------------------- judge


@pytest.mark.parametrize("prompt,answer", [
    ("Reverse: cat dog sun\n", "sun dog cat"),
    ("Sort: 42 7 19\n", "7 19 42"),
    ("Add: 23+58\n", "81"),
    ("Upper: cat dog\n", "CAT DOG"),
    ("Count: cat dog sun\n", "3"),
    ("Max: 4 17 9\n", "17"),
    ("Initials: cat dog sun\n", "cds"),
    ("Repeat 3: cat\n", "cat cat cat"),
])
def test_gold_answers_score_one(prompt, answer):
    assert gold_answer(prompt) == answer
    assert judge(prompt, answer) == 1.0
    assert judge(prompt, f"  {answer} ") == 1.0                  # whitespace does not matter


def test_partial_credit_orders_quality():
    p = "Reverse: cat dog sun fish\n"
    exact, swapped, missing, garbage = "fish sun dog cat", "fish dog sun cat", "fish sun cat", "red red"
    scores = [judge(p, r) for r in (exact, swapped, missing, garbage)]
    assert scores[0] == 1.0 > scores[1] > scores[3] and scores[2] > scores[3]
    assert all(0.0 <= s < 1.0 for s in scores[1:])
    assert judge("Add: 23+58\n", "80") == pytest.approx(0.5 * (1 - 1 / 82))
    assert judge("Add: 23+58\n", "70") < judge("Add: 23+58\n", "80") < 1.0
    assert judge("Add: 23+58\n", "eighty") == 0.0
    assert judge("Upper: cat dog\n", "CAT dog") < 1.0
    assert 0 < judge("Initials: cat dog sun\n", "cd") < 1.0


def test_judge_refuses_foreign_prompts():
    with pytest.raises(ValueError, match="not a built-in"):
        judge("Translate: chat\n", "cat")


def test_every_family_fits_tiny_models():
    prompts = make_prompts(2000)
    assert {instruct.parse(p)[0] for p in prompts} == set(instruct.FAMILIES)
    assert max(len((p + gold_answer(p)).encode()) for p in prompts) < 64


# ----------------------------------------------------------------------------- splits


def test_heldout_is_disjoint_by_construction():
    train = make_prompts(3000, "train")
    held = make_prompts(300, "heldout")
    assert len(set(train)) == 3000 and len(set(held)) == 300
    assert not set(train) & set(held)
    assert all(split_of(p) == "heldout" for p in held) and all(split_of(p) == "train" for p in train)
    # Another seed draws other prompts, but the split of a prompt never changes.
    other = make_prompts(3000, "train", TaskConfig(seed=5))
    assert other != train and not set(other) & set(held)
    assert make_prompts(50, "heldout") == held[:50]              # deterministic, prefix-stable


def test_task_config_validates():
    with pytest.raises(ValueError, match="families"):
        TaskConfig(families=("poetry",))
    with pytest.raises(ValueError, match="heldout_percent"):
        TaskConfig(heldout_percent=0)
    only = make_prompts(50, cfg=TaskConfig(families=("add",)))
    assert all(p.startswith("Add: ") for p in only)


# ----------------------------------------------------------------------------- demonstrations and comparisons


def test_demonstrations_are_gold_unless_noisy():
    demos = demonstrations(20, "heldout")
    assert all(judge(d.prompt, d.response) == 1.0 and split_of(d.prompt) == "heldout" for d in demos)
    noisy = demonstrations(400, noise=0.3)
    wrong = sum(judge(d.prompt, d.response) < 1.0 for d in noisy)
    assert 80 <= wrong <= 150                                    # about 30%, a few corruptions undo themselves
    assert noisy == demonstrations(400, noise=0.3)
    assert [d.prompt for d in noisy] == [d.prompt for d in demonstrations(400)]


def test_comparisons_rank_strictly_by_judge():
    comps = comparisons(100, k=4, min_gap=0.1)
    assert len(comps) >= 95
    for c in comps:
        assert 2 <= len(c.responses) <= 4 and sorted(c.ranking) == list(range(len(c.responses)))
        scores = [judge(c.prompt, r) for r in c.ranked]
        assert all(a - b >= 0.1 - 1e-9 for a, b in zip(scores, scores[1:])), (c, scores)
    assert sum(len(c.responses) == 4 for c in comps) > 80


def test_comparisons_use_model_samples():
    seen = []

    def sampler(prompts, n):
        seen.append((len(prompts), n))
        return [[gold_answer(p) + " extra"] * n for p in prompts]

    comps = comparisons(10, k=4, sampler=sampler)
    assert seen == [(10, 8)]
    assert all(any(r.endswith(" extra") for r in c.responses) for c in comps)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "jsonl.gz"])
def test_files_round_trip(tmp_path, fmt):
    demos = demonstrations(5)
    comps = comparisons(5, k=3)
    uri = lambda name: f"{tmp_path}/{name}.{fmt}"  # noqa: E731
    assert read_demonstrations(write_demonstrations(uri("d"), demos)) == demos
    assert read_comparisons(write_comparisons(uri("c"), comps)) == comps
    pairs = read_comparisons(write_comparisons(uri("p"), comps, pairwise=True))
    assert [p.ranked for p in pairs] == [[c.ranked[0], c.ranked[-1]] for c in comps]
    assert read_prompts(write_prompts(uri("q"), ["a\n", "b\n"])) == ["a\n", "b\n"]


def test_files_work_on_any_fsspec_uri():
    uri = "memory://rlhf-test/demos.jsonl"
    demos = [Demonstration("Add: 1+1\n", "2")]
    assert read_demonstrations(write_demonstrations(uri, demos)) == demos


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "ranking"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}', "ranking"),
    ('{"prompt": "p", "responses": ["a", "b"]}', "ranking"),
    ('{"prompt": "p", "responses": "a b", "ranking": [0, 1]}', "responses"),
    ('{"prompt": "p", "responses": ["a"], "ranking": [0]}', "responses"),
    ('{"prompt": "p", "responses": ["a", 3], "ranking": [0, 1]}', "responses"),
    ('{"prompt": "p", "chosen": "a"}', "rejected"),
    ('{"prompt": 7, "chosen": "a", "rejected": "b"}', "prompt"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "prompt"),
    ('{"prompt": "p"}', "responses"),
    ('["p", "a", "b"]', "(row)"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', "(row)"),
])
def test_bad_comparison_rows_name_file_row_and_field(tmp_path, line, field):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = _write_lines(tmp_path / "cmp.jsonl", [good, good, line])
    with pytest.raises(ValueError) as err:
        read_comparisons(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: row 3: field {field!r}: "), msg
    assert isinstance(err.value, RowError) and err.value.row == 3 and err.value.field == field


def test_bad_demonstration_and_prompt_rows(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ['{"prompt": "p", "response": "r"}', "", '{"prompt": "p"}'])
    with pytest.raises(ValueError, match=r"d\.jsonl: row 3: field 'response': missing"):
        read_demonstrations(path)
    path = _write_lines(tmp_path / "q.jsonl", ['{"prompt": "p"}', '{"text": "p"}'])
    with pytest.raises(ValueError, match=r"q\.jsonl: row 2: field 'prompt': missing"):
        read_prompts(path)


def test_bad_parquet_row_names_row_and_field(tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]},
    ]), path)
    with pytest.raises(ValueError, match=r"c\.parquet: row 2: field 'ranking'"):
        read_comparisons(path)


def test_missing_empty_and_unnamed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        read_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        read_prompts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_prompts(str(tmp_path / "data.csv"))


def test_builtin_datasets_round_trip(tmp_path):
    cfg = BuiltinDataConfig(n_sft=20, n_rm=10, n_rm_heldout=5, n_ppo=15, n_eval=6, k=3, fmt="parquet", demo_noise=0.0)
    files = write_builtin_prompts(str(tmp_path), cfg)
    demos = read_demonstrations(files.sft_train)
    assert len(demos) == 20 and all(judge(d.prompt, d.response) == 1.0 for d in demos)
    assert len(read_prompts(files.ppo_prompts)) == 15
    held = read_prompts(files.eval_prompts)
    assert len(held) == 6 and all(split_of(p) == "heldout" for p in held)
    files = write_builtin_comparisons(str(tmp_path), cfg)
    train, heldout = read_comparisons(files.rm_train), read_comparisons(files.rm_heldout)
    assert all(isinstance(c, Comparison) for c in train) and len(heldout) == 5
    assert all(split_of(c.prompt) == "heldout" for c in heldout)
    assert not {c.prompt for c in train} & {c.prompt for c in heldout}
