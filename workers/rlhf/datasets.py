"""The datasets of the InstructGPT stages: which files a stage reads, the built-in task written on first use,
held-out splits, rows that fit the model, and the held-out measures the stages and the evaluator share.

Datasets are files (``spec.rlhf.data``: JSONL/Parquet at any fsspec URI) or
the built-in task, written into ``rlhf.data.dir`` by rank 0 the first time a
stage needs them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from data.rlhf_files import (BuiltinDataConfig, Comparison, Demonstration, RLHFDataFiles, builtin_comparisons,
                             read_comparisons, read_demonstrations, read_prompts, write_builtin_prompts,
                             write_comparisons, write_demonstrations)
from models.generate import SamplingConfig
from specs.errors import UserError
from workers.metrics import all_sum
from workers.rlhf import ppo_math as pm
from workers.rlhf.steps import comparison_batch, encode_pair, sample_responses, sft_batch

log = logging.getLogger(__name__)

HELDOUT_SHARE = 0.05
"""Share of a dataset held out (its tail) when no held-out file is given."""


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class StageFiles:
    """The dataset URIs of a stage; None = not given (held-out sets then come from the tail)."""

    demonstrations: str | None
    demonstrations_heldout: str | None
    comparisons: str | None
    comparisons_heldout: str | None
    prompts: str | None
    eval_prompts: str | None
    builtin: dict                       # field -> whether the built-in task writes it


def stage_data_dir(spec, run_dir: str) -> str:
    """The folder of a stage's built-in datasets: rlhf.data.dir, else <run_dir>/rlhf_data."""
    return (spec.rlhf.data.dir or f"{run_dir.rstrip('/')}/rlhf_data").rstrip("/")


def builtin_config(spec) -> BuiltinDataConfig:
    b = spec.rlhf.data.builtin
    fields = {f.name for f in dataclasses.fields(BuiltinDataConfig)}
    return BuiltinDataConfig(**{k: v for k, v in b.model_dump().items() if k in fields})


def stage_files(spec, run_dir: str) -> StageFiles:
    d = spec.rlhf.data
    std = RLHFDataFiles.under(stage_data_dir(spec, run_dir))
    defaults = {"demonstrations": std.sft_train, "demonstrations_heldout": f"{stage_data_dir(spec, run_dir)}/sft_heldout.jsonl",
                "comparisons": std.rm_train, "comparisons_heldout": std.rm_heldout, "prompts": std.ppo_prompts,
                "eval_prompts": std.eval_prompts}
    chosen, builtin = {}, {}
    for name, default in defaults.items():
        source = d.source_of(name)  # a held-out set next to the user's own pool file is that file's tail
        builtin[name] = source == "builtin"
        chosen[name] = getattr(d, name) if source == "given" else default if source == "builtin" else None
    return StageFiles(**chosen, builtin=builtin)


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _check_builtin_key(spec, run_dir: str) -> None:
    """The built-in files in a folder were made with this spec's settings (rank 0)."""
    import fsspec

    key = spec.rlhf.data.builtin.model_dump(mode="json")
    uri = f"{stage_data_dir(spec, run_dir)}/builtin.json"
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        with fs.open(path) as f:
            if json.load(f) != key:
                raise UserError(f"rlhf.data.dir: {stage_data_dir(spec, run_dir)} holds built-in datasets made with other "
                                "rlhf.data.builtin settings; give another rlhf.data.dir (or remove that folder)")
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(key, f)


def on_rank0(rank: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 while the others wait. Collective.

    A failure on rank 0 fails every rank (a UserError as itself), so no rank
    is left waiting in a later collective for a peer that has given up.
    """
    failure: BaseException | None = None
    if rank == 0:
        try:
            fn()
        except Exception as err:  # re-raised below, after the others have heard of it
            failure = err
    box = [None if failure is None else (isinstance(failure, UserError), str(failure))]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        user, message = box[0]
        raise UserError(message) if user else RuntimeError(f"rank 0 failed: {message}")


def ensure_builtin_prompts(spec, run_dir: str, rank: int) -> StageFiles:
    """Rank 0 writes the built-in demonstrations and prompts that are missing; everyone waits. Collective."""
    files = stage_files(spec, run_dir)
    needed = [n for n in ("demonstrations", "demonstrations_heldout", "prompts", "eval_prompts") if files.builtin[n]]

    def write() -> None:
        _check_builtin_key(spec, run_dir)
        if not all(_exists(getattr(files, n)) for n in needed):
            from data import instruct

            cfg = builtin_config(spec)
            write_builtin_prompts(stage_data_dir(spec, run_dir), cfg)
            held = instruct.demonstrations(spec.rlhf.data.builtin.n_sft_heldout, "heldout", cfg.task())
            write_demonstrations(files.demonstrations_heldout, held)

    if needed:
        on_rank0(rank, write)
    return files


def held_out_count(n_rows: int) -> int:
    """How many rows at the end of a dataset are held out when no held-out file is given."""
    return max(1, int(n_rows * HELDOUT_SHARE))


def _tail_split(rows: list, what: str) -> tuple[list, list]:
    n = held_out_count(len(rows))
    if len(rows) < 2:
        raise UserError(f"{what}: needs at least 2 rows to hold some out (or give a held-out file)")
    return rows[:-n], rows[-n:]


def _read(reader, uri: str, field: str):
    try:
        return reader(uri)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"rlhf.data.{field}: {err}") from None


def sft_data(spec, files: StageFiles) -> tuple[list[Demonstration], list[Demonstration]]:
    if files.demonstrations is None:
        raise UserError("rlhf.data.demonstrations: the sft stage needs demonstrations (or rlhf.data.builtin)")
    demos = _read(read_demonstrations, files.demonstrations, "demonstrations")
    if files.demonstrations_heldout is not None:
        return demos, _read(read_demonstrations, files.demonstrations_heldout, "demonstrations_heldout")
    return _tail_split(demos, "rlhf.data.demonstrations")


def rm_data(spec, files: StageFiles) -> tuple[list[Comparison], list[Comparison]]:
    comps = _read(read_comparisons, files.comparisons, "comparisons")
    if files.comparisons_heldout is not None:
        return comps, _read(read_comparisons, files.comparisons_heldout, "comparisons_heldout")
    return _tail_split(comps, "rlhf.data.comparisons")


def ppo_data(spec, files: StageFiles) -> tuple[list[str], list[str]]:
    prompts = _read(read_prompts, files.prompts, "prompts")
    if files.eval_prompts is not None:
        return prompts, _read(read_prompts, files.eval_prompts, "eval_prompts")
    return _tail_split(prompts, "rlhf.data.prompts")


def pair_tokens(tok, prompt: str, response: str) -> int:
    """Tokens of prompt + response + eos, as every stage lays a pair out."""
    return sum(len(x) for x in encode_pair(tok, prompt, response))


def fitting(rows: list, lengths: Sequence[int], limit: int, what: str) -> list:
    """Rows whose token length fits the model; says how many were left out, refuses if none fit."""
    kept = [r for r, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise UserError(f"{what}: no row fits the model's {limit} tokens; raise data.seq_len or shorten the rows")
    if len(kept) < len(rows):
        log.warning("%s: %d of %d rows are longer than %d tokens and are left out", what, len(rows) - len(kept),
                    len(rows), limit)
    return kept


# ----------------------------------------------------------------------------- held-out measures

# ----------------------------------------------------------------------------- held-out measures


@torch.no_grad()
def sft_heldout_sums(model, tok, demos: Sequence[Demonstration], response_only: bool, batch_size: int = 32,
                     device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(sum of token losses, target tokens) over demonstrations: the held-out SFT loss is their ratio."""
    total = count = 0.0
    for i in range(0, len(demos), batch_size):
        b = sft_batch(tok, demos[i:i + batch_size], response_only)
        n = float((b["targets"] != -100).sum())
        _, loss = model(b["input_ids"].to(device), b["targets"].to(device))
        total += float(loss) * n
        count += n
    return total, count


@torch.no_grad()
def rm_heldout_sums(model, tok, comps: Sequence[Comparison], batch_size: int = 32,
                    device: torch.device = torch.device("cpu")) -> tuple[float, float, float, float]:
    """(right pairs, pairs, sum of per-prompt ranking losses, prompts) over comparisons."""
    right = pairs = loss = 0.0
    for i in range(0, len(comps), batch_size):
        chunk = comps[i:i + batch_size]
        b = comparison_batch(tok, chunk)
        scores = model(b["input_ids"].to(device), b["lengths"].to(device))
        rewards, mask = pm.group_rewards(scores, b["index"].to(device))
        n = float(sum(pm.n_pairs(len(c.responses)) for c in chunk))
        right += float(pm.pairwise_accuracy(rewards, mask)) * n
        pairs += n
        loss += float(pm.ranking_loss(rewards, mask)) * len(chunk)
    return right, pairs, loss, float(len(comps))


def ensure_builtin_comparisons(env, tok, files: StageFiles, sampler_model: torch.nn.Module) -> None:
    """Built-in comparisons: K responses per prompt, part sampled from the SFT model (ranks split the
    prompts), part corrupted gold answers, ranked by the gold judge; rank 0 writes them. Collective."""
    spec = env.spec
    if not files.builtin["comparisons"] and not files.builtin["comparisons_heldout"]:
        return
    missing = [u for n, u in (("comparisons", files.comparisons), ("comparisons_heldout", files.comparisons_heldout))
               if files.builtin[n] and not _exists(u)]
    if not any(all_sum([float(bool(missing))])):
        return
    on_rank0(env.rank, lambda: _check_builtin_key(spec, env.run_dir))
    sampling = SamplingConfig(max_new_tokens=spec.rlhf.ppo.max_new_tokens, temperature=1.0, eos_id=tok.eos_id,
                              pad_id=tok.pad_id)
    gen = torch.Generator().manual_seed(spec.train.seed * 1000 + env.rank)

    def sampler(prompts: Sequence[str], n: int) -> list[list[str]]:
        mine = sample_responses(sampler_model, tok, list(prompts[env.rank::env.world]), n, sampling, gen)
        parts: list = [None] * env.world
        dist.all_gather_object(parts, mine)
        out: list = [None] * len(prompts)
        for r, part in enumerate(parts):
            out[r::env.world] = part
        return out

    t0 = time.time()
    train, heldout = builtin_comparisons(builtin_config(spec), sampler)

    def write() -> None:
        if files.builtin["comparisons"]:
            write_comparisons(files.comparisons, train)
        if files.builtin["comparisons_heldout"]:
            write_comparisons(files.comparisons_heldout, heldout)
        log.info("built-in comparisons: %d + %d held out in %.0fs", len(train), len(heldout), time.time() - t0)

    on_rank0(env.rank, write)


def comparison_tokens(tok, c: Comparison) -> int:
    """Tokens of the longest response of a comparison laid out as a pair."""
    return max(pair_tokens(tok, c.prompt, r) for r in c.responses)
