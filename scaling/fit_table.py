"""Reading a results table for the fits: a sweep directory or any CSV/Parquet table, into a ``FitTable``.

Input is a sweep directory (its ``results/*.parquet`` rows, see
``scaling.table``) or any CSV/Parquet table with a column for the
model size N, one for tokens D or compute C (D = C / (6N) when only C is
given) and one for the loss; column names are matched case-insensitively
against common aliases. If the table names per-run loss curves
(``curve_path`` to a metrics.jsonl), approach 1 uses them; otherwise it uses
the final losses.

A user's table with a non-finite or non-positive value, N or D out of range,
or fewer than two distinct N or D is refused in one line (exit code 2) before
anything is written; a sweep directory's runs without a finite loss (diverged
or never evaluated) are left out with a note.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import numpy as np

from scaling.fit import Curve, point_problem
from specs.errors import UsageError
N_ALIASES = ("n", "params", "n_params", "num_params", "parameters", "model_size")
D_ALIASES = ("d", "tokens", "n_tokens", "num_tokens", "train_tokens", "data")
C_ALIASES = ("c", "flops", "compute", "flops_6nd", "c_6nd")
# Held-out loss before training loss: on a small corpus runs can repeat data, and held-out is the honest one.
LOSS_ALIASES = ("loss", "held_out_loss", "final_loss", "eval_loss", "val_loss", "validation_loss", "train_loss")
RUN_ALIASES = ("run_id", "run", "name")
MIN_POINTS = 6
"""Approach 3 has 5 parameters: fewer than 6 runs cannot constrain it."""


@dataclass(frozen=True)
class FitTable:
    """Runs ready to fit: one row per run."""

    source: str
    """Where the table came from."""
    n: np.ndarray
    """Total parameters N per run."""
    d: np.ndarray
    """Training tokens D per run."""
    loss: np.ndarray
    """Final loss per run."""
    run_id: tuple[str, ...]
    """Run names (row numbers if the table has none)."""
    columns: dict[str, str]
    """Role (n, d, c, loss) -> the column used."""
    curves: tuple[Curve, ...] | None = None
    """Per-run training curves, when every run's curve could be read."""
    notes: tuple[str, ...] = ()
    """What was dropped or assumed while reading."""

    @property
    def c(self) -> np.ndarray:
        return 6.0 * self.n * self.d


def _fail(path: str, what: str) -> UsageError:
    return UsageError(f"fit: {path}: {what}")


def _read_arrow(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from scaling.table import read_results

    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise _fail(path, "no such file or directory; give a sweep directory or a .csv/.parquet table")
    if fs.isdir(p):
        table = read_results(path)
        if table.num_rows == 0:
            raise _fail(path, "no results/*.parquet rows in this directory; run the sweep first or give a table file")
        return table
    lower = p.lower()
    try:
        with fs.open(p, "rb") as f:
            if lower.endswith((".csv", ".tsv", ".txt")):
                opts = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
                return pacsv.read_csv(f, parse_options=opts)
            if lower.endswith((".parquet", ".pq")):
                return pq.read_table(f)
    except Exception as err:  # pyarrow raises several types for malformed files
        raise _fail(path, f"could not be read as a table ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    raise _fail(path, "unknown format; give a .csv, .tsv or .parquet file or a sweep directory")


def _find(names: list[str], aliases: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[a] for a in aliases if a in lower), None)


def _numeric(table, column: str, path: str) -> np.ndarray:
    import pyarrow as pa

    try:
        return np.asarray(table.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise _fail(path, f"column {column!r} is not numeric") from None


def _read_curve(uri: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, loss) from a metrics.jsonl; rows without both fields (eval rows, ...) are skipped."""
    tokens, losses = [], []
    try:
        with fsspec.open(uri, "r") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                t = next((row[k] for k in ("tokens", "tokens_seen", "train_tokens") if k in row), None)
                y = next((row[k] for k in ("loss", "train_loss") if k in row), None)
                if t is not None and y is not None:
                    tokens.append(float(t))
                    losses.append(float(y))
    except (OSError, ValueError):
        return None
    return (np.array(tokens), np.array(losses)) if tokens else None


def load_table(path: str, loss_column: str | None = None) -> FitTable:
    """Read a sweep directory or a CSV/Parquet table into runs to fit; UsageError on bad input."""
    table = _read_arrow(path)
    names = list(table.column_names)
    found = ", ".join(names) or "none"
    n_col = _find(names, N_ALIASES)
    if n_col is None:
        raise _fail(path, f"no model-size column (looked for {', '.join(N_ALIASES)}; found {found}); rename one")
    d_col, c_col = _find(names, D_ALIASES), _find(names, C_ALIASES)
    if d_col is None and c_col is None:
        raise _fail(path, f"no tokens or compute column (looked for {', '.join(D_ALIASES + C_ALIASES)}; "
                          f"found {found}); rename one")
    if loss_column is not None:
        loss_col = _find(names, (loss_column.lower(),))
        if loss_col is None:
            raise _fail(path, f"no column {loss_column!r} (found {found}); check --loss-column")
    else:
        # The first alias present with at least one value (held_out_loss may be empty if never evaluated).
        loss_col = next((c for a in LOSS_ALIASES if (c := _find(names, (a,))) is not None
                         and table.column(c).null_count < table.num_rows), None)
        if loss_col is None:
            raise _fail(path, f"no loss column with values (looked for {', '.join(LOSS_ALIASES)}; found {found}); "
                              "rename one or pass --loss-column")
    n = _numeric(table, n_col, path)
    loss = _numeric(table, loss_col, path)
    columns = {"n": n_col, "loss": loss_col}
    if d_col is not None:
        d = _numeric(table, d_col, path)
        columns["d"] = d_col
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            d = _numeric(table, c_col, path) / (6.0 * n)
        columns["c"] = c_col
    run_col = _find(names, RUN_ALIASES)
    run_ids = ([str(v) for v in table.column(run_col).to_pylist()] if run_col
               else [f"row{i}" for i in range(table.num_rows)])
    notes = []
    if d_col is None:
        notes.append(f"tokens derived as D = {c_col} / (6 * {n_col})")
    good = np.ones(n.size, dtype=bool)
    fs, p = fsspec.core.url_to_fs(path)
    if fs.isdir(p):
        # A sweep's own table: a run that diverged or was never evaluated has no usable loss; leave it out
        # and say so. Anything else wrong in a sweep's rows, and anything wrong in a user's table, is refused.
        good = np.isfinite(loss)
        if (~good).any():
            notes.append(f"dropped {int((~good).sum())} runs with no finite {loss_col} "
                         f"({', '.join(run_ids[i] for i in np.flatnonzero(~good)[:5])})")
    keep = np.flatnonzero(good)
    problem = point_problem(n[keep], d[keep], loss[keep], [f"run {run_ids[i]!r}" if run_col else f"data row {i + 1}"
                                                          for i in keep])
    if problem is not None:
        raise _fail(path, f"{problem}; fix or remove those rows")
    if good.sum() < MIN_POINTS:
        raise _fail(path, f"{int(good.sum())} usable runs, need at least {MIN_POINTS} "
                          "(L(N, D) has 5 parameters); add runs to the sweep")
    curves = None
    curve_col = _find(names, ("curve_path",))
    if curve_col is not None:
        uris = table.column(curve_col).to_pylist()
        read = [(_read_curve(uris[i]) if uris[i] else None) for i in keep]
        if all(r is not None for r in read):
            curves = tuple(Curve(float(n[i]), r[0], r[1], run_ids[i]) for i, r in zip(keep, read))
        else:
            notes.append(f"{sum(r is None for r in read)} loss curves missing or unreadable: "
                         "approach 1 uses final losses")
    return FitTable(path, n[keep], d[keep], loss[keep], tuple(run_ids[i] for i in keep), columns, curves,
                    tuple(notes))
