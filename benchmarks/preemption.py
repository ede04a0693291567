"""Preemption on a full cluster: how long a high-priority job waits, and what the preempted job loses.

A local Ray of ``--cpus`` CPUs and a controller (guards off: ``min_run_s`` 0)
run a low-priority job whose gang fills the cluster, checkpointing every
``--every`` steps. Once it has passed ``--at`` steps a high-priority job of the
same shape is submitted. Measured, all from this machine's clock and the job
store:

1. ``submit_to_first_step_s``: from the high-priority submit to its first
   completed step (the first time the store shows step >= 1).
2. ``checkpoint_interval_s``: the low job's seconds per checkpoint interval
   (``--every`` steps at its median step time), and ``warm_start_s``: the
   high job's own submit-to-first-step when the cluster is empty (measured
   after, same shape). Target: (1) <= the interval + a start.
3. ``steps_lost``: steps the preempted job ran that it must run again: the
   step it stopped at minus the checkpoint it resumed from. Target: 0 (the
   ranks save at the step boundary where they see the stop).
4. ``losses_equal``: the preempted job's per-step losses equal an
   uninterrupted run's (exact resume).

Run: ``.venv/bin/python benchmarks/preemption.py [--cpus 4] [--steps 60] [--every 10] [--at 14]``.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

POLL_S = 0.05


def spec(name: str, steps: int, every: int, cpus: int):
    from specs.job import validate_spec

    return validate_spec({
        "name": name, "model": {"family": "llama", "preset": "tiny"},
        "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 400},
        "train": {"steps": steps, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2},
        "resources": {"workers": 2, "cpus_per_worker": cpus // 2, "torch_threads": 1},
        "checkpoint": {"every": every, "keep": 3}, "eval": {"held_out_tokens": 2048, "batches": 1},
    })


def wait_for(cond, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(POLL_S)
    raise TimeoutError("benchmark condition not reached")


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--at", type=int, default=14)
    args = ap.parse_args()

    import ray

    from orchestrator.cli_jobs import submit_spec
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import start_controller, stop_controller
    from orchestrator.job_store import JobState, JobStore
    from orchestrator.runner import run_job

    tmp = tempfile.mkdtemp(prefix="sy-preempt-")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, namespace="bench-preempt")
    cfg = ClusterConfig.model_validate({"storage": f"{tmp}/runs", "job_store": f"{tmp}/jobs.db",
                                        "ray": {"namespace": "bench-preempt"},
                                        "preemption": {"min_run_s": 0, "backoff_s": 0}})
    store = JobStore(cfg.job_store)
    start_controller(cfg, tick_s=0.1)
    try:
        low_spec = spec("low", args.steps, args.every, args.cpus)
        low = submit_spec(cfg, low_spec, priority=0)
        wait_for(lambda: (store.get(low).step or 0) >= args.at)
        t0 = time.time()
        high = submit_spec(cfg, spec("high", 3, 100, args.cpus), priority=10)
        wait_for(lambda: (store.get(high).step or 0) >= 1)
        to_first = time.time() - t0
        wait_for(lambda: store.get(low).terminal and store.get(high).terminal, timeout=1800)
        rec = store.get(low)
        requeue = next(h.reason for h in rec.history if h.reason.startswith("preempted by") and h.to_state == JobState.QUEUED)
        stopped = re.search(r"stopped at step (\d+)", requeue)
        resumed = re.search(r"checkpoint at step (\d+)", requeue)
        steps_lost = (int(stopped.group(1)) - int(resumed.group(1))) if stopped and resumed else None
        rows = [json.loads(line) for line in open(os.path.join(rec.run_dir, "metrics.jsonl"))]
        step_s = statistics.median(64 * 4 * 2 / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
        # The same high-priority job on an empty cluster: a start with no preemption.
        t1 = time.time()
        alone = submit_spec(cfg, spec("alone", 3, 100, args.cpus), priority=10)
        wait_for(lambda: (store.get(alone).step or 0) >= 1)
        warm_start = time.time() - t1
        wait_for(lambda: store.get(alone).terminal)
        reference = run_job(low_spec, cfg, log=lambda *a, **k: None)
        equal = len(losses(rec.run_dir)) == len(losses(reference["run_dir"])) and all(
            abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(losses(rec.run_dir), losses(reference["run_dir"])))
        interval = step_s * args.every
        out = {"submit_to_first_step_s": round(to_first, 3), "checkpoint_interval_s": round(interval, 3),
               "warm_start_s": round(warm_start, 3), "steps_lost": steps_lost, "losses_equal": equal,
               "low_state": rec.state.value, "high_state": store.get(high).state.value, "requeue_reason": requeue,
               "met": bool(to_first <= interval + warm_start and steps_lost == 0 and equal)}
    finally:
        stop_controller("bench-preempt")
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
