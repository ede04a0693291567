"""Sweep overhead: many tiny one-worker runs through the controller on a 4-CPU local cluster.

``--runs`` (50) one-worker jobs of the tiny llama decoder (one CPU, one torch
thread each) are submitted at once to a real controller, as a scaling-law sweep
would queue its runs. With ``--concurrency`` (4) CPUs, that many run side by side;
the controller starts them in parallel, from the warm pool first
(``workers.warm_pool`` = concurrency, filled before anything is timed), then
on the warm gangs finished runs leave behind.

Figure: the wall time from the first submit to the last run's SUCCEEDED,
against the time the runs spent in their optimizer steps (the sum over runs of
their per-step durations from metrics.jsonl, each ``tokens / tokens_per_s``)
divided by the concurrency: the wall time of a perfect scheduler with zero
per-run cost. Target: ratio at most TARGET (1.2). Checkpoints are written at each
run's end (no consolidated copy, so no evaluation task competes for the CPUs).

Run: ``.venv/bin/python benchmarks/sweep_overhead.py [--runs 50] [--steps 40]``.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGET = 1.2


def make_spec(args, i: int):
    from specs.job import validate_spec

    return validate_spec({
        "name": f"sweep-{i:03d}",
        "model": {"family": "llama", "preset": "tiny"},
        "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 400},
        "train": {"steps": args.steps, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                  "seed": i},
        "resources": {"workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "checkpoint": {"every": args.steps, "keep": 1, "consolidated": False},
        "eval": {"held_out_tokens": 2048, "batches": 1},
        "max_restarts": 0,
    })


def step_seconds(run_dir: str, tokens_per_step: int) -> float:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return sum(tokens_per_step / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4, help="CPUs of the local Ray (one per run)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for every run")
    args = ap.parse_args()

    import ray

    from data.shards import TokenSource, build_token_cache
    from orchestrator.cli_jobs import submit_spec
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import start_controller
    from orchestrator.job_store import JobState, JobStore
    from orchestrator.runner import storage_of

    tmp = tempfile.mkdtemp(prefix="sy-bench-sweep-")
    cluster = ClusterConfig.model_validate({"storage": os.path.join(tmp, "runs"),
                                            "job_store": os.path.join(tmp, "jobs.db"),
                                            "ray": {"num_cpus": args.concurrency},
                                            "workers": {"warm_pool": args.concurrency}})
    storage, store = storage_of(cluster), JobStore(cluster.job_store)
    load_before = os.getloadavg()[0]
    ray.init(address="local", num_cpus=args.concurrency, namespace=cluster.ray.namespace,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        build_token_cache(TokenSource.from_spec(make_spec(args, 0).data), storage, log=lambda m: None)
        controller = start_controller(cluster)
        t0 = time.time()
        while len(ray.get(controller.ping.remote())["pool"]) < args.concurrency:
            time.sleep(0.2)
        pool_s = time.time() - t0
        print(f"sweep overhead: {args.runs} one-worker runs x {args.steps} steps on {args.concurrency} CPUs; "
              f"warm pool of {args.concurrency} filled in {pool_s:.1f} s (not timed); load {load_before:.1f}")
        specs = [make_spec(args, i) for i in range(args.runs)]
        t_first = time.time()
        jobs = [submit_spec(cluster, s, priority=0) for s in specs]
        submit_s = time.time() - t_first
        deadline = t_first + args.timeout
        while not all(store.get(j).terminal for j in jobs):
            if time.time() > deadline:
                raise SystemExit(f"runs still going after {args.timeout:g} s")
            time.sleep(0.25)
        recs = [store.get(j) for j in jobs]
        bad = [r for r in recs if r.state != JobState.SUCCEEDED]
        if bad:
            raise SystemExit(f"{len(bad)} runs did not succeed, e.g. {bad[0].id}: {bad[0].reason}")
        wall = max(next(h.ts for h in r.history if h.to_state == JobState.SUCCEEDED) for r in recs) - t_first
        tokens_per_step = specs[0].samples_per_step * specs[0].data.seq_len
        steps = sum(step_seconds(r.run_dir, tokens_per_step) for r in recs)
        starts = [next(h.reason for h in r.history if h.to_state == JobState.STARTING) for r in recs]
        ray.kill(controller, no_restart=True)
    finally:
        ray.shutdown()
    ideal = steps / args.concurrency
    ratio = wall / ideal
    how = {k: starts.count(k) for k in sorted(set(starts))}
    print(f"  wall {wall:.1f} s (submitting {submit_s:.1f} s); in steps {steps:.1f} s over all runs, "
          f"/ {args.concurrency} = {ideal:.1f} s; ratio {ratio:.2f} (target <= {TARGET:g}): "
          f"{'met' if ratio <= TARGET else 'MISSED'}")
    print(f"  how runs started: {how}")
    print(json.dumps({
        "benchmark": "sweep_overhead", "runs": args.runs, "steps": args.steps, "concurrency": args.concurrency,
        "wall_s": round(wall, 3), "submit_s": round(submit_s, 3), "step_time_sum_s": round(steps, 3),
        "ideal_wall_s": round(ideal, 3), "ratio": round(ratio, 4), "target_ratio": TARGET,
        "starts": how, "pool_fill_s": round(pool_s, 3),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "met": ratio <= TARGET,
    }))


if __name__ == "__main__":
    main()
