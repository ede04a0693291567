"""Labelled text for classification fine-tuning: users' files, and a built-in task that needs no download.

A user's rows are JSONL lines or Parquet rows at any fsspec URI (read with
``data.rlhf_files.iter_rows``), one example each; extra fields are ignored:

* ``{"text": str, "label": str | int}``, or
* ``{"text": str, "text_pair": str, "label": str | int}`` (sentence pairs).

Every row is checked and a bad one is refused in one line naming the file,
the row and the field (``RowError``): a missing or empty text, a label that
is neither a string nor an integer, a label outside ``classify.labels``, a
held-out label training never saw, an empty file.

The built-in task (``builtin_task``): which standard-library package a
docstring comes from (``asyncio``, ``email``, ``logging``, ...), from the
docstrings of this machine's Python (``data.corpus.docstrings_of``). A row
is held out exactly when a hash of its text falls in the first
``heldout_percent`` of 100 buckets, so the split is the same on every rank
and every run. Docstrings that occur in more than one package are dropped
(their label would be a coin toss), and each package keeps at most
``per_label`` of them, the first in file order, so the classes are near
balanced; the chance level is reported next to the accuracy.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from data.corpus import docstrings_of
from data.rlhf_files import RowError, iter_rows
from specs.errors import UserError

BUILTIN_PACKAGES = ("asyncio", "email", "importlib", "logging", "xml", "unittest", "http", "multiprocessing")
"""Standard-library packages of the built-in task: each has over 100 docstrings in Python 3.10 to 3.13."""


@dataclass(frozen=True)
class LabelledRow:
    """One classification example."""

    text: str
    text_pair: str | None
    """The second text of a sentence pair, or None."""
    label: str
    """The label as text (integers in a file become their decimal string)."""


def held_out(text: str, heldout_percent: int) -> bool:
    """Whether a row belongs to the held-out split: a hash of its text alone decides."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100 < heldout_percent


def _text(uri: str, n: int, row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(uri, n, name, "missing (rows are {text, label} or {text, text_pair, label})")
    if not isinstance(value, str):
        raise RowError(uri, n, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(uri, n, name, "empty")
    return value


def _label(uri: str, n: int, row: dict, labels: Sequence[str] | None) -> str:
    value = row.get("label")
    if value is None:
        raise RowError(uri, n, "label", "missing (rows are {text, label} or {text, text_pair, label})")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(uri, n, "label", f"expected a string or an integer, got {type(value).__name__}")
    label = str(value)
    if labels is not None and label not in labels:
        raise RowError(uri, n, "label", f"{label!r} is not one of classify.labels {list(labels)}")
    return label


def read_labelled(uri: str, labels: Sequence[str] | None = None) -> list[LabelledRow]:
    """Validated rows of one JSONL or Parquet file; ValueError (one line) on the first bad row or no rows."""
    out = []
    for n, row in iter_rows(uri):
        if not isinstance(row, dict):
            raise RowError(uri, n, "(row)", f"expected an object with named fields, got {type(row).__name__}")
        pair = _text(uri, n, row, "text_pair") if row.get("text_pair") is not None else None
        out.append(LabelledRow(_text(uri, n, row, "text"), pair, _label(uri, n, row, labels)))
    if not out:
        raise ValueError(f"{uri}: no rows; a labelled file needs at least one {{text, label}} row")
    return out


def check_held_out_labels(rows: list[LabelledRow], known: Sequence[str], where: str) -> None:
    """Refuse held-out rows whose label training never saw (no class id to score them against)."""
    unknown = sorted({r.label for r in rows} - set(known))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]} never occur in the training rows {list(known)[:8]}; "
                         "give classify.labels or train on rows with them")


# ----------------------------------------------------------------------------- the built-in task


def _package_files(package: str) -> list[str]:
    root = os.path.join(sysconfig.get_paths()["stdlib"], package)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def builtin_task(packages: Sequence[str], per_label: int, heldout_percent: int
                 ) -> tuple[list[LabelledRow], list[LabelledRow]]:
    """(train rows, held-out rows) of the docstring-package task; ValueError naming a package with no docstrings."""
    docs = {p: list(dict.fromkeys(docstrings_of(_package_files(p)))) for p in packages}
    empty = [p for p, d in docs.items() if not d]
    if empty:
        raise ValueError(f"classify.builtin_packages: {empty} have no docstrings in this Python's standard library")
    seen = Counter(text for d in docs.values() for text in d)
    rows = [LabelledRow(text, None, p) for p in packages for text in
            [t for t in docs[p] if seen[t] == 1][:per_label]]
    train = [r for r in rows if not held_out(r.text, heldout_percent)]
    held = [r for r in rows if held_out(r.text, heldout_percent)]
    return train, held


def chance_level(rows: list[LabelledRow]) -> float:
    """Accuracy of always answering the most common label of ``rows``."""
    return max(Counter(r.label for r in rows).values()) / len(rows) if rows else 0.0


# ----------------------------------------------------------------------------- a spec's rows


def classify_rows(c) -> tuple[list[LabelledRow], list[LabelledRow], tuple[str, ...]]:
    """(training rows, held-out rows, labels in class-id order) of a spec's ``classify`` section; UserError in
    one line (the runner calls it before any worker starts)."""
    try:
        if c.train_file is None:
            train, held = builtin_task(c.builtin_packages, c.per_label, c.heldout_percent)
        elif c.heldout_file is not None:
            train, held = read_labelled(c.train_file, c.labels), read_labelled(c.heldout_file, c.labels)
        else:
            rows = read_labelled(c.train_file, c.labels)
            train = [r for r in rows if not held_out(r.text, c.heldout_percent)]
            held = [r for r in rows if held_out(r.text, c.heldout_percent)]
        labels = c.labels or tuple(sorted({r.label for r in train}))
        check_held_out_labels(held, labels, c.heldout_file or c.train_file or "classify.builtin_packages")
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if not train or not held:
        which = "training" if not train else "held-out"
        raise UserError(f"classify.heldout_percent: no {which} rows are left of {len(train) + len(held)}; "
                        "give more rows, another heldout_percent or a classify.heldout_file")
    if len(labels) < 2:
        raise UserError(f"classify.train_file: every training row has the label {labels[0]!r}; "
                        "a classifier needs at least two labels")
    return train, held, labels
