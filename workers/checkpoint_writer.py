"""Writing a checkpoint while training goes on: a host snapshot at the step boundary, files written behind it.

At the step boundary (collective, in the training thread) ``snapshot`` runs
DeepSpeed's own ``save_checkpoint`` with a checkpoint engine that keeps a host
copy of each state dict it is given instead of writing it (``SnapshotEngine``;
on a GPU the copies go to pinned memory without blocking, one synchronize at
the end). The consolidated weights come from that same snapshot (ZeRO-0/1/2:
rank 0's model states hold every weight) or, under ZeRO-3, one gathered
parameter at a time: no rank's device ever holds a second copy of the model.

A ``PendingSave`` thread then serializes every file straight to the run's
staging folder through fsspec, several files at a time, hashing while it
streams, and frees the snapshot. What it returns (each file's size and sha256,
or the error) is what rank 0 publishes from (``checkpoint_store.publish``) at
the next point where every rank meets; until then the checkpoint does not
exist for anyone, so a kill -9 during the write leaves the previous one as the
latest.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import shutil
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from data.storage import Storage
from workers.checkpoint_store import CHUNK, DS_TAG, log, staging_dir, storage_fault

WRITE_THREADS = 4
"""Files written (uploaded) at once by one rank."""
WRITER_NICE = 19
"""CPU priority of the writing threads (nice value): the training step comes first."""
WRITER_DUTY = 0.2
"""Share of one core a save's writing threads use together while training runs (they sleep the rest):
a machine's sibling hyperthreads and memory bandwidth are shared with the step. Waiting for a save lifts it."""
PIECE = 1 << 20
"""Bytes hashed and written at a time."""

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def to_host(item, pinned: bool):
    """A copy of ``item`` with every tensor in it copied to host memory (containers rebuilt, plain objects
    copied shallowly, other values kept).

    ``pinned``: page-locked buffers and non-blocking copies (CUDA); the caller synchronizes once.
    """
    if torch.is_tensor(item):
        t = item.detach()
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        return out.copy_(t, non_blocking=pinned)
    if isinstance(item, dict):
        out = item.copy()                                  # keeps the dict's type (OrderedDict)
        for k, v in item.items():
            out[k] = to_host(v, pinned)
        return out
    if isinstance(item, list):
        return [to_host(v, pinned) for v in item]
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(to_host(v, pinned) for v in item)
    if hasattr(item, "__dict__") and not isinstance(item, type):  # a loss scaler's current scale, say
        try:
            return copy.copy(item)
        except Exception:  # noqa: BLE001 -- an object that cannot be copied is saved as it is then
            return item
    return item


class SnapshotEngine:
    """A DeepSpeed checkpoint engine for saving only: ``save`` keeps a host copy of the state dict and its path.

    DeepSpeed calls it for every file it writes (model states, ZeRO shards, pipeline layers, experts);
    it makes the folders and copies its recovery script itself, into the local folder given to
    ``save_checkpoint``.
    """

    def __init__(self, zipfile_serialization: bool, pinned: bool):
        self.name = "SnapshotEngine"
        self.zipfile_serialization, self.pinned = zipfile_serialization, pinned
        self.states: list[tuple[str, object]] = []

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.states.append((path, to_host(state_dict, self.pinned)))

    def commit(self, info) -> bool:
        return True

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed need not clone first: ``save`` copies every tensor once

    def load(self, path: str, map_location=None):
        raise RuntimeError("SnapshotEngine only saves")


def snapshot_engine_states(engine, local_dir: str, tag: str, snap: SnapshotEngine) -> None:
    """Collective: DeepSpeed's ``save_checkpoint`` into ``snap`` (its files' folders under ``local_dir``)."""
    own = engine.checkpoint_engine
    engine.checkpoint_engine = snap
    try:
        engine.save_checkpoint(local_dir, tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = own


def host_weights(engine, rank: int, pinned: bool) -> dict[str, torch.Tensor] | None:
    """Collective under ZeRO-3: the module's full fp32 weights in rank 0's host memory (None elsewhere), one
    parameter gathered and copied at a time."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():
        gathered = deepspeed.zero.GatheredParameters([t], modifier_rank=None) if hasattr(t, "ds_id") else None
        if gathered is not None:
            gathered.__enter__()
        try:
            if rank == 0:
                out[name] = to_host(t, pinned).float()
        finally:
            if gathered is not None:
                gathered.__exit__(None, None, None)
    return out if rank == 0 else None


def module_weights(snap: SnapshotEngine) -> dict[str, torch.Tensor] | None:
    """The module's weights from the snapshot of the model states (rank 0 under ZeRO-0/1/2), None if absent."""
    for path, state in snap.states:
        if path.endswith("model_states.pt") and isinstance(state, dict) and state.get("module"):
            return state["module"]
    return None


# ----------------------------------------------------------------------------- writing files


class Pace:
    """How fast a save's threads write: WRITER_DUTY of the time while training runs, flat out once
    someone waits for the save (``hurry``)."""

    def __init__(self, duty: float = WRITER_DUTY):
        self.duty, self.threads, self.hurry = duty, 1, threading.Event()

    def rest(self, worked_s: float) -> None:
        """Sleep after ``worked_s`` CPU seconds of work so that all the save's threads together keep to
        ``duty`` of one core (waiting for a slow store or a busy CPU is not work)."""
        if not self.hurry.is_set():
            self.hurry.wait(worked_s * (self.threads / self.duty - 1.0))


class _Hashed:
    """A writable file that hashes and counts the bytes going through it, PIECE bytes at a time (at
    ``pace``, when given)."""

    def __init__(self, f, pace: Pace | None = None):
        self.f, self.h, self.size, self.pace = f, hashlib.sha256(), 0, pace
        self.refused: OSError | None = None   # the storage's own error, kept when the caller rewraps it

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), PIECE):
            t0 = time.thread_time()
            piece = view[at:at + PIECE]
            self.h.update(piece)
            try:
                self.f.write(piece)
            except OSError as err:
                self.refused = err
                raise
            if self.pace is not None:
                self.pace.rest(time.thread_time() - t0)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def write_hashed(storage: Storage, uri: str, fill: Callable[[_Hashed], None], pace: Pace | None = None) -> list:
    """Write one file at ``uri`` with ``fill(file)``; its [size, sha256]."""
    if storage.is_local:
        os.makedirs(os.path.dirname(storage.local_path(uri)), exist_ok=True)
    with storage.fs.open(uri, "wb") as f:
        out = _Hashed(f, pace)
        try:
            fill(out)
        except Exception as err:
            # torch.save's zip writer turns a refused write into RuntimeError("unexpected pos ..."): the
            # storage's own error is the reason (a full disk fails the job; a RuntimeError would restart it).
            if out.refused is not None and not isinstance(err, OSError):
                raise out.refused from err
            raise
    return [out.size, out.h.hexdigest()]


def write_safetensors(f, tensors: dict[str, torch.Tensor], as_float: bool = False) -> None:
    """The safetensors format (8-byte header length, JSON header, raw bytes) written one tensor at a time, so
    no whole second copy is made. Tensors sharing storage are written once, under the first name (as
    ``safetensors`` requires); ``as_float``: each tensor converted to fp32 as it is written."""
    seen, items = set(), []
    for name, t in tensors.items():
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        items.append((name, t))
    header, at = {}, 0
    for name, t in items:
        dtype = torch.float32 if as_float else t.dtype
        n = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                                                  # 8-byte aligned data
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, t in items:
        t = (t.float() if as_float else t).contiguous().reshape(-1)
        if t.numel():
            f.write(t.view(torch.uint8).numpy())


def _stream_file(src: str):
    def fill(f) -> None:
        with open(src, "rb") as g:
            while chunk := g.read(CHUNK):
                f.write(chunk)
    return fill


def upload_hashed(storage: Storage, local_dir: str, uri: str) -> dict[str, list]:
    """Upload every file under ``local_dir`` to ``uri``, several at a time, hashing while each streams;
    {rel: [size, sha256]}."""
    jobs = {}
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            src = os.path.join(dirpath, name)
            jobs[os.path.relpath(src, local_dir).replace(os.sep, "/")] = _stream_file(src)
    return write_all(storage, uri, jobs)


def _yield_to_training() -> None:
    """Lower the calling thread's CPU priority (Linux nice values are per thread): on a busy machine the
    files are written with the CPU time training leaves, instead of taking it from the step."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the writer runs at training's priority
        pass


def write_all(storage: Storage, uri: str, jobs: dict[str, Callable], pace: Pace | None = None) -> dict[str, list]:
    """Each ``rel -> fill`` written to ``uri/rel`` by a pool of WRITE_THREADS; {rel: [size, sha256]}."""
    if not jobs:
        return {}
    if pace is not None:
        pace.threads = min(WRITE_THREADS, len(jobs))
    with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(jobs)), thread_name_prefix="ckpt-write",
                            initializer=_yield_to_training) as pool:
        futures = {rel: pool.submit(write_hashed, storage, posixpath.join(uri, rel), fill, pace)
                   for rel, fill in jobs.items()}
        return {rel: fut.result() for rel, fut in sorted(futures.items())}


# ----------------------------------------------------------------------------- one save


class PendingSave(threading.Thread):
    """One rank's files of one checkpoint, written to the staging folder behind training.

    ``result()`` waits for it: ``{"files": {rel: [size, sha256]}}``, or ``{"error": message, "storage": bool}``
    (the storage refused a write) for rank 0 to report on every rank.
    """

    def __init__(self, storage: Storage, run_dir: str, step: int, attempt: str | None, local_dir: str,
                 jobs: dict[str, Callable], intact: int | None):
        super().__init__(name=f"ckpt-step-{step}", daemon=True)
        self.storage, self.run_dir, self.step, self.attempt = storage, run_dir, step, attempt
        self.local_dir, self.jobs, self.intact = local_dir, jobs, intact
        self._result: dict | None = None
        self.pace = Pace()
        self.start()

    def run(self) -> None:
        staged = staging_dir(self.run_dir, self.attempt, self.step)
        jobs = dict(self.jobs)
        for dirpath, _, names in os.walk(self.local_dir):    # what DeepSpeed wrote itself (its recovery script)
            for name in names:
                src = os.path.join(dirpath, name)
                jobs[os.path.relpath(src, self.local_dir).replace(os.sep, "/")] = _stream_file(src)
        try:
            self._result = {"files": write_all(self.storage, staged, jobs, self.pace)}
        except OSError as err:
            fault = storage_fault(err, f"{self.run_dir} (checkpoint step {self.step})", self.intact)
            self._result = {"error": str(fault or f"checkpoint step {self.step}: {err}"), "storage": fault is not None}
        except Exception as err:  # noqa: BLE001 -- reported on every rank, so none waits forever for this one
            log.exception("checkpoint step %d: writing failed", self.step)
            self._result = {"error": f"checkpoint step {self.step}: {type(err).__name__}: {err}", "storage": False}
        finally:
            self.jobs = {}                                   # the snapshot goes with them
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def written(self) -> bool:
        return not self.is_alive()

    def result(self) -> dict:
        self.pace.hurry.set()                               # nothing trains while someone waits: flat out
        self.join()
        return self._result


def snapshot(engine, storage: Storage, run_dir: str, step: int, rank: int, consolidated: bool,
             others: dict, tensor_files: dict, overrides: dict, attempt: str | None,
             intact: int | None) -> PendingSave:
    """Collective: every rank's checkpoint state copied to host memory now; its files written by the returned
    thread. ``others``: more engines saved under DeepSpeed tags ``ds_<name>``; ``tensor_files``: file name
    -> host state dict rank 0 writes as safetensors (None on other ranks); ``overrides``: entries of the
    consolidated weights replaced."""
    cuda = next(engine.module.parameters()).device.type == "cuda"
    snap = SnapshotEngine(getattr(engine.checkpoint_engine, "zipfile_serialization", True), pinned=cuda)
    local = tempfile.mkdtemp(prefix=f"sy-ckpt-r{rank}-")
    snapshot_engine_states(engine, local, DS_TAG, snap)
    for name, other in others.items():
        snapshot_engine_states(other, local, f"{DS_TAG}_{name}", snap)
    weights = None
    if consolidated:  # rank 0's model states hold every weight, except under ZeRO-3 and with experts
        plain = engine.zero_optimization_stage() < 3 and not engine.has_moe_layers
        weights = module_weights(snap) if plain and rank == 0 else None
        if weights is None:
            weights = host_weights(engine, rank, cuda)
    if cuda:
        torch.cuda.synchronize()                             # the non-blocking copies have landed
    jobs: dict[str, Callable] = {}
    for path, state in snap.states:
        jobs[os.path.relpath(path, local).replace(os.sep, "/")] = _torch_save(state, snap.zipfile_serialization)
    if weights is not None:
        jobs["model.safetensors"] = _safetensors({**weights, **overrides}, as_float=True)
    for name, tensors in tensor_files.items():
        if tensors is not None:
            jobs[name] = _safetensors(tensors)
    return PendingSave(storage, run_dir, step, attempt, local, jobs, intact)


def _torch_save(state, zipfile: bool):
    def fill(f) -> None:
        torch.save(state, f, _use_new_zipfile_serialization=zipfile)
    return fill


def _safetensors(tensors: dict, as_float: bool = False):
    def fill(f) -> None:
        write_safetensors(f, tensors, as_float)
    return fill
