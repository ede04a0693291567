"""RLHF dataset files: documented formats at any fsspec URI, JSONL or Parquet.

A user brings their own data as files, never code. Three kinds, one object
(JSONL line or Parquet row) per example; extra fields are ignored:

* demonstrations (SFT):  ``{"prompt": str, "response": str}``
* comparisons (RM), either a K-way ranking
  ``{"prompt": str, "responses": [str, ...K], "ranking": [int, ...K]}``
  with ``ranking`` the indices into ``responses`` from best to worst, or a pair
  ``{"prompt": str, "chosen": str, "rejected": str}`` (read as K = 2);
* prompts (PPO, evaluation):  ``{"prompt": str}``; evaluation prompts may also carry
  ``"reference"``: one string or a list of acceptable answers (``read_eval_prompts``).

The format follows the file name: ``.jsonl`` (optionally ``.jsonl.gz``, any
fsspec compression) or ``.parquet``. Loaders check every row, and a bad row
raises ``ValueError("<uri>: row <n>: field '<name>': <what is wrong>")`` on
one line; rows count from 1 (the line number for JSONL).

The pipeline writes its built-in task (``data.instruct``) with the same
writers into the run directory and reads it back with the same loaders, so
the built-in and a user's data take one path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import fsspec

from data import instruct
from data.records import Comparison, Demonstration

FORMATS = ("jsonl", "parquet")


# ----------------------------------------------------------------------------- raw rows


def file_format(uri: str) -> str:
    """'jsonl' or 'parquet' from the file name (compression suffixes ignored for JSONL)."""
    name = uri.lower()
    if name.endswith(".parquet"):
        return "parquet"
    stem = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] in fsspec.utils.compressions else name
    if stem.endswith(".jsonl"):
        return "jsonl"
    raise ValueError(f"{uri}: unknown dataset format; name the file *.jsonl or *.parquet")


def _one_line(value: Any, limit: int = 60) -> str:
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RowError(ValueError):
    """A malformed dataset row; the message names the file, row and field."""

    def __init__(self, uri: str, row: int, field: str, what: str):
        super().__init__(f"{uri}: row {row}: field {field!r}: {what}")
        self.uri, self.row, self.field = uri, row, field


def iter_rows(uri: str) -> Iterator[tuple[int, Any]]:
    """(row number from 1, raw row) of a JSONL or Parquet file."""
    fmt = file_format(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such dataset file")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read()  # pq.read_table would import pandas
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with fsspec.open(uri, "rb", compression="infer") as f:
        offset = 0
        for i, raw in enumerate(f, start=1):
            at, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # refused, never patched: the file and the byte are named
                raise RowError(uri, i, "(row)", f"invalid UTF-8 at byte {at + e.start}; re-encode the file "
                                                "as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(uri, i, "(row)", f"not valid JSON ({e.msg} at column {e.colno})") from None
            yield i, row


def write_rows(uri: str, rows: Iterable[dict]) -> str:
    """Write dict rows as JSONL or Parquet (by the name), creating parent folders; returns ``uri``.

    The file appears whole or not at all: rows go to a hidden sibling that is renamed at the end.
    """
    fmt = file_format(uri)
    rows = list(rows)
    fs, path = fsspec.core.url_to_fs(uri)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{os.getpid()}-{name}" if parent else f".tmp-{os.getpid()}-{name}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fs.open(tmp, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    else:
        with fsspec.open(fs.unstrip_protocol(tmp), "wt", compression=fsspec.utils.infer_compression(name),
                         encoding="utf-8", **fs.storage_options) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fs.mv(tmp, path)
    return uri


# ----------------------------------------------------------------------------- validated loaders


def _object(uri: str, n: int, row: Any) -> dict:
    if not isinstance(row, dict):
        raise RowError(uri, n, "(row)", f"expected an object with named fields, got {type(row).__name__}")
    return row


def _text(uri: str, n: int, row: dict, name: str, allow_empty: bool = True) -> str:
    if name not in row or row[name] is None:
        raise RowError(uri, n, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(uri, n, name, f"expected a string, got {type(value).__name__} {_one_line(value)}")
    if not allow_empty and not value.strip():
        raise RowError(uri, n, name, "empty")
    return value


MAX_RESPONSES = 64
"""Most responses one comparison row may rank (K; a row's K-choose-2 pairs share one batch element)."""


def _comparison(uri: str, n: int, row: dict) -> Comparison:
    prompt = _text(uri, n, row, "prompt", allow_empty=False)
    if "responses" not in row and "chosen" not in row:
        raise RowError(uri, n, "responses", "missing (give 'responses' + 'ranking', or 'chosen' + 'rejected')")
    if "responses" in row and "chosen" in row:
        raise RowError(uri, n, "chosen", "a row has either 'responses' + 'ranking' or 'chosen' + 'rejected', not both")
    if "chosen" in row:
        chosen = _text(uri, n, row, "chosen")
        rejected = _text(uri, n, row, "rejected")
        return Comparison(prompt, (chosen, rejected), (0, 1))
    responses = row["responses"]
    if not isinstance(responses, (list, tuple)):
        raise RowError(uri, n, "responses", f"expected a list of strings, got {type(responses).__name__}")
    if len(responses) < 2:
        raise RowError(uri, n, "responses", f"need at least 2 responses to rank, got {len(responses)}")
    if len(responses) > MAX_RESPONSES:  # all K-choose-2 pairs of a row train in one batch element
        raise RowError(uri, n, "responses", f"at most {MAX_RESPONSES} responses per row, got {len(responses)}")
    for j, r in enumerate(responses):
        if not isinstance(r, str):
            raise RowError(uri, n, "responses", f"item {j} is {type(r).__name__} {_one_line(r)}, not a string")
    if "ranking" not in row or row["ranking"] is None:
        raise RowError(uri, n, "ranking", "missing")
    ranking = row["ranking"]
    ok = isinstance(ranking, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not ok or sorted(ranking) != list(range(len(responses))):
        raise RowError(uri, n, "ranking", f"must list each index 0..{len(responses) - 1} once, best first; "
                                          f"got {_one_line(ranking)}")
    return Comparison(prompt, tuple(responses), tuple(ranking))


def read_demonstrations(uri: str) -> list[Demonstration]:
    """Validated ``{prompt, response}`` rows."""
    out = []
    for n, row in iter_rows(uri):
        row = _object(uri, n, row)
        out.append(Demonstration(_text(uri, n, row, "prompt", allow_empty=False),
                                 _text(uri, n, row, "response", allow_empty=False)))
    return _non_empty(uri, out)


def read_comparisons(uri: str) -> list[Comparison]:
    """Validated ranking rows or chosen/rejected rows (both may appear in one file)."""
    return _non_empty(uri, [_comparison(uri, n, _object(uri, n, row)) for n, row in iter_rows(uri)])


def read_prompts(uri: str) -> list[str]:
    """Validated ``{prompt}`` rows."""
    out = [_text(uri, n, _object(uri, n, row), "prompt", allow_empty=False) for n, row in iter_rows(uri)]
    return _non_empty(uri, out)


def _references(uri: str, n: int, row: dict) -> tuple[str, ...] | None:
    """A row's acceptable answers: ``reference`` as one string or a list of strings; None when absent."""
    value = row.get("reference")
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(uri, n, "reference", f"expected a string or a non-empty list of strings, got {_one_line(value)}")
    for j, r in enumerate(value):
        if not isinstance(r, str):
            raise RowError(uri, n, "reference", f"item {j} is {type(r).__name__} {_one_line(r)}, not a string")
    return tuple(value)


def read_eval_prompts(uri: str) -> list[tuple[str, tuple[str, ...] | None]]:
    """Validated ``{prompt, reference?}`` rows: (prompt, its acceptable answers or None) per row.

    ``reference`` (optional) is one string or a list of acceptable answers; the report judges the
    policies' responses against it (exact match and token F1).
    """
    out = []
    for n, row in iter_rows(uri):
        row = _object(uri, n, row)
        out.append((_text(uri, n, row, "prompt", allow_empty=False), _references(uri, n, row)))
    return _non_empty(uri, out)


def _non_empty(uri: str, rows: list) -> list:
    if not rows:
        raise ValueError(f"{uri}: dataset file has no rows")
    return rows


# ----------------------------------------------------------------------------- writers


def write_demonstrations(uri: str, rows: Iterable[Demonstration]) -> str:
    return write_rows(uri, ({"prompt": d.prompt, "response": d.response} for d in rows))


def write_comparisons(uri: str, rows: Iterable[Comparison], pairwise: bool = False) -> str:
    """Ranking rows, or (``pairwise``) one chosen/rejected row per best-vs-worst pair."""
    if pairwise:
        return write_rows(uri, ({"prompt": c.prompt, "chosen": c.ranked[0], "rejected": c.ranked[-1]}
                                for c in rows))
    return write_rows(uri, ({"prompt": c.prompt, "responses": list(c.responses), "ranking": list(c.ranking)}
                            for c in rows))


def write_prompts(uri: str, prompts: Iterable[str]) -> str:
    return write_rows(uri, ({"prompt": p} for p in prompts))


@dataclass(frozen=True)
class BuiltinDataConfig:
    """Sizes of the built-in instruction task's datasets."""

    n_sft: int = 4000
    """Demonstrations (train prompts)."""
    demo_noise: float = 0.3
    """Share of demonstrations with a corrupted answer (careless demonstrators)."""
    n_rm: int = 4000
    """Ranked comparisons for RM training (train prompts)."""
    n_rm_heldout: int = 300
    """Ranked comparisons on held-out prompts, for RM accuracy."""
    k: int = 4
    """Responses per comparison."""
    min_gap: float = 0.15
    """Least gold-score difference between two responses of one comparison."""
    model_share: float = 0.5
    """Share of each comparison's responses taken from the sampler (the SFT model) when one is given."""
    n_samples: int = 4
    """Samples drawn from the sampler per comparison prompt."""
    n_ppo: int = 4000
    """PPO prompts (train prompts from a second stream)."""
    n_eval: int = 200
    """Held-out prompts for the final evaluation."""
    seed: int = 0
    """Seed of the prompt generator (data.instruct.TaskConfig.seed)."""
    families: tuple[str, ...] | None = None
    """Instruction families to draw (data.instruct.FAMILIES); None = all."""
    fmt: str = "jsonl"
    """File format: 'jsonl' or 'parquet'."""

    def task(self, seed_offset: int = 0):
        """The data.instruct.TaskConfig of one prompt stream."""
        families = instruct.FAMILIES if self.families is None else tuple(self.families)
        return instruct.TaskConfig(seed=self.seed + seed_offset, families=families)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"data.fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.k < 2:
            raise ValueError(f"data.k must be at least 2, got {self.k}")
        if not 0.0 <= self.demo_noise < 1.0:
            raise ValueError(f"data.demo_noise must be in [0, 1), got {self.demo_noise}")
        if not 0.0 <= self.model_share <= 1.0:
            raise ValueError(f"data.model_share must be in [0, 1], got {self.model_share}")
        if self.families is not None:
            self.task()  # validates the families (None, all of them, needs no check)


@dataclass(frozen=True)
class RLHFDataFiles:
    """Where one pipeline's datasets live (URIs)."""

    sft_train: str
    """Demonstrations for SFT."""
    rm_train: str
    """Comparisons for reward-model training."""
    rm_heldout: str
    """Comparisons on held-out prompts, for RM pairwise accuracy."""
    ppo_prompts: str
    """Prompts PPO generates on."""
    eval_prompts: str
    """Held-out prompts for the final gold-judge evaluation."""

    @classmethod
    def under(cls, root: str, fmt: str = "jsonl") -> "RLHFDataFiles":
        """The standard file names under a run directory."""
        root = root.rstrip("/")
        return cls(*(f"{root}/{name}.{fmt}" for name in
                     ("sft_train", "rm_train", "rm_heldout", "ppo_prompts", "eval_prompts")))


def write_builtin_prompts(root: str, cfg: BuiltinDataConfig = BuiltinDataConfig()) -> RLHFDataFiles:
    """Write the built-in task's demonstrations, PPO prompts and evaluation prompts under ``root``.

    Demonstrations and PPO prompts use train-split prompts, evaluation prompts
    the held-out split (``data.instruct``). Comparisons come separately
    (``write_builtin_comparisons``) because they may need the SFT model.
    """
    files = RLHFDataFiles.under(root, cfg.fmt)
    task = cfg.task()
    write_demonstrations(files.sft_train, instruct.demonstrations(cfg.n_sft, "train", task, cfg.demo_noise))
    # PPO prompts: a second train-split stream, so they meet the SFT prompts only by chance.
    write_prompts(files.ppo_prompts, instruct.make_prompts(cfg.n_ppo, "train", cfg.task(1)))
    write_prompts(files.eval_prompts, instruct.make_prompts(cfg.n_eval, "heldout", task))
    return files


def builtin_comparisons(cfg: BuiltinDataConfig = BuiltinDataConfig(), sampler=None
                        ) -> tuple[list[Comparison], list[Comparison]]:
    """Ranked comparisons (train, held-out) of the built-in task.

    ``sampler`` (``data.instruct.Sampler``, e.g. the SFT model) contributes
    ``cfg.model_share`` of each prompt's responses; the judge ranks them.
    """
    task = cfg.task()
    opts = dict(sampler=sampler, model_share=cfg.model_share, n_samples=cfg.n_samples, min_gap=cfg.min_gap)
    train = instruct.comparisons(cfg.n_rm, cfg.k, "train", task, seed=1, **opts)
    # Held-out RM prompts come from a second held-out stream, apart from the evaluation prompts' one.
    heldout = instruct.comparisons(cfg.n_rm_heldout, cfg.k, "heldout", cfg.task(1), seed=2, **opts)
    return train, heldout


def write_builtin_comparisons(root: str, cfg: BuiltinDataConfig = BuiltinDataConfig(),
                              sampler=None) -> RLHFDataFiles:
    """Write ranked comparisons (train and held-out, ``builtin_comparisons``) under ``root``."""
    files = RLHFDataFiles.under(root, cfg.fmt)
    train, heldout = builtin_comparisons(cfg, sampler)
    write_comparisons(files.rm_train, train)
    write_comparisons(files.rm_heldout, heldout)
    return files
