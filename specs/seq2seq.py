"""The ``data.noising`` section: how the encoder-decoder families (t5, bart) corrupt their inputs.

Defaults are the papers': T5's span corruption at noise density 0.15 with
mean span length 3; BART's text infilling (30% of tokens in Poisson(3)
spans) plus sentence permutation. The functions themselves are in
``data/noising.py``.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NoisingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_density: float = Field(0.15, gt=0, lt=1)
    """t5: share of each window's tokens that become noise spans."""
    mean_span_length: float = Field(3.0, ge=1, le=1000)
    """t5: mean length of a noise span."""
    mask_ratio: float = Field(0.3, ge=0, lt=1)
    """bart text infilling: share of tokens inside masked spans (0 = off)."""
    poisson_lambda: float = Field(3.0, gt=0, le=100)
    """bart text infilling: mean span length (Poisson)."""
    permute_sentences: bool = True
    """bart: shuffle the sentences of each window."""
    delete_ratio: float = Field(0.0, ge=0, lt=1)
    """bart token deletion: share of tokens removed (0 = off)."""
    rotate: bool = False
    """bart document rotation: start each window at a random token."""

    def bart(self):
        """As a ``data.noising.BartNoise``."""
        from data.noising import BartNoise

        return BartNoise(mask_ratio=self.mask_ratio, poisson_lambda=self.poisson_lambda,
                         permute_sentences=self.permute_sentences, delete_ratio=self.delete_ratio, rotate=self.rotate)
