"""The Switch MoE layer's config (``models.moe.SwitchMLP``), with no torch: spec validation builds it.

``num_experts`` and ``every`` say which blocks get a Switch layer and how
wide it is; the capacity fields say how many tokens each expert takes per
forward (``capacity``, the same float arithmetic as DeepSpeed's gate); the
loss weights and dropout are read by the layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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
