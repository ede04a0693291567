"""Text corpora: the built-in stdlib docstrings, or files at any fsspec URI.

Inputs are plain text (one document per file), JSONL (one document per line,
in a text field) or Parquet (a text column). Globs are expanded and sorted so
the document order, and therefore the token stream, is the same everywhere.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from typing import Iterator

import fsspec

from specs.errors import UsageError

BUILTIN_STDLIB = "builtin:stdlib"
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                "ensurepip", "__pycache__", "tkinter", "pydoc_data"}
_MIN_DOC_CHARS = 40


def stdlib_files() -> list[str]:
    """The standard library's .py files (tests, GUI and vendored folders left out), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def stdlib_docstrings() -> Iterator[str]:
    """Docstrings of the Python standard library (~1.5 MB of English), parsed with ast: nothing is imported."""
    return docstrings_of(stdlib_files())


def docstrings_of(paths: list[str]) -> Iterator[str]:
    """The docstrings (at least _MIN_DOC_CHARS long) of these Python files, in order; unparsable files are skipped."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    yield doc


def resolve_files(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not os.path.basename(p).startswith("."))
    elif fs.exists(path):
        files = [path]
    else:
        raise UsageError(f"data.corpus: {uri} does not exist; give a file, folder or glob, or 'builtin:stdlib'")
    if not files:
        raise UsageError(f"data.corpus: {uri} matches no files")
    return fs, files


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def _read_file(fs, path: str, fmt: str, text_field: str) -> Iterator[str]:
    fmt = _format_of(path, fmt)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read()  # pq.read_table would import pandas
        if text_field not in table.column_names:
            raise UsageError(f"{path}: no column {text_field!r} (columns: {table.column_names}); "
                             f"set data.text_field")
        for text in table.column(text_field).to_pylist():
            if text:
                yield str(text)
    elif fmt == "jsonl":
        with fs.open(path, "rb", compression="infer") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line, at, offset = raw, offset, offset + len(raw)
                text = jsonl_text(line, path, at, text_field, lineno)
                if text is not None:
                    yield text
    else:
        with fs.open(path, "rb", compression="infer") as f:
            yield decode_utf8(f.read(), path, 0, newlines=True)


def decode_utf8(raw: bytes, path: str, offset: int, newlines: bool = False) -> str:
    """Strict UTF-8: a corpus with invalid bytes is refused with the file and the byte offset, never patched.

    With ``newlines``, \\r\\n and \\r become \\n (Python's universal newlines, as text files have always
    been read here)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: invalid UTF-8 at byte {offset + err.start}; re-encode the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if newlines and "\r" in text else text


def jsonl_text(line: bytes, path: str, offset: int, text_field: str, lineno: int | None = None) -> str | None:
    """The ``text_field`` of one JSONL line at byte ``offset`` (None for a blank line).

    Errors name the line by ``lineno`` when the reader counted lines, else by its byte offset."""
    if not line.strip():
        return None
    where = f"line {lineno}" if lineno is not None else f"the line at byte {offset}"
    try:
        row = json.loads(decode_utf8(line, path, offset))
    except json.JSONDecodeError:
        raise UsageError(f"{path}: {where} is not valid JSON") from None
    if not isinstance(row, dict) or text_field not in row:
        raise UsageError(f"{path}: {where} has no {text_field!r} field; set data.text_field")
    if row[text_field] is None:
        raise UsageError(f"{path}: {where} has {text_field!r}: null; remove the line or give text")
    return str(row[text_field])


def iter_documents(corpus: str, fmt: str = "auto", text_field: str = "text", max_docs: int | None = None,
                   storage_options: dict | None = None) -> Iterator[str]:
    docs: Iterator[str]
    if corpus == BUILTIN_STDLIB:
        docs = stdlib_docstrings()
    elif corpus.startswith("builtin:"):
        raise UsageError(f"data.corpus: unknown built-in corpus {corpus!r}; the built-in one is {BUILTIN_STDLIB!r}")
    else:
        fs, files = resolve_files(corpus, storage_options)
        docs = (doc for path in files for doc in _read_file(fs, path, fmt, text_field))
    for i, doc in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield doc


def hash_stdlib_files(h) -> None:
    """Feed the standard library files' identities (path, size, mtime) into the hash ``h``."""
    for path in stdlib_files():
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{int(st.st_mtime)}".encode())


def corpus_fingerprint(corpus: str, fmt: str = "auto", text_field: str = "text", max_docs: int | None = None,
                       storage_options: dict | None = None) -> str:
    """A content hash of the corpus, cheap to recompute: file identities for the stdlib, bytes for user files."""
    h = hashlib.sha256(json.dumps([corpus, fmt, text_field, max_docs]).encode())
    if corpus == BUILTIN_STDLIB:
        hash_stdlib_files(h)
        return h.hexdigest()[:20]
    fs, files = resolve_files(corpus, storage_options)
    for path in files:
        h.update(path.encode())
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]
