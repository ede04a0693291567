"""The records of the InstructGPT datasets: a demonstration (SFT) and a ranked comparison (RM).

Plain frozen values that the file loaders (``data/rlhf_files.py``) and the
built-in task (``data/instruct.py``) both build.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    """Instruction text, everything the model sees before its answer."""
    response: str
    """The demonstrated answer."""


@dataclass(frozen=True)
class Comparison:
    prompt: str
    """Instruction text shared by all responses."""
    responses: tuple[str, ...]
    """K >= 2 candidate answers, in any order."""
    ranking: tuple[int, ...]
    """Indices into ``responses``, best first: a permutation of 0..K-1."""

    @property
    def ranked(self) -> list[str]:
        """Responses from best to worst."""
        return [self.responses[i] for i in self.ranking]
