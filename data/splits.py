"""A corpus as a list of work units: byte ranges of files, Parquet row groups, whole compressed files.

A preparation cuts the corpus into ``Unit`` values that Ray actors tokenize
independently. Concatenating the units' token ids in unit order gives exactly
the ids a single process would produce reading the corpus file by file
(documents joined by ``<|endoftext|>``), so the number of actors never changes
the data.

How each input is split:

* JSONL (one document per line): byte ranges; a unit owns every line that
  *starts* inside its range (Hadoop's rule), so no line is read twice or lost.
* Plain text (one document per file): byte ranges cut just before a ``\\n`` or
  ``\\r`` that follows a printable ASCII character. The byte-level
  pre-tokenizer (GPT-2 regex) always splits there, so the BPE ids of the
  pieces equal the ids of the whole file. The end-of-document token follows the
  file's last piece only.
* Parquet: groups of row groups.
* ``.gz`` / ``.zst`` files and Hugging Face ``datasets`` folders (Arrow
  stream files, ``save_to_disk``): one unit per file, streamed batch by batch.

Every reader streams with bounded memory: blocks of ``READ_BLOCK`` bytes,
one row group or record batch at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import fsspec

from data.corpus import BUILTIN_STDLIB, decode_utf8, docstrings_of, hash_stdlib_files, jsonl_text, stdlib_files
from specs.errors import UsageError

UNIT_BYTES = 16 << 20
"""Target input bytes per unit (and so per shard): small enough for frequent progress, big enough to amortise."""
READ_BLOCK = 1 << 20
"""Bytes read per call while streaming a range."""
MAX_PIECE = 8 << 20
"""A text stretch this long with no safe cut is cut anyway (BPE ids may then differ there from one-process ids)."""
STDLIB_FILES_PER_UNIT = 200

_HF_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


@dataclass(frozen=True)
class FileEntry:
    """One input file as listed: what the cache key is made of (no byte is read)."""

    path: str
    size: int
    version: str
    """ETag or modification time, whichever the filesystem reports."""
    fmt: str
    """text, jsonl, parquet or arrow."""
    compression: str | None = None


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``path``'s bytes [start, end), row groups [start, end), or stdlib files [start, end)."""

    index: int
    path: str
    fmt: str
    start: int
    end: int
    nbytes: int
    """Input bytes this unit covers (for progress)."""
    last_of_file: bool = True
    compression: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- listing

def _fmt_of(path: str, fmt: str) -> tuple[str, str | None]:
    base, ext = os.path.splitext(path)
    compression = _COMPRESSED.get(ext)
    if compression:
        path = base
    if fmt != "auto":
        return fmt, compression
    if path.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl", compression
    if path.endswith(".parquet"):
        return "parquet", compression
    if path.endswith(".arrow"):
        return "arrow", compression
    return "text", compression


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "md5Hash"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_files(uri: str, fmt: str = "auto", storage_options: dict | None = None
               ) -> tuple[fsspec.AbstractFileSystem, list[FileEntry]]:
    """The corpus's files, sorted, with sizes and versions from one listing call (no file is opened)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if any(ch in path for ch in "*?["):
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    elif fs.exists(path):
        infos = {path: fs.info(path)}
    else:
        raise UsageError(f"data.corpus: {uri} does not exist; give a file, folder or glob, or 'builtin:stdlib'")
    infos = {p: i for p, i in infos.items() if i.get("type", "file") == "file"
             and not os.path.basename(p).startswith(".")}
    if any(p.endswith(".arrow") for p in infos):  # a datasets folder: its JSON files describe, not hold, data
        infos = {p: i for p, i in infos.items() if os.path.basename(p) not in _HF_METADATA}
    if not infos:
        raise UsageError(f"data.corpus: {uri} matches no files")
    out = []
    for p in sorted(infos):
        f, comp = _fmt_of(p, fmt)
        out.append(FileEntry(p, int(infos[p].get("size") or 0), _version(infos[p]), f, comp))
    return fs, out


def listing_fingerprint(corpus: str, fmt: str, text_field: str, max_docs: int | None,
                        storage_options: dict | None = None) -> str:
    """Hash of the file listing (paths, sizes, versions) and the reading options; reads no file's bytes."""
    h = hashlib.sha256(json.dumps([corpus, fmt, text_field, max_docs]).encode())
    if corpus == BUILTIN_STDLIB:
        hash_stdlib_files(h)
    else:
        for e in list_files(corpus, fmt, storage_options)[1]:
            h.update(f"{e.path}\0{e.size}\0{e.version}\0".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- units

def _parquet_row_groups(fs, path: str) -> list[int]:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
            return [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
    except Exception as err:  # noqa: BLE001 - one line naming the file, whatever pyarrow says
        raise UsageError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def plan_units(corpus: str, fmt: str = "auto", storage_options: dict | None = None,
               unit_bytes: int | None = None, log=print) -> list[Unit]:
    """Cut the corpus into units in document order. Empty files are skipped with one line each."""
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[Unit] = []
    if corpus == BUILTIN_STDLIB:
        files = stdlib_files()
        for lo in range(0, len(files), STDLIB_FILES_PER_UNIT):
            hi = min(lo + STDLIB_FILES_PER_UNIT, len(files))
            size = sum(os.path.getsize(p) for p in files[lo:hi])
            units.append(Unit(len(units), BUILTIN_STDLIB, "stdlib", lo, hi, size))
        return units
    if corpus.startswith("builtin:"):
        raise UsageError(f"data.corpus: unknown built-in corpus {corpus!r}; the built-in one is {BUILTIN_STDLIB!r}")
    fs, files = list_files(corpus, fmt, storage_options)
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    empty = []
    for e in files:
        e = e if local else FileEntry(fs.unstrip_protocol(e.path), e.size, e.version, e.fmt, e.compression)
        if e.size == 0:
            log(f"skipping {e.path}: the file is empty")
            empty.append(e.path)
            continue
        if e.compression or e.fmt == "arrow":
            units.append(Unit(len(units), e.path, e.fmt, 0, e.size, e.size, True, e.compression))
        elif e.fmt == "parquet":
            sizes = _parquet_row_groups(fs, e.path)
            lo, acc = 0, 0
            for i, s in enumerate(sizes):
                acc += s
                if acc >= unit_bytes or i == len(sizes) - 1:
                    units.append(Unit(len(units), e.path, "parquet", lo, i + 1, acc, i == len(sizes) - 1))
                    lo, acc = i + 1, 0
        else:
            n = max(1, -(-e.size // unit_bytes))
            for k in range(n):
                start, end = k * e.size // n, (k + 1) * e.size // n
                units.append(Unit(len(units), e.path, e.fmt, start, end, end - start, k == n - 1))
    if not units:
        more = f" (and {len(empty) - 1} more empty files)" if len(empty) > 1 else ""
        raise UsageError(f"data.corpus: {corpus} holds no text: {empty[0]} is empty{more}")
    return units


# ---------------------------------------------------------------------------------------------- reading

_PRINTABLE = frozenset(range(0x21, 0x7F))


def _safe_cut(buf: bytes, lo: int = 1) -> int:
    """Last p >= lo with buf[p] a line break and buf[p-1] printable ASCII, or -1."""
    p = len(buf)
    while True:
        a, b = buf.rfind(b"\n", lo, p), buf.rfind(b"\r", lo, p)
        p = max(a, b)
        if p < lo:
            return -1
        if buf[p - 1] in _PRINTABLE:
            return p


def _first_safe_cut(f, offset: int) -> int:
    """The first text cut at or after ``offset``, or the end of the file: the same answer for both units
    that share the boundary."""
    if offset <= 0:
        return 0
    pos = offset - 1
    f.seek(pos)
    prev = None
    while True:
        block = f.read(READ_BLOCK)
        if not block:
            return pos
        if prev is not None:
            block, pos = bytes([prev]) + block, pos - 1
        for i in range(1, len(block)):
            c = block[i]
            if (c == 0x0A or c == 0x0D) and block[i - 1] in _PRINTABLE:
                return pos + i
        prev = block[-1]
        pos += len(block)


def _utf8_boundary(buf: bytes) -> int:
    """The largest cut <= len(buf) that does not split a UTF-8 sequence."""
    n = len(buf)
    for k in range(1, min(4, n) + 1):
        c = buf[n - k]
        if c < 0x80:
            return n
        if c >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return n if need <= k else n - k
    return n


def _first_line_start(f, offset: int, size: int) -> int:
    """The first byte after a newline at or after ``offset - 1`` (a line starting exactly at offset counts)."""
    if offset <= 0:
        return 0
    pos = offset - 1
    f.seek(pos)
    while pos < size:
        block = f.read(READ_BLOCK)
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _open_compressed(fs, unit: Unit):
    import pyarrow as pa

    raw = fs.open(unit.path, "rb")
    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), unit.compression)


def _text_pieces(fs, unit: Unit) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a plain-text unit, cut only at safe places."""
    if unit.compression:
        stream, start, end = _open_compressed(fs, unit), 0, None
    else:
        stream = fs.open(unit.path, "rb")
    with stream as f:
        if not unit.compression:
            start = _first_safe_cut(f, unit.start)
            end = unit.end if unit.last_of_file else _first_safe_cut(f, unit.end)
            f.seek(start)
        pos, pending = start, b""
        while end is None or pos < end:
            block = f.read(READ_BLOCK if end is None else min(READ_BLOCK, end - pos))
            if not block:
                break
            pos += len(block)
            pending += block
            cut = _safe_cut(pending)
            if cut < 0 and len(pending) >= MAX_PIECE:
                cut = _utf8_boundary(pending)
            if cut > 0:
                yield decode_utf8(pending[:cut], unit.path, pos - len(pending), True), False
                pending = pending[cut:]
        if pending:
            yield decode_utf8(pending, unit.path, pos - len(pending), True), False
    if unit.last_of_file:
        yield "", True


def _jsonl_docs(fs, unit: Unit, text_field: str) -> Iterator[str]:
    if unit.compression:
        with _open_compressed(fs, unit) as f:
            pos, pending = 0, b""
            while True:
                block = f.read(READ_BLOCK)
                if not block:
                    break
                pending += block
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    text = jsonl_text(line, unit.path, pos, text_field)
                    pos += len(line) + 1
                    if text is not None:
                        yield text
            if pending:
                text = jsonl_text(pending, unit.path, pos, text_field)
                if text is not None:
                    yield text
        return
    with fs.open(unit.path, "rb") as f:
        start = _first_line_start(f, unit.start, unit.end)
        f.seek(start)
        pos = start
        while pos < unit.end:
            line = f.readline()
            if not line:
                break
            text = jsonl_text(line, unit.path, pos, text_field)
            pos += len(line)
            if text is not None:
                yield text


def _table_docs(batches, path: str, text_field: str) -> Iterator[str]:
    for batch in batches:
        if text_field not in batch.schema.names:
            raise UsageError(f"{path}: no column {text_field!r} (columns: {batch.schema.names}); set data.text_field")
        for text in batch.column(text_field).to_pylist():
            if text:
                yield str(text)


def _parquet_docs(fs, unit: Unit, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with fs.open(unit.path, "rb") as f:
        pf = pq.ParquetFile(f)
        for rg in range(unit.start, unit.end):
            yield from _table_docs(pf.iter_batches(row_groups=[rg], columns=None, batch_size=4096),
                                   unit.path, text_field)


def _arrow_docs(fs, unit: Unit, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    with fs.open(unit.path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            yield from _table_docs((reader.get_batch(i) for i in range(reader.num_record_batches)), unit.path,
                                   text_field)
            return
        yield from _table_docs(reader, unit.path, text_field)


def _stdlib_docs(unit: Unit) -> Iterator[str]:
    return docstrings_of(stdlib_files()[unit.start:unit.end])


def read_unit(unit: Unit, text_field: str = "text", storage_options: dict | None = None
              ) -> Iterator[tuple[str, bool]]:
    """The unit's text as (piece, ends_document) pairs, in order, with bounded memory."""
    if unit.fmt == "stdlib":
        for doc in _stdlib_docs(unit):
            yield doc, True
        return
    fs = fsspec.core.url_to_fs(unit.path, **(storage_options or {}))[0]
    try:
        if unit.fmt == "text":
            yield from _text_pieces(fs, unit)
            return
        docs = {"jsonl": _jsonl_docs, "parquet": _parquet_docs, "arrow": _arrow_docs}[unit.fmt](fs, unit, text_field)
        for doc in docs:
            yield doc, True
    except UsageError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"{unit.path}: cannot read the file ({type(err).__name__}: {err})") from None
