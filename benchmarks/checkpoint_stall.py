"""What a checkpoint costs the training it interrupts: step time while one is written, and rank 0's memory.

One rank (gloo, DeepSpeed on its CPU accelerator) trains the project's llama
decoder through ``build_engine`` on random tokens, and saves through the
loop's own ``Checkpointer`` into a local run directory. Measured in one run:

* steady step time with no checkpoint being written (median of ``--steps``);
* the old behaviour as the baseline: a save that nothing trains through
  (``save`` then ``wait`` at once: snapshot, every file written and hashed,
  published);
* a save written behind training: the step-boundary snapshot, then the
  median time of the steps that run while its files are written, until it
  is published;
* rank 0's peak memory (VmHWM, reset through ``/proc/self/clear_refs``; on
  this CPU device the training memory is host memory): the training peak, the
  peak while a checkpoint is taken, and what consolidating the weights into
  model.safetensors adds to it now (the difference between the same save
  with and without consolidated weights) against what the old consolidation
  (a full fp32 clone of every weight, then ``safetensors.save_file``) added.

Targets (``met``): step time during a write <= 1.2 x without one; rank 0's
peak during consolidation <= 1.2 x its training peak. The host snapshot
itself (on a GPU it lands in host memory, not the device's) is reported as
``checkpoint_peak_ratio``, outside the targets.

Run: ``.venv/bin/python benchmarks/checkpoint_stall.py [--preset medium] [--batch 2] [--seq 32]
[--zero-stage 1] [--steps 8]``. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["DS_ACCELERATOR"] = "cpu"                   # before deepspeed is imported

from workers.rank import use_prebuilt_ops  # noqa: E402  (after the path and the accelerator)

use_prebuilt_ops()                                     # DeepSpeed's ops as the ranks use them

TARGET_STEP_RATIO = 1.2
TARGET_MEMORY_RATIO = 1.2
VOCAB = 4096


def peak_kib(field: str = "VmHWM") -> int:
    """This process's peak resident memory since the last ``reset_peak`` (``VmRSS``: its current one), KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> None:
    """Return freed heap pages to the system (else a new allocation reuses them unseen), then restart
    VmHWM at the current resident size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks may miss reused memory
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_spec(args):
    from specs.job import validate_spec

    return validate_spec({
        "name": "bench-checkpoint-stall", "model": {"family": "llama", "preset": args.preset},
        "data": {"seq_len": args.seq}, "train": {"steps": 10_000, "micro_batch": args.batch, "warmup_steps": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "parallel": {"zero_stage": args.zero_stage}, "checkpoint": {"every": 10_000, "keep": 2},
    })


class Trainer:
    """The engine, one step on random tokens, and the steps' wall times."""

    def __init__(self, spec):
        import torch

        from workers.parallel.engine import build_engine
        from workers.tasks import build_model, model_config

        torch.manual_seed(0)
        self.cfg = model_config(spec, VOCAB)
        self.engine = build_engine(build_model(self.cfg), spec)
        self.batch, self.seq, self.n = spec.train.micro_batch, spec.data.seq_len, 0

    def step(self) -> float:
        import torch

        self.n += 1
        x = torch.randint(0, VOCAB, (self.batch, self.seq), generator=torch.Generator().manual_seed(self.n))
        t0 = time.perf_counter()
        _, loss = self.engine(x, x)
        self.engine.backward(loss)
        self.engine.step()
        loss.item()
        return time.perf_counter() - t0


def old_consolidation_extra(engine, path: str) -> int:
    """KiB the old consolidation added to the peak: a full fp32 clone of every weight, then save_file."""
    from safetensors.torch import save_file

    reset_peak()
    base = peak_kib("VmRSS")
    state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    seen, out = set(), {}
    for k, v in state.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.contiguous()
    save_file(out, path)
    del state, out
    return max(0, peak_kib() - base)


def consolidation_extra(trainer, storage, run_dir: str) -> tuple[int, int]:
    """(KiB the same save peaks at with consolidated weights minus without, the old way's extra)."""
    from workers.checkpoint_writer import snapshot

    peaks = {}
    for consolidated in (False, True):
        reset_peak()
        base = peak_kib("VmRSS")
        snapshot(trainer.engine, storage, run_dir, 900_000 + consolidated, 0, consolidated, {}, {}, {}, None,
                 None).result()
        peaks[consolidated] = peak_kib() - base
    old = old_consolidation_extra(trainer.engine, os.path.join(tempfile.mkdtemp(prefix="sy-old-"), "m.safetensors"))
    return max(0, peaks[True] - peaks[False]), old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=8, help="steady steps timed without a checkpoint")
    args = ap.parse_args()

    import deepspeed
    import torch

    from data.storage import Storage
    from models.transformer import param_counts
    from workers.checkpoint import Checkpointer, CheckpointState, begin_attempt

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    spec = make_spec(args)
    trainer = Trainer(spec)
    root = tempfile.mkdtemp(prefix="sy-bench-stall-")
    storage, run_dir = Storage(root), os.path.join(root, "run")
    saver = Checkpointer(spec, storage, run_dir, 0, 1, attempt=begin_attempt(storage, run_dir, "run"))
    n_params = param_counts(trainer.cfg)["total"]
    print(f"checkpoint_stall: llama/{args.preset} {n_params / 1e6:.1f}M parameters, ZeRO-{args.zero_stage}, "
          f"batch {args.batch} x seq {args.seq}, 1 torch thread; load average {os.getloadavg()[0]:.1f}")
    for _ in range(3):                                  # warm-up
        trainer.step()
    reset_peak()
    plain = [trainer.step() for _ in range(args.steps)]
    train_peak = peak_kib()
    t0 = time.perf_counter()
    saver.save(trainer.n, trainer.engine, {"data": {}}, CheckpointState())
    saver.wait()
    sync_save = time.perf_counter() - t0                # the old behaviour: training waits for every file
    reset_peak()
    t0 = time.perf_counter()
    saver.save(trainer.n, trainer.engine, {"data": {}}, CheckpointState())
    snapshot_s = time.perf_counter() - t0
    during = []
    while not saver.written() and len(during) < 200:
        during.append(trainer.step())
    write_s = time.perf_counter() - t0
    saver.wait()
    checkpoint_peak = peak_kib()
    after = [trainer.step() for _ in range(args.steps)]
    new_extra, old_extra = consolidation_extra(trainer, storage, run_dir)

    base_step = statistics.median(plain + after)
    during_step = statistics.median(during) if during else None
    step_ratio = during_step / base_step if during_step else None
    mem_ratio = (train_peak + new_extra) / train_peak
    old_mem_ratio = (train_peak + old_extra) / train_peak
    print(f"step without a checkpoint {1e3 * base_step:.1f} ms (median of {len(plain + after)}); "
          f"a save training waits for (the old way) {sync_save:.2f} s")
    print(f"save behind training: snapshot {1e3 * snapshot_s:.0f} ms at the step boundary, then {len(during)} "
          f"steps while its files were written ({write_s:.2f} s), median {1e3 * (during_step or 0):.1f} ms: "
          + (f"{step_ratio:.2f} x (target <= {TARGET_STEP_RATIO})" if step_ratio else "no step ran during it"))
    print(f"rank 0 peak: training {train_peak / 1024:.0f} MiB; while checkpointing {checkpoint_peak / 1024:.0f} MiB "
          f"(host snapshot included); consolidation adds {new_extra / 1024:.0f} MiB now "
          f"({mem_ratio:.2f} x the training peak, target <= {TARGET_MEMORY_RATIO}), the old way added "
          f"{old_extra / 1024:.0f} MiB ({old_mem_ratio:.2f} x)")
    met = step_ratio is not None and step_ratio <= TARGET_STEP_RATIO and mem_ratio <= TARGET_MEMORY_RATIO
    print(json.dumps({
        "benchmark": "checkpoint_stall", "preset": args.preset, "n_params": n_params, "zero_stage": args.zero_stage,
        "batch": args.batch, "seq_len": args.seq, "step_s": round(base_step, 5),
        "step_s_during_write": round(during_step, 5) if during_step else None, "steps_during_write": len(during),
        "step_ratio": round(step_ratio, 4) if step_ratio else None, "target_step_ratio": TARGET_STEP_RATIO,
        "snapshot_s": round(snapshot_s, 4), "write_s": round(write_s, 3), "sync_save_s": round(sync_save, 3),
        "train_peak_mib": round(train_peak / 1024, 1), "checkpoint_peak_mib": round(checkpoint_peak / 1024, 1),
        "checkpoint_peak_ratio": round(checkpoint_peak / train_peak, 4),
        "consolidation_extra_mib": round(new_extra / 1024, 1), "old_consolidation_extra_mib": round(old_extra / 1024, 1),
        "consolidation_peak_ratio": round(mem_ratio, 4), "old_consolidation_peak_ratio": round(old_mem_ratio, 4),
        "target_memory_ratio": TARGET_MEMORY_RATIO, "load_average": round(os.getloadavg()[0], 2), "met": met,
    }))


if __name__ == "__main__":
    main()
