"""What the training loop talks to about checkpoints: when to save, saving without stalling, resuming.

``Checkpointer`` decides when a step is due for a save, writes one (with
retention) and says how a run resumes from the latest one, including the one
rule for resuming on another number of workers.

A save does not stop training for its files: at the step boundary every rank
copies its state to host memory (``checkpoint_writer.snapshot``) and a thread
writes the files; rank 0 publishes the checkpoint (manifest last, attempt
fence, ``checkpoint_store.publish``) at the first step at which every rank's
files are written, found with the loop's one all-reduce per step. At most one
save is in flight: the next save, a stop and the end of the run wait for it.
A checkpoint whose writing did not finish (kill -9, an exception) is never
published, exactly like one that died before its manifest, so the previous one
stays the latest.

On resume each rank reads the files it needs: in place on local storage; on an
object store it downloads its own ZeRO shards and the shared files, never the
other ranks' shards (a universal checkpoint, for another number of workers, is
read whole).

The layout on storage, manifests, checksums, the fence and retention are
``workers/checkpoint_store.py``; writing the files is ``workers/checkpoint_writer.py``.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from data.storage import Storage
from specs.errors import UserError
from workers.checkpoint_store import (  # noqa: F401 -- the names the rest of the project imports from here
    ATTEMPT_FILE, DS_TAG, STAGING, UNIVERSAL_TAG, CheckpointInfo, FencedOut, StorageFault, apply_retention,
    begin_attempt, checkpoint_dir, checkpoint_folders, current_attempt, is_current, latest_checkpoint,
    list_checkpoints, load_consolidated, needs_universal, publish, resume_choice, retain, staging_dir,
    storage_fault, tensors_only, unevaluated, verify)
from workers.checkpoint_writer import PendingSave, host_weights, snapshot, upload_hashed  # noqa: F401

log = logging.getLogger(__name__)

ZERO_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt$")
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt$")
"""DeepSpeed MoE: one file per (MoE layer, global expert id)."""
EXPERT_OPTIM_RE = re.compile(r"^expp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
"""DeepSpeed MoE without ZeRO: the optimizer state of one expert-parallel rank."""
DOWNLOAD_THREADS = 4


def consolidated_state_dict(engine) -> dict | None:
    """Collective under ZeRO-3: full fp32 weights in rank 0's host memory (None elsewhere), one parameter at
    a time (PPO's value model)."""
    import torch.distributed as dist

    return host_weights(engine, dist.get_rank(), next(engine.module.parameters()).device.type == "cuda")


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




@dataclass(frozen=True)
class ExpertShare:
    """The experts one rank holds under expert parallelism, as DeepSpeed's checkpoint files name them."""

    ep_rank: int
    """The rank's index in its (largest) expert-parallel group: its ``expp_rank_<r>`` optimizer file."""
    experts: frozenset
    """(MoE layer id, global expert id) pairs: its ``layer_<l>_expert_<e>`` files."""


def rank_files(rels: list[str], dp_rank: int | None, experts: ExpertShare | None = None) -> list[str]:
    """The files of a DeepSpeed checkpoint folder one rank reads: everything but the other data-parallel
    ranks' ZeRO shards (``zero_pp_rank_<r>_...``; all of them when ``dp_rank`` is None) and, with experts
    sharded, the other expert-parallel ranks' expert and expert-optimizer files."""
    def mine(rel: str) -> bool:
        name = posixpath.basename(rel)
        if dp_rank is not None and (m := ZERO_SHARD_RE.search(name)) is not None:
            return int(m.group(1)) == dp_rank
        if experts is not None and (m := EXPERT_FILE_RE.match(name)) is not None:
            return (int(m.group(1)), int(m.group(2))) in experts.experts
        if experts is not None and (m := EXPERT_OPTIM_RE.match(name)) is not None:
            return int(m.group(1)) == experts.ep_rank
        return True

    return [rel for rel in rels if mine(rel)]


def _dp_rank(engine) -> int | None:
    """This rank's index in the group its ZeRO optimizer partitions over (None without ZeRO)."""
    import torch.distributed as dist

    group = getattr(engine.optimizer, "dp_process_group", None)
    return dist.get_rank(group=group) if group is not None else None


def expert_share(engine) -> ExpertShare | None:
    """The experts ``engine``'s rank loads, numbered as DeepSpeed's ``load_moe_state_dict`` numbers them (MoE
    layers in module order, global id = expert-parallel rank x local experts + local id); None without MoE."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    layers = [m for m in engine.module.modules() if isinstance(m, MoE)]
    if not layers:
        return None
    held = set()
    for layer_id, layer in enumerate(layers):
        r, n = groups._get_expert_parallel_rank(layer.expert_group_name), layer.num_local_experts
        held.update((layer_id, r * n + i) for i in range(n))
    return ExpertShare(groups._get_expert_parallel_rank(groups._get_max_expert_size_name()), frozenset(held))


def download(storage: Storage, uri: str, local_dir: str, rels: list[str]) -> None:
    """Files ``uri/rel`` to ``local_dir/rel``, several at a time."""
    def get(rel: str) -> None:
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        storage.fs.get_file(posixpath.join(uri, rel), dst)

    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="ckpt-get") as pool:
        list(pool.map(get, rels))


def load_checkpoint(engine, storage: Storage, ckpt: CheckpointInfo, universal: bool = False,
                    name: str | None = None) -> None:
    """Every rank loads the same complete checkpoint (in place when local; else its own files downloaded).

    ``name`` picks another engine saved with the checkpoint (``Checkpointer.save`` of ``others``).
    """
    tag = UNIVERSAL_TAG if universal else DS_TAG if name is None else f"{DS_TAG}_{name}"
    if storage.is_local:
        with tensors_only():
            engine.load_checkpoint(storage.local_path(ckpt.path), tag=tag)
        return
    staging = tempfile.mkdtemp(prefix="sy-load-")
    try:
        uri = f"{ckpt.path}/{tag}"
        if universal:  # every rank re-partitions every parameter: all of it
            storage.get_dir(uri, os.path.join(staging, tag))
        else:
            every = sorted(rel[len(tag) + 1:] for rel in ckpt.manifest.get("files", {}) if rel.startswith(f"{tag}/"))
            mine = rank_files(every, _dp_rank(engine), expert_share(engine))
            download(storage, uri, os.path.join(staging, tag), mine)
            log.info("resume: downloaded %d of the %d files of %s", len(mine), len(every), uri)
        with tensors_only():
            engine.load_checkpoint(staging, tag=tag)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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

    def __init__(self, spec, storage: Storage, run_dir: str, rank: int, world_size: int,
                 attempt: str | None = None):
        self.spec, self.storage, self.run_dir = spec, storage, run_dir
        self.rank, self.world_size = rank, world_size
        self.attempt = attempt
        """This run's attempt token (``begin_attempt``); None: unfenced."""
        self.last_saved = -1
        """The step of the last save begun (published or still being written)."""
        self.intact = -1
        """The step of the last checkpoint published (what a storage fault's message says is intact)."""
        self.pending: tuple[PendingSave, dict, int] | None = None
        """The save being written: its thread, its manifest fields, the engine's ZeRO stage."""

    def latest(self) -> CheckpointInfo | None:
        return latest_checkpoint(self.storage, self.run_dir)

    def is_current(self) -> bool:
        """Whether this rank's attempt still owns the run directory (reads ``attempt.json``)."""
        return is_current(self.storage, self.run_dir, self.attempt)

    def resume_point(self) -> CheckpointInfo | None:
        """Collective: the checkpoint every rank resumes from (``resume_choice``, decided by rank 0, which
        reads the files once); a UserError on every rank when the run cannot be resumed."""
        import torch.distributed as dist

        choice: list = [None]
        if self.rank == 0:
            try:
                ckpt = resume_choice(self.storage, self.run_dir)
                choice[0] = ("ok", ckpt.step if ckpt is not None else None)
            except UserError as err:
                choice[0] = ("refused", str(err))
        dist.broadcast_object_list(choice, src=0)
        what, value = choice[0]
        if what == "refused":
            raise UserError(value)
        if value is None:
            return None
        self.last_saved = self.intact = value
        return next(c for c in list_checkpoints(self.storage, self.run_dir) if c.step == value)

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
        self.last_saved = self.intact = latest.step

    def due(self, step: int, last_step: bool) -> bool:
        """Every checkpoint.every steps, and the last step, once."""
        return step != self.last_saved and (step % self.spec.checkpoint.every == 0 or last_step)

    def save(self, step: int, engine, manifest: dict, state: CheckpointState) -> str:
        """Collective: wait for the save in flight (``wait``), then snapshot this step's state to host memory
        and write its files behind training; published later by ``publish_if_written`` or ``wait``. Returns
        the checkpoint's URI."""
        self.wait()
        consolidated = self.spec.checkpoint.consolidated and state.consolidate_engine
        writer = snapshot(engine, self.storage, self.run_dir, step, self.rank, consolidated, state.others,
                          state.tensor_files, state.overrides, self.attempt, self.intact)
        self.pending = (writer, {**manifest, **state.manifest}, engine.zero_optimization_stage())
        self.last_saved = step
        return checkpoint_dir(self.run_dir, step)

    def written(self) -> bool:
        """Whether this rank has nothing left to write (the loop all-reduces it with the step's values)."""
        return self.pending is None or self.pending[0].written()

    def publish_if_written(self, every_rank_written: bool) -> None:
        """Collective: publish the save in flight once every rank has written its files (the reduced
        ``written``: the same on every rank)."""
        if self.pending is not None and every_rank_written:
            self.wait()

    def wait(self) -> None:
        """Collective: finish the save in flight, if any: every rank's files written, then rank 0 publishes
        it (manifest last, while the attempt is current) and runs retention. Every rank raises the same
        error when one failed: FencedOut, StorageFault, else OSError."""
        import torch.distributed as dist

        if self.pending is None:
            return
        writer, manifest, zero_stage = self.pending
        self.pending = None
        parts = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(writer.result(), parts, dst=0)
        verdict = [publish(self.storage, self.run_dir, writer.step, manifest, parts, self.world_size, zero_stage,
                           self.attempt, self.intact) if self.rank == 0 else None]
        dist.broadcast_object_list(verdict, src=0)
        kind, message = verdict[0] or (None, None)
        if kind == "fenced":
            raise FencedOut(message)
        if kind == "storage":
            raise StorageFault(message)
        if kind is not None:
            raise OSError(message)
        self.intact = writer.step
        if self.rank == 0 and is_current(self.storage, self.run_dir, self.attempt):  # a zombie never deletes
            retain(self.storage, self.run_dir, self.spec.checkpoint.keep)
