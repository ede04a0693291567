"""``switchyard export RUN_DIR --format hf OUT``: a trained model as a Hugging Face folder.

It reads the consolidated fp32 weights (``model.safetensors``) of the run's
best checkpoint (``best_checkpoint.json``) or, without one, of its latest
complete checkpoint; RUN_DIR may also name one checkpoint folder. ZeRO
shards, pipeline stages and expert-parallel shards were consolidated when the
checkpoint was written. OUT gets ``config.json``, ``model.safetensors`` and
the run's tokenizer (``tokenizer.json``, ``tokenizer_config.json``), so::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUT)      # LlamaForCausalLM / GPT2LMHeadModel
    # encoder-decoders (t5, bart): AutoModelForSeq2SeqLM
    tokenizer = AutoTokenizer.from_pretrained(OUT)

Which family maps to which class is in ``models/hf.py``. A folder like this
(or any transformers folder of those classes, in safetensors) is also what
``model.init_from`` starts a job from.
"""
from __future__ import annotations

import argparse
import os

from orchestrator import json_output
from specs.errors import UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_hf(storage, run_path: str, out: str) -> dict:
    """Write the HF folder ``out`` (local) from a run directory or checkpoint folder; UsageError on bad input."""
    from models.hf import HFError, save_hf
    from workers.weights import model_info, resolve_checkpoint, run_weights

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"export: {out} exists and is not an empty folder; choose a new OUT")
    if not storage.exists(run_path):
        raise UsageError(f"export: {run_path}: no such run directory")
    try:
        w = run_weights(storage, run_path)
        labels = model_info(storage, resolve_checkpoint(storage, run_path)[0]).get("labels")  # a classifier's classes
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UsageError(f"export: {err}") from None
    files = {}
    if not w.tokenizer_dir or not storage.exists(f"{w.tokenizer_dir}/tokenizer.json"):
        raise UsageError(f"export: the run's token cache ({w.tokenizer_dir}) is gone, so its tokenizer is too; "
                         "run the job's data step again (switchyard run --resume) to rebuild it")
    for name in TOKENIZER_FILES:
        if storage.exists(f"{w.tokenizer_dir}/{name}"):
            files[name] = storage.read_text(f"{w.tokenizer_dir}/{name}")
    try:
        cls = save_hf(out, w.config, w.state, files, labels=labels)
    except HFError as err:
        raise UsageError(f"export: {w.family}: {err}") from None
    return {"out": out, "class": cls, "family": w.family, "checkpoint": w.source}


def export_command(args: argparse.Namespace) -> int:
    from orchestrator.cluster_config import load_cluster_config

    from data.storage import Storage
    from workers.weights import storage_for

    cluster = load_cluster_config(args.cluster)
    run_path = args.run_dir.rstrip("/")
    storage = storage_for(run_path, Storage(cluster.storage, dict(cluster.storage_options)))
    result = export_hf(storage, run_path, args.out)
    if args.json:
        print(json_output.dumps(result))
    else:
        print(f"exported {result['family']} from {result['checkpoint']} as {result['class']} to {result['out']}")
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `export RUN_DIR --format hf OUT [--json]`."""
    p = subparsers.add_parser(
        "export", help="write a trained model as a Hugging Face folder",
        description="Export the best (else latest complete) checkpoint of RUN_DIR, or one checkpoint folder, "
                    "as a folder transformers loads: LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM / "
                    "BertForPreTraining, AlbertForMaskedLM / AlbertForPreTraining, T5ForConditionalGeneration, "
                    "BartForConditionalGeneration.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint folder (any fsspec URI)")
    p.add_argument("out", metavar="OUT", help="new local folder to write")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=export_command)
    return p
