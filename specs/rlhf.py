"""The InstructGPT stages' spec sections (kinds sft, rm, ppo): their datasets, the built-in task and the
per-stage settings, embedded in ``specs.job.JobSpec`` as ``rlhf:``."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from specs.base import SEED_MAX, FromList, PathStr, _Section
from workers.rlhf.ppo_config import PPOConfig


class BuiltinTaskSpec(_Section):
    """The built-in instruction task's datasets (data.rlhf_files.BuiltinDataConfig), written by the stages."""

    n_sft: int = Field(4000, ge=1, le=10_000_000)
    """Demonstrations (train prompts)."""
    demo_noise: float = Field(0.3, ge=0, lt=1)
    """Share of demonstrations with a corrupted answer (careless demonstrators)."""
    n_sft_heldout: int = Field(200, ge=1, le=10_000_000)
    """Held-out demonstrations (gold answers) for the SFT held-out loss."""
    n_rm: int = Field(4000, ge=1, le=10_000_000)
    """Ranked comparisons for reward-model training."""
    n_rm_heldout: int = Field(300, ge=1, le=10_000_000)
    """Ranked comparisons on held-out prompts, for the RM's held-out pairwise accuracy."""
    k: int = Field(4, ge=2, le=16)
    """Responses per comparison (K of the K-way ranking)."""
    min_gap: float = Field(0.15, ge=0, le=1)
    """Least gold-score difference between two responses of one comparison."""
    model_share: float = Field(0.5, ge=0, le=1)
    """Share of each comparison's responses sampled from the SFT model (the rest are corrupted answers)."""
    n_samples: int = Field(4, ge=1, le=64)
    """SFT samples drawn per comparison prompt."""
    n_ppo: int = Field(4000, ge=1, le=10_000_000)
    """PPO prompts."""
    n_eval: int = Field(200, ge=1, le=10_000_000)
    """Held-out prompts of the final evaluation."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the prompt generator (0 to 2**31 - 1)."""
    families: Annotated[tuple[str, ...] | None, FromList] = ("reverse", "add", "upper", "count", "repeat")
    """Instruction families (data.instruct.FAMILIES); null = all of them."""

    @field_validator("families")
    @classmethod
    def _families(cls, v):
        if v is not None:
            from data.instruct import FAMILIES

            bad = [f for f in v if f not in FAMILIES]
            if bad or not v:
                raise ValueError(f"unknown instruction families {bad}; choose from {list(FAMILIES)}")
        return v


class RLHFDataSpec(_Section):
    """Where an InstructGPT stage reads its datasets: files (JSONL/Parquet at any fsspec URI), or the built-in task.

    A file left null is written from the built-in task into ``dir`` (when
    ``builtin`` is set): demonstrations and prompts at once, comparisons by
    the RM stage from SFT samples ranked by the gold judge.
    """

    builtin: BuiltinTaskSpec | None = BuiltinTaskSpec()
    """The built-in task that fills in every file left null; null = every file the stage needs must be given."""
    dir: PathStr | None = None
    """Folder for the built-in task's files (default: <run_dir>/rlhf_data; a pipeline shares one)."""
    demonstrations: PathStr | None = None
    """SFT: {prompt, response} rows."""
    demonstrations_heldout: PathStr | None = None
    """SFT held-out loss: {prompt, response} rows (default: the last 5% of demonstrations)."""
    comparisons: PathStr | None = None
    """RM: {prompt, responses, ranking} or {prompt, chosen, rejected} rows."""
    comparisons_heldout: PathStr | None = None
    """RM held-out accuracy: comparison rows (default: the last 5% of comparisons)."""
    prompts: PathStr | None = None
    """PPO: {prompt} rows to sample on."""
    eval_prompts: PathStr | None = None
    """PPO evaluation and the pipeline report: held-out {prompt} rows."""

    def source_of(self, name: str) -> Literal["given", "builtin", "tail", "none"]:
        """Where dataset ``name`` comes from: the user's file, the built-in task, or the tail of the user's
        own pool file (a held-out set left null next to a given pool: never the built-in held-out set)."""
        if getattr(self, name):
            return "given"
        pool = HELD_OUT_OF.get(name)
        if pool is not None and getattr(self, pool):
            return "tail"
        return "builtin" if self.builtin is not None else "tail" if pool is not None else "none"


HELD_OUT_OF = {"demonstrations_heldout": "demonstrations", "comparisons_heldout": "comparisons",
               "eval_prompts": "prompts"}
"""Each held-out dataset of rlhf.data and the dataset whose tail it defaults to."""


class SFTStageSpec(_Section):
    response_only: bool = True
    """Loss on response tokens only (false: on the whole prompt + response)."""


class RMStageSpec(_Section):
    center_coef: float = Field(0.1, ge=0, le=1e6)
    """Weight of the term keeping each prompt's mean reward near zero (0 = the plain InstructGPT loss)."""
    n_bias: int = Field(512, ge=1, le=10_000_000)
    """Demonstrations scored to set the reward bias (their mean reward becomes 0)."""


class RLHFSpec(_Section):
    """Settings of the InstructGPT stages (kind: sft, rm, ppo)."""

    data: RLHFDataSpec = RLHFDataSpec()
    sft: SFTStageSpec = SFTStageSpec()
    rm: RMStageSpec = RMStageSpec()
    ppo: PPOConfig = PPOConfig()
    """PPO: the one PPO config (workers/rlhf/ppo_config.py), shared with the single-process reference."""
