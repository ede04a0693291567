"""``switchyard data prepare``: tokenize a corpus into the shared token cache, on the cluster, ahead of jobs."""
from __future__ import annotations

import sys

from orchestrator import json_output
from specs.errors import UsageError


def cmd_data_prepare(args) -> int:
    from data.shards import TokenCache, TokenSource, build_token_cache, cache_folder
    from orchestrator.cluster_config import load_cluster_config
    from orchestrator.ray_cluster import connect
    from orchestrator.runner import storage_of

    if args.tokenizer == "bpe" and not 300 <= args.vocab_size <= 200_000:
        raise UsageError(f"--vocab-size: {args.vocab_size} is outside 300..200000")
    if args.actors is not None and args.actors < 1:
        raise UsageError("--actors: give at least 1")
    if args.max_docs is not None and args.max_docs < 1:
        raise UsageError("--max-docs: give at least 1")
    cluster = load_cluster_config(args.cluster)
    storage = storage_of(cluster)
    source = TokenSource(args.corpus, args.format, args.text_field, args.tokenizer, args.vocab_size, args.max_docs)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    folder = cache_folder(source, storage)  # lists the corpus: a missing one fails here, before Ray starts
    cached = storage.exists(f"{folder}/manifest.json")
    if not cached:
        connect(cluster)
        build_token_cache(source, storage, log=log, max_actors=args.actors, use_ray=True)
    m = TokenCache.load(folder, storage).manifest
    summary = {"corpus": args.corpus, "cache": folder, "key": m["key"], "already_prepared": cached,
               "documents": m["documents"], "tokens": m["tokens"], "shards": len(m["shards"]),
               "tokenizer": m["tokenizer"], "vocab_size": m["vocab_size"], "seconds": m.get("seconds")}
    if args.json:
        print(json_output.dumps(summary))
    else:
        what = "already prepared" if cached else "prepared"
        print(f"{what}: {m['documents']} documents, {m['tokens']} tokens in {len(m['shards'])} shards "
              f"({m['tokenizer']}, vocab {m['vocab_size']}) -> {folder}")
        print("jobs with the same data.corpus/format/text_field/tokenizer/vocab_size/max_docs reuse it")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="token caches: prepare a corpus ahead of the jobs that train on it")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare}")
    q = dsub.add_parser("prepare", help="tokenize CORPUS into Parquet token shards with a pool of Ray actors "
                                        "(resumable; prints files, bytes, tokens/s and ETA)")
    q.add_argument("corpus", help="file, folder or glob at any fsspec URI (txt, JSONL[.gz|.zst], Parquet, "
                                  "datasets Arrow), or builtin:stdlib")
    q.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    q.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (300..200000)")
    q.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"], default="auto")
    q.add_argument("--text-field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    q.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    q.add_argument("--actors", type=int, default=None, help="writer actors (default: one per cluster CPU)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    q.set_defaults(func=cmd_data_prepare)
