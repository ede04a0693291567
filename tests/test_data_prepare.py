"""Sharded tokenization (units, actor pool, resume), the lazy token stream and the on-the-fly window order."""
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import prepare as prep
from data import splits
from data.corpus import iter_documents
from data.sampler import DataPlan, IndexPermutation
from data.shards import TokenCache, TokenSource, build_token_cache, cache_folder
from data.storage import Storage
from specs.errors import UsageError

_WORDS = ["the", "cat", "Grüße", "世界", "x=1;", "  ", "\t", "foo.bar()", "'s", "42", "\r\n", "\n", "\n\n", " \n",
          "end.", "\u00a0", "\u3000"]


def _text(rng, n):
    return "".join(rng.choice(_WORDS) + rng.choice([" ", "", "\n", "  "]) for _ in range(n))


def _corpus(root, seed=0):
    """Text (split into many byte ranges), JSONL, gzip JSONL and Parquet with several row groups."""
    rng = random.Random(seed)
    root.mkdir()
    with open(root / "a.txt", "w", newline="") as f:
        f.write(_text(rng, 6000))
    with open(root / "b.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": _text(rng, 25)}) + "\n")
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        for _ in range(40):
            f.write(json.dumps({"text": _text(rng, 25)}) + "\n")
    pq.write_table(pa.table({"text": [_text(rng, 15) for _ in range(200)]}), root / "d.parquet", row_group_size=40)
    return str(root)


def _expected(corpus, tok):
    ids = []
    for doc in iter_documents(corpus):
        ids += tok.encode(doc) + [tok.eos_id]
    return np.array(ids, dtype=np.int32)


@pytest.fixture
def small_units(monkeypatch):
    monkeypatch.setattr(splits, "UNIT_BYTES", 2048)
    monkeypatch.setattr(prep, "ROW_GROUP_TOKENS", 256)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_units_give_the_ids_of_one_process_reading_file_by_file(tmp_path, small_units, tokenizer):
    corpus = _corpus(tmp_path / "c")
    storage = Storage(str(tmp_path / "store"))
    folder = build_token_cache(TokenSource(corpus, tokenizer=tokenizer, vocab_size=400), storage,
                               log=lambda *_: None, use_ray=False)
    cache = TokenCache.load(folder, storage)
    assert len(cache.manifest["shards"]) > 20  # the text file alone is cut into many byte ranges
    assert np.array_equal(cache.tokens[:], _expected(corpus, cache.tokenizer))
    assert cache.manifest["documents"] == len(list(iter_documents(corpus)))


def test_huggingface_datasets_folder_is_read_as_arrow(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.table({"text": ["first row", "second row", None, "third"], "label": [0, 1, 2, 3]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")
    storage = Storage(str(tmp_path / "store"))
    cache = TokenCache.load(build_token_cache(TokenSource(str(folder)), storage, log=lambda *_: None), storage)
    tok = cache.tokenizer
    assert tok.decode(cache.tokens[:]) == "first rowsecond rowthird"
    assert cache.manifest["documents"] == 3


def test_pool_on_a_multi_node_cluster_gives_the_single_process_ids(ray_cluster, tmp_path, small_units):
    import ray

    corpus = _corpus(tmp_path / "c", seed=1)
    node = ray_cluster.add_node(num_cpus=2)
    try:
        ray_cluster.wait_for_nodes()
        storage = Storage(str(tmp_path / "pool"))
        src = TokenSource(corpus, tokenizer="bpe", vocab_size=400)
        lines = []
        folder = build_token_cache(src, storage, log=lines.append, max_actors=4, use_ray=True)
        pooled = TokenCache.load(folder, storage)
        alone_storage = Storage(str(tmp_path / "alone"))
        alone = TokenCache.load(build_token_cache(src, alone_storage, log=lambda *_: None, use_ray=False),
                                alone_storage)
        assert np.array_equal(pooled.tokens[:], alone.tokens[:])
        assert np.array_equal(pooled.tokens[:], _expected(corpus, pooled.tokenizer))
        nodes = {storage.read_json(os.path.join(folder, f))["node"] for f in os.listdir(folder)
                 if f.startswith("shard-") and f.endswith(".json")}
        assert len(nodes) == 2  # SPREAD put writers on both nodes
        assert any("M tokens/s" in line and "ETA" in line for line in lines)
        progress = storage.read_json(os.path.join(folder, "progress.json"))
        assert progress["units"] == progress["total_units"] and progress["bytes"] == progress["total_bytes"]
    finally:
        ray_cluster.remove_node(node)
        assert ray.is_initialized()


def test_interrupted_preparation_finishes_only_the_missing_shards(tmp_path, small_units, monkeypatch):
    corpus = _corpus(tmp_path / "c", seed=2)
    storage = Storage(str(tmp_path / "store"))
    src = TokenSource(corpus)
    real_write = prep.ShardWriter.write
    calls = []

    def dying_write(self, unit, max_docs=None):
        if unit.index == 7:
            raise KeyboardInterrupt  # the process is stopped mid-preparation
        calls.append(unit.index)
        return real_write(self, unit, max_docs)

    monkeypatch.setattr(prep.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(src, storage, log=lambda *_: None, use_ray=False)
    folder = cache_folder(src, storage)
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    assert calls == list(range(7))
    # A half-written shard (no index entry) of unit 8 is redone, not trusted.
    (tmp_path / "store").joinpath(*os.path.relpath(folder, storage.root).split(os.sep), "shard-00008.parquet") \
        .write_bytes(b"garbage")
    calls.clear()
    monkeypatch.setattr(prep.ShardWriter, "write", lambda self, unit, max_docs=None:
                        (calls.append(unit.index), real_write(self, unit, max_docs))[1])
    lines = []
    assert build_token_cache(src, storage, log=lines.append, use_ray=False) == folder
    n_units = len(splits.plan_units(corpus, log=lambda *_: None))
    assert calls == list(range(7, n_units))
    assert any("resuming, 7 of" in line for line in lines)
    cache = TokenCache.load(folder, storage)
    assert np.array_equal(cache.tokens[:], _expected(corpus, cache.tokenizer))


def test_cache_key_comes_from_the_listing_not_the_bytes(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c", seed=3)
    storage = Storage(str(tmp_path / "store"))
    src = TokenSource(corpus)
    key = src.cache_key(storage)
    from fsspec.implementations.local import LocalFileSystem

    def no_open(*a, **k):
        raise AssertionError("the cache key must not read file contents")

    monkeypatch.setattr(LocalFileSystem, "_open", no_open)
    assert src.cache_key(storage) == key
    os.utime(os.path.join(corpus, "b.jsonl"), (1, 1))  # same bytes, another mtime: another listing
    assert src.cache_key(storage) != key
    assert TokenSource(corpus, tokenizer="bpe").cache_key(storage) != src.cache_key(storage)


def test_bad_files_get_one_line_naming_the_file(tmp_path):
    storage = Storage(str(tmp_path / "store"))

    def build(name, content):
        folder = tmp_path / name
        folder.mkdir()
        path = folder / name
        path.write_bytes(content)
        with pytest.raises(UsageError) as err:
            build_token_cache(TokenSource(str(folder)), storage, log=lambda *_: None, use_ray=False)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg
        return msg

    assert "invalid UTF-8 at byte 6" in build("bad.txt", b"hello \xff\xfe world")
    assert "not valid JSON" in build("bad.jsonl", b'{"text": "ok"}\n{"text": \n')
    assert "null" in build("null.jsonl", b'{"text": null}\n')
    assert "no 'text' field" in build("field.jsonl", b'{"body": "x"}\n')
    assert "not a readable Parquet file" in build("bad.parquet", b"PAR1 not really")
    assert "holds no text" in build("empty.txt", b"")
    # An empty file among good ones is skipped with one line.
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("some text")
    (folder / "b.txt").write_text("")
    lines = []
    build_token_cache(TokenSource(str(folder)), storage, log=lines.append, use_ray=False)
    assert f"skipping {folder / 'b.txt'}: the file is empty" in lines


def test_bpe_trains_on_a_bounded_sample(tmp_path, monkeypatch, small_units):
    corpus = _corpus(tmp_path / "c", seed=4)
    units = splits.plan_units(corpus, log=lambda *_: None)
    everything = prep.bpe_sample(units, "text", None, None)
    assert "".join(everything) == "".join(iter_documents(corpus))  # under the budget: the whole corpus
    monkeypatch.setattr(prep, "BPE_SAMPLE_BYTES", 20_000)
    sample = prep.bpe_sample(units, "text", None, None)
    per_unit = 20_000 // len(units)
    assert sum(map(len, sample)) <= 20_000 + len(units) * 4096  # each unit overshoots by under one piece
    assert sum(map(len, sample)) < sum(map(len, everything)) and per_unit > 0


def test_token_stream_reads_ranges_like_an_array(tmp_path, small_units):
    corpus = _corpus(tmp_path / "c", seed=5)
    storage = Storage(str(tmp_path / "store"))
    cache = TokenCache.load(build_token_cache(TokenSource(corpus), storage, log=lambda *_: None, use_ray=False),
                            storage)
    full = _expected(corpus, cache.tokenizer)
    stream = cache.tokens
    assert len(stream) == len(full) and stream[-1] == full[-1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo = int(rng.integers(0, len(full)))
        hi = min(len(full), lo + int(rng.integers(1, 3000)))  # crosses row groups and shards
        assert np.array_equal(stream[lo:hi], full[lo:hi])
    stream.prefetch([(0, 600), (len(full) - 10, len(full))])
    stream._ahead.join()
    assert np.array_equal(stream[0:600], full[:600])
    # A DataPlan over the stream gives the same batches as over the array, and never holds the corpus.
    a, b = DataPlan(stream, 32, 1000, 7), DataPlan(full, 32, 1000, 7)
    for step in range(5):
        assert all(np.array_equal(x, y) for x, y in zip(a.batch(range(step * 8, step * 8 + 8)),
                                                         b.batch(range(step * 8, step * 8 + 8))))
    from data.shards import CACHE_ROW_GROUPS

    assert len(stream._groups) <= CACHE_ROW_GROUPS and a._perm is not None


def test_tokenizing_and_reading_token_shards_never_import_pandas(tmp_path, small_units):
    """pyarrow's to_numpy and pa.table import pandas at their first call: 0.7 s of every tokenizing process,
    and inside a cold job's first step."""
    corpus = _corpus(tmp_path / "c", seed=6)
    storage = Storage(str(tmp_path / "store"))
    folder = build_token_cache(TokenSource(corpus), storage, log=lambda *_: None, use_ray=False)
    full = _expected(corpus, TokenCache.load(folder, storage).tokenizer)
    np.save(tmp_path / "full.npy", full)
    child = ("import sys, numpy as np; from data.shards import TokenCache, TokenSource, build_token_cache; "
             "from data.storage import Storage; "
             f"build_token_cache(TokenSource({corpus!r}), Storage({str(tmp_path / 'again')!r}), log=print, "
             "use_ray=False); "
             f"s = TokenCache.load({folder!r}, Storage({str(tmp_path / 'store')!r})).tokens; "
             f"full = np.load({str(tmp_path / 'full.npy')!r}); "
             "assert np.array_equal(s[0:len(full)], full) and np.array_equal(s[5:900], full[5:900]); "
             "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_token_ids_go_to_arrow_and_back_over_chunks_and_slices_and_other_columns_are_refused():
    from data.shards import ids_table, int32_ids

    assert int32_ids(ids_table(np.arange(7, dtype=np.int64)[2:]).column(0)).tolist() == [2, 3, 4, 5, 6]

    ids = pa.chunked_array([pa.array(np.arange(10, dtype=np.int32)).slice(3, 5),
                            pa.array(np.arange(100, 104, dtype=np.int32))])
    assert int32_ids(ids).tolist() == [3, 4, 5, 6, 7, 100, 101, 102, 103]
    assert int32_ids(pa.chunked_array([], type=pa.int32())).tolist() == []
    with pytest.raises(ValueError, match="expected int32 ids without nulls, got int64"):
        int32_ids(pa.chunked_array([pa.array([1, 2], type=pa.int64())]))
    with pytest.raises(ValueError, match="with 1 null"):
        int32_ids(pa.chunked_array([pa.array([1, None], type=pa.int32())]))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 65_537])
def test_window_order_is_a_bijection_computed_per_index(n):
    perm = IndexPermutation(n, seed=5, epoch=0)
    out = perm(np.arange(n))
    assert out.dtype == np.int64 and np.array_equal(np.sort(out), np.arange(n))
    if n >= 64:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, IndexPermutation(n, seed=5, epoch=1)(np.arange(n)))
        assert not np.array_equal(out, IndexPermutation(n, seed=6, epoch=0)(np.arange(n)))
        assert np.array_equal(perm(out[: n // 2][::-1])[::-1], perm(out[: n // 2]))  # per index, any order


def test_window_order_on_a_huge_corpus_needs_no_big_array():
    import tracemalloc

    tracemalloc.start()
    perm = IndexPermutation(10**11, seed=1, epoch=3)
    w = perm(np.arange(10**11 - 64, 10**11))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20 and len(set(w.tolist())) == 64 and w.max() < 10**11


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_corpus_and_shards_on_s3_are_range_read(tmp_path, s3_endpoint, small_units):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="corpus")
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    storage = Storage("s3://corpus/store", options)
    local = _corpus(tmp_path / "c", seed=6)
    for name in os.listdir(local):
        storage.fs.put_file(os.path.join(local, name), f"corpus/data/{name}")
    src = TokenSource("s3://corpus/data", tokenizer="bpe", vocab_size=400)
    folder = build_token_cache(src, storage, log=lambda *_: None, use_ray=False)
    assert folder.startswith("s3://corpus/store/cache/tokens/")
    cache = TokenCache.load(folder, storage)
    full = _expected(local, cache.tokenizer)
    assert len(cache.tokens) == len(full)
    for lo in (0, 1000, len(full) - 700):
        assert np.array_equal(cache.tokens[lo:lo + 700], full[lo:lo + 700])
    assert build_token_cache(src, storage, log=lambda *_: None, use_ray=False) == folder


def test_cli_data_prepare_then_a_job_reuses_the_cache(ray_cluster, tmp_path, capsys, small_units):
    from orchestrator.cli import main

    corpus = _corpus(tmp_path / "c", seed=7)
    store = tmp_path / "store"
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"storage: {store}\njob_store: {tmp_path / 'jobs.db'}\n")
    assert main(["--cluster", str(cfg), "data", "prepare", corpus, "--tokenizer", "bpe", "--vocab-size", "400",
                 "--actors", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    first = json.loads(out.strip().splitlines()[-1])
    assert not first["already_prepared"] and first["shards"] > 20 and "M tokens/s" in err and "ETA" in err
    assert main(["--cluster", str(cfg), "data", "prepare", corpus, "--tokenizer", "bpe", "--vocab-size", "400",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["already_prepared"] and again["cache"] == first["cache"]
    # A job's data section with the same fields finds the same cache entry.
    from tests.conftest import tiny_spec

    spec = tiny_spec(**{"data.corpus": corpus, "data.tokenizer": "bpe", "data.vocab_size": 400, "data.max_docs": None})
    assert cache_folder(TokenSource.from_spec(spec.data), Storage(str(store))) == first["cache"]
    assert main(["--cluster", str(cfg), "data", "prepare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_zstd_jsonl_and_text_are_streamed(tmp_path):
    folder = tmp_path / "z"
    folder.mkdir()
    rows = [{"text": f"row {i} " * (i % 7 + 1)} for i in range(500)]
    with pa.CompressedOutputStream(str(folder / "a.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    with pa.CompressedOutputStream(str(folder / "b.txt.gz"), "gzip") as f:
        f.write("a whole gzipped document\r\nwith two lines".encode())
    storage = Storage(str(tmp_path / "store"))
    cache = TokenCache.load(build_token_cache(TokenSource(str(folder)), storage, log=lambda *_: None,
                                              use_ray=False), storage)
    tok = cache.tokenizer
    expected = []
    for r in rows:
        expected += tok.encode(r["text"]) + [tok.eos_id]
    expected += tok.encode("a whole gzipped document\nwith two lines") + [tok.eos_id]
    assert np.array_equal(cache.tokens[:], np.array(expected, dtype=np.int32))


def test_builtin_corpus_units_keep_the_document_order(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    cache = TokenCache.load(build_token_cache(TokenSource("builtin:stdlib", max_docs=700), storage,
                                              log=lambda *_: None, use_ray=False), storage)
    assert np.array_equal(cache.tokens[:], _expected_builtin(cache.tokenizer, 700))
    assert len(splits.plan_units("builtin:stdlib")) > 1  # the stdlib's files are cut into several units


def _expected_builtin(tok, n):
    ids = []
    for doc in iter_documents("builtin:stdlib", max_docs=n):
        ids += tok.encode(doc) + [tok.eos_id]
    return np.array(ids, dtype=np.int32)
