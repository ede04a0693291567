"""Corpora, the token cache and the sample order that makes resumes exact."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.corpus import iter_documents
from data.sampler import DataPlan
from data.shards import TokenCache, TokenSource, build_token_cache
from data.storage import Storage
from data.tokenizer import byte_tokenizer, train_bpe
from specs.errors import UsageError


def test_reads_text_jsonl_parquet_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    docs = list(iter_documents(str(tmp_path / "*")))
    assert docs == ["plain text document", "json one", "json two", "parquet row"]
    assert list(iter_documents(f"file://{tmp_path}/*.jsonl")) == ["json one", "json two"]
    with pytest.raises(UsageError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(UsageError, match="line 1 has no 'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_builtin_corpus_is_docstrings():
    docs = list(iter_documents("builtin:stdlib", max_docs=50))
    assert len(docs) == 50 and all(len(d) >= 40 for d in docs)


def test_byte_tokenizer_roundtrip_and_bpe():
    tok = byte_tokenizer()
    text = "Grüße, 世界!\n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    assert tok.padded_vocab_size % 64 == 0 and tok.vocab_size == 261
    bpe = train_bpe(["the cat sat on the mat " * 20] * 5, 300)
    assert len(bpe.encode("the cat sat")) < len(tok.encode("the cat sat"))


def test_token_cache_is_reused(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document number {i} " * 50)
    storage = Storage(str(tmp_path / "store"))
    src = TokenSource(str(tmp_path / "corpus"))
    folder = build_token_cache(src, storage, log=lambda *_: None)
    manifest = os.path.join(folder, "manifest.json")
    mtime = os.path.getmtime(manifest)
    assert build_token_cache(src, storage, log=lambda *_: None) == folder
    assert os.path.getmtime(manifest) == mtime
    cache = TokenCache.load(folder, storage)
    assert (cache.tokens[:] == cache.tokenizer.eos_id).sum() == 3
    # Changing the content changes the key.
    (tmp_path / "corpus" / "0.txt").write_text("changed")
    assert build_token_cache(src, storage, log=lambda *_: None) != folder
    # A cache entry without its manifest is rebuilt, not read.
    bpe = TokenSource(str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300)
    f2 = build_token_cache(bpe, storage, log=lambda *_: None)
    os.remove(os.path.join(f2, "manifest.json"))
    assert build_token_cache(bpe, storage, log=lambda *_: None) == f2 and os.path.exists(os.path.join(f2, "manifest.json"))


def _plan():
    return DataPlan(np.arange(5000, dtype=np.int32), seq_len=16, held_out_tokens=500, seed=3)


def test_order_is_a_permutation_per_epoch_and_held_out_is_disjoint():
    plan = _plan()
    n = plan.n_windows
    first_epoch = [plan.window_of(p) for p in range(n)]
    assert sorted(first_epoch) == list(range(n))
    assert [plan.window_of(p) for p in range(n, 2 * n)] != first_epoch
    x, y = plan.batch(range(0, n))
    assert x.max() < plan.train_end and np.array_equal(x[:, 1:], y[:, :-1])
    hx, _ = plan.held_out_batch(0, 4)
    assert hx.min() >= plan.train_end


@pytest.mark.parametrize("dp_before, dp_after", [(2, 1), (1, 4), (4, 2)])
def test_resume_on_another_worker_count_reads_each_sample_once(dp_before, dp_after):
    plan, G, steps = _plan(), 8, 6
    seen = []
    position = 0
    for step in range(steps):
        dp = dp_before if step < 3 else dp_after  # "checkpoint" after step 3, resumed with another dp
        for rank in range(dp):
            seen.extend(plan.rank_positions(position, G, rank, dp))
        position += G
    assert sorted(seen) == list(range(G * steps))
