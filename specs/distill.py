"""The ``distill:`` section of a job spec (kind: distill): the teacher and the weights of the triple loss.

Its own module so that ``specs/job.py`` only names it; the kind itself is
``workers/distill.py``.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _plain_path(v: str | None) -> str | None:
    if v is not None and (not v or len(v) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in v)):
        raise ValueError("must be 1 to 4096 characters with no control characters (NUL, newline, ...)")
    return v


class DistillSpec(BaseModel):
    """DistilBERT's recipe (Sanh et al. 2019): loss = alpha_kd x KD + alpha_lm x LM + alpha_cos x cosine.

    The defaults are DistilBERT's (5, 2, 1 at temperature 2).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    teacher: Annotated[str, AfterValidator(_plain_path)] | None = None
    """The frozen teacher: a finished run's directory, a checkpoint folder, or a Hugging Face folder."""
    temperature: float = Field(2.0, gt=0, le=100)
    """T of the softened distributions softmax(z / T); the KL is scaled by T**2."""
    alpha_kd: float = Field(5.0, ge=0, le=1e6)
    """Weight of KL(teacher_T || student_T) x T**2, over every position."""
    alpha_lm: float = Field(2.0, ge=0, le=1e6)
    """Weight of the student's own loss: masked LM (encoders) or next-token LM (decoders)."""
    alpha_cos: float = Field(1.0, ge=0, le=1e6)
    """Weight of 1 - cos(student, teacher) of the last hidden states; needs equal widths (0 = off)."""
    init_from_teacher: bool = True
    """Start the student from every other layer of the teacher (when all shapes but the depth match)."""


def distill_combinations(spec) -> None:
    """What a distill job needs beyond the other sections' own checks; ValueError naming the field."""
    d, m, p = spec.distill, spec.model, spec.parallel
    if not d.teacher:
        raise ValueError("distill.teacher: give the teacher's run directory, checkpoint folder or Hugging Face "
                         "folder")
    if m.family == "electra":
        raise ValueError("model.family: distill trains a plain encoder or decoder student, not electra")
    if p.pp > 1:
        raise ValueError("parallel.pp: distill runs data-parallel students (no pipeline stages)")
    if m.init_from:
        raise ValueError("model.init_from: a distill student starts from its teacher (distill.init_from_teacher) "
                         "or from scratch; leave model.init_from out")
    if d.alpha_kd + d.alpha_lm + d.alpha_cos == 0:
        raise ValueError("distill.alpha_kd: at least one of alpha_kd, alpha_lm and alpha_cos must be > 0")
