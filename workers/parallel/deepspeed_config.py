"""The DeepSpeed config of a job: Switchyard's defaults, then the spec's ``deepspeed:`` block over them."""
from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(spec, load_universal: bool = False) -> dict[str, Any]:
    """``spec`` is an specs.job.JobSpec; batch sizes are derived from it only."""
    t, p = spec.train, spec.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.zero_stage == 3:
        # Gather whole layers at once instead of thresholding per parameter, and keep the
        # communication buckets at 5e7 elements: DeepSpeed's 5e8 default preallocates ~2 GB of fp32
        # gradient bucket per rank whatever the model's size. Large models can raise them in `deepspeed:`.
        zero["stage3_param_persistence_threshold"] = 0
        zero["reduce_bucket_size"] = 50_000_000
        zero["stage3_prefetch_bucket_size"] = 50_000_000
    base = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": spec.samples_per_step,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if load_universal:
        base["checkpoint"] = {"load_universal": True}
    return deep_merge(base, spec.deepspeed)
