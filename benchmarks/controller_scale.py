"""The controller at scale: submits, scheduling ticks, `list` and `status` with 10,000 and 100,000 queued jobs.

A real job store (a temporary SQLite file) is filled through ``JobStore.submit``,
the call `switchyard submit` makes, with a realistic mix: four teams (one
with a CPU quota), priorities 0/1/5/10, gangs of 1 to 8 workers of 1 to 4
CPUs, a third of them with a GPU each, 1% waiting for another job
(``--after``). 64 nodes of 32 CPUs and 8 GPUs are about 95% held by 400
running jobs, which started 30 s ago (so they are protected from preemption:
every high-priority job looks for victims and says why it found none).

The tick is the controller's scheduling path without Ray (``QueueView``,
``scheduler.plan_tick``, the Wait notes written back in one transaction,
starts moved to STARTING in the store, and every 10 s the start-time
estimates of the first 20 waiting jobs, whose extra cost is also reported on
its own). The baseline is the tick's store
traffic the way the controller had it before issue #15 (every queued job
loaded in full with ``store.list([QUEUED])``, then read again for each
decision) around today's full scheduling pass. Between measured ticks the
store changes the way a busy cluster does: 10 new submits, 2 running jobs
finish, 1 queued job is cancelled. The measured ticks come after the queue's
first minute, in which the controller writes the pending notes of
REFRESH_PER_TICK jobs per tick until every job has one (those ticks are
reported apart, as is the very first tick, which reads the whole queue).
Fair share is computed once per size and reported on its own: the controller
recomputes it every 10 s, not every tick. `list`, `status` and a name lookup
are the median of 5 calls.

``--time-limits`` measures the scheduler's hardest case for time-limit
backfill instead: every job has a ``resources.time_limit_s`` (10 min to a
day), the running jobs end within two hours, and the backfill window is 0, so
the head is always aged and its start time known, and every job behind it
whose shape fits the free room is looked at for the gap (a pass cannot stop
early while some shape still to come fits).

Targets: a changed tick <= 100 ms at 10,000 queued and <= 1 s at 100,000
(the largest of the measured ticks, in CPU seconds of this process: on the
shared 2-core development machine, at a load of 20 and more, wall time
measures the neighbours; both are printed); >= 500 submits/s (wall).

Run: ``.venv/bin/python benchmarks/controller_scale.py [--sizes 10000,100000] [--ticks 5] [--time-limits]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator import scheduler as sched  # noqa: E402
from orchestrator.job_store import JobState, JobStore, safe_join  # noqa: E402
from orchestrator.queue_view import EXACT_POSITIONS, REFRESH_PER_TICK, QueueView  # noqa: E402

KINDS = ("train", "sweep-run", "pipeline-stage")
NODES = {f"node-{i:02d}": {"CPU": 32.0, "GPU": 8.0} for i in range(64)}
TEAMS = ("nlp", "vision", "speech", "default")
QUOTAS = {"vision": sched.TeamQuota(cpus=64.0)}
POLICY = sched.PreemptionPolicy()
SPEC = {"model": {"family": "llama", "preset": "tiny"}, "train": {"steps": 100, "micro_batch": 4, "grad_accum": 1},
        "data": {"corpus": "builtin:stdlib-docs", "seq_len": 64}, "resources": {"workers": 1}}


class Mix:
    """Random job shapes, priorities and teams, the same for every run of the benchmark."""

    def __init__(self, seed: int = 0, time_limits: bool = False):
        self.rng = random.Random(seed)
        self.ids: list[str] = []
        self.time_limits = time_limits

    def submit(self, store: JobStore, after: bool = True) -> str:
        rng = self.rng
        workers, cpus = rng.choice((1, 1, 2, 2, 4, 8)), rng.choice((1, 2, 4))
        res = {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": 1 if rng.random() < 0.3 else 0}
        deps = [rng.choice(self.ids)] if after and self.ids and rng.random() < 0.01 else []
        spec = SPEC
        if self.time_limits:
            spec = {**SPEC, "resources": {"workers": 1, "time_limit_s": rng.choice((600, 3600, 4 * 3600, 86400))}}
        rec = store.submit(f"run-{len(self.ids)}", "sweep-run" if rng.random() < 0.5 else "train", spec,
                           rng.choice((0,) * 7 + (1, 1, 5, 10)), res, 3, lambda j: safe_join("/tmp/runs", j),
                           owner="bench", team=rng.choice(TEAMS), after=deps)
        self.ids.append(rec.id)
        return rec.id


def fill(store: JobStore, mix: Mix, n: int) -> float:
    """Submit jobs until the store holds ``n``; the submit rate (jobs/s), with progress on stderr."""
    todo, t0 = n - len(mix.ids), time.perf_counter()
    for i in range(todo):
        mix.submit(store)
        if (i + 1) % 5000 == 0:
            rate = (i + 1) / (time.perf_counter() - t0)
            print(f"  submitted {len(mix.ids):,} jobs ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return todo / (time.perf_counter() - t0) if todo else float("nan")


def occupy(store: JobStore, mix: Mix, now: float) -> dict[str, sched.RunningJob]:
    """Start 400 queued jobs by hand (STARTING -> RUNNING) so they hold ~95% of the nodes (with time limits:
    each gives its workers back within two hours)."""
    free = {n: dict(r) for n, r in NODES.items()}
    running: dict[str, sched.RunningJob] = {}
    for rec in store.page([JobState.QUEUED], limit=4000, page=1)[0]:
        if len(running) == 400:
            break
        bundles = sched.bundles_of(rec.resources)
        nodes = sched.place(bundles, free)
        if nodes is None or rec.after:
            continue
        sched.subtract(free, bundles, nodes)
        store.transition(rec.id, JobState.STARTING, "bench")
        store.transition(rec.id, JobState.RUNNING, "bench")
        ends = now + mix.rng.uniform(60.0, 7200.0) if mix.time_limits else None
        running[rec.id] = sched.RunningJob(rec.id, rec.priority, bundles, nodes, now - 30.0, 0, rec.team,
                                           ends_by=ends)
    return running


def free_of(running: dict[str, sched.RunningJob]) -> dict[str, dict[str, float]]:
    held = [r for r in running.values()]
    free = {n: dict(r) for n, r in NODES.items()}
    for r in held:
        sched.subtract(free, r.bundles, r.nodes)
    return free


def shares_now(store: JobStore, now: float) -> dict[str, float]:
    """Fair shares from the store's run history, as the controller computes them (every 10 s)."""
    return sched.fair_shares(sched.team_usage(store.ran_since(now - 30 * 86400.0), now, 86400.0, 10.0), QUOTAS)


def tick(store: JobStore, view: QueueView, running: dict[str, sched.RunningJob], now: float,
         shares: dict[str, float]) -> dict:
    """The controller's scheduling tick without Ray; what it did."""
    view.refresh(store)
    jobs = view.jobs(shares)
    window = 0.0 if view.max_time_limit_s else sched.DEFAULT_BACKFILL_WINDOW_S
    plan = sched.plan_tick(jobs, free_of(running), NODES, now=now, backfill_window_s=window,
                           running=running.values(), preemption=POLICY, quotas=QUOTAS, shares=shares,
                           exact=EXACT_POSITIONS, ordered=True, counts=view.counts)
    view.estimate(plan, running.values(), NODES, now)  # as the controller: every 10 s
    starts = 0
    for d in plan.decisions:
        if isinstance(d, sched.Start):
            store.transition(d.job_id, JobState.STARTING, "resources available")
            starts += 1
        elif isinstance(d, sched.Wait):
            if view.rows[d.job_id].blocked_since is None:
                view.note_blocked(d.job_id, now)
            view.note_pending(d.job_id, plan.positions[d.job_id], d, now)
        elif isinstance(d, sched.Fail):
            store.transition(d.job_id, JobState.FAILED, d.reason)
    for job_id in view.due(now, plan):
        wait, position = plan.wait_for(job_id)
        view.note_pending(job_id, position, wait, now)
    written = view.flush(store)
    return {"decided": len(plan.positions), "decided_of": len(plan.order), "starts": starts,
            "notes_written": written}


def baseline_tick(store: JobStore, running: dict[str, sched.RunningJob], now: float) -> int:
    """The same pass the way the controller ran it before: every queued job in full, then one get per decision."""
    queued = [r for r in store.list([JobState.QUEUED]) if r.kind in KINDS]
    deps = {d: store.get(d).state.value for r in queued for d in r.after}
    jobs = [sched.QueuedJob.from_record(r, deps) for r in queued]
    decisions = sched.schedule(jobs, free_of(running), NODES, now=now, running=running.values(),
                               preemption=POLICY, quotas=QUOTAS)
    for d in decisions[:2000]:  # capped: the full loop is minutes at 100,000; scaled up below
        store.get(d.job_id)
    return len(decisions)


def churn(store: JobStore, mix: Mix, running: dict[str, sched.RunningJob], rng: random.Random) -> None:
    """What changes between two ticks on a busy cluster: 10 submits, 2 jobs finish, 1 cancel."""
    for _ in range(10):
        mix.submit(store, after=False)
    for job_id in rng.sample(sorted(running), 2):
        store.transition(job_id, JobState.SUCCEEDED, "finished")
        del running[job_id]
    victim = rng.choice(mix.ids[-5000:])
    if store.get(victim).state == JobState.QUEUED:
        store.request_cancel(victim)


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall s, this process's CPU s, result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(store: JobStore, mix: Mix, running: dict, n_ticks: int, rng: random.Random) -> dict:
    """Ticks (first, changed, idle), the baseline tick, list and status at the store's current size."""
    now = time.time()
    # With time limits, as the controller builds it: a day's cap, a start and a stop on top of each limit.
    view = QueueView(KINDS, 86400.0, 420.0) if mix.time_limits else QueueView(KINDS)
    share_s, share_cpu, shares = timed(shares_now, store, now)
    first_s, first_cpu, _ = timed(tick, store, view, running, now, shares)
    annotating = []  # the first minute: REFRESH_PER_TICK pending notes per tick until every job has one
    for i in range(1, 2 + len(view.rows) // REFRESH_PER_TICK):
        annotating.append(timed(tick, store, view, running, now + i * 0.5, shares)[1])
    now += len(annotating)
    wall, cpu, starts = [], [], 0
    for i in range(n_ticks):
        churn(store, mix, running, rng)
        s, c, did = timed(tick, store, view, running, now + 5 + i, shares)
        wall.append(s)
        cpu.append(c)
        starts += did["starts"]
    idle_s, idle_cpu, _ = timed(tick, store, view, running, now + 5 + n_ticks, shares)
    view._estimated_at = -1e18  # the next tick plays the queue forward: its extra cost, on its own
    est_s, est_cpu, _ = timed(tick, store, view, running, now + 6 + n_ticks, shares)
    est_cpu -= idle_cpu
    base_s, base_cpu, n_decisions = timed(baseline_tick, store, running, now + 7 + n_ticks)
    get_s, get_cpu, _ = timed(lambda: [store.get(mix.ids[-1]) for _ in range(50)])
    skipped = n_decisions - min(n_decisions, 2000)  # the gets the capped loop left out, at the measured rate
    base_s, base_cpu = base_s + skipped * get_s / 50, base_cpu + skipped * get_cpu / 50
    from orchestrator.cli_jobs import job_status

    median = lambda fn: statistics.median(timed(fn)[0] for _ in range(5))
    total = store.page(limit=1)[1]
    list_s = median(lambda: store.page(limit=100, page=1))
    deep_s = median(lambda: store.page([JobState.QUEUED], limit=100, page=max(1, len(view.rows) // 200)))
    status_s = median(lambda: job_status(store, mix.ids[len(mix.ids) // 2]))
    name_s = median(lambda: store.by_name("run-7", "train") + store.by_name("run-7", "sweep-run"))
    return {"queued": len(view.rows), "jobs": total,
            "changed_tick_cpu_s": cpu, "changed_tick_wall_s": wall, "changed_tick_cpu_max_s": max(cpu),
            "changed_tick_wall_max_s": max(wall), "idle_tick_cpu_s": idle_cpu, "idle_tick_wall_s": idle_s,
            "estimate_cpu_s": est_cpu, "estimated": sum(v is not None for v in view.starts.values()),
            "first_tick_cpu_s": first_cpu, "first_tick_wall_s": first_s,
            "annotating_ticks": len(annotating), "annotating_tick_cpu_max_s": max(annotating),
            "baseline_tick_cpu_s": base_cpu, "baseline_tick_wall_s": base_s, "speedup_cpu": base_cpu / max(cpu),
            "fair_share_cpu_s": share_cpu, "fair_share_wall_s": share_s, "list_page_s": list_s,
            "list_deep_page_s": deep_s, "status_s": status_s, "name_lookup_s": name_s,
            "decided": did["decided"], "of": did["decided_of"], "notes_written_last_tick": did["notes_written"],
            "starts_in_changed_ticks": starts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="queued-job counts to measure at, ascending")
    ap.add_argument("--ticks", type=int, default=5, help="changed ticks measured at each size")
    ap.add_argument("--time-limits", action="store_true",
                    help="every job has a time limit and the backfill window is 0 (the time-limit backfill's case)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = {10_000: 0.1, 100_000: 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        store, mix, rng = JobStore(os.path.join(tmp, "jobs.db")), Mix(time_limits=args.time_limits), random.Random(1)
        results, rates, running = {}, [], None
        for n in sizes:
            print(f"filling the store to {n:,} jobs", file=sys.stderr, flush=True)
            rates.append(fill(store, mix, n + (400 if running is None else 0)))
            if running is None:
                running = occupy(store, mix, time.time())
            r = results[str(n)] = measure(store, mix, running, args.ticks, rng)
            print(f"{r['queued']:,} queued: changed tick max {r['changed_tick_cpu_max_s'] * 1e3:.0f} ms CPU "
                  f"({r['changed_tick_wall_max_s'] * 1e3:.0f} ms wall), idle {r['idle_tick_cpu_s'] * 1e3:.0f} ms, "
                  f"first {r['first_tick_cpu_s']:.2f} s, before #15 {r['baseline_tick_cpu_s']:.2f} s CPU; decided "
                  f"{r['decided']:,} of {r['of']:,}; list {r['list_page_s'] * 1e3:.0f} ms, status "
                  f"{r['status_s'] * 1e3:.1f} ms", flush=True)
    load = os.getloadavg()[0]
    met_ticks = {n: results[str(n)]["changed_tick_cpu_max_s"] <= t for n, t in targets.items() if str(n) in results}
    submit_rate = min(rates)
    # Tick targets are judged on the tick's CPU time: on a shared 2-core machine at load 20+ wall time
    # measures the neighbours (both are reported). The submit rate is wall time (it waits on the disk too).
    met = len(met_ticks) == len(targets) and all(met_ticks.values()) and submit_rate >= 500
    print(json.dumps({"sizes": results, "time_limits": args.time_limits, "submits_per_s": submit_rate,
                      "load_average": load,
                      "cpus": os.cpu_count(), "targets": {"tick_10k_s": 0.1, "tick_100k_s": 1.0,
                                                          "submits_per_s": 500},
                      "met_by_size": {str(k): v for k, v in met_ticks.items()}, "met": met}))


if __name__ == "__main__":
    main()
