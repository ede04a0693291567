"""Tokens/s of a one-worker ``switchyard run`` against a plain single-process PyTorch loop.

Both train the same decoder (``workers.tasks.model_config`` of the same
spec) on the same samples (the job's token cache and ``DataPlan``), with the
same micro batch, sequence length, optimizer (``make_optimizer``: AdamW with
the spec's parameter groups), LR schedule, gradient clipping at 1.0 (what
DeepSpeed's ``gradient_clipping`` does) and one torch thread. Switchyard runs
through ``orchestrator.runner.run_job`` (placement group, rank actor,
DeepSpeed ZeRO-0 engine, metrics files, progress polling); the baseline is a
child Python process of this script with no Ray in it.

Steady state: the first ``--warmup`` steps of each are dropped. Two figures:

* wall: tokens/s from the median wall time of one whole loop iteration (for
  Switchyard the difference of consecutive ``elapsed`` values in
  metrics.jsonl, which also covers metric writes and progress polling);
* CPU: tokens per CPU-second of the training process over the steady steps
  (the baseline's ``time.process_time``; the rank actor's utime + stime from
  /proc, sampled every 20 ms against the rows of metrics.jsonl). On a shared
  machine whose other users take the cores away, this is the robust figure.

The baseline runs before and after each Switchyard run (B S B S B): each
Switchyard run is compared with the mean of the baselines either side of it,
and the ratios reported are medians over rounds.

Run: ``.venv/bin/python benchmarks/throughput.py [--preset mini] [--steps 60]
[--micro-batch 8] [--seq-len 128] [--rounds 2]``. The last line printed is one
JSON object.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TARGET_RATIO = 0.95
THREADS = 1
SAMPLE_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_spec(args):
    from specs.job import validate_spec

    return validate_spec({
        "name": "bench-throughput",
        "model": {"family": args.family, "preset": args.preset},
        "data": {"corpus": "builtin:stdlib", "seq_len": args.seq_len, "max_docs": args.max_docs},
        "train": {"steps": args.steps, "micro_batch": args.micro_batch, "warmup_steps": 5, "log_every": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1, "torch_threads": THREADS},
        "parallel": {"zero_stage": 0},
        # One checkpoint, after the last step (outside the timed window); no consolidated copy.
        "checkpoint": {"every": args.steps, "keep": 1, "consolidated": False},
        "eval": {"held_out_tokens": 4096, "batches": 1},
    })


def summarize(step_s: list[float], iter_s: list[float], cpu_s: float, cpu_steps: int,
              tokens_per_step: int, warmup: int) -> dict:
    steady_step, steady_iter = step_s[warmup:], iter_s[warmup:]
    return {
        "steps_timed": len(steady_iter),
        "tokens_per_s": tokens_per_step / statistics.median(steady_iter),
        "tokens_per_s_in_step": tokens_per_step / statistics.median(steady_step),
        "tokens_per_s_mean": tokens_per_step * len(steady_iter) / sum(steady_iter),
        "tokens_per_cpu_s": tokens_per_step * cpu_steps / cpu_s if cpu_s else None,
        "median_iter_ms": 1e3 * statistics.median(steady_iter),
        "median_step_ms": 1e3 * statistics.median(steady_step),
        "cpu_ms_per_step": 1e3 * cpu_s / cpu_steps if cpu_steps else None,
    }


# ---------------------------------------------------------------------- baseline (child process, no Ray)


def baseline_child(args) -> None:
    """Plain PyTorch training of the same model on the same samples; prints its timings as JSON."""
    import torch

    from data.sampler import DataPlan
    from data.shards import TokenCache
    from data.storage import Storage
    from workers.parallel.engine import PlainTorch

    torch.set_num_threads(THREADS)
    spec = make_spec(args)
    cache = TokenCache.load(args.baseline_child, Storage(args.storage, {}))
    plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    plain = PlainTorch(spec, cache.tokenizer.padded_vocab_size)
    G, T = spec.samples_per_step, spec.data.seq_len
    step_s, iter_s, cpu_ends, position = [], [], [], 0
    t_prev = time.time()
    for _ in range(spec.total_steps):
        t0 = time.time()
        x, y = (torch.from_numpy(a) for a in plan.batch(plan.rank_positions(position, G, 0, 1)))
        loss = plain.step(x, y)
        loss.item()
        position += G
        t1 = time.time()
        step_s.append(t1 - t0)
        iter_s.append(t1 - t_prev)
        t_prev = t1
        cpu_ends.append(time.process_time())
    w = args.warmup
    print(json.dumps(summarize(step_s, iter_s, cpu_ends[-1] - cpu_ends[w - 1], len(cpu_ends) - w, G * T, w)))


def baseline(args, token_cache: str, storage_root: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--baseline-child", token_cache, "--storage", storage_root,
           "--preset", args.preset, "--family", args.family, "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
           "--max-docs", str(args.max_docs)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- switchyard


class RankCpuSampler(threading.Thread):
    """Samples (metrics rows written, CPU seconds) of the new run's rank-0 process every SAMPLE_S."""

    def __init__(self, runs_root: str, known: set[str]):
        super().__init__(daemon=True)
        self.runs_root, self.known = runs_root, known
        self.samples: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pid, metrics = None, None
        while not self.stop.is_set():
            if pid is None:
                for log in glob.glob(os.path.join(self.runs_root, "bench-throughput-*", "logs", "rank_0.log")):
                    run_dir = os.path.dirname(os.path.dirname(log))
                    if run_dir in self.known:
                        continue
                    m = re.search(r"rank 0/\d+ pid (\d+)", open(log).read())
                    if m:
                        pid, metrics = int(m.group(1)), os.path.join(run_dir, "metrics.jsonl")
            else:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
                    with open(metrics) as f:
                        rows = sum(1 for line in f if line.endswith("\n"))
                except (FileNotFoundError, ProcessLookupError):
                    rows, cpu = None, None
                if rows is not None:
                    self.samples.append((rows, cpu))
            self.stop.wait(SAMPLE_S)

    def cpu_between(self, first_rows: int, last_rows: int) -> tuple[float, int]:
        """CPU seconds and steps from the first sample with >= first_rows rows to the first with >= last_rows."""
        a = next((s for s in self.samples if s[0] >= first_rows), None)
        b = next((s for s in self.samples if s[0] >= last_rows), None)
        if a is None or b is None or b[0] <= a[0]:
            return 0.0, 0
        return b[1] - a[1], b[0] - a[0]


def switchyard(spec, cluster, warmup: int) -> dict:
    from orchestrator.runner import run_job, storage_of

    runs_root = cluster.storage
    sampler = RankCpuSampler(runs_root, set(glob.glob(os.path.join(runs_root, "bench-throughput-*"))))
    sampler.start()
    t0 = time.time()
    try:
        out = run_job(spec, cluster, log=lambda m: print(f"  {m}"))
    finally:
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    if out["state"] != "SUCCEEDED":
        raise SystemExit(f"switchyard run ended {out['state']}; see {out['run_dir']}/logs/")
    storage = storage_of(cluster)
    rows = [json.loads(line) for line in storage.read_text(f"{out['run_dir']}/metrics.jsonl").splitlines()]
    rows.sort(key=lambda r: r["step"])
    tokens_per_step = spec.samples_per_step * spec.data.seq_len
    step_s = [tokens_per_step / r["tokens_per_s"] for r in rows]
    elapsed = [r["elapsed"] for r in rows]
    iter_s = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    cpu_s, cpu_steps = sampler.cpu_between(warmup, len(rows))
    res = summarize(step_s, iter_s, cpu_s, cpu_steps, tokens_per_step, warmup)
    res.update(run_wall_s=wall, reported_tokens_per_s=out["tokens_per_s"], cpu_samples=len(sampler.samples))
    return res


# ---------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini", help="decoder preset (default mini)")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=10, help="steps dropped before steady state")
    ap.add_argument("--max-docs", type=int, default=600, help="documents of the built-in corpus to tokenize")
    ap.add_argument("--rounds", type=int, default=2, help="baseline/switchyard pairs (then one closing baseline)")
    ap.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--storage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= args.warmup + 5:
        ap.error(f"--steps must exceed --warmup + 5 ({args.warmup + 5})")
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    return args


def run_rounds(args) -> tuple[list[dict], list[dict], tuple[float, float]]:
    """Baseline / Switchyard pairs and a closing baseline on our own local Ray: (baselines, runs, load averages)."""
    import ray

    from data.shards import TokenSource, build_token_cache
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.runner import storage_of

    tmp = tempfile.mkdtemp(prefix="sy-bench-throughput-")
    cluster = ClusterConfig.model_validate({"storage": os.path.join(tmp, "runs"),
                                            "job_store": os.path.join(tmp, "jobs.db"),
                                            "ray": {"num_cpus": 2}})
    spec = make_spec(args)
    storage = storage_of(cluster)
    load_before = os.getloadavg()[0]
    # address="local": our own Ray, never a head someone else started on this machine; run_job reuses it.
    ray.init(address="local", num_cpus=cluster.ray.num_cpus, namespace=cluster.ray.namespace,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    bases, runs = [], []
    try:
        token_cache = build_token_cache(TokenSource.from_spec(spec.data), storage, log=lambda m: print(f"  {m}"))
        tokens_per_step = spec.samples_per_step * spec.data.seq_len
        print(f"throughput: {args.family}/{args.preset}, micro batch {args.micro_batch} x seq {args.seq_len} "
              f"= {tokens_per_step} tokens/step, {args.steps} steps ({args.warmup} warm-up), {THREADS} torch "
              f"thread, {args.rounds} round(s) baseline/switchyard and a closing baseline; load average "
              f"{load_before:.1f}; storage {tmp}")
        for r in range(args.rounds + 1):
            b = baseline(args, token_cache, cluster.storage)
            bases.append(b)
            print(f"baseline (plain PyTorch, own process) #{r + 1}: {b['tokens_per_s']:.0f} tokens/s wall "
                  f"(median iteration {b['median_iter_ms']:.1f} ms), {b['tokens_per_cpu_s']:.0f} tokens/CPU-s")
            if r == args.rounds:
                break
            s = switchyard(spec, cluster, args.warmup)
            runs.append(s)
            cpu = f"{s['tokens_per_cpu_s']:.0f}" if s["tokens_per_cpu_s"] else "n/a"
            print(f"switchyard run (1 worker, ZeRO-0) #{r + 1}: {s['tokens_per_s']:.0f} tokens/s wall "
                  f"(median iteration {s['median_iter_ms']:.1f} ms; whole run {s['run_wall_s']:.1f} s), "
                  f"{cpu} tokens/CPU-s")
    finally:
        ray.shutdown()
    load_after = os.getloadavg()[0]
    return bases, runs, (load_before, load_after)


def report(args, bases: list[dict], runs: list[dict], loads: tuple[float, float]) -> None:
    """Each round's ratios against the mean of the baselines around it, then the JSON line."""
    load_before, load_after = loads

    def ratio(s: dict, b1: dict, b2: dict, key: str) -> float | None:
        if not s[key] or not b1[key] or not b2[key]:
            return None
        return s[key] / ((b1[key] + b2[key]) / 2)

    rounds = [{"ratio": ratio(s, bases[i], bases[i + 1], "tokens_per_s"),
               "ratio_in_step": ratio(s, bases[i], bases[i + 1], "tokens_per_s_in_step"),
               "ratio_cpu": ratio(s, bases[i], bases[i + 1], "tokens_per_cpu_s")} for i, s in enumerate(runs)]

    def med(key: str) -> float | None:
        vals = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(vals) if vals else None

    r_wall, r_step, r_cpu = med("ratio"), med("ratio_in_step"), med("ratio_cpu")
    base_tps = statistics.median(b["tokens_per_s"] for b in bases)
    sy_tps = statistics.median(s["tokens_per_s"] for s in runs)
    spread = (max(b["tokens_per_s"] for b in bases) - min(b["tokens_per_s"] for b in bases)) / base_tps
    print(f"\nbaseline {base_tps:.0f} tokens/s wall (median of {len(bases)}; spread {100 * spread:.0f}%), "
          f"switchyard {sy_tps:.0f} tokens/s wall (median of {len(runs)})")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: switchyard / baseline = {r['ratio']:.3f} wall per iteration, "
              f"{r['ratio_in_step']:.3f} wall in-step, "
              + (f"{r['ratio_cpu']:.3f} per CPU-second" if r["ratio_cpu"] else "CPU n/a"))
    print(f"ratio switchyard / baseline (median of rounds): wall {r_wall:.3f}, in-step {r_step:.3f}, CPU "
          + (f"{r_cpu:.3f}" if r_cpu else "n/a")
          + f" (target >= {TARGET_RATIO}: {'met' if r_wall >= TARGET_RATIO else 'MISSED'} on wall"
          + (f", {'met' if r_cpu >= TARGET_RATIO else 'MISSED'} on CPU)" if r_cpu else ")"))
    if spread > 0.1:
        print(f"note: the baselines differ by {100 * spread:.0f}%: other load on the machine changed during the "
              f"run (load average {load_before:.1f} -> {load_after:.1f}); the wall ratio is that noisy, "
              "the CPU ratio much less")
    print(json.dumps({
        "benchmark": "throughput", "preset": args.preset, "family": args.family, "steps": args.steps,
        "warmup": args.warmup, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "threads": THREADS,
        "baseline_tokens_per_s": round(base_tps, 1), "switchyard_tokens_per_s": round(sy_tps, 1),
        "ratio": round(r_wall, 4), "ratio_in_step": round(r_step, 4),
        "ratio_cpu": round(r_cpu, 4) if r_cpu else None, "target_ratio": TARGET_RATIO,
        "met": r_wall >= TARGET_RATIO, "met_cpu": (r_cpu >= TARGET_RATIO) if r_cpu else None,
        "baseline_spread": round(spread, 4), "load_average": [round(load_before, 2), round(load_after, 2)],
        "rounds": rounds, "baseline_runs": bases, "switchyard_runs": runs,
    }))


def main() -> None:
    args = parse_args()
    if args.baseline_child:
        baseline_child(args)
        return
    report(args, *run_rounds(args))


if __name__ == "__main__":
    main()
