"""Checkpoints on storage: the layout, manifests and checksums, the attempt fence, publishing, retention.

Layout under ``<run_dir>/checkpoints/step_00000100/``::

    ds/...               DeepSpeed's files (model states, each rank's ZeRO shards)
    model.safetensors    consolidated fp32 weights (optional, written by rank 0)
    manifest.json        written last, by rank 0, after every rank has uploaded:
                         each file's size and sha256, the attempt that wrote it

A checkpoint is complete only when its manifest exists and every file it lists
is present with the listed size; a resume also checks every file's sha256 and
skips (with a line in the log) a checkpoint that fails, for the one before it.
Retention deletes the manifest first, so a half-deleted checkpoint is already
invisible.

One writer per run directory. Whoever starts an attempt of a run (the
controller, or ``switchyard run``) writes ``<run_dir>/attempt.json`` with a new
attempt token first (``begin_attempt``). Ranks upload a checkpoint into
``checkpoints/.staging/<attempt>/step_N`` (an earlier attempt's zombie ranks
have a staging folder of their own, so they never touch this attempt's files);
rank 0 then checks that its attempt is still the current one, moves the
staged folder into place and writes the manifest, checking again right before
(``publish``). A rank of an attempt that is not the current one writes no
manifest, runs no retention and stops with ``FencedOut``.

How the files are written while training goes on is ``workers/checkpoint_writer.py``;
what the training loop talks to is ``workers/checkpoint.py``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import secrets
import socket
import posixpath
import re
import time
from dataclasses import dataclass

from data.storage import Storage
from specs.errors import UserError

log = logging.getLogger("workers.checkpoint")  # one logger for the checkpoint modules (what operators grep)

STEP_RE = re.compile(r"step_(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
STAGING = ".staging"
ATTEMPT_FILE = "attempt.json"
CHUNK = 1 << 20  # bytes read at a time while hashing


# The only non-tensor types DeepSpeed's checkpoint files hold (besides builtins and tensors).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def tensors_only():
    """Make every torch.load inside (DeepSpeed's included) a ``weights_only=True`` load.

    DeepSpeed unpickles its files with ``weights_only=False``; a checkpoint on
    shared storage must not be able to run code in our ranks. Tensors, builtins
    and the few plain DeepSpeed data classes above load; anything else fails.
    """
    import torch  # here: the layout and listing above serve `switchyard status` too, which has no torch

    allowed = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer types to allow
            continue
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def checkpoint_dir(run_dir: str, step: int) -> str:
    return posixpath.join(run_dir, "checkpoints", f"step_{step:08d}")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    manifest: dict


class FencedOut(UserError):
    """This rank's attempt is no longer the run's current one: another attempt owns the run directory."""


class StorageFault(UserError):
    """The storage refused a write (read-only, full, over quota): retrying cannot help, the job fails."""


STORAGE_ERRNOS = {errno.EROFS: "is read-only", errno.EACCES: "refuses writes (permission denied)",
                  errno.EPERM: "refuses writes (operation not permitted)", errno.ENOSPC: "is full (no space left)",
                  errno.EDQUOT: "is over its quota"}


def storage_fault(err: OSError, where: str, intact: int | None = None) -> StorageFault | None:
    """The one-line StorageFault for a write the storage refused, or None for another OSError."""
    why = STORAGE_ERRNOS.get(err.errno)
    if why is None:
        return None
    kept = (f"; the checkpoint at step {intact} is intact" if intact is not None and intact >= 0
            else "; no checkpoint was written")
    return StorageFault(f"storage: {where} {why} ({err.filename or err}){kept}; free space or make it writable, "
                        "then resume")


def begin_attempt(storage: Storage, run_dir: str, owner: str, job_id: str | None = None) -> str:
    """Start a new attempt of the run: ``attempt.json`` names it (the fence); returns its token.

    Called by whoever starts the ranks (the controller, ``switchyard run``), before they start. From then
    on the ranks of every earlier attempt can write no manifest and run no retention.
    """
    number = int((current_attempt(storage, run_dir) or {}).get("number", 0)) + 1
    token = f"{number:04d}-{secrets.token_hex(4)}"
    storage.makedirs(run_dir)
    storage.write_json(f"{run_dir}/{ATTEMPT_FILE}", {"attempt": token, "number": number, "owner": owner,
                                                     "job_id": job_id, "host": socket.gethostname(),
                                                     "pid": os.getpid(), "time": time.time()})
    return token


def current_attempt(storage: Storage, run_dir: str) -> dict | None:
    """The run's ``attempt.json`` (None when no attempt was ever recorded)."""
    try:
        return storage.read_json(f"{run_dir}/{ATTEMPT_FILE}")
    except (FileNotFoundError, ValueError):
        return None


def is_current(storage: Storage, run_dir: str, attempt: str | None) -> bool:
    """Whether ``attempt`` may write the run's manifests (None: an unfenced writer, e.g. a unit test)."""
    if attempt is None:
        return True
    return (current_attempt(storage, run_dir) or {}).get("attempt") == attempt


def staging_dir(run_dir: str, attempt: str | None, step: int) -> str:
    return posixpath.join(run_dir, "checkpoints", STAGING, attempt or "unfenced", f"step_{step:08d}")


def manifest_uri(path: str) -> str:
    """The manifest of the checkpoint folder ``path``: written last, so a folder without it saved nothing."""
    return f"{path}/manifest.json"


def _is_complete(storage: Storage, path: str) -> dict | None:
    fs = storage.fs
    if not fs.exists(manifest_uri(path)):
        return None
    try:
        manifest = storage.read_json(manifest_uri(path))
    except (ValueError, OSError):
        return None
    for rel, size in manifest.get("files", {}).items():
        uri = f"{path}/{rel}"
        try:
            if fs.size(uri) != size:
                return None
        except (FileNotFoundError, OSError):
            return None
    return manifest


def _sha256(fs, uri: str) -> str:
    h = hashlib.sha256()
    with fs.open(uri, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(storage: Storage, ckpt: CheckpointInfo) -> str | None:
    """Why ``ckpt``'s files do not match its manifest's sha256 sums; None when every one does.

    (A manifest written before checksums has sizes only: those were checked when it was listed.)
    """
    for rel, want in sorted((ckpt.manifest.get("sha256") or {}).items()):
        try:
            got = _sha256(storage.fs, f"{ckpt.path}/{rel}")
        except OSError as err:
            return f"{rel} cannot be read ({err})"
        if got != want:
            return f"{rel} has sha256 {got[:12]}..., the manifest says {want[:12]}..."
    return None


def checkpoint_folders(storage: Storage, run_dir: str) -> list[int]:
    """Steps of every ``step_N`` folder of a run, complete or not, oldest first."""
    root = posixpath.join(run_dir, "checkpoints")
    if not storage.fs.exists(root):
        return []
    return sorted(int(m.group(1)) for e in storage.fs.ls(root, detail=False)
                  if (m := STEP_RE.search(e.rstrip("/"))))


def list_checkpoints(storage: Storage, run_dir: str, complete_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints of a run, oldest first."""
    out = []
    for step in checkpoint_folders(storage, run_dir):
        path = checkpoint_dir(run_dir, step)
        manifest = _is_complete(storage, path) if complete_only else {}
        if manifest is not None:
            out.append(CheckpointInfo(step, path, manifest))
    return out


def latest_checkpoint(storage: Storage, run_dir: str) -> CheckpointInfo | None:
    done = list_checkpoints(storage, run_dir)
    return done[-1] if done else None


def resume_choice(storage: Storage, run_dir: str) -> CheckpointInfo | None:
    """The newest complete checkpoint whose files match their checksums; a failing one is skipped with a
    line in the log. UserError when a checkpoint was published (it has a manifest) but none is complete
    and intact now: resuming at step 0 would silently throw the run away. Folders that never got their
    manifest (a crash while one was being published) saved nothing: they are ignored, and with nothing
    else the run starts at step 0."""
    done = list_checkpoints(storage, run_dir)
    for ckpt in reversed(done):
        problem = verify(storage, ckpt)
        if problem is None:
            return ckpt
        log.warning("checkpoint %s skipped: %s; trying the one before it", ckpt.path, problem)
    folders = checkpoint_folders(storage, run_dir)
    if not done and not storage.is_local:
        storage.fs.invalidate_cache()
    if done or any(storage.fs.exists(manifest_uri(checkpoint_dir(run_dir, s))) for s in folders):
        bad = ", ".join(f"step_{s:08d}" for s in folders[-3:])
        raise UserError(f"resume: {run_dir} has checkpoint folders ({bad}) but none is complete and intact "
                        "(manifest, sizes and sha256); nothing to resume from: start a new run")
    if folders:
        log.warning("checkpoint folders of %s were never published (no manifest): %s ignored; starting at step 0",
                    run_dir, ", ".join(f"step_{s:08d}" for s in folders))
    return None


def publish(storage: Storage, run_dir: str, step: int, extra: dict, parts: list[dict], world: int,
            zero_stage: int, attempt: str | None, intact: int | None) -> tuple[str, str] | None:
    """Rank 0: move the attempt's staged checkpoint into place and write its manifest, if the attempt is
    still the current one; returns None, or (``"fenced" | "storage" | "error"``, message)."""
    failed = [p for p in parts if "error" in p]
    if failed:
        return ("storage" if failed[0]["storage"] else "error"), failed[0]["error"]
    fs = storage.fs
    path, staged = checkpoint_dir(run_dir, step), staging_dir(run_dir, attempt, step)

    def fenced() -> tuple[str, str] | None:
        if is_current(storage, run_dir, attempt):
            return None
        now = (current_attempt(storage, run_dir) or {}).get("attempt")
        log.warning("attempt %s is not the current one (%s): step %d not published, no retention", attempt, now,
                    step)
        return "fenced", (f"checkpoint: attempt {attempt} of {run_dir} is no longer the current one ({now} is); "
                          "this rank stops without writing")

    try:
        if (why := fenced()) is not None:
            return why
        files = {rel: info for p in parts for rel, info in p["files"].items()}
        if not storage.is_local:
            fs.invalidate_cache()  # the other ranks' uploads are not in this process's listing cache
        if fs.exists(path):  # an earlier attempt's unfinished folder of this step: invisible first, then gone
            if fs.exists(manifest_uri(path)):
                fs.rm(manifest_uri(path))
            fs.rm(path, recursive=True)
        if storage.is_local:
            fs.mv(staged, path, recursive=True)  # one rename
        else:  # an object store has no rename: copy the files every rank listed, server-side
            for rel in sorted(files):
                fs.copy(f"{staged}/{rel}", f"{path}/{rel}")
        manifest = dict(extra, step=step, files={rel: info[0] for rel, info in sorted(files.items())},
                        sha256={rel: info[1] for rel, info in sorted(files.items())}, world_size=world,
                        zero_stage=zero_stage, attempt=attempt, time=time.time())
        if (why := fenced()) is not None:  # checked again right before the manifest makes it visible
            return why
        storage.write_json(manifest_uri(path), manifest)
        _drop_staging(storage, run_dir, attempt)
    except OSError as err:
        fault = storage_fault(err, f"{run_dir} (checkpoint step {step})", intact)
        return ("storage", str(fault)) if fault is not None else ("error", f"checkpoint step {step}: {err}")
    return None


def _drop_staging(storage: Storage, run_dir: str, attempt: str | None) -> None:
    """What is left in the staging area: this attempt's empty folders, other attempts' partial uploads."""
    root = posixpath.join(run_dir, "checkpoints", STAGING)
    fs = storage.fs
    try:
        if fs.exists(root):
            fs.rm(root, recursive=True)
    except OSError:  # a zombie still writing its own staged files: they go next time
        pass


def needs_universal(ckpt: CheckpointInfo, world_size: int) -> bool:
    """ZeRO-1/2/3 shards are laid out per data-parallel rank: another world size needs a universal checkpoint."""
    return ckpt.manifest.get("world_size") != world_size and ckpt.manifest.get("zero_stage", 0) > 0


def load_consolidated(storage: Storage, ckpt_path: str, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Tensors only (safetensors): no code is run from a checkpoint."""
    from safetensors.torch import load as load_bytes

    with storage.fs.open(f"{ckpt_path}/{name}", "rb") as f:
        return load_bytes(f.read())


def unevaluated(storage: Storage, run_dir: str) -> set[str]:
    """Checkpoints the controller will evaluate and has not yet (those with consolidated weights, not in
    ``evals.jsonl``); empty when no controller runs the run (``switchyard run``: nothing evaluates them)."""
    if (current_attempt(storage, run_dir) or {}).get("owner") != "controller":
        return set()
    done = set()
    if storage.exists(f"{run_dir}/evals.jsonl"):
        for line in storage.read_text(f"{run_dir}/evals.jsonl").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                done.add(json.loads(line).get("checkpoint"))
    return {c.path for c in list_checkpoints(storage, run_dir)
            if "model.safetensors" in c.manifest.get("files", {}) and c.path not in done}


def retain(storage: Storage, run_dir: str, keep: int) -> list[str]:
    """``apply_retention`` that never deletes the run's best checkpoint (best_checkpoint.json) nor one the
    controller has not evaluated yet; rank 0 only."""
    best_uri = f"{run_dir}/best_checkpoint.json"
    protect = {storage.read_json(best_uri).get("path", "")} if storage.exists(best_uri) else set()
    return apply_retention(storage, run_dir, keep, protect | unevaluated(storage, run_dir))


def apply_retention(storage: Storage, run_dir: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, never one in ``protect``; return deleted paths."""
    done = list_checkpoints(storage, run_dir)
    victims = [c for c in done[:-keep] if c.path not in protect] if keep > 0 else []
    fs = storage.fs
    for c in victims:
        fs.rm(manifest_uri(c.path))  # invisible first, then gone
        fs.rm(c.path, recursive=True)
    return [c.path for c in victims]
