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

The config, ``SwitchConfig``, is in ``models/moe_config.py`` (no torch, so a
spec is validated without importing it) and importable from here. Expert
parallelism (experts sharded over ranks with all-to-all) lives in
``workers/parallel/experts.py``; it swaps this module for DeepSpeed's MoE layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mlp import MLP
from models.moe_config import SwitchConfig


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
