"""Expert parallelism: Switch layers sharded over ranks with DeepSpeed's MoE layer.

``models.moe.SwitchMLP`` keeps all experts on one device. Here each one is
replaced, in place, by a ``DeepSpeedSwitch`` that holds a
``deepspeed.moe.layer.MoE``: the ``ep_size`` ranks of an expert-parallel group
each keep ``num_experts / ep_size`` experts, and tokens travel to their expert
and back with two all-to-alls. Ranks in different expert-parallel groups hold
the same experts and average their gradients (DeepSpeed's expert-data-parallel
group); dense parameters are averaged over all ranks as usual.

Usage, on every rank, after ``deepspeed.init_distributed``::

    model = Decoder(cfg)                      # same seed on every rank
    expert_parallel(model, ep_size=2)
    optimizer = torch.optim.AdamW(moe_param_groups(model), lr=...)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=...)

The conversion keeps the model's function: rank r of an expert-parallel group
gets global experts ``r * local .. (r + 1) * local - 1`` copied from the
SwitchMLP, and the router weight is copied into DeepSpeed's gate, so the same
initialisation gives the same model for every ``ep_size``.

Differences from ``SwitchMLP`` worth knowing:

* Which over-capacity tokens are dropped: SwitchMLP serves tokens in order;
  DeepSpeed's gate (with ``use_rts=False``) keeps ``capacity`` of them picked
  by ``torch.topk`` over a 0/1 mask. The number dropped is the same.
* Jitter: DeepSpeed's 'Jitter' policy always uses epsilon 0.01, whatever
  ``SwitchConfig.jitter`` says (any non-zero value turns it on).
* Capacity is computed from each rank's local tokens (as SwitchMLP does from
  its batch), so it depends on the micro-batch per rank, not on ``ep_size``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.moe import SwitchConfig, SwitchMLP, router_z_loss

JITTER_EPSILON_DEEPSPEED = 0.01  # fixed inside deepspeed.moe.sharded_moe.multiplicative_jitter
GATE_HELPERS = ("_capacity", "_top_idx", "_one_hot_to_float")
"""The small ops of ``deepspeed.moe.sharded_moe``'s gating that DeepSpeed wraps in ``torch.compile``."""


def eager_gate_helpers() -> None:
    """Run DeepSpeed's gating helpers eagerly: take off the ``torch.compile`` wrapper DeepSpeed gives them.

    Each is one small op (a capacity, a top-k, a one-hot). Compiled, the first
    gating call of every rank process spent 12 s in inductor on a CPU, two of
    the three then failing to compile (a graph break, and a screen of warnings
    in the job's log), and a new shape (an eval batch) compiles again. Eager,
    a gating call takes milliseconds. Idempotent.
    """
    from deepspeed.moe import sharded_moe

    for name in GATE_HELPERS:
        original = getattr(getattr(sharded_moe, name, None), "_torchdynamo_orig_callable", None)
        if original is not None:
            setattr(sharded_moe, name, original)


class DeepSpeedSwitch(nn.Module):
    """A SwitchMLP's experts and router inside DeepSpeed's MoE layer; sets ``aux_loss`` and ``stats`` alike."""

    def __init__(self, switch: SwitchMLP, ep_size: int, ep_rank: int):
        from deepspeed.moe.layer import MoE

        eager_gate_helpers()
        super().__init__()
        cfg: SwitchConfig = switch.cfg
        if cfg.num_experts % ep_size:
            raise ValueError(f"moe.num_experts ({cfg.num_experts}) must be divisible by ep_size ({ep_size})")
        if cfg.jitter not in (0.0, JITTER_EPSILON_DEEPSPEED):
            warnings.warn(f"moe.jitter={cfg.jitter}: DeepSpeed's jitter always uses epsilon "
                          f"{JITTER_EPSILON_DEEPSPEED}", stacklevel=2)
        self.cfg = cfg
        local = cfg.num_experts // ep_size
        first = ep_rank * local
        d_model = switch.router.in_features
        self.moe = MoE(
            hidden_size=d_model,
            expert=switch.experts[first],
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=cfg.capacity_factor_train,
            eval_capacity_factor=cfg.capacity_factor_eval,
            min_capacity=cfg.min_capacity,
            noisy_gate_policy="Jitter" if cfg.jitter > 0 else None,
            drop_tokens=cfg.drop_tokens,
            use_rts=False,
        )
        # MoE deep-copied experts[first] `local` times; give each slot its own global expert.
        with torch.no_grad():
            for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                expert.load_state_dict(switch.experts[first + i].state_dict())
            self.moe.deepspeed_moe.gate.wg.weight.copy_(switch.router.weight)          # (N, d)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, l_aux, counts = self.moe(x)                # (..., d), N * sum f_i P_i, (N,) tokens routed per expert
        tokens = x.reshape(-1, x.shape[-1])                                            # (S, d)
        S = tokens.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.moe.deepspeed_moe.gate.wg.weight.float())  # (S, N) fp32
        z = router_z_loss(logits)
        self.aux_loss = self.cfg.alpha * l_aux + self.cfg.z_loss * z
        capacity = self.cfg.capacity(S, self.training)
        kept = counts.clamp(max=capacity).sum()         # DeepSpeed keeps min(count, capacity) per expert
        self.stats = {
            "expert_share": (counts.float() / S).detach(),                            # (N,) sums to 1
            "dropped": (1.0 - kept.float() / S).detach(),
            "load_balancing": l_aux.detach(),
            "z_loss": z.detach(),
            "capacity": torch.tensor(capacity),
        }
        return out


def expert_parallel(model: nn.Module, ep_size: int, use_data_before_expert_parallel: bool = False) -> nn.Module:
    """Replace every SwitchMLP in ``model`` (in place) by a DeepSpeedSwitch over ``ep_size`` ranks.

    Call on every rank, after ``deepspeed.init_distributed`` and before
    ``deepspeed.initialize``, with the model built from the same seed
    everywhere. ``use_data_before_expert_parallel`` must match the DeepSpeed
    config's flag of that name (it decides which ranks form a group).
    Returns ``model``.
    """
    from deepspeed import comm as dist
    from deepspeed.utils import groups

    if not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed: call deepspeed.init_distributed() first")
    world_size = dist.get_world_size()
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world_size})")
    # Create the groups now (DeepSpeed reuses them later) to learn this rank's place in its ep group.
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    ep_rank = groups._get_expert_parallel_rank(group_name)

    switches = [(name, m) for name, m in model.named_modules() if isinstance(m, SwitchMLP)]
    if not switches:
        raise ValueError("expert_parallel: the model has no SwitchMLP layers (set its config's moe)")
    for name, switch in switches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DeepSpeedSwitch(switch, ep_size, ep_rank))
    return model


def moe_param_groups(model: nn.Module, base_groups: list[dict] | None = None) -> list[dict]:
    """Optimizer param groups with expert parameters in groups of their own.

    DeepSpeed reduces expert gradients over the expert-data-parallel group and
    ZeRO partitions them separately; it finds them through these groups
    (marked ``moe: True``). ``base_groups``: the groups you would otherwise
    use (each needs a unique ``name``; other keys such as ``weight_decay`` are
    copied into the matching expert groups); default one group of all parameters.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if base_groups is None:
        base_groups = [{"name": "params", "params": list(model.parameters())}]
    missing = [i for i, g in enumerate(base_groups) if "name" not in g]
    if missing:
        raise ValueError(f"moe_param_groups: param groups {missing} need a 'name' key")
    groups = [dict(g, params=list(g["params"])) for g in base_groups]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def expert_state(engine, ep: int) -> dict[str, torch.Tensor] | None:
    """Collective: the model's state dict on rank 0 with DeepSpeed MoE layers back in ``SwitchMLP`` names.

    Each rank holds num_experts / ep experts; rank r of an expert-parallel
    group holds global experts r * local ... (r + 1) * local - 1.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep}")
    mine: dict[str, torch.Tensor] = {}
    for name, m in engine.module.named_modules():
        if not isinstance(m, DeepSpeedSwitch):
            continue
        local = m.cfg.num_experts // ep
        for i, expert in enumerate(m.moe.deepspeed_moe.experts.deepspeed_experts):
            for k, v in expert.state_dict().items():
                mine[f"{name}.experts.{ep_rank * local + i}.{k}"] = v.detach().float().cpu().clone()
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    out = {}
    for k, v in engine.module.state_dict().items():
        if ".moe.deepspeed_moe." not in k:
            out[k] = v.detach().float().clone()
        elif k.endswith(".moe.deepspeed_moe.gate.wg.weight"):
            out[k.replace(".moe.deepspeed_moe.gate.wg.weight", ".router.weight")] = v.detach().float().clone()
    for part in parts:
        out.update(part)
    return out
