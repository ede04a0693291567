"""What ``--json`` prints: valid JSON always, a non-finite number (a diverged loss) written as null.

Python's ``json.dumps`` writes ``NaN`` and ``Infinity``, which no strict JSON
parser (``jq``, JavaScript, Go) accepts; one diverged run would break every
script reading the output.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        return finite_or_null(value.item())
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` that refuses to write NaN/Infinity: they are nulls."""
    default = kwargs.pop("default", None)
    if default is not None:  # values the default turns into numbers are checked too
        value = json.loads(json.dumps(value, default=default))
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
