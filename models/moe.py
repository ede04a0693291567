"""Switch Transformer MoE layer (Fedus, Zoph & Shazeer, 2021), single-device PyTorch.

A ``SwitchMLP`` stands in for a block's dense MLP. Each token goes to one
expert (top-1 routing); each expert is an MLP of the same kind as the dense
one (GELU or SwiGLU). The pieces, in the order the forward pass runs them:

1. Router: logits = x @ W_r (d_model -> num_experts), always in float32, also
   under bf16 autocast, because the softmax and argmax are sensitive to
   rounding (the paper's "selective precision").
2. Capacity: each expert takes at most
   ``max(min_capacity, ceil(tokens / num_experts * capacity_factor))`` tokens
   per forward, with the train or eval factor chosen by ``module.training``.
   Tokens are served first come first served in their (batch, position)
   order; the rest are dropped: the layer outputs 0 for them, so the block's
   residual connection carries them through unchanged.
3. Output: expert(x) * p, where p is the router probability of the chosen
   expert; multiplying by p is what lets the router learn.
4. Auxiliary losses, set on ``self.aux_loss`` every forward (the decoder and
   encoder add them to the loss): ``alpha * N * sum_i f_i * P_i`` (load
   balancing) plus ``z_loss * mean(logsumexp(logits)^2)`` (router z-loss, from
   ST-MoE, keeps router logits small).

Expert parallelism (experts sharded over ranks with all-to-all) lives in
``workers/parallel/experts.py``; it swaps this module for DeepSpeed's MoE layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mlp import MLP


@dataclass(frozen=True)
class SwitchConfig:
    num_experts: int = 4
    """Experts per Switch layer; parameters grow with it, compute per token does not."""
    every: int = 1
    """Switch layer frequency: 1 = every block, 2 = every other block (odd layers, as in the paper)."""
    capacity_factor_train: float = 1.25
    """Capacity factor while training: slots per expert = tokens / num_experts x this."""
    capacity_factor_eval: float = 2.0
    """Capacity factor in eval mode (fewer dropped tokens when it matters less for speed)."""
    min_capacity: int = 4
    """Lower bound on slots per expert, for tiny batches."""
    alpha: float = 0.01
    """Weight of the load-balancing loss N * sum_i f_i * P_i."""
    z_loss: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2); 0 = off, 1e-3 to 1e-4 typical."""
    jitter: float = 0.0
    """Multiplicative jitter epsilon on the router input while training (x * U(1-eps, 1+eps)); 0 = off."""
    expert_dropout: float = 0.0
    """Dropout on each expert's hidden layer; the paper fine-tunes with 0.4 here vs 0.1 elsewhere."""
    drop_tokens: bool = True
    """Drop tokens over capacity; False = unlimited capacity (no token is dropped)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if self.every < 1:
            raise ValueError(f"moe.every must be >= 1, got {self.every}")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"moe.{name} must be > 0, got {getattr(self, name)}")
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity must be >= 0, got {self.min_capacity}")
        if self.alpha < 0 or self.z_loss < 0:
            raise ValueError(f"moe.alpha and moe.z_loss must be >= 0, got {self.alpha} and {self.z_loss}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"moe.jitter must be in [0, 1), got {self.jitter}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"moe.expert_dropout must be in [0, 1), got {self.expert_dropout}")

    def applies_to(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) uses a Switch layer: layers every-1, 2*every-1, ..."""
        return (layer + 1) % self.every == 0

    def capacity_factor(self, training: bool) -> float:
        return self.capacity_factor_train if training else self.capacity_factor_eval

    def capacity(self, num_tokens: int, training: bool) -> int:
        """Slots per expert for a forward over ``num_tokens`` tokens."""
        if not self.drop_tokens:
            return num_tokens
        # Same float arithmetic as DeepSpeed's gate, so both paths agree on the capacity.
        slots = math.ceil(num_tokens / self.num_experts * self.capacity_factor(training))
        return max(self.min_capacity, slots)


# ----------------------------------------------------------------------------- losses


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Un-scaled Switch load-balancing loss N * sum_i f_i * P_i.

    router_probs: (S, N) softmax of the router logits; expert_index: (S,) the
    expert each token was routed to (before capacity drops). f_i is the fraction
    of tokens routed to expert i, P_i the mean router probability of expert i.
    Uniform routing gives 1.0; every token on one expert with probability 1 gives N.
    Only P carries gradient (f comes from an argmax).
    """
    f = F.one_hot(expert_index, num_experts).to(router_probs.dtype).mean(0)  # (N,)
    p = router_probs.mean(0)                                                 # (N,)
    return num_experts * torch.sum(f * p)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, for (S, N) logits (ST-MoE, Zoph et al. 2022)."""
    return torch.logsumexp(router_logits, dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------- layer


class ExpertMLP(MLP):
    """One expert: the dense MLP's layers, with dropout on the hidden layer as the paper's expert dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)                                    # (S_e, d_ff)
        else:
            h = F.gelu(self.up(x), approximate="tanh")                               # (S_e, d_ff)
        return self.down(F.dropout(h, self.dropout, self.training))                # (S_e, d)


class SwitchMLP(nn.Module):
    """Top-1 routed mixture of ``cfg.num_experts`` MLPs; drop-in for the dense MLP.

    Parameters: num_experts copies of the dense MLP plus a bias-free
    (num_experts, d_model) router, which is what ``param_counts`` assumes.
    After each forward: ``aux_loss`` (scaled scalar tensor) and ``stats``
    (detached tensors: ``expert_share`` (N,) fraction of tokens routed to each
    expert, ``dropped`` fraction of tokens over capacity, ``load_balancing``
    and ``z_loss`` un-scaled, ``capacity`` slots per expert).
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool, cfg: SwitchConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [ExpertMLP(d_model, d_ff, kind, bias, cfg.expert_dropout) for _ in range(cfg.num_experts)])
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(S, d) tokens -> (S, N) router logits in float32, autocast or not."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            if self.training and self.cfg.jitter > 0:
                eps = self.cfg.jitter
                h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
            return F.linear(h, self.router.weight.float())                          # (S, N) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                  # (S, d)
        S, N = x.shape[0], self.cfg.num_experts

        logits = self.router_logits(x)                                                # (S, N) fp32
        probs = logits.softmax(dim=-1)                                                # (S, N) fp32
        gate, index = probs.max(dim=-1)                                               # (S,), (S,)

        # Position of each token in its expert's queue, in token order.
        routed = F.one_hot(index, N)                                                  # (S, N)
        position = (routed.cumsum(dim=0) * routed).sum(dim=-1) - 1                   # (S,)
        capacity = self.cfg.capacity(S, self.training)
        keep = position < capacity                                                    # (S,)

        # Group the kept tokens by expert, run each expert on its slice, scatter back.
        kept = keep.nonzero().squeeze(1)                                              # (K,)
        order = kept[torch.argsort(index[kept], stable=True)]                         # (K,) grouped by expert
        counts = torch.bincount(index[order], minlength=N).tolist()
        chunks = x.index_select(0, order).split(counts)                              # N x (K_e, d)
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])  # (K, d)
        y = y * gate.index_select(0, order).unsqueeze(1).to(y.dtype)                  # scale by router prob
        out = y.new_zeros(S, shape[-1]).index_copy(0, order, y)                      # (S, d), dropped rows 0

        lb = load_balancing_loss(probs, index, N)
        z = router_z_loss(logits)
        self.aux_loss = self.cfg.alpha * lb + self.cfg.z_loss * z
        self.stats = {
            "expert_share": routed.float().mean(dim=0).detach(),                      # (N,) sums to 1
            "dropped": 1.0 - keep.float().mean().detach(),
            "load_balancing": lb.detach(),
            "z_loss": z.detach(),
            "capacity": torch.tensor(capacity),
        }
        return out.reshape(shape)
