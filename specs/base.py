"""What every spec section shares: the strict base model, checked path strings, the one-line spec error
and the bounds of counts and seeds."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from specs.errors import UsageError

SEED_MAX = (1 << 31) - 1
"""Largest seed: seeds are mixed (seed x 1_000_003 + step x 1009 + rank) into torch's 64-bit generator seeds."""
BIG = 10**12
"""Upper bound of counts (steps, tokens per eval, intervals): far past any real run, far inside int64."""


def _plain_text(v: str | None) -> str | None:
    """Paths and names: no control characters (a NUL makes every OS call fail), at most 4096 characters."""
    if v is not None and (len(v) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in v)):
        raise ValueError("must be at most 4096 characters with no control characters (NUL, newline, ...)")
    return v


PathStr = Annotated[str, AfterValidator(_plain_text)]
"""A path or URI field of the spec (checked against cluster.yaml's roots at submit: specs.paths)."""

FromList = BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
"""For a tuple field: YAML and JSON give lists, which strict validation would refuse."""


class SpecError(UsageError):
    """A spec that cannot run: one line naming the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
