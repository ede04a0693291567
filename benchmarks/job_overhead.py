"""Fixed overhead per job: ``switchyard submit`` through the controller against Ray Train's TorchTrainer.

The same trivial job for both: two workers (one CPU, one torch thread each),
the tiny llama decoder of ``workers.tasks.model_config``, a few optimizer
steps on the same samples (the job's token cache and ``DataPlan``, each rank
its share). Switchyard runs it through the controller (``start_controller``,
started once before anything is timed, as ``switchyard up`` would be;
``submit_spec``; SUCCEEDED in the job store), on DeepSpeed (ZeRO-0 by default,
which is plain data parallelism). Ray Train runs an equivalent
``train_loop_per_worker``: plain torch DDP, AdamW from ``make_optimizer``, LR
schedule, clipping at 1.0, and the same loss all-reduce per step.

Two overheads of each, all times from this machine's clock:

1. start: from submit (Switchyard) or ``trainer.fit()`` (Ray Train) to the
   start of the first optimizer step. Switchyard's is read from rank 0's
   TensorBoard event of step 1 (wall time) minus that row's ``elapsed``
   (seconds since the loop began); Ray Train's loop records it directly.
2. total: wall time from submit to SUCCEEDED in the job store (Switchyard) or
   of ``trainer.fit()`` (Ray Train), minus the time inside steps (the sum of
   per-step durations: Switchyard's from the ``tokens_per_s`` of each
   metrics.jsonl row, Ray Train's timed in its loop).

Switchyard's total includes what every Switchyard job does after its last step
and the Ray Train loop does not: a checkpoint (no consolidated copy here) and
a held-out evaluation of one batch. Ray Train runs first; then Switchyard runs
one cold job and ``--repeats`` more back to back, which take over the previous
job's warm gang (placement group, rank processes, process group). The cold job
is the controller's first: it finds no gang of its own, and takes the warm
pool's idle rank processes (``workers.warm_pool``, filled once the controller is
up, before anything is timed, as after ``switchyard up``; ``--no-pool``: none, a
fresh placement group and fresh processes). The headline ratio is the warm
per-job overhead (median); the cold job is reported apart. The one-time
tokenization of the corpus is done before anything is timed (later jobs on the
same data reuse the cache) and reported separately.

Targets, all in ``met`` (``met_by_target`` says which): on a warm gang, start overhead at most
TARGET_FRACTION of Ray Train's and total overhead at most TOTAL_TARGET_FRACTION; the cold first
job's start at most COLD_TARGET_FRACTION of Ray Train's and its total at most Ray Train's.

Run: ``.venv/bin/python benchmarks/job_overhead.py [--steps 5] [--repeats 2]``.
The last line printed is one JSON object. Needs ``ray[train]``.
"""
from __future__ import annotations

import argparse
import glob
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

TARGET_FRACTION = 0.05  # a warm job's start overhead at most this fraction of Ray Train's
TOTAL_TARGET_FRACTION = 0.1  # a warm job's total overhead at most this fraction of Ray Train's
COLD_TARGET_FRACTION = 0.1  # a cold first job's start overhead (on the warm pool) at most this fraction
WORKERS = 2
POLL_S = 0.05


def make_spec(args, name: str):
    from specs.job import validate_spec

    return validate_spec({
        "name": name,
        "model": {"family": "llama", "preset": "tiny"},
        "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 400},
        "train": {"steps": args.steps, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1},
        "resources": {"workers": WORKERS, "cpus_per_worker": 1, "torch_threads": 1},
        "parallel": {"zero_stage": args.zero_stage},
        "checkpoint": {"every": args.steps, "keep": 1, "consolidated": False},
        "eval": {"held_out_tokens": 2048, "batches": 1},
        "max_restarts": 0,
    })


# ---------------------------------------------------------------------- switchyard


def tensorboard_step_walls(tb_dir: str) -> dict[int, float]:
    """{step: wall time} of rank 0's train/loss scalars, or {} if TensorBoard wrote nothing."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    if not glob.glob(os.path.join(tb_dir, "events.*")):
        return {}
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.wall_time for e in acc.Scalars("train/loss")}


def process_start_time(rank_log: str) -> float | None:
    """Unix time at which the process named in a rank log's first line started, while it still runs."""
    try:
        with open(rank_log) as f:
            m = re.search(r"pid (\d+)", f.readline())
        if not m:
            return None
        with open(f"/proc/{m.group(1)}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:  # boot time to 10 ms (/proc/stat's btime is whole seconds)
            boot = time.time() - float(f.read().split()[0])
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_switchyard(args, cluster, store, i: int) -> dict:
    from orchestrator.cli_jobs import submit_spec
    from orchestrator.job_store import JobState

    spec = make_spec(args, f"bench-overhead-{i}")
    t_submit = time.time()
    job_id = submit_spec(cluster, spec, priority=0)
    t_submitted = time.time()
    first_row_seen, rank0_started = None, None
    deadline = t_submit + args.timeout
    rec = store.get(job_id)
    while not rec.terminal:
        if time.time() > deadline:
            raise SystemExit(f"switchyard job {job_id} still {rec.state.value} after {args.timeout:g}s")
        if rank0_started is None and rec.run_dir:
            rank0_started = process_start_time(os.path.join(rec.run_dir, "logs", "rank_0.log"))
        if first_row_seen is None and rec.run_dir and os.path.exists(os.path.join(rec.run_dir, "metrics.jsonl")):
            if os.path.getsize(os.path.join(rec.run_dir, "metrics.jsonl")) > 0:
                first_row_seen = time.time()
        time.sleep(POLL_S)
        rec = store.get(job_id)
    if rec.state != JobState.SUCCEEDED:
        raise SystemExit(f"switchyard job {job_id} ended {rec.state.value}: {rec.reason}")
    ts = {}
    for t in rec.history:
        ts.setdefault(t.to_state.value, t.ts)
    rows = [json.loads(line) for line in open(os.path.join(rec.run_dir, "metrics.jsonl"))]
    rows.sort(key=lambda r: r["step"])
    tokens_per_step = spec.samples_per_step * spec.data.seq_len
    step_s = [tokens_per_step / r["tokens_per_s"] for r in rows]
    walls = tensorboard_step_walls(os.path.join(rec.run_dir, "tb"))
    if 1 in walls:
        first_end, source = walls[1], "tensorboard"
    else:  # no TensorBoard: when this process first saw a row (up to POLL_S late)
        first_end, source = first_row_seen, "polled metrics.jsonl"
    loop_start = first_end - rows[0]["elapsed"]
    last_end = walls.get(rows[-1]["step"], loop_start + rows[-1]["elapsed"])
    succeeded = ts["SUCCEEDED"]
    startup = {}  # the job's own start-up phases (workers/phases.py), seconds each, in order
    with open(os.path.join(rec.run_dir, "startup.json")) as f:
        for ph in json.load(f).get("history", []):
            if ph.get("end") is not None:
                startup[ph["phase"]] = round(ph["end"] - ph["start"], 3)
    return {
        "job_id": job_id, "steps": len(rows), "first_step_time_source": source, "startup_phases_s": startup,
        "start_overhead_s": loop_start - t_submit,
        "total_overhead_s": (succeeded - t_submit) - sum(step_s),
        "first_step_end_s": first_end - t_submit,
        "wall_s": succeeded - t_submit,
        "step_time_s": sum(step_s),
        "phases_s": {
            "submit_call": t_submitted - t_submit,
            "queued_to_starting": ts["STARTING"] - ts["QUEUED"],
            "starting_to_first_step": loop_start - ts["STARTING"],
            # The rank-0 actor's process: negative if Ray handed over an idle, already started worker process.
            "starting_to_rank0_process": (rank0_started - ts["STARTING"]) if rank0_started else None,
            "rank0_process_to_first_step": (loop_start - rank0_started) if rank0_started else None,
            "running_recorded_after_start": ts["RUNNING"] - ts["STARTING"],
            "between_steps": (last_end - loop_start) - sum(step_s),
            "last_step_to_succeeded": succeeded - last_end,
        },
    }


# ---------------------------------------------------------------------- ray train


def ray_train_loop(config: dict) -> None:
    """One Ray Train worker: plain torch DDP on the same model, samples and optimizer as the Switchyard job."""
    import time as _time

    t_entry = _time.time()
    import json

    import ray.train
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from data.sampler import DataPlan
    from data.shards import TokenCache
    from data.storage import Storage
    from specs.job import validate_spec
    from workers.parallel.engine import PlainTorch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = validate_spec(config["spec"])
    cache = TokenCache.load(config["token_cache"], Storage(config["storage"], {}))
    plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    plain = PlainTorch(spec, cache.tokenizer.padded_vocab_size)
    model = DistributedDataParallel(plain.model)
    G = spec.samples_per_step
    step_s, first_start, last_end, position = [], None, None, 0
    for _ in range(spec.total_steps):
        t0 = _time.time()
        first_start = first_start or t0
        x, y = (torch.from_numpy(a) for a in plan.batch(plan.rank_positions(position, G, rank, world)))
        loss = plain.step(x, y, model)
        mean = torch.tensor([loss.item(), 0.0], dtype=torch.float64)
        dist.all_reduce(mean)
        position += G
        last_end = _time.time()
        step_s.append(last_end - t0)
    timings = {"rank": rank, "loop_entry": t_entry, "first_step_start": first_start, "last_step_end": last_end,
               "step_s": step_s, "loss": float(mean[0]) / world}
    if rank == 0:  # Ray Train v2's Result carries metrics only with a checkpoint: hand them over in a file
        with open(config["timings_path"], "w") as f:
            json.dump(timings, f)
    ray.train.report(timings)


def run_ray_train(args, token_cache: str, storage_root: str, tmp: str, i: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = make_spec(args, f"bench-overhead-raytrain-{i}")
    timings_path = os.path.join(tmp, f"ray_train_timings_{i}.json")
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"spec": spec.to_dict(), "token_cache": token_cache, "storage": storage_root,
                           "timings_path": timings_path},
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-overhead-{i}", storage_path=os.path.join(tmp, "ray_train")),
    )
    t_fit = time.time()
    result = trainer.fit()
    t_done = time.time()
    if result.error:
        raise SystemExit(f"Ray Train run failed: {result.error}")
    with open(timings_path) as f:
        m = json.load(f)
    return {
        "steps": len(m["step_s"]),
        "start_overhead_s": m["first_step_start"] - t_fit,
        "total_overhead_s": (t_done - t_fit) - sum(m["step_s"]),
        "first_step_end_s": m["first_step_start"] + m["step_s"][0] - t_fit,
        "wall_s": t_done - t_fit,
        "step_time_s": sum(m["step_s"]),
        "phases_s": {
            "fit_to_loop_entry": m["loop_entry"] - t_fit,
            "loop_entry_to_first_step": m["first_step_start"] - m["loop_entry"],
            "between_steps": (m["last_step_end"] - m["first_step_start"]) - sum(m["step_s"]),
            "last_step_to_fit_return": t_done - m["last_step_end"],
        },
    }


# ---------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each system, alternating")
    ap.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                    help="Switchyard's ZeRO stage (0 = plain data parallel, like DDP)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one job")
    ap.add_argument("--no-pool", action="store_true", help="no warm pool: the cold job places and starts its gang")
    args = ap.parse_args()

    import ray

    from data.shards import TokenSource, build_token_cache
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import start_controller
    from orchestrator.job_store import JobStore
    from orchestrator.runner import storage_of

    tmp = tempfile.mkdtemp(prefix="sy-bench-overhead-")
    cluster = ClusterConfig.model_validate({"storage": os.path.join(tmp, "runs"),
                                            "job_store": os.path.join(tmp, "jobs.db"),
                                            "ray": {"num_cpus": 4},
                                            "workers": {"warm_pool": 0 if args.no_pool else WORKERS}})
    storage = storage_of(cluster)
    store = JobStore(cluster.job_store)
    load_before = os.getloadavg()[0]
    # address="local": our own Ray, never a head someone else started on this machine. 4 logical CPUs on
    # 2 cores, so that neither system ever waits for Ray resources (Ray Train's controller, evaluations).
    ray.init(address="local", num_cpus=cluster.ray.num_cpus, namespace=cluster.ray.namespace,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    sy_cold, sy_warm, rt_runs = [], [], []
    try:
        t0 = time.time()
        token_cache = build_token_cache(TokenSource.from_spec(make_spec(args, "x").data), storage,
                                        log=lambda m: print(f"  {m}"))
        tokenize_s = time.time() - t0
        t0 = time.time()
        controller = start_controller(cluster)
        controller_s = time.time() - t0
        t0 = time.time()
        while len(ray.get(controller.ping.remote())["pool"]) < cluster.workers.warm_pool:
            time.sleep(0.2)
        pool_s = time.time() - t0
        print(f"job overhead: {WORKERS} workers, llama/tiny, {args.steps} steps, Switchyard ZeRO-{args.zero_stage} "
              f"vs Ray Train TorchTrainer (DDP); load average {load_before:.1f}; storage {tmp}")
        print(f"  not timed: tokenizing the corpus {tokenize_s:.1f} s (once per corpus), starting the controller "
              f"{controller_s:.1f} s (once, `switchyard up`), filling the warm pool "
              f"({cluster.workers.warm_pool} rank processes) {pool_s:.1f} s (once, ahead of demand)")
        # Ray Train first, then Switchyard: a cold job, then jobs back to back that take over the
        # previous job's warm gang (what a team submitting many jobs, or a sweep, sees).
        for i in range(args.repeats):
            r = run_ray_train(args, token_cache, cluster.storage, tmp, i)
            rt_runs.append(r)
            print(f"ray train  #{i + 1}: start {r['start_overhead_s']:.2f} s, total {r['total_overhead_s']:.2f} s "
                  f"(wall {r['wall_s']:.2f} s, in steps {r['step_time_s']:.2f} s; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items()) + ")")
        for i in range(args.repeats + 1):
            s = run_switchyard(args, cluster, store, i)
            s["warm"] = i > 0
            (sy_warm if i else sy_cold).append(s)
            print(f"switchyard #{i + 1} ({'warm gang' if i else 'cold, warm pool' if not args.no_pool else 'cold'}): start {s['start_overhead_s']:.2f} s, "
                  f"total {s['total_overhead_s']:.2f} s (wall {s['wall_s']:.2f} s, in steps {s['step_time_s']:.2f} s; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in s["phases_s"].items() if v is not None) + ")")
            print("    start-up phases: " + ", ".join(f"{k} {v:.2f}" for k, v in s["startup_phases_s"].items()))
        try:
            ray.get(controller.shutdown.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(controller, no_restart=True)
    finally:
        ray.shutdown()
    setup = {"warm_pool": cluster.workers.warm_pool, "pool_fill_s": round(pool_s, 3), "tokenize_s": round(tokenize_s, 3),
             "controller_start_s": round(controller_s, 3),
             "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    summarize(args, sy_cold, sy_warm, rt_runs, setup)


def summarize(args, sy_cold: list[dict], sy_warm: list[dict], rt_runs: list[dict], setup: dict) -> None:
    """Medians, ratios against Ray Train and the targets; the JSON line last."""

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    sy_start, sy_total = med(sy_warm, "start_overhead_s"), med(sy_warm, "total_overhead_s")
    cold_start, cold_total = sy_cold[0]["start_overhead_s"], sy_cold[0]["total_overhead_s"]
    rt_start, rt_total = med(rt_runs, "start_overhead_s"), med(rt_runs, "total_overhead_s")
    f_start, f_total = sy_start / rt_start, sy_total / rt_total
    met_by_target = {"warm_start": f_start <= TARGET_FRACTION, "warm_total": f_total <= TOTAL_TARGET_FRACTION,
                     "cold_start": cold_start / rt_start <= COLD_TARGET_FRACTION,
                     "cold_total": cold_total / rt_total <= 1.0}
    ok = all(met_by_target.values())
    print(f"\nmedians over {args.repeats} run(s) each (switchyard: jobs on a warm gang; its cold first job apart):")
    print(f"  start overhead (submit/fit -> first optimizer step): switchyard {sy_start:.2f} s "
          f"(cold {cold_start:.2f} s), ray train {rt_start:.2f} s, ratio {f_start:.3f} (cold {cold_start / rt_start:.3f})")
    print(f"  total overhead (wall - time in steps):               switchyard {sy_total:.2f} s "
          f"(cold {cold_total:.2f} s), ray train {rt_total:.2f} s, ratio {f_total:.3f} (cold {cold_total / rt_total:.3f})")
    print(f"  target: start <= {TARGET_FRACTION:g} x ray train on a warm gang (total <= {TOTAL_TARGET_FRACTION:g} x), "
          f"a cold job's start <= {COLD_TARGET_FRACTION:g} x (total <= 1 x): {'met' if ok else 'MISSED'} "
          f"({met_by_target})")
    print(json.dumps({
        "benchmark": "job_overhead", "workers": WORKERS, "steps": args.steps, "zero_stage": args.zero_stage,
        "repeats": args.repeats, "switchyard_start_overhead_s": round(sy_start, 3),
        "switchyard_total_overhead_s": round(sy_total, 3),
        "switchyard_cold_start_overhead_s": round(cold_start, 3),
        "switchyard_cold_total_overhead_s": round(cold_total, 3), "ray_train_start_overhead_s": round(rt_start, 3),
        "ray_train_total_overhead_s": round(rt_total, 3), "ratio_start": round(f_start, 4),
        "ratio_total": round(f_total, 4), "ratio_start_cold": round(cold_start / rt_start, 4),
        "ratio_total_cold": round(cold_total / rt_total, 4), "target_ratio": TARGET_FRACTION,
        "target_ratio_total": TOTAL_TARGET_FRACTION, "target_ratio_cold": COLD_TARGET_FRACTION,
        "met_by_target": met_by_target, "met": ok, **setup,
        "switchyard_runs": sy_cold + sy_warm, "ray_train_runs": rt_runs,
    }))


if __name__ == "__main__":
    main()
