"""RLHF dataset files: bad rows are refused in one line naming the file, the row and the field (issue 11)."""
import json

import pytest

from data.rlhf_files import MAX_RESPONSES, RowError, read_comparisons, read_demonstrations, read_prompts


def test_invalid_utf8_names_the_file_row_and_byte(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(RowError) as e:
        read_demonstrations(str(f))
    assert str(e.value) == f"{f}: row 2: field '(row)': invalid UTF-8 at byte 48; re-encode the file as UTF-8"


@pytest.mark.parametrize("row, field", [({"prompt": None, "response": "b"}, "prompt"),
                                        ({"prompt": "a", "response": None}, "response"),
                                        ({"prompt": "a", "response": 5}, "response"),
                                        ({"prompt": "", "response": "b"}, "prompt"),
                                        ([1, 2], "(row)")])
def test_null_and_wrong_types_are_refused(tmp_path, row, field):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(RowError) as e:
        read_demonstrations(str(f))
    assert f"row 1: field {field!r}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 18446744073709551616]}, "ranking"),
    ({"prompt": "p", "responses": ["a"] * (MAX_RESPONSES + 1), "ranking": list(range(MAX_RESPONSES + 1))},
     "responses"),
    ({"prompt": "p", "responses": ["a", None], "ranking": [0, 1]}, "responses"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "rejected"),
])
def test_bad_comparisons_are_refused(tmp_path, row, field):
    f = tmp_path / "rm.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(RowError) as e:
        read_comparisons(str(f))
    assert f"field {field!r}" in str(e.value)


def test_prompts_file_with_no_rows_is_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no rows"):
        read_prompts(str(f))
