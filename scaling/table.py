"""The results table of a scaling-law sweep: one Parquet row per finished run.

Each run writes its own small file, ``<sweep_dir>/results/<run_id>.parquet``,
so a crash while one run reports cannot damage the rows of the others, and
runs finishing at the same time never write the same file. A row is written
to a temporary name beside its final one and then renamed: on a local or
POSIX filesystem the rename is atomic, so a reader sees the whole row or
none of it. On object stores (s3://, gs://) a single PUT is already all or
nothing; fsspec's rename there is copy + delete, and readers skip the
dot-named temporary. ``read_results`` concatenates the rows.

Paths are fsspec URIs, so the sweep can live anywhere the job storage does.
"""
from __future__ import annotations

import io
import posixpath
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS_DIR = "results"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Column name, Arrow type, nullable, and what it holds (stored as field metadata).
_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("run_id", pa.string(), False, "Run name within the sweep, e.g. c1e12-n123456."),
    ("family", pa.string(), False, "Decoder family: gpt2, llama or palm."),
    ("n_params", pa.int64(), False, "Total parameters N (embeddings included), Chinchilla's N."),
    ("n_params_non_embedding", pa.int64(), False, "Parameters without the vocabulary-sized matrices (Kaplan's N)."),
    ("tokens", pa.int64(), False, "Training tokens D actually seen."),
    ("flops_6nd", pa.float64(), False, "6 * n_params * tokens."),
    ("flops_6nd_non_embedding", pa.float64(), False, "6 * n_params_non_embedding * tokens."),
    ("flops_with_attention", pa.float64(), False, "(6N + 12 * layers * heads * head_dim * seq_len) * tokens."),
    ("final_loss", pa.float64(), False, "Training loss at the end of the run (nats per token)."),
    ("held_out_loss", pa.float64(), True, "Loss on held-out tokens after training, if evaluated."),
    ("curve_path", pa.string(), True, "URI of the run's metrics.jsonl (per-step loss curve)."),
    ("spec_hash", pa.string(), False, "Hash of the run's job spec, to tell reruns with changed settings apart."),
]

SCHEMA = pa.schema([pa.field(name, typ, nullable=nullable, metadata={"doc": doc})
                    for name, typ, nullable, doc in _COLUMNS])
"""Arrow schema of the results table; every row file has exactly these columns."""

COLUMNS = tuple(name for name, *_ in _COLUMNS)


def make_row(*, run_id: str, family: str, n_params: int, n_params_non_embedding: int, tokens: int,
             attention_flops_per_token: float, final_loss: float, spec_hash: str,
             held_out_loss: float | None = None, curve_path: str | None = None) -> dict[str, Any]:
    """A results row with its three FLOP columns derived here, in one place.

    ``attention_flops_per_token`` is the attention score/value term
    12 * n_layers * n_heads * head_dim * seq_len (PaLM's MFU formula); it is
    ``flops_per_token(cfg)['with_attention'] - flops_per_token(cfg)['6N']``.
    """
    return {
        "run_id": run_id,
        "family": family,
        "n_params": int(n_params),
        "n_params_non_embedding": int(n_params_non_embedding),
        "tokens": int(tokens),
        "flops_6nd": 6.0 * n_params * tokens,
        "flops_6nd_non_embedding": 6.0 * n_params_non_embedding * tokens,
        "flops_with_attention": (6.0 * n_params + attention_flops_per_token) * tokens,
        "final_loss": float(final_loss),
        "held_out_loss": None if held_out_loss is None else float(held_out_loss),
        "curve_path": curve_path,
        "spec_hash": spec_hash,
    }


def results_path(sweep_dir: str, run_id: str) -> str:
    """Where a run's row lives: ``<sweep_dir>/results/<run_id>.parquet``."""
    return posixpath.join(sweep_dir.rstrip("/"), RESULTS_DIR, f"{run_id}.parquet")


def _check_row(row: dict[str, Any]) -> None:
    missing = [c for c in COLUMNS if c not in row]
    unknown = [c for c in row if c not in COLUMNS]
    if missing or unknown:
        raise ValueError(f"results row: missing columns {missing}, unknown columns {unknown}; "
                         "build rows with sweep_table.make_row")
    if not RUN_ID_RE.match(str(row["run_id"])):
        raise ValueError(f"results row: run_id {row['run_id']!r} is not filesystem-safe "
                         "(letters, digits, '.', '_', '-')")
    for c, (_, _, nullable, _) in zip(COLUMNS, _COLUMNS):
        if row[c] is None and not nullable:
            raise ValueError(f"results row: column {c!r} may not be empty")


def append_row(table_dir_or_path: str, row: dict[str, Any]) -> str:
    """Write one run's row atomically and return its URI.

    ``table_dir_or_path`` is a sweep directory (the row goes to
    ``results/<run_id>.parquet`` under it) or an exact ``.parquet`` path.
    Writing the same run again replaces its row (a rerun's result wins).
    """
    _check_row(row)
    target = (table_dir_or_path if table_dir_or_path.endswith(".parquet")
              else results_path(table_dir_or_path, row["run_id"]))
    fs, path = fsspec.core.url_to_fs(target)
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), buf)
    # Dot-named temporary in the same directory: the rename stays on one filesystem and readers skip it.
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    fs.pipe_file(tmp, buf.getvalue())
    try:
        fs.mv(tmp, path)
    except BaseException:
        fs.rm(tmp)
        raise
    return target


def read_results(sweep_dir: str) -> pa.Table:
    """All rows under ``<sweep_dir>/results/``, sorted by run_id; an empty table if none yet."""
    fs, path = fsspec.core.url_to_fs(sweep_dir)
    pattern = posixpath.join(path.rstrip("/"), RESULTS_DIR, "*.parquet")
    files = sorted(p for p in fs.glob(pattern) if not posixpath.basename(p).startswith("."))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).select(list(COLUMNS)).cast(SCHEMA))
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("run_id")
