"""Per-step metrics: ``metrics.jsonl`` in the run directory and TensorBoard event files.

Rank 0 writes. With local storage the files are written in place; with remote
storage they are written to a local folder and uploaded by ``sync()`` (at every
checkpoint and at the end), because object stores cannot append.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from data.storage import Storage

# Dense bf16 peak FLOP/s per device, for MFU when cluster.yaml gives none.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def detect_peak_flops(configured: float | None) -> float | None:
    if configured:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def step_means(rows: list[dict]) -> dict[str, np.ndarray]:
    """Mean over micro-batches of each named value (scalars and vectors), as float64 arrays."""
    out: dict[str, np.ndarray] = {}
    for row in rows:
        for k, v in row.items():
            v = np.atleast_1d(np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=np.float64))
            out[k] = out.get(k, 0.0) + v / len(rows)
    return out


def collective_device():
    """The device a rank's collectives run on: its GPU under NCCL (which has no CPU tensors), else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values, device=None) -> list[float]:
    """Collective: the element-wise sum over ranks of a list of numbers, on ``device`` (None: the rank's
    ``collective_device``; a CPU tensor fails under NCCL)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device if device is not None else collective_device())
    dist.all_reduce(t)
    return t.tolist()


def reduce_mean_dict(values: dict[str, np.ndarray], device=None) -> dict[str, np.ndarray]:
    """Collective: one all-reduce for every named value (same keys and shapes on every rank), averaged."""
    import torch.distributed as dist

    keys = sorted(values)
    flat = np.concatenate([values[k] for k in keys]) if keys else np.zeros(0)
    mean = np.asarray(all_sum(flat.tolist(), device)) / dist.get_world_size()
    out, at = {}, 0
    for k in keys:
        n = len(values[k])
        out[k] = mean[at:at + n]
        at += n
    return out


class MetricsWriter:
    """Rows go to ``metrics.jsonl``; ``start_step`` is the step a (resumed) run starts from.

    Rows of steps after ``start_step`` are dropped when the writer opens: they
    were written after the checkpoint the run resumes from and are about to be
    run again, so each step keeps one row.
    """

    def __init__(self, storage: Storage, run_dir: str, enabled: bool, start_step: int = 0):
        self.storage, self.run_dir, self.enabled = storage, run_dir, enabled
        self.local_dir = storage.local_path(run_dir) if storage.is_local else tempfile.mkdtemp(prefix="sy-metrics-")
        self._file = None
        self._tb = None
        if enabled:
            os.makedirs(self.local_dir, exist_ok=True)
            local = os.path.join(self.local_dir, "metrics.jsonl")
            if not storage.is_local and storage.exists(f"{run_dir}/metrics.jsonl"):
                # Resumed on remote storage: continue the uploaded file.
                with open(local, "w") as f:
                    f.write(storage.read_text(f"{run_dir}/metrics.jsonl"))
            if os.path.exists(local):
                _keep_rows_up_to(local, start_step)
            self._file = open(local, "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.local_dir, "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def sync(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.flush()
        if not self.storage.is_local:
            self.storage.put_dir(self.local_dir, self.run_dir)

    def close(self) -> None:
        if self.enabled:
            self.sync()
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _keep_rows_up_to(path: str, step: int) -> None:
    """Rewrite a metrics file (atomically) without its rows past ``step`` and any torn last line."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a crash
                continue
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
