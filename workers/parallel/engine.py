"""DeepSpeed engines from single-device models: the optimizer, the LR schedule, parallelism applied from outside.

``build_engine`` is the trained engine of every job kind (pipeline stages for
``pp > 1``, expert-parallel Switch layers for ``ep > 1``); ``frozen_engine``
the inference engine of a frozen model. Both take their DeepSpeed config from
``workers/parallel/deepspeed_config.py``. ``parallel_weights`` gathers the
consolidated weights of pipeline and expert-parallel engines, whose modules
do not hold single-device names.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from models.transformer import Decoder
from specs.errors import UserError
from workers.parallel.deepspeed_config import deepspeed_config, frozen_deepspeed_config


def lr_lambda(spec):
    """Multiplier on the peak LR: linear warm-up, then cosine/linear/constant decay to min_lr_ratio."""
    t = spec.train
    total, warm, floor = spec.total_steps, t.warmup_steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.decay == "constant" or total <= warm:
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.decay == "cosine" else 1 - frac
        return floor + (1 - floor) * shape

    return f


def make_optimizer(model: torch.nn.Module, spec) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; matrices decay, vectors do not; DeepSpeed MoE experts get groups of their own."""
    t = spec.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from workers.parallel.experts import moe_param_groups

        groups = moe_param_groups(model, groups)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    if t.optimizer == "adam":
        for g in groups:
            g["weight_decay"] = 0.0
        return torch.optim.Adam(groups, lr=t.lr, betas=t.betas)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


class PlainTorch:
    """The spec's decoder, optimizer, schedule and clipping in plain PyTorch, no DeepSpeed: the baseline loop
    the benchmarks measure the engine against (``benchmarks/throughput.py``, ``benchmarks/job_overhead.py``)."""

    def __init__(self, spec, vocab_size: int):
        from workers.tasks import model_config

        torch.manual_seed(spec.train.seed)
        self.model = Decoder(model_config(spec, vocab_size))
        self.model.train()
        self.opt = make_optimizer(self.model, spec)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(spec))
        self.grad_clip = spec.train.grad_clip

    def step(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """One optimizer step on (x, y) through ``model`` (default the decoder; e.g. a DDP wrapper of it)."""
        _, loss = (model or self.model)(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def build_engine(model: torch.nn.Module, spec, load_universal: bool = False):
    """Apply the spec's parallelism to the single-device model, then DeepSpeed.

    pp > 1: the Decoder is cut into pipeline stages holding its weights (a
    ``PipelineEngine``). ep > 1: Switch layers become DeepSpeed MoE layers with
    their experts sharded over ``ep`` ranks. Collective: every rank calls it.
    """
    import deepspeed

    p = spec.parallel
    if p.pp > 1:
        from workers.parallel.pipeline import load_decoder_state, pipeline_module

        if not isinstance(model, Decoder):
            raise UserError(f"parallel.pp: pipeline parallelism is for decoders, not {type(model).__name__}")
        state = model.state_dict()
        try:
            model = pipeline_module(model.cfg, p.pp)
        except ValueError as err:
            raise UserError(str(err)) from None
        load_decoder_state(model, state)
    elif p.ep > 1:
        from workers.parallel.experts import expert_parallel

        expert_parallel(model, p.ep)
    optimizer = make_optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(spec, load_universal))
    if (dist.get_world_size() == 1 and p.zero_stage == 0 and p.pp == 1 and not engine.bfloat16_enabled()
            and not engine.fp16_enabled()):
        engine.enable_backward_allreduce = False  # one plain fp32 rank: no flatten + all-reduce of every gradient
    return engine


def frozen_engine(model: torch.nn.Module, spec, zero3: bool):
    """A frozen model as a DeepSpeed inference engine (ZeRO-3 shards its parameters over the ranks)."""
    import deepspeed

    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=model, config=frozen_deepspeed_config(spec, dist.get_world_size(), zero3))
    engine.eval()
    return engine


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def parallel_weights(engine, spec) -> dict[str, torch.Tensor] | None:
    """Collective for pipeline and expert-parallel engines: single-device weights on rank 0, None elsewhere.

    Every other engine's module already holds single-device names (``checkpoint.consolidated_state_dict``).
    """
    p = spec.parallel
    if p.pp > 1:
        from workers.parallel.pipeline import gather_decoder_state

        return gather_decoder_state(engine)
    from workers.parallel.experts import expert_state

    return expert_state(engine, p.ep)
