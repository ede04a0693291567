"""Corpora: invalid UTF-8 is refused with the file and the byte offset, {"text": null} is refused with its line;
in the reference reader (data.corpus.iter_documents) and in the sharded tokenization reader (data.splits)."""
import pytest

from data.corpus import iter_documents
from specs.errors import UsageError


def _docs_sharded(corpus):
    from data.splits import plan_units, read_unit

    return ["".join(piece for piece, _ in read_unit(u)) for u in plan_units(corpus)]


READERS = [lambda c: list(iter_documents(c)), _docs_sharded]


@pytest.mark.parametrize("read", READERS, ids=["reference", "sharded"])
def test_invalid_utf8_names_the_file_and_offset(tmp_path, read):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 3 + b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    with pytest.raises(UsageError) as e:
        read(str(bad))
    assert str(e.value) == f"{bad}: invalid UTF-8 at byte 39; re-encode the file as UTF-8"


@pytest.mark.parametrize("read", READERS, ids=["reference", "sharded"])
def test_invalid_utf8_in_jsonl(tmp_path, read):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(UsageError) as e:
        read(str(bad))
    assert str(e.value).startswith(f"{bad}: invalid UTF-8 at byte ") and "\n" not in str(e.value)
    assert int(str(e.value).split("byte ")[1].split(";")[0]) in range(15, 30)


@pytest.mark.parametrize("read", READERS, ids=["reference", "sharded"])
def test_text_null_is_refused(tmp_path, read):
    bad = tmp_path / "null.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(UsageError, match="null") as e:
        read(str(bad))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_valid_utf8_and_crlf_read_the_same_in_both_readers(tmp_path):
    (tmp_path / "a.txt").write_bytes("naïve café ☕\r\nline two\r\n".encode())
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["naïve café ☕\nline two\n"]
    assert _docs_sharded(str(tmp_path / "a.txt")) == ["naïve café ☕\nline two\n"]
