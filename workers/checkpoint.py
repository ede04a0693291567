"""Checkpoints: every rank's DeepSpeed shards, a manifest written last, retention.

Layout under ``<run_dir>/checkpoints/step_00000100/``::

    ds/...               DeepSpeed's files (model states, each rank's ZeRO shards)
    model.safetensors    consolidated fp32 weights (optional, written by rank 0)
    manifest.json        written last, by rank 0, after every rank has uploaded

A checkpoint is complete only when its manifest exists and every file it lists
is present with the listed size. Nothing else is ever loaded. Retention deletes
the manifest first, so a half-deleted checkpoint is already invisible.

``Checkpointer`` is what the training loop talks to: when a step is due for a
save, writing one (with retention), and how a run resumes from the latest one,
including the one rule for resuming on another number of workers.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from data.storage import Storage
from specs.errors import UserError

STEP_RE = re.compile(r"step_(\d{8})$")
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


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


def _is_complete(storage: Storage, path: str) -> dict | None:
    fs = storage.fs
    manifest_uri = f"{path}/manifest.json"
    if not fs.exists(manifest_uri):
        return None
    try:
        manifest = storage.read_json(manifest_uri)
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


def list_checkpoints(storage: Storage, run_dir: str, complete_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints of a run, oldest first."""
    root = posixpath.join(run_dir, "checkpoints")
    fs = storage.fs
    if not fs.exists(root):
        return []
    out = []
    for entry in fs.ls(root, detail=False):
        m = STEP_RE.search(entry.rstrip("/"))
        if not m:
            continue
        path = checkpoint_dir(run_dir, int(m.group(1)))
        manifest = _is_complete(storage, path) if complete_only else {}
        if manifest is not None:
            out.append(CheckpointInfo(int(m.group(1)), path, manifest))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(storage: Storage, run_dir: str) -> CheckpointInfo | None:
    done = list_checkpoints(storage, run_dir)
    return done[-1] if done else None


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere); a collective under ZeRO-3."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().float().clone() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
        return sd
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def save_safetensors(state: dict[str, torch.Tensor], path: str) -> None:
    """safetensors refuses shared storage: keep one copy of tied tensors."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v.contiguous()
    save_file(out, path)


def save_checkpoint(engine, storage: Storage, run_dir: str, step: int, extra: dict, consolidated: bool = True,
                    others: dict | None = None, tensor_files: dict[str, dict | None] | None = None,
                    overrides: dict[str, torch.Tensor] | None = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint URI.

    ``others`` are more engines of the same job (PPO's value model), saved
    under DeepSpeed tags ``ds_<name>``. ``tensor_files`` maps a file name to
    a state dict rank 0 writes as safetensors (None on other ranks).
    ``overrides`` replace entries of the consolidated weights.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    path = checkpoint_dir(run_dir, step)
    staging = tempfile.mkdtemp(prefix=f"sy-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(staging, tag=DS_TAG, save_latest=False)
        for name, other in (others or {}).items():
            other.save_checkpoint(staging, tag=f"{DS_TAG}_{name}", save_latest=False)
        state = consolidated_state_dict(engine) if consolidated else None
        if state is not None:
            save_safetensors({**state, **(overrides or {})}, os.path.join(staging, "model.safetensors"))
        for name, tensors in (tensor_files or {}).items():
            if tensors is not None:
                save_safetensors(tensors, os.path.join(staging, name))
        storage.put_dir(staging, path)
        dist.barrier()
        if rank == 0:
            files = {rel: storage.fs.size(f"{path}/{rel}") for rel in _list_rel(storage, path)}
            manifest = dict(extra, step=step, files=files, world_size=dist.get_world_size(),
                            zero_stage=engine.zero_optimization_stage(), time=time.time())
            storage.write_json(f"{path}/manifest.json", manifest)
        dist.barrier()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _list_rel(storage: Storage, path: str) -> list[str]:
    fs = storage.fs
    base = fs._strip_protocol(path).rstrip("/")
    return sorted(p[len(base):].lstrip("/") for p in fs.find(path)
                  if not p.endswith("manifest.json") and f"/{UNIVERSAL_TAG}/" not in p)


def needs_universal(ckpt: CheckpointInfo, world_size: int) -> bool:
    """ZeRO-1/2/3 shards are laid out per data-parallel rank: another world size needs a universal checkpoint."""
    return ckpt.manifest.get("world_size") != world_size and ckpt.manifest.get("zero_stage", 0) > 0


def convert_to_universal(storage: Storage, ckpt: CheckpointInfo) -> None:
    """Rank 0 only: DeepSpeed's ds_to_universal, written next to the checkpoint's ds/ folder.

    The converted folder counts once its ``.complete`` marker exists, like a manifest.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    marker = f"{ckpt.path}/{UNIVERSAL_TAG}/.complete"
    if storage.exists(marker):
        return
    work = tempfile.mkdtemp(prefix="sy-universal-")
    try:
        src = os.path.join(work, DS_TAG)
        if storage.is_local:
            src = os.path.join(storage.local_path(ckpt.path), DS_TAG)
        else:
            storage.get_dir(f"{ckpt.path}/{DS_TAG}", src)
        out = os.path.join(work, UNIVERSAL_TAG)
        args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with tensors_only():
            ds_to_universal.main(args)
        storage.put_dir(out, f"{ckpt.path}/{UNIVERSAL_TAG}")
        storage.write_text(marker, "ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_checkpoint(engine, storage: Storage, ckpt: CheckpointInfo, universal: bool = False,
                    name: str | None = None) -> None:
    """Every rank loads the same complete checkpoint (downloaded first when remote).

    ``name`` picks another engine saved with the checkpoint (``save_checkpoint(others=...)``).
    """
    tag = UNIVERSAL_TAG if universal else DS_TAG if name is None else f"{DS_TAG}_{name}"
    if storage.is_local:
        with tensors_only():
            engine.load_checkpoint(storage.local_path(ckpt.path), tag=tag)
        return
    staging = tempfile.mkdtemp(prefix="sy-load-")
    try:
        storage.get_dir(f"{ckpt.path}/{tag}", os.path.join(staging, tag))
        with tensors_only():
            engine.load_checkpoint(staging, tag=tag)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_consolidated(storage: Storage, ckpt_path: str, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Tensors only (safetensors): no code is run from a checkpoint."""
    from safetensors.torch import load as load_bytes

    with storage.fs.open(f"{ckpt_path}/{name}", "rb") as f:
        return load_bytes(f.read())


def retain(storage: Storage, run_dir: str, keep: int) -> list[str]:
    """``apply_retention`` that never deletes the run's best checkpoint (best_checkpoint.json); rank 0 only."""
    best_uri = f"{run_dir}/best_checkpoint.json"
    protect = {storage.read_json(best_uri).get("path", "")} if storage.exists(best_uri) else set()
    return apply_retention(storage, run_dir, keep, protect)


def apply_retention(storage: Storage, run_dir: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, never one in ``protect``; return deleted paths."""
    done = list_checkpoints(storage, run_dir)
    victims = [c for c in done[:-keep] if c.path not in protect] if keep > 0 else []
    fs = storage.fs
    for c in victims:
        fs.rm(f"{c.path}/manifest.json")  # invisible first, then gone
        fs.rm(c.path, recursive=True)
    return [c.path for c in victims]


# ----------------------------------------------------------------------------- what the loop talks to


@dataclass
class CheckpointState:
    """What a job kind adds to a checkpoint beyond its main engine and the loop's manifest fields."""

    manifest: dict = field(default_factory=dict)
    """More manifest entries (PPO: the KL coefficient; RM: the reward bias)."""
    others: dict = field(default_factory=dict)
    """More engines, name -> engine, saved under DeepSpeed tags ``ds_<name>`` (PPO: the value model)."""
    tensor_files: dict = field(default_factory=dict)
    """File name -> state dict rank 0 writes as safetensors (None on the other ranks)."""
    overrides: dict = field(default_factory=dict)
    """Entries of the consolidated weights replaced (RM: the reward bias)."""
    consolidate_engine: bool = True
    """Write model.safetensors from the main engine's module (False: the kind gives it in tensor_files)."""


class Checkpointer:
    """When to save, writing and retaining checkpoints, and the resume layout of one run. Collective calls
    say so."""

    def __init__(self, spec, storage: Storage, run_dir: str, rank: int, world_size: int):
        self.spec, self.storage, self.run_dir = spec, storage, run_dir
        self.rank, self.world_size = rank, world_size
        self.last_saved = -1

    def latest(self) -> CheckpointInfo | None:
        return latest_checkpoint(self.storage, self.run_dir)

    def resume_layout(self, latest: CheckpointInfo | None, reshards: bool) -> bool:
        """Whether resuming from ``latest`` needs a universal checkpoint (ZeRO state re-partitioned for
        another number of workers); UserError for a layout this run cannot resume on.

        DeepSpeed's pipeline and expert files are laid out per stage and expert
        rank, so those resume on the same layout; ZeRO-1/2/3 shards are laid out
        per data-parallel rank, so another world size converts them (only a
        kind whose one engine ``reshards``).
        """
        if latest is None:
            return False
        p, m, world = self.spec.parallel, latest.manifest, self.world_size
        if m.get("pp", 1) != p.pp:
            raise UserError(f"parallel.pp: the checkpoint was written by a {m.get('pp', 1)}-stage run; "
                            f"resume with parallel.pp={m.get('pp', 1)}")
        if m.get("ep", 1) != p.ep:
            raise UserError(f"parallel.ep: the checkpoint was written with ep={m.get('ep', 1)}; "
                            f"resume with parallel.ep={m.get('ep', 1)}")
        if p.pp > 1 and m.get("world_size") != world:
            raise UserError(f"resources.workers: a pipeline run resumes on the number of workers it had "
                            f"({m.get('world_size')}), got {world}")
        universal = needs_universal(latest, world)
        if universal and not reshards:
            raise UserError(f"resources.workers: the {self.spec.kind} stage resumes on the number of workers it had "
                            f"({m.get('world_size')}), got {world}")
        return universal

    def prepare_universal(self, latest: CheckpointInfo) -> None:
        """Collective: rank 0 converts ``latest`` to a universal checkpoint while the others wait."""
        import torch.distributed as dist

        if self.rank == 0:
            convert_to_universal(self.storage, latest)
        dist.barrier()

    def load(self, latest: CheckpointInfo, engine, others: dict, universal: bool) -> None:
        """Collective: the main engine (universal or not) and the kind's other engines."""
        load_checkpoint(engine, self.storage, latest, universal=universal)
        for name, other in others.items():
            load_checkpoint(other, self.storage, latest, name=name)
        self.last_saved = latest.step

    def due(self, step: int, last_step: bool) -> bool:
        """Every checkpoint.every steps, and the last step, once."""
        return step != self.last_saved and (step % self.spec.checkpoint.every == 0 or last_step)

    def save(self, step: int, engine, manifest: dict, state: CheckpointState) -> str:
        """Collective: write the checkpoint (manifest last), then retention on rank 0."""
        path = save_checkpoint(engine, self.storage, self.run_dir, step, {**manifest, **state.manifest},
                               self.spec.checkpoint.consolidated and state.consolidate_engine, others=state.others,
                               tensor_files=state.tensor_files, overrides=state.overrides)
        self.last_saved = step
        if self.rank == 0:
            retain(self.storage, self.run_dir, self.spec.checkpoint.keep)
        return path
