"""What a job kind is: the one shape every kind has, and the values the training loop gives it.

A kind (pretrain in ``workers/pretrain.py``; sft, rm and ppo in
``workers/rlhf/stages.py``; distill in ``workers/distill.py``) builds its models and engines from a
``RankEnv``, then the loop (``workers/train_loop.py``) calls it: ``step``,
``evaluate``, ``checkpoint_state`` and ``restore``. The loop owns
everything else: cadence, resume, stop, metrics, the final evaluation and the
result.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from data.storage import Storage
from workers.checkpoint import CheckpointInfo, CheckpointState

if TYPE_CHECKING:
    from specs.job import JobSpec


@dataclass
class RunContext:
    """What a rank needs to train: plain values that travel to the actor."""

    spec: JobSpec
    storage: Storage
    run_dir: str
    token_cache: str
    """URI of the complete token cache folder."""
    resume: bool
    """Continue from the latest complete checkpoint."""
    peak_flops: float | None = None
    """Peak FLOP/s per worker, for MFU."""
    stop: threading.Event | None = None
    """Set to stop at the next step; made on the rank (events do not pickle)."""
    progress: dict | None = None
    """Step, loss, throughput and last checkpoint, read by ``RankWorker.progress``."""
    attempt: str | None = None
    """This attempt's token (``workers.checkpoint.begin_attempt``): only the current attempt publishes
    checkpoints and runs retention. None: unfenced (in-process tests)."""


@dataclass
class RankEnv:
    """One rank's place in the job, handed to a kind's builder."""

    ctx: RunContext
    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls, ctx: RunContext) -> "RankEnv":
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return cls(ctx, dist.get_rank(), dist.get_world_size(), device)

    @property
    def spec(self) -> JobSpec:
        return self.ctx.spec

    @property
    def storage(self) -> Storage:
        return self.ctx.storage

    @property
    def run_dir(self) -> str:
        return self.ctx.run_dir


class DataOrder(Protocol):
    """Where a kind's data position lives in a checkpoint (``data.sampler.DataPlan`` or ``ItemOrder``)."""

    def state(self, position: int): ...

    def check_resume(self, state) -> None: ...


class JobKind(Protocol):
    """One job kind, built by ``KINDS[spec.kind](env, resume_from, universal)`` on every rank."""

    engine: object
    """The main trained DeepSpeed engine (its LR and grad norm go into the metrics)."""
    others: dict
    """More trained engines saved with each checkpoint, name -> engine."""
    order: DataOrder
    """The data order whose position each checkpoint records."""
    per_step: int
    """Samples or records all ranks consume together per step."""
    tokens_per_step: int | None
    """Tokens per step for throughput metrics (None: the kind does not count tokens)."""
    n_params: int | None
    """Parameters of the trained model, for progress."""

    def step(self, step: int, position: int) -> dict:
        """One optimizer step from global position ``position``: named values, ``loss`` among them."""

    def log_fields(self, position: int, seconds: float) -> dict:
        """Kind-specific fields of a metrics row (position after the step, its seconds)."""

    def evaluate(self) -> dict | None:
        """Collective: held-out measures of the trained model."""

    def checkpoint_state(self, step: int) -> CheckpointState:
        """Collective: what a checkpoint at ``step`` holds beyond the main engine."""

    def restore(self, latest: CheckpointInfo) -> None:
        """Extra state back from a checkpoint, after the engines are loaded."""
