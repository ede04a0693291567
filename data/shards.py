"""Tokenize a corpus once into Parquet shards of token ids, cached by file listing; read them back lazily.

Cache layout under ``<storage>/cache/tokens/<key>/``::

    tokenizer.json, tokenizer_config.json
    shard-00000.parquet ...   one int32 column ``ids`` (documents joined by <|endoftext|>),
                              row groups of ROW_GROUP_TOKENS tokens
    shard-00000.json ...      each shard's index entry: tokens, documents, the input range it came from
    progress.json             files, bytes, tokens/s, ETA of the preparation under way
    manifest.json             written last; a cache entry without it is finished (only missing shards)

The key hashes the corpus's file listing (paths, sizes, ETags or mtimes, not
the bytes), the reading options, the tokenizer settings and this format's
version, so a second run (or a second job, or ``switchyard data prepare``) on
the same files reuses the shards. ``data.prepare`` writes them with a pool of
Ray actors; ``TokenStream`` reads any token range back from the shards by
row group (memory-mapped when local, range reads through fsspec otherwise), so
no process ever holds the whole corpus.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.storage import Storage
from data.tokenizer import TextTokenizer

FORMAT_VERSION = 2
CACHE_ROW_GROUPS = 512
"""Decoded row groups a ``TokenStream`` keeps (512 x 64 KiB = 32 MiB per process, whatever the corpus size)."""
OPEN_SHARDS = 16
"""Shard files a ``TokenStream`` keeps open (each holds its Parquet footer)."""


@dataclass(frozen=True)
class TokenSource:
    """What to tokenize: the data part of a job spec."""

    corpus: str
    fmt: str = "auto"
    text_field: str = "text"
    tokenizer: str = "byte"
    vocab_size: int = 2048
    max_docs: int | None = None

    @classmethod
    def from_spec(cls, data) -> "TokenSource":
        return cls(data.corpus, data.format, data.text_field, data.tokenizer, data.vocab_size, data.max_docs)

    def docs(self, storage: Storage):
        from data.corpus import iter_documents

        return iter_documents(self.corpus, self.fmt, self.text_field, self.max_docs, storage.options)

    def cache_key(self, storage: Storage) -> str:
        from data import splits
        from data.prepare import ROW_GROUP_TOKENS

        fp = splits.listing_fingerprint(self.corpus, self.fmt, self.text_field, self.max_docs, storage.options)
        tok = [self.tokenizer, self.vocab_size if self.tokenizer == "bpe" else None]
        return hashlib.sha256(json.dumps([FORMAT_VERSION, fp, tok, splits.UNIT_BYTES, ROW_GROUP_TOKENS]).encode()
                              ).hexdigest()[:20]


def cache_folder(source: TokenSource, storage: Storage) -> str:
    return storage.path("cache", "tokens", source.cache_key(storage))


def build_token_cache(source: TokenSource, storage: Storage, log=print, max_actors: int | None = None,
                      use_ray: bool | None = None) -> str:
    """Return the cache folder URI for ``source``, writing only the shards a complete entry still lacks.

    With Ray initialized (a job's rank 0, ``switchyard data prepare``) a pool of actors tokenizes; without it
    this process does, with the same result.
    """
    from data.prepare import prepare

    folder = cache_folder(source, storage)
    manifest_uri = f"{folder}/manifest.json"
    if storage.exists(manifest_uri):
        return folder
    t0 = time.time()
    manifest = prepare(source, storage, folder, log=log, max_actors=max_actors, use_ray=use_ray)
    manifest.update(version=FORMAT_VERSION, key=folder.rsplit("/", 1)[-1], corpus=source.corpus)
    storage.write_json(manifest_uri, manifest)
    log(f"tokenized {manifest['documents']} documents into {manifest['tokens']} tokens "
        f"({len(manifest['shards'])} shards) in {time.time() - t0:.1f}s")
    return folder


IDS_SCHEMA = pa.schema([("ids", pa.int32())])
"""A token shard's one column."""


def int32_ids(column) -> np.ndarray:
    """A Parquet column of int32 token ids as one numpy array, over Arrow's own buffers.

    pyarrow's ``to_numpy`` imports pandas on its first call (to pick conversion options pandas decides):
    0.25 CPU-seconds here, 0.7 s of a loaded rank's first training step; a rank has no other use for it."""
    parts = []
    for chunk in column.chunks:
        if chunk.type != pa.int32() or chunk.null_count:
            raise ValueError(f"token shard column: expected int32 ids without nulls, got {chunk.type} "
                             f"with {chunk.null_count} null(s); delete the token cache to rebuild it")
        parts.append(np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=len(chunk), offset=4 * chunk.offset))
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, np.int32)


def ids_table(ids: np.ndarray):
    """int32 token ids as a one-column (``ids``) Arrow table over the array's own memory (``pa.table`` would
    import pandas, as ``to_numpy`` does, in every tokenizing process)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    column = pa.Array.from_buffers(pa.int32(), len(ids), [None, pa.py_buffer(ids)])
    return pa.Table.from_arrays([column], schema=IDS_SCHEMA)


class TokenStream:
    """A cache entry's token ids, addressed like a (n_tokens,) int32 array but read on demand.

    ``stream[a:b]`` reads the row groups that hold tokens [a, b). Local shards are memory-mapped,
    remote ones range-read through fsspec. Decoded row groups are kept in a small LRU
    (``CACHE_ROW_GROUPS``), so memory does not grow with the corpus. ``prefetch`` reads ranges in a
    background thread, so a step's windows are usually decoded before the step asks for them.
    """

    def __init__(self, folder: str, storage: Storage, manifest: dict):
        self.folder, self.storage = folder, storage
        self.names = [s["name"] for s in manifest["shards"]]
        counts = np.array([s["tokens"] for s in manifest["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (n_shards + 1,) token offset of each shard
        self.rg = int(manifest.get("row_group_tokens", 0)) or None
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._ahead: threading.Thread | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _file(self, shard: int) -> pq.ParquetFile:
        f = self._files.get(shard)
        if f is None:
            uri = f"{self.folder}/{self.names[shard]}"
            if self.storage.is_local:
                f = pq.ParquetFile(self.storage.local_path(uri), memory_map=True)
            else:
                f = pq.ParquetFile(self.storage.fs.open(uri, "rb", block_size=1 << 20))
            self._files[shard] = f
            if len(self._files) > OPEN_SHARDS:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(shard)
        return f

    def _group(self, shard: int, group: int) -> np.ndarray:
        key = (shard, group)
        with self._lock:
            ids = self._groups.get(key)
            if ids is not None:
                self._groups.move_to_end(key)
                return ids
            f = self._file(shard)
            if self.rg is None:  # a shard written in one row group per table (format 1): read it whole
                ids = int32_ids(f.read(columns=["ids"]).column(0))
            else:
                ids = int32_ids(f.read_row_group(group, columns=["ids"]).column(0))
            self._groups[key] = ids
            if len(self._groups) > CACHE_ROW_GROUPS:
                self._groups.popitem(last=False)
            return ids

    def _read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty(max(0, hi - lo), dtype=np.int32)
        pos = lo
        while pos < hi:
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[shard])
            rg = self.rg or (int(self.starts[shard + 1] - self.starts[shard]))
            group, off = divmod(local, rg)
            ids = self._group(shard, group if self.rg else 0)
            take = min(hi - pos, len(ids) - off)
            out[pos - lo:pos - lo + take] = ids[off:off + take]
            pos += take
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise IndexError("TokenStream reads contiguous ranges only")
            return self._read(lo, hi)
        i = int(key)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._read(i, i + 1)[0]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Read ``ranges`` into the row-group cache in a background thread (one at a time; extra calls drop)."""
        if self._ahead is not None and self._ahead.is_alive():
            return

        def run():
            for lo, hi in ranges:
                self._read(max(0, lo), min(hi, len(self)))

        self._ahead = threading.Thread(target=run, daemon=True, name="token-read-ahead")
        self._ahead.start()


@dataclass
class TokenCache:
    """A complete cache entry: its token stream (read lazily), its tokenizer and its manifest."""

    folder: str
    tokens: TokenStream  # (n_tokens,) int32, read by range
    tokenizer: TextTokenizer
    manifest: dict

    @classmethod
    def load(cls, folder: str, storage: Storage) -> "TokenCache":
        manifest = storage.read_json(f"{folder}/manifest.json")
        tokens = TokenStream(folder, storage, manifest)
        if len(tokens) != manifest["tokens"]:
            raise RuntimeError(f"token cache {folder} is inconsistent: delete it and run again")
        return cls(folder, tokens, load_cached_tokenizer(folder, storage), manifest)


def load_cached_tokenizer(folder: str, storage: Storage) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(storage.read_text(f"{folder}/tokenizer.json"))
    kind = json.loads(storage.read_text(f"{folder}/tokenizer_config.json")).get("switchyard_kind", "bpe")
    return TextTokenizer(tok, kind)
