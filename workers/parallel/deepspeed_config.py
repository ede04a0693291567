"""The DeepSpeed config of a job's engines: Switchyard's defaults, then the spec's ``deepspeed:`` block over them.

One builder for trained engines (``deepspeed_config``) and frozen inference
engines (``frozen_deepspeed_config``: PPO's reference and reward models).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

# ---------------------------------------------------------------------- the spec's `deepspeed:` allow-list
#
# The spec's `deepspeed:` block may only tune how DeepSpeed communicates and buckets, never what the rest of
# the spec already decides (batch sizes, precision, ZeRO stage, optimizer, clipping, checkpoints) and never
# anything that writes files or imports modules (profilers, monitors, autotuning, nebula, aio).


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"an integer from {lo} to {hi}"
    return check


def _positive_float(v) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e6
    return None if ok else "a finite number in (0, 1e6]"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


_ELEMENTS = _int_range(1, 1 << 40)
_ELEMENTS0 = _int_range(0, 1 << 40)
ZERO_ALLOWED: dict[str, Callable[[Any], str | None]] = {
    "reduce_bucket_size": _ELEMENTS,
    "allgather_bucket_size": _ELEMENTS,
    "overlap_comm": _bool,
    "contiguous_gradients": _bool,
    "reduce_scatter": _bool,
    "allgather_partitions": _bool,
    "round_robin_gradients": _bool,
    "stage3_prefetch_bucket_size": _ELEMENTS0,
    "stage3_param_persistence_threshold": _ELEMENTS0,
    "stage3_max_live_parameters": _ELEMENTS0,
    "stage3_max_reuse_distance": _ELEMENTS0,
    "sub_group_size": _ELEMENTS,
}
"""``deepspeed.zero_optimization`` keys a spec may set: bucket sizes and communication overlap."""
DEEPSPEED_ALLOWED: dict[str, Any] = {
    "zero_optimization": ZERO_ALLOWED,
    "communication_data_type": _one_of("fp32", "bf16"),
    "prescale_gradients": _bool,
    "gradient_predivide_factor": _positive_float,
    "wall_clock_breakdown": _bool,
    "memory_breakdown": _bool,
    "steps_per_print": _int_range(1, 1 << 30),
}
"""Top-level ``deepspeed:`` keys a spec may set (a dict value is the allow-list of that section)."""
_BATCH = "set batch sizes with train.micro_batch and train.grad_accum, not in the deepspeed block"
_WRITES = "writes files or imports modules; Switchyard writes metrics.jsonl and its own checkpoints"
REFUSED_WHY: dict[str, str] = {
    "train_batch_size": _BATCH, "train_micro_batch_size_per_gpu": _BATCH, "gradient_accumulation_steps": _BATCH,
    "elasticity": _BATCH,
    "fp16": "fp16 does not run on CPU; set train.precision (fp32 or bf16)",
    "bf16": "set train.precision (fp32 or bf16)", "amp": "set train.precision (fp32 or bf16)",
    "gradient_clipping": "set train.grad_clip",
    "optimizer": "set train.optimizer, train.lr, train.betas and train.weight_decay",
    "scheduler": "set train.warmup_steps, train.decay and train.min_lr_ratio",
    "zero_optimization.stage": "set parallel.zero_stage",
    "zero_optimization.offload_optimizer": "set parallel.offload_optimizer",
    "pipeline": "set parallel.pp", "checkpoint": "set the checkpoint section",
    **{k: _WRITES for k in ("flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "aim", "autotuning",
                            "nebula", "aio", "monitor_config", "compression_training", "data_efficiency",
                            "curriculum_learning", "activation_checkpointing")},
}
"""Why common DeepSpeed keys are refused, for the one-line error."""


def check_deepspeed_block(block: Any) -> dict[str, Any]:
    """Return ``block`` if every key is allow-listed with a valid value, else raise ValueError naming the key."""
    if not isinstance(block, dict):
        raise ValueError(f"deepspeed: expected a mapping of DeepSpeed settings, got {type(block).__name__}")
    allowed_top = ", ".join(sorted(DEEPSPEED_ALLOWED))
    for key, value in block.items():
        rule = DEEPSPEED_ALLOWED.get(key)
        if rule is None:
            why = REFUSED_WHY.get(key, f"not one of the allowed keys ({allowed_top})")
            raise ValueError(f"deepspeed.{key}: not allowed: {why} (see README 'The deepspeed block')")
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise ValueError(f"deepspeed.{key}: expected a mapping, got {type(value).__name__}")
            for sub, v in value.items():
                check = rule.get(sub)
                if check is None:
                    why = REFUSED_WHY.get(f"{key}.{sub}", f"not one of the allowed keys ({', '.join(sorted(rule))})")
                    raise ValueError(f"deepspeed.{key}.{sub}: not allowed: {why} (see README 'The deepspeed block')")
                need = check(v)
                if need:
                    raise ValueError(f"deepspeed.{key}.{sub}: must be {need}, got {v!r}")
        else:
            need = rule(value)
            if need:
                raise ValueError(f"deepspeed.{key}: must be {need}, got {value!r}")
    return block



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
    return deep_merge(base, check_deepspeed_block(spec.deepspeed))  # checked again: a stored spec may predate the list


# What a frozen engine takes from the spec's ``deepspeed:`` block: nothing about optimizers or gradients.
_TRAINING_ONLY = ("optimizer", "scheduler", "zero_optimization", "gradient_clipping", "gradient_accumulation_steps",
                  "checkpoint")


def frozen_deepspeed_config(spec, world_size: int, zero3: bool) -> dict[str, Any]:
    """A frozen model's inference engine: ZeRO-3 (parameters sharded over the ranks) or none, the spec's
    precision and the rest of its ``deepspeed:`` block."""
    zero: dict[str, Any] = {"stage": 3 if zero3 else 0}
    base = {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.train.precision == "bf16"},
        "steps_per_print": 1 << 30,
    }
    return deep_merge(base, {k: v for k, v in spec.deepspeed.items() if k not in _TRAINING_ONLY})
