"""The one PPO config: the job spec's ``rlhf.ppo`` section and the single-process reference's PPO settings.

Plain pydantic, no torch, so ``specs/job.py`` embeds it without importing the
training stack. ``shares(world)`` is the one place the per-rank sizes of a
rollout are derived (``JobSpec.ppo_shares`` gives them for a job).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class PPOShares:
    """Each rank's part of a rollout, for ``world`` data-parallel ranks."""

    rollout: int
    """Sequences each rank samples per rollout."""
    minibatch: int
    """Sequences per policy/value update on each rank."""
    prompts_per_rollout: int
    """Distinct prompts per rollout, all ranks together (records consumed per step)."""
    updates_per_rollout: int
    """Policy updates per rollout on each rank: ppo_epochs x ceil(rollout / minibatch)."""


class PPOConfig(BaseModel):
    """PPO against a frozen reward model, with a KL penalty to the frozen SFT reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward_model: str | None = None
    """The reward model: an RM run directory or checkpoint folder (also initialises the value model)."""
    rollout_size: int = Field(128, ge=1)
    """Sequences per rollout (all ranks): rollout_size / samples_per_prompt prompts."""
    samples_per_prompt: int = Field(4, ge=1)
    """Responses sampled per prompt (InstructGPT: 1)."""
    loo_baseline: bool = True
    """Subtract from each score the mean score of its prompt's other samples (needs samples_per_prompt >= 2)."""
    minibatch_size: int = Field(64, ge=1)
    """Sequences per policy/value update (all ranks)."""
    ppo_epochs: int = Field(2, ge=1)
    """Passes over each rollout."""
    value_warmup: int = Field(10, ge=0)
    """First rollouts train only the value model, so advantages start from a fitted baseline."""
    value_lr: float = Field(1e-3, gt=0)
    """Value-model learning rate (train.lr is the policy's)."""
    clip: float = Field(0.2, gt=0)
    """Policy ratio clip epsilon."""
    value_clip: float = Field(0.2, ge=0)
    """Value clip around the old values (0 = off)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    kl_beta: float = Field(0.1, ge=0)
    """Initial per-token KL coefficient beta (InstructGPT: 0.02, on a differently scaled reward)."""
    kl_target: float | None = Field(3.0, gt=0)
    """Adaptive KL target in nats per sequence; null = fixed beta."""
    kl_horizon: int = Field(2000, ge=1)
    """Adaptive KL controller horizon in samples (Ziegler et al.)."""
    reward_clip: float = Field(5.0, ge=0)
    """Clamp reward-model scores to +-this before the KL penalty (0 = off)."""
    no_eos_penalty: float = Field(1.0, ge=0)
    """Subtracted from the score of a response that never ended."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Normalise advantages over each rollout (all ranks)."""
    ptx_coef: float = Field(0.0, ge=0)
    """PPO-ptx: gamma times the pretraining loss on data.corpus, added to the policy loss (0 = off)."""
    ema_decay: float | None = Field(0.992, gt=0, lt=1)
    """EMA of the policy weights (InstructGPT: 0.992), saved with each checkpoint (null = off)."""
    max_new_tokens: int = Field(40, ge=1)
    """Most response tokens per sample."""
    temperature: float = Field(1.0, ge=0)
    """Rollout sampling temperature (1.0 keeps rollouts on-policy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollout nucleus sampling."""
    frozen_zero3: bool = False
    """Run the frozen reference and reward models as ZeRO-3 inference engines (parameters sharded)."""
    eval_prompts: int = Field(64, ge=1)
    """Held-out prompts scored per checkpoint evaluation (reward and KL)."""

    @model_validator(mode="after")
    def _sizes(self) -> "PPOConfig":
        if self.rollout_size % self.samples_per_prompt:
            raise ValueError(f"rlhf.ppo.rollout_size: {self.rollout_size} must be a multiple of "
                             f"rlhf.ppo.samples_per_prompt ({self.samples_per_prompt})")
        if self.loo_baseline and self.samples_per_prompt < 2:
            raise ValueError("rlhf.ppo.loo_baseline: needs rlhf.ppo.samples_per_prompt >= 2")
        if self.minibatch_size > self.rollout_size:
            raise ValueError(f"rlhf.ppo.minibatch_size: {self.minibatch_size} is larger than "
                             f"rlhf.ppo.rollout_size ({self.rollout_size})")
        return self

    def share_error(self, world: int) -> str | None:
        """Why the rollout cannot be split over ``world`` ranks, or None."""
        for name in ("rollout_size", "minibatch_size"):
            if getattr(self, name) % world:
                return f"rlhf.ppo.{name}: {getattr(self, name)} must divide evenly over resources.workers ({world})"
        if (self.rollout_size // world) % self.samples_per_prompt:
            return (f"rlhf.ppo.rollout_size: each rank's share ({self.rollout_size // world}) must be a "
                    f"multiple of rlhf.ppo.samples_per_prompt ({self.samples_per_prompt})")
        return None

    def shares(self, world: int = 1) -> PPOShares:
        """Per-rank sizes over ``world`` ranks (validated by ``share_error``)."""
        rollout, minibatch = self.rollout_size // world, self.minibatch_size // world
        return PPOShares(rollout=rollout, minibatch=minibatch,
                         prompts_per_rollout=self.rollout_size // self.samples_per_prompt,
                         updates_per_rollout=self.ppo_epochs * -(-rollout // minibatch))
