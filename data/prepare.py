"""Tokenize a corpus into Parquet token shards with a pool of Ray actors.

``prepare(source, storage)`` plans the corpus into units (``data.splits``),
trains or builds the tokenizer, then hands the units to ``ShardWriter``
actors spread over the cluster. Each unit becomes one shard::

    <storage>/cache/tokens/<key>/
        tokenizer.json, tokenizer_config.json
        shard-00000.parquet   one int32 column ``ids`` in row groups of ROW_GROUP_TOKENS
        shard-00000.json      the unit's index entry: tokens, documents, input range (written after its shard)
        progress.json         files, bytes, tokens/s and ETA while a preparation runs
        manifest.json         written last: every shard in order with its token and document counts

A unit whose index entry exists is done, so an interrupted preparation (a
killed job, a lost node, Ctrl-C) rerun with the same key finishes only the
missing shards. Shards are written to a temporary name and renamed (local) or
PUT whole (object stores), so a half-written shard never counts.

BPE is trained on a bounded sample (``bpe_sample``): the whole corpus when it
is under ``BPE_SAMPLE_BYTES``, otherwise the first documents of every unit, an
equal share of the budget each, at most ``BPE_TRAIN_DOCS`` documents.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from data.splits import Unit, plan_units, read_unit
from data.storage import Storage
from data.tokenizer import TextTokenizer, byte_tokenizer, train_bpe
from specs.errors import UsageError, root_cause

log_ = logging.getLogger(__name__)

ROW_GROUP_TOKENS = 16384
"""Tokens per Parquet row group: the unit a rank reads (64 KiB of int32)."""
ENCODE_BATCH_CHARS = 1 << 20
"""Characters handed to one ``encode_batch`` call."""
BPE_SAMPLE_BYTES = 64 << 20
"""At most this much text trains a BPE tokenizer."""
BPE_TRAIN_DOCS = 200_000
"""At most this many documents train a BPE tokenizer."""
PROGRESS_EVERY_S = 2.0


def bpe_sample(units: list[Unit], text_field: str, storage_options: dict | None, max_docs: int | None) -> list[str]:
    """The documented BPE training sample (see the module docstring); deterministic for a listing."""
    total = sum(u.nbytes for u in units)
    per_unit = None if total <= BPE_SAMPLE_BYTES else max(1, BPE_SAMPLE_BYTES // max(1, len(units)))
    docs: list[str] = []
    limit = min(BPE_TRAIN_DOCS, max_docs or BPE_TRAIN_DOCS)
    for unit in units:
        taken, current = 0, []
        for piece, ends in read_unit(unit, text_field, storage_options):
            current.append(piece)
            taken += len(piece)
            if ends or (per_unit is not None and taken >= per_unit):
                docs.append("".join(current))
                current = []
                if len(docs) >= limit or (per_unit is not None and taken >= per_unit):
                    break
        if current:
            docs.append("".join(current))
        if len(docs) >= limit:
            break
    return docs[:limit]


class ShardWriter:
    """Tokenizes units into shards. A plain class: ``ray.remote`` is applied where the pool spawns it."""

    def __init__(self, folder: str, storage: Storage, tokenizer_json: str, kind: str, text_field: str):
        import pyarrow.parquet  # noqa: F401  (imported before the actor reports ready, not inside the first unit)
        from tokenizers import Tokenizer

        self.folder, self.storage, self.text_field = folder, storage, text_field
        self.tok = TextTokenizer(Tokenizer.from_str(tokenizer_json), kind)
        # The same ids as encode_batch without computing character offsets (tokenizers >= 0.20).
        self._encode_batch = getattr(self.tok.tok, "encode_batch_fast", self.tok.tok.encode_batch)

    def write(self, unit: Unit, max_docs: int | None = None) -> dict:
        """Tokenize ``unit`` into ``shard-<index>.parquet``; return (and store) its index entry."""
        import pyarrow.parquet as pq

        from data.shards import IDS_SCHEMA, ids_table

        t0 = time.time()
        name = f"shard-{unit.index:05d}"
        uri = f"{self.folder}/{name}.parquet"
        local = self.storage.is_local
        target = f"{self.storage.local_path(uri)}.tmp-{uuid.uuid4().hex[:8]}" if local else uri
        schema = IDS_SCHEMA
        writer, sink = None, None
        eos = self.tok.eos_id
        buf: list[np.ndarray] = []
        buffered = tokens = documents = 0

        def flush(final: bool) -> None:
            nonlocal writer, sink, buf, buffered
            if not buffered or (not final and buffered < ROW_GROUP_TOKENS):
                return
            ids = np.concatenate(buf)
            keep = len(ids) if final else len(ids) // ROW_GROUP_TOKENS * ROW_GROUP_TOKENS
            if writer is None:
                sink = open(target, "wb") if local else self.storage.fs.open(target, "wb")
                writer = pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=False,
                                          write_statistics=False)
            writer.write_table(ids_table(ids[:keep]), row_group_size=ROW_GROUP_TOKENS)
            buf, buffered = ([ids[keep:]], len(ids) - keep) if keep < len(ids) else ([], 0)

        texts: list[str] = []
        ends: list[bool] = []
        chars = 0

        def encode() -> None:
            nonlocal texts, ends, chars, buffered, tokens, documents
            parts: list[list[int]] = []
            for enc, end in zip(self._encode_batch(texts, add_special_tokens=False), ends):
                parts.append(enc.ids)
                if end:
                    parts.append([eos])
                    documents += 1
            flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32)
            if len(flat):
                buf.append(flat)
                buffered += len(flat)
                tokens += len(flat)
            texts, ends, chars = [], [], 0
            flush(False)

        try:
            for piece, end in read_unit(unit, self.text_field, self.storage.options):
                texts.append(piece)
                ends.append(end)
                chars += len(piece)
                if max_docs is not None and end and documents + sum(ends) >= max_docs:
                    break
                if chars >= ENCODE_BATCH_CHARS or len(texts) >= 1024:
                    encode()
            encode()
            flush(True)
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        if writer is not None and local:
            os.replace(target, self.storage.local_path(uri))
        entry = {"name": f"{name}.parquet" if tokens else None, "tokens": tokens, "documents": documents,
                 "unit": unit.to_dict(), "seconds": round(time.time() - t0, 3), "node": _node_id()}
        self.storage.write_json(f"{self.folder}/{name}.json", entry)
        return entry


def _node_id() -> str | None:
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclass(frozen=True)
class PoolPlan:
    """How many writer actors to start and what each asks of the cluster."""

    actors: int
    cpus_per_actor: float


def pool_plan(pending_units: int, total_cpus: float, free_cpus: float, max_actors: int | None) -> PoolPlan:
    """One actor per CPU of the cluster (at most one per unit). When the CPUs are held (a job's gang is
    placed and calls this from its rank 0), the actors ask for none and share the cores."""
    n = max(1, min(pending_units, max_actors or max(1, int(total_cpus))))
    return PoolPlan(n, 1.0 if free_cpus >= n else 0.0)


class Progress:
    """Counts finished units and reports files, bytes, tokens/s and an ETA, in the log and progress.json."""

    def __init__(self, folder: str, storage: Storage, units: list[Unit], done: list[dict], log):
        self.folder, self.storage, self.log = folder, storage, log
        self.total_units, self.total_bytes = len(units), sum(u.nbytes for u in units)
        self.files = len({u.path for u in units if u.fmt != "stdlib"}) + sum(u.end - u.start for u in units
                                                                          if u.fmt == "stdlib")
        self.units = len(done)
        self.bytes = sum(e["unit"]["nbytes"] for e in done)
        self.tokens = sum(e["tokens"] for e in done)
        self.t0, self.bytes0, self.tokens0, self.last = time.time(), self.bytes, self.tokens, 0.0

    def restart(self) -> None:
        """Rates count from now (the pool's actors are up)."""
        self.t0, self.bytes0, self.tokens0 = time.time(), self.bytes, self.tokens

    def add(self, entry: dict) -> None:
        self.units += 1
        self.bytes += entry["unit"]["nbytes"]
        self.tokens += entry["tokens"]
        if time.time() - self.last >= PROGRESS_EVERY_S or self.units == self.total_units:
            self.report()

    def snapshot(self) -> dict:
        dt = max(1e-6, time.time() - self.t0)
        rate = (self.bytes - self.bytes0) / dt
        left = self.total_bytes - self.bytes
        return {"units": self.units, "total_units": self.total_units, "files": self.files,
                "bytes": self.bytes, "total_bytes": self.total_bytes, "tokens": self.tokens,
                "tokens_per_s": round((self.tokens - self.tokens0) / dt, 1), "bytes_per_s": round(rate, 1),
                "eta_s": round(left / rate, 1) if rate > 0 else None, "elapsed_s": round(dt, 2)}

    def report(self) -> None:
        self.last = time.time()
        s = self.snapshot()
        eta = "-" if s["eta_s"] is None else f"{s['eta_s']:.0f}s"
        self.log(f"data prepare: {s['units']}/{s['total_units']} shards of {s['files']} file(s), "
                 f"{s['bytes'] / 1e6:.1f}/{s['total_bytes'] / 1e6:.1f} MB, {s['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                 f"ETA {eta}")
        try:
            self.storage.write_json(f"{self.folder}/progress.json", s)
        except OSError:  # progress is advisory
            pass


def _done_entries(folder: str, storage: Storage, units: list[Unit]) -> dict[int, dict]:
    """Index entries already written by an earlier (interrupted) preparation with the same key."""
    fs = storage.fs
    try:
        names = {os.path.basename(p) for p in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return {}
    done = {}
    for u in units:
        if f"shard-{u.index:05d}.json" in names:
            entry = storage.read_json(f"{folder}/shard-{u.index:05d}.json")
            if entry.get("unit") == u.to_dict() and (entry["name"] is None or entry["name"] in names):
                done[u.index] = entry
    return done


def _tokenizer(source, folder: str, storage: Storage, units: list[Unit]) -> TextTokenizer:
    from data.shards import load_cached_tokenizer

    if storage.exists(f"{folder}/tokenizer_config.json"):
        return load_cached_tokenizer(folder, storage)
    if source.tokenizer == "bpe":
        tok = train_bpe(bpe_sample(units, source.text_field, storage.options, source.max_docs), source.vocab_size)
    else:
        tok = byte_tokenizer()
    tok.save(folder, storage.fs)  # tokenizer_config.json last: it marks the tokenizer complete
    return tok


def _run_pool(units: list[Unit], writer_args: tuple, progress: Progress, max_actors: int | None
              ) -> tuple[list[dict], float]:
    """Tokenize ``units`` on a pool of writer actors; return their index entries and the actors' start time."""
    import ray

    plan = pool_plan(len(units), ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0), max_actors)
    env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cls = ray.remote(ShardWriter).options(num_cpus=plan.cpus_per_actor, scheduling_strategy="SPREAD",
                                          max_restarts=2, max_task_retries=2, runtime_env={"env_vars": env})
    t0 = time.time()
    actors = [cls.remote(*writer_args) for _ in range(plan.actors)]
    queue, inflight, out = list(units), {}, []
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])
        started_s = time.time() - t0
        progress.restart()
        for actor in actors * 2:  # two units queued per actor keep it busy between reports
            if queue:
                inflight[actor.write.remote(queue.pop(0))] = actor
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            try:
                entry = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                raise root_cause(err) from None
            out.append(entry)
            progress.add(entry)
            if queue:
                inflight[actor.write.remote(queue.pop(0))] = actor
    finally:
        for actor in actors:
            ray.kill(actor)
    return out, started_s


def prepare(source, storage: Storage, folder: str, log=print, max_actors: int | None = None,
            use_ray: bool | None = None) -> dict:
    """Write every missing shard of ``source`` into ``folder``; return the manifest's content (not written)."""
    t0 = time.time()
    units = plan_units(source.corpus, source.fmt, storage.options, log=log)
    storage.makedirs(folder)
    tok = _tokenizer(source, folder, storage, units)
    done = _done_entries(folder, storage, units)
    if done:
        log(f"data prepare: resuming, {len(done)} of {len(units)} shards already written")
    todo = [u for u in units if u.index not in done]
    actors_start_s = 0.0
    progress = Progress(folder, storage, units, list(done.values()), log)
    writer_args = (folder, storage, tok.to_json(), tok.kind, source.text_field)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if source.max_docs is not None:
        # A global document limit is sequential by nature: units in order, in this process, until it is reached.
        writer, left = ShardWriter(*writer_args), source.max_docs - sum(e["documents"] for e in done.values())
        for u in todo:
            if left <= 0:
                break
            entry = writer.write(u, max_docs=left)
            done[u.index] = entry
            left -= entry["documents"]
            progress.add(entry)
    elif todo and use_ray and len(todo) > 1:
        entries, actors_start_s = _run_pool(todo, writer_args, progress, max_actors)
        for entry in entries:
            done[entry["unit"]["index"]] = entry
    else:
        writer = ShardWriter(*writer_args)
        for u in todo:
            done[u.index] = entry = writer.write(u)
            progress.add(entry)
    entries = [done[i] for i in sorted(done)]
    shards = [{"name": e["name"], "tokens": e["tokens"], "documents": e["documents"]} for e in entries if e["tokens"]]
    n_tokens = sum(s["tokens"] for s in shards)
    if n_tokens == 0:
        raise UsageError(f"data.corpus: {source.corpus} holds no text")
    return {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "padded_vocab_size": tok.padded_vocab_size,
            "documents": sum(s["documents"] for s in shards), "tokens": n_tokens, "shards": shards,
            "row_group_tokens": ROW_GROUP_TOKENS, "files": progress.files, "input_bytes": progress.total_bytes,
            "seconds": round(time.time() - t0, 2), "actors_start_seconds": round(actors_start_s, 2),
            "tokenize_seconds": progress.snapshot()["elapsed_s"]}
