"""Tokenize a corpus once into Parquet shards of token ids, cached by content hash.

Cache layout under ``<storage>/cache/tokens/<key>/``::

    tokenizer.json, tokenizer_config.json
    shard-00000.parquet ...   one int32 column ``ids``: documents joined by <|endoftext|>
    manifest.json             written last; a cache entry without it is rebuilt

The key hashes the corpus content, the tokenizer settings and this format's
version, so a second run (or a second job) on the same data reuses the shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.corpus import corpus_fingerprint, iter_documents
from data.storage import Storage
from data.tokenizer import TextTokenizer, byte_tokenizer, train_bpe

FORMAT_VERSION = 1
SHARD_TOKENS = 4_000_000
BPE_TRAIN_DOCS = 200_000


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
        return iter_documents(self.corpus, self.fmt, self.text_field, self.max_docs, storage.options)

    def cache_key(self, storage: Storage) -> str:
        fp = corpus_fingerprint(self.corpus, self.fmt, self.text_field, self.max_docs, storage.options)
        tok = [self.tokenizer, self.vocab_size if self.tokenizer == "bpe" else None]
        return hashlib.sha256(json.dumps([FORMAT_VERSION, fp, tok]).encode()).hexdigest()[:20]


def _write_shard(storage: Storage, uri: str, ids: np.ndarray) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"ids": pa.array(ids, type=pa.int32())}), buf, compression="zstd")
    with storage.fs.open(uri, "wb") as f:
        f.write(buf.getvalue())


def build_token_cache(source: TokenSource, storage: Storage, log=print) -> str:
    """Return the cache folder URI for ``source``, tokenizing only if no complete entry exists."""
    key = source.cache_key(storage)
    folder = storage.path("cache", "tokens", key)
    manifest_uri = f"{folder}/manifest.json"
    if storage.exists(manifest_uri):
        return folder
    t0 = time.time()
    storage.makedirs(folder)
    if source.tokenizer == "bpe":
        tok = train_bpe(list(source.docs(storage))[:BPE_TRAIN_DOCS], source.vocab_size)
    else:
        tok = byte_tokenizer()
    tok.save(folder, storage.fs)

    shards, pending, pending_len, n_docs, n_tokens = [], [], 0, 0, 0
    docs = list(source.docs(storage))
    for start in range(0, len(docs), 1024):
        for ids in tok.encode_batch(docs[start:start + 1024]):
            pending.append(np.asarray(ids + [tok.eos_id], dtype=np.int32))
            pending_len += len(ids) + 1
            n_docs += 1
            if pending_len >= SHARD_TOKENS:
                name = f"shard-{len(shards):05d}.parquet"
                _write_shard(storage, f"{folder}/{name}", np.concatenate(pending))
                shards.append({"name": name, "tokens": pending_len})
                n_tokens += pending_len
                pending, pending_len = [], 0
    if pending:
        name = f"shard-{len(shards):05d}.parquet"
        _write_shard(storage, f"{folder}/{name}", np.concatenate(pending))
        shards.append({"name": name, "tokens": pending_len})
        n_tokens += pending_len
    if n_tokens == 0:
        from specs.errors import UsageError

        raise UsageError(f"data.corpus: {source.corpus} holds no text")
    storage.write_json(manifest_uri, {
        "version": FORMAT_VERSION, "key": key, "corpus": source.corpus, "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size, "padded_vocab_size": tok.padded_vocab_size,
        "documents": n_docs, "tokens": n_tokens, "shards": shards, "seconds": round(time.time() - t0, 2),
    })
    log(f"tokenized {n_docs} documents into {n_tokens} tokens ({len(shards)} shards) in {time.time() - t0:.1f}s")
    return folder


@dataclass
class TokenCache:
    """A complete cache entry, loaded: the whole token stream and its tokenizer."""

    folder: str
    tokens: np.ndarray  # (n_tokens,) int32
    tokenizer: TextTokenizer
    manifest: dict

    @classmethod
    def load(cls, folder: str, storage: Storage) -> "TokenCache":
        manifest = storage.read_json(f"{folder}/manifest.json")
        parts = []
        for shard in manifest["shards"]:
            with storage.fs.open(f"{folder}/{shard['name']}", "rb") as f:
                parts.append(pq.read_table(f).column("ids").to_numpy())
        tokens = np.concatenate(parts).astype(np.int32, copy=False)
        if len(tokens) != manifest["tokens"]:
            raise RuntimeError(f"token cache {folder} is inconsistent: delete it and run again")
        return cls(folder, tokens, load_cached_tokenizer(folder, storage), manifest)


def load_cached_tokenizer(folder: str, storage: Storage) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(storage.read_text(f"{folder}/tokenizer.json"))
    kind = json.loads(storage.read_text(f"{folder}/tokenizer_config.json")).get("switchyard_kind", "bpe")
    return TextTokenizer(tok, kind)
