"""Unit tests for the scheduling and failure policies: plain values in, decisions out."""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.job_store import JobStore
from orchestrator.scheduler import (
    Bundle,
    Cancel,
    ErrorKind,
    Fail,
    QueuedJob,
    Restart,
    Start,
    Wait,
    earliest_fit,
    fits,
    on_failure,
    place,
    queue_order,
    schedule,
)

NOW = 10_000.0


def job(job_id: str, workers: int = 1, cpus: float = 1, gpus: float = 0, priority: int = 0,
        submitted_at: float = 0.0, blocked_since: float | None = None, cancel: bool = False) -> QueuedJob:
    return QueuedJob(job_id, priority, submitted_at, (Bundle(cpus, gpus),) * workers, blocked_since, cancel)


def nodes(*cpus: float, gpus: tuple[float, ...] = ()) -> dict[str, dict[str, float]]:
    gpus = gpus or (0,) * len(cpus)
    return {f"n{i}": {"CPU": c, "GPU": g} for i, (c, g) in enumerate(zip(cpus, gpus))}


def by_id(decisions) -> dict:
    return {d.job_id: d for d in decisions}


def started(decisions) -> list[str]:
    return [d.job_id for d in decisions if isinstance(d, Start)]


# ---------------------------------------------------------------------- packing


def test_gang_admission_is_all_or_nothing():
    # Two of three bundles would fit; the job must not start.
    assert not fits([Bundle(1)] * 3, nodes(2))
    d = schedule([job("a", workers=3)], nodes(2), nodes(4), now=NOW)
    assert isinstance(d[0], Wait) and "3 workers x {1 CPU}" in d[0].reason


def test_a_job_spans_nodes_but_a_bundle_does_not():
    assert place([Bundle(1)] * 4, nodes(2, 2)) is not None
    assert sorted(place([Bundle(1)] * 4, nodes(2, 2))) == ["n0", "n0", "n1", "n1"]
    assert not fits([Bundle(3)], nodes(2, 2))  # 4 CPUs free, but no node has 3
    assert by_id(schedule([job("a", workers=4)], nodes(2, 2), nodes(2, 2), now=NOW))["a"] == Start("a")


def test_gpu_bundles_need_gpu_nodes_and_cpu_bundles_avoid_them():
    free = {"cpu-node": {"CPU": 8}, "gpu-node": {"CPU": 8, "GPU": 2}}
    assert place([Bundle(1, 1)] * 2, free) == ("gpu-node", "gpu-node")
    assert not fits([Bundle(1, 1)] * 3, free)
    # CPU-only bundles go to the GPU-less node first, leaving the GPUs' host CPUs free.
    assert place([Bundle(4)], free) == ("cpu-node",)
    # Ray-style bundle dicts are accepted too.
    assert fits([{"CPU": 1, "GPU": 1}], free)


def test_fractional_resources_use_ray_granularity():
    assert fits([Bundle(0.1), Bundle(0.2)], {"n": {"CPU": 0.3}})
    assert not fits([Bundle(0.1), Bundle(0.2)], {"n": {"CPU": 0.2999}})


# ---------------------------------------------------------------------- order


def test_priority_first_then_submission_order():
    q = [job("old-low", cpus=4, priority=0, submitted_at=1), job("new-high", cpus=4, priority=5, submitted_at=3),
         job("old-high", cpus=4, priority=5, submitted_at=2)]
    d = schedule(q, nodes(4), nodes(4), now=NOW, backfill_window_s=0)
    assert [x.job_id for x in d] == ["old-high", "new-high", "old-low"]  # decisions come in queue order
    assert started(d) == ["old-high"]
    # With room for two, the next in order gets it, not the older low-priority job.
    assert started(schedule(q, nodes(4, 4), nodes(4, 4), now=NOW)) == ["old-high", "new-high"]


def test_ties_break_by_id_so_order_is_stable():
    q = [job("b", submitted_at=1), job("a", submitted_at=1)]
    assert [j.job_id for j in queue_order(q)] == ["a", "b"]


# ---------------------------------------------------------------------- backfill


def test_backfill_within_window():
    q = [job("big", cpus=4, submitted_at=1, blocked_since=NOW - 60), job("small", cpus=1, submitted_at=2)]
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=120))
    assert isinstance(d["big"], Wait) and d["small"] == Start("small")


def test_no_backfill_after_window_resources_drain_to_head():
    q = [job("big", cpus=4, submitted_at=1, blocked_since=NOW - 121), job("small", cpus=1, submitted_at=2)]
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=120))
    assert isinstance(d["small"], Wait)
    assert "held for big" in d["small"].reason and "121 s" in d["small"].reason


def test_window_zero_means_no_backfill():
    q = [job("big", cpus=4, submitted_at=1), job("small", cpus=1, submitted_at=2)]
    assert started(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=0)) == []


def test_head_never_seen_blocked_is_not_aged():
    q = [job("big", cpus=4, submitted_at=1), job("small", cpus=1, submitted_at=2)]
    assert started(schedule(q, nodes(2), nodes(4), now=NOW)) == ["small"]


def test_backfill_does_not_overcommit():
    q = [job("big", cpus=4, submitted_at=1)] + [job(f"s{i}", cpus=2, submitted_at=2 + i) for i in range(3)]
    assert started(schedule(q, nodes(3), nodes(4), now=NOW)) == ["s0"]


def test_jobs_ahead_of_the_head_still_start():
    q = [job("first", cpus=1, submitted_at=1), job("big", cpus=4, submitted_at=2, blocked_since=0.0),
         job("small", cpus=1, submitted_at=3)]
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW))
    assert d["first"] == Start("first") and isinstance(d["big"], Wait) and isinstance(d["small"], Wait)


# ---------------------------------------------------------------------- time limits: the head's start, EASY backfill


def limited(job_id: str, max_run_s: float | None, cpus: float = 1, submitted_at: float = 2.0) -> QueuedJob:
    return QueuedJob(job_id, 0, submitted_at, (Bundle(cpus),), max_run_s=max_run_s)


def holding(job_id: str, cpus: float, ends_in: float | None, node: str = "n0") -> RunningJob:
    return RunningJob(job_id, 0, (Bundle(cpus),), (node,), NOW - 100, ends_by=None if ends_in is None else NOW + ends_in)


def test_the_head_is_told_when_the_jobs_in_its_way_reach_their_time_limits():
    # 4 CPUs, 1 free; the head needs 3: r1 (1 CPU, ends in 60 s) is not enough, r2 (2 CPUs, 600 s) is.
    running = [holding("r1", 1, 60), holding("r2", 2, 600)]
    head = job("big", cpus=3, submitted_at=1)
    d = by_id(schedule([head], nodes(1), nodes(4), now=NOW, running=running))
    assert d["big"].starts_by == NOW + 600
    # A job in the way with no time limit: nobody can say.
    running[1] = holding("r2", 2, None)
    assert schedule([head], nodes(1), nodes(4), now=NOW, running=running)[0].starts_by is None
    # Only the head gets an estimate.
    q = [head, job("big2", cpus=3, submitted_at=2)]
    assert [w.starts_by for w in schedule(q, nodes(1), nodes(4), now=NOW, running=[holding("r", 3, 60)])] \
        == [NOW + 60, None]


def test_behind_an_aged_head_only_jobs_that_end_before_it_can_start_go_ahead():
    running = [holding("r", 2, 600)]  # the head can start in 600 s at the latest
    q = [job("big", cpus=4, submitted_at=1, blocked_since=NOW - 500), limited("short", 300),
         limited("long", 900, submitted_at=3), limited("unbounded", None, submitted_at=4),
         limited("short-but-too-big", 300, cpus=2, submitted_at=5)]
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=120, running=running))
    assert d["short"] == Start("short")  # done by NOW + 300: the head is not delayed
    for j in ("long", "unbounded", "short-but-too-big"):  # the last: "short" took one of the two free CPUs
        assert isinstance(d[j], Wait) and d[j].waiting_for == "backfill"
    assert "can start in about 10m at the latest" in d["long"].reason and "resources.time_limit_s" in d["long"].reason
    # With no bound on the head's start, an aged head holds everything, as before.
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=120, running=[holding("r", 2, None)]))
    assert started(d.values()) == [] and "at the latest" not in d["short"].reason
    # A backfill window of 0 still lets a job that cannot delay the head through.
    d = by_id(schedule(q, nodes(2), nodes(4), now=NOW, backfill_window_s=0, running=running))
    assert started(d.values()) == ["short"]


def test_earliest_fit_gives_back_the_jobs_in_the_order_they_end():
    total = nodes(2, 3)
    jobs = [holding("a", 2, 300, "n0"), holding("b", 1, 100, "n1"), holding("c", 1, None, "n1")]
    assert earliest_fit((Bundle(2),), total, jobs, NOW) == NOW + 100  # n1: b's 1 CPU back beside its free one
    assert earliest_fit((Bundle(1),), total, jobs, NOW) == NOW  # fits beside them: only non-jobs are in the way
    assert earliest_fit((Bundle(2),) * 2, total, jobs, NOW) == NOW + 300
    assert earliest_fit((Bundle(2),) * 2, total, jobs[1:] + [holding("d", 2, None, "n0")], NOW) is None
    # A job still being placed (its nodes unknown) is counted where it would go.
    placing = RunningJob("p", 0, (Bundle(2),), ("?",), None, ends_by=NOW + 50)
    assert earliest_fit((Bundle(2),) * 2, total, [placing], NOW) == NOW + 50


# ---------------------------------------------------------------------- impossible, cancelled, edge cases


def test_impossible_job_fails_with_a_clear_reason_and_blocks_nobody():
    q = [job("huge", workers=3, cpus=4, priority=9, blocked_since=0.0), job("ok", cpus=1)]
    d = by_id(schedule(q, nodes(2, 2), nodes(2, 2), now=NOW, backfill_window_s=0))
    assert isinstance(d["huge"], Fail)
    assert d["huge"].reason.startswith("needs 3 workers x {4 CPUs} but the cluster has 2 nodes with 4 CPUs in all")
    assert "n0 (2 CPUs)" in d["huge"].reason
    assert d["ok"] == Start("ok")


def test_gpu_job_on_cpu_cluster_fails_naming_gpus():
    d = schedule([job("g", workers=2, cpus=1, gpus=1)], nodes(8), nodes(8), now=NOW)
    assert isinstance(d[0], Fail) and "{1 CPU, 1 GPU}" in d[0].reason and "0 GPUs" in d[0].reason


def test_cancel_requested_jobs_are_cancelled_not_started():
    d = schedule([job("a", cancel=True), job("b")], nodes(4), nodes(4), now=NOW)
    assert by_id(d) == {"a": Cancel("a"), "b": Start("b")}


def test_no_nodes_yet_means_wait_not_fail():
    d = schedule([job("a")], {}, {}, now=NOW)
    assert isinstance(d[0], Wait) and "no resources" in d[0].reason


def test_parent_jobs_without_workers_start():
    assert schedule([job("pipe", workers=0)], nodes(0.5), nodes(1), now=NOW) == [Start("pipe")]


def test_from_record_reads_a_job_store_record(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    rec = store.submit("j", "train", {}, 3, {"workers": 2, "cpus_per_worker": 1.5, "gpus_per_worker": 1}, 0,
                       lambda jid: "/runs/" + jid)
    store.update(rec.id, blocked_since=5.0)
    q = QueuedJob.from_record(store.get(rec.id))
    assert q == QueuedJob(rec.id, 3, rec.submitted_at, (Bundle(1.5, 1),) * 2, 5.0, False)
    assert q.bundles[0].to_ray() == {"CPU": 1.5, "GPU": 1}


# ---------------------------------------------------------------------- failure policy


def test_user_errors_fail_at_once():
    d = on_failure(0, 3, "user", "data file s3://b/x.parquet not found", job_id="j")
    assert isinstance(d, Fail) and "s3://b/x.parquet" in d.reason and "restarting cannot fix" in d.reason


def test_infra_errors_restart_until_max_then_fail():
    msgs = [on_failure(r, 2, ErrorKind.INFRA, "rank 1 died on n1", job_id="j") for r in range(4)]
    assert [type(m) for m in msgs] == [Restart, Restart, Fail, Fail]
    assert msgs[0].reason == "restart 1 of 2 after: rank 1 died on n1"
    assert msgs[2].reason == "gave up after 2 restarts (max_restarts=2); last error: rank 1 died on n1"
    assert isinstance(on_failure(0, 0, "infra", "node lost", job_id="j"), Fail)


def test_unknown_error_kind_is_refused():
    with pytest.raises(ValueError):
        on_failure(0, 3, "cosmic-ray", "?", job_id="j")


# ---------------------------------------------------------------------- invariants (hypothesis)


def exact_fits(bundles, free) -> bool:
    """Brute-force feasibility in integer units (slow, obviously right); nodes are interchangeable."""
    items = sorted(((round(b.cpus * 10_000), round(b.gpus * 10_000)) for b in bundles), reverse=True)
    caps = tuple(sorted((round(r.get("CPU", 0) * 10_000), round(r.get("GPU", 0) * 10_000)) for r in free.values()))

    @lru_cache(maxsize=None)
    def go(i: int, caps: tuple) -> bool:
        if i == len(items):
            return True
        c, g = items[i]
        for k, (fc, fg) in enumerate(caps):
            if (k == 0 or caps[k - 1] != caps[k]) and fc >= c and fg >= g:
                rest = tuple(sorted(caps[:k] + ((fc - c, fg - g),) + caps[k + 1:]))
                if go(i + 1, rest):
                    return True
        return False

    return go(0, caps)


node_res = st.fixed_dictionaries({"CPU": st.integers(0, 6), "GPU": st.integers(0, 2)})
bundle = st.builds(Bundle, st.integers(1, 3).map(float), st.sampled_from([0.0, 0.0, 1.0]))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), bundle, st.lists(node_res, min_size=1, max_size=3))
def test_fits_is_exact_for_uniform_bundles(n, b, free_list):
    free = {f"n{i}": r for i, r in enumerate(free_list)}
    assert fits([b] * n, free) == exact_fits([b] * n, free)


@settings(max_examples=150, deadline=None)
@given(st.lists(bundle, max_size=8), st.lists(node_res, min_size=1, max_size=3))
def test_place_is_sound_for_mixed_bundles(bundles, free_list):
    free = {f"n{i}": r for i, r in enumerate(free_list)}
    chosen = place(bundles, free)
    if chosen is None:
        return
    assert exact_fits(bundles, free)
    for node, r in free.items():
        mine = [b for b, n in zip(bundles, chosen) if n == node]
        assert sum(b.cpus for b in mine) <= r["CPU"] and sum(b.gpus for b in mine) <= r["GPU"]


@st.composite
def snapshots(draw):
    # Every node has a CPU: an empty cluster is the "no resources yet" case, tested above.
    totals = draw(st.lists(st.fixed_dictionaries({"CPU": st.integers(1, 6), "GPU": st.integers(0, 2)}),
                           min_size=1, max_size=3))
    total = {f"n{i}": r for i, r in enumerate(totals)}
    free = {n: {"CPU": draw(st.integers(0, r["CPU"])), "GPU": draw(st.integers(0, r["GPU"]))}
            for n, r in total.items()}
    q = [job(f"j{i}", workers=draw(st.integers(1, 4)), cpus=draw(st.integers(1, 3)),
             gpus=draw(st.sampled_from([0, 0, 1])), priority=draw(st.integers(0, 2)),
             submitted_at=draw(st.integers(0, 5)),
             blocked_since=draw(st.none() | st.sampled_from([NOW - 500, NOW - 10, NOW])))
         for i in range(draw(st.integers(0, 6)))]
    return q, free, total


@settings(max_examples=200, deadline=None)
@given(snapshots())
def test_schedule_invariants(snap):
    q, free, total = snap
    window = 120.0
    decisions = schedule(q, free, total, now=NOW, backfill_window_s=window)
    ordered = queue_order(q)
    jobs = {j.job_id: j for j in q}
    # One decision per job, in queue order.
    assert [d.job_id for d in decisions] == [j.job_id for j in ordered]
    # Never start more than fits: all started gangs fit into what was free, together.
    assert exact_fits([b for jid in started(decisions) for b in jobs[jid].bundles], free)
    # Impossible jobs, and only they, fail.
    for d in decisions:
        assert isinstance(d, Fail) == (not exact_fits(jobs[d.job_id].bundles, total))
    live = [d for d in decisions if not isinstance(d, Fail)]
    if not live:
        return
    # The first job that can run starts if it fits in what is free (nothing is ahead of it).
    first = jobs[live[0].job_id]
    assert isinstance(live[0], Start) == exact_fits(first.bundles, free)
    # Nothing starts behind a head that has waited past the window.
    for k, d in enumerate(live):
        if isinstance(d, Wait):
            head = jobs[d.job_id]
            if head.blocked_since is not None and NOW - head.blocked_since >= window:
                assert not started(live[k + 1:])
            break


@st.composite
def limited_snapshots(draw):
    total = {f"n{i}": {"CPU": c, "GPU": 0} for i, c in enumerate(draw(st.lists(st.integers(1, 6), min_size=1,
                                                                              max_size=3)))}
    free = {n: {"CPU": draw(st.integers(0, r["CPU"])), "GPU": 0} for n, r in total.items()}
    held = {n: total[n]["CPU"] - free[n]["CPU"] for n in total}
    running = []
    for n, cpus in held.items():  # what is not free is held by running jobs, 1 or 2 CPUs each
        while cpus > 0:
            c = min(cpus, draw(st.integers(1, 2)))
            ends = draw(st.none() | st.sampled_from([NOW + 60, NOW + 300, NOW + 900]))
            running.append(RunningJob(f"r{len(running)}", 0, (Bundle(c),), (n,), NOW - 100, ends_by=ends))
            cpus -= c
    q = [QueuedJob(f"j{i}", 0, float(i), (Bundle(draw(st.integers(1, 3))),) * draw(st.integers(1, 3)),
                   draw(st.sampled_from([None, NOW - 500])),
                   max_run_s=draw(st.none() | st.sampled_from([30.0, 200.0, 600.0, 2000.0])))
         for i in range(draw(st.integers(1, 7)))]
    return q, free, total, running


@settings(max_examples=300, deadline=None)
@given(limited_snapshots())
def test_what_starts_behind_an_aged_head_never_delays_it_past_its_estimate(snap):
    q, free, total, running = snap
    decisions = [d for d in schedule(q, free, total, now=NOW, backfill_window_s=120.0, running=running)
                 if not isinstance(d, Fail)]
    jobs = {j.job_id: j for j in q}
    heads = [k for k, d in enumerate(decisions) if isinstance(d, Wait)]
    if not heads:
        return
    k = heads[0]
    head, by = jobs[decisions[k].job_id], decisions[k].starts_by
    behind = started(decisions[k + 1:])
    if by is None:
        if head.blocked_since is not None:
            assert not behind  # an aged head with no estimate holds everything
        return
    if head.blocked_since is not None:
        assert all(jobs[j].max_run_s is not None and NOW + jobs[j].max_run_s <= by for j in behind)
    # At `by`, the head fits in what is free once the jobs that end by then are gone, minus what this pass
    # started that may still run then.
    room = {n: dict(r) for n, r in free.items()}
    for r in running:
        if r.ends_by is not None and r.ends_by <= by:
            room[r.nodes[0]]["CPU"] += r.bundles[0].cpus
    still = [b for j in started(decisions) if jobs[j].max_run_s is None or NOW + jobs[j].max_run_s > by
             for b in jobs[j].bundles]
    if head.blocked_since is not None or not behind:  # before aging, backfill may delay the head (bounded)
        assert exact_fits(list(head.bundles) + still, room)


# ---------------------------------------------------------------------- preemption

from orchestrator.scheduler import (  # noqa: E402
    PreemptionPolicy,
    Preempt,
    RunningJob,
    TeamQuota,
    decayed_usage,
    fair_shares,
)

POLICY = PreemptionPolicy(min_run_s=60, max_per_job=2, backoff_s=30)


def running(job_id, workers=1, cpus=1.0, priority=0, node="n0", since=NOW - 1000, preemptions=0, team="",
            stopping=False, nodes_=None):
    return RunningJob(job_id, priority, (Bundle(cpus),) * workers, tuple(nodes_ or (node,) * workers), since,
                      preemptions, team, stopping)


def preempted(decisions) -> list[str]:
    return [d.job_id for d in decisions if isinstance(d, Preempt)]


def test_a_higher_priority_job_preempts_the_fewest_lowest_priority_jobs():
    # Four CPUs, all busy: a (prio 0, 2 CPUs), b (prio 1, 2 CPUs). The new job needs 2 CPUs.
    run = [running("a", 2, priority=0), running("b", 2, priority=1)]
    d = schedule([job("hi", workers=2, priority=5)], nodes(0), nodes(4), now=NOW, running=run, preemption=POLICY)
    assert preempted(d) == ["a"]
    p = next(x for x in d if isinstance(x, Preempt))
    assert p.by == "hi" and "priority 5 > 0" in p.reason
    w = by_id([x for x in d if not isinstance(x, Preempt)])["hi"]
    assert isinstance(w, Wait) and w.waiting_for == "preemption"
    # Needing 3 CPUs: one 2-CPU job is not enough, and the pair is the only set that is.
    d = schedule([job("hi", workers=3, priority=5)], nodes(0), nodes(4), now=NOW, running=run, preemption=POLICY)
    assert sorted(preempted(d)) == ["a", "b"]


def test_one_big_victim_beats_two_small_ones():
    # Fewest jobs first: one prio-1 job of 4 CPUs rather than two prio-0 jobs of 2 CPUs... on another node.
    run = [running("s1", 2, node="n0", priority=0), running("s2", 2, node="n0", priority=0),
           running("big", 4, node="n1", priority=1)]
    d = schedule([job("hi", workers=4, priority=5)], nodes(0, 0), nodes(4, 4), now=NOW, running=run,
                 preemption=POLICY)
    assert preempted(d) == ["big"]


def test_equal_or_higher_priority_is_never_preempted_and_free_room_is_used_first():
    run = [running("a", 4, priority=5)]
    d = schedule([job("hi", workers=2, priority=5)], nodes(0), nodes(4), now=NOW, running=run, preemption=POLICY)
    assert preempted(d) == [] and isinstance(d[0], Wait) and d[0].waiting_for == "capacity"
    d = schedule([job("hi", workers=2, priority=9)], nodes(2), nodes(4), now=NOW, running=[running("a", 2)],
                 preemption=POLICY)
    assert started(d) == ["hi"] and preempted(d) == []


def test_guards_min_run_time_protected_class_cap_and_backoff():
    q = [job("hi", workers=2, priority=5)]

    def go(r, policy=POLICY):
        return schedule(q, nodes(0), nodes(2), now=NOW, running=[r], preemption=policy)

    young = go(running("a", 2, since=NOW - 10))
    assert preempted(young) == [] and "has run 10 s of its protected 60 s" in young[0].reason
    assert preempted(go(running("a", 2, since=NOW - 61))) == ["a"]
    vip = go(running("a", 2, priority=3), PreemptionPolicy(min_run_s=0, never_preempt_priority=3))
    assert preempted(vip) == [] and "never preempted" in vip[0].reason
    capped = go(running("a", 2, preemptions=2))
    assert preempted(capped) == [] and "max_per_job 2" in capped[0].reason
    # Backoff: after 1 preemption the protection is 60 + 30 s; after 2 (with a higher cap) 60 + 60 s.
    assert preempted(go(running("a", 2, since=NOW - 80, preemptions=1))) == []
    assert preempted(go(running("a", 2, since=NOW - 91, preemptions=1))) == ["a"]
    more = PreemptionPolicy(min_run_s=60, max_per_job=5, backoff_s=30)
    assert preempted(go(running("a", 2, since=NOW - 110, preemptions=2), more)) == []
    assert preempted(go(running("a", 2, since=NOW - 121, preemptions=2), more)) == ["a"]
    # A job still starting has no checkpoint to resume from: never preempted.
    assert preempted(go(running("a", 2, since=None))) == []
    # Preemption off.
    assert preempted(go(running("a", 2), PreemptionPolicy(enabled=False))) == []
    assert preempted(schedule(q, nodes(0), nodes(2), now=NOW, running=[running("a", 2)])) == []


def test_a_stopping_victim_is_waited_for_and_its_room_is_reserved():
    run = [running("a", 2, stopping=True), running("b", 2, priority=0)]
    q = [job("hi", workers=2, priority=5), job("small", workers=1, priority=0)]
    d = schedule(q, nodes(1), nodes(5), now=NOW, running=run, preemption=POLICY)
    assert preempted(d) == []  # "a" is already stopping for it: no second victim
    assert by_id(d)["hi"].waiting_for == "preemption" and "a to checkpoint and stop" in by_id(d)["hi"].reason
    # The 1 free CPU is not taken by a smaller job while the room is being made.
    assert isinstance(by_id(d)["small"], Wait) and started(d) == []


def test_alternating_priorities_do_not_ping_pong():
    """Two full-cluster jobs whose priorities swap every 10 s: guards bound the preemptions."""
    policy = PreemptionPolicy(min_run_s=60, max_per_job=2, backoff_s=60)
    state = {"a": {"running": True, "since": 0.0, "n": 0}, "b": {"running": False, "since": None, "n": 0}}
    count = 0
    for t in range(0, 3600, 10):
        prio = {"a": (t // 10) % 2, "b": 1 - (t // 10) % 2}
        run = [running(j, 2, priority=prio[j], since=s["since"], preemptions=s["n"])
               for j, s in state.items() if s["running"]]
        q = [job(j, workers=2, priority=prio[j]) for j, s in state.items() if not s["running"]]
        for d in schedule(q, nodes(0), nodes(2), now=float(t), running=run, preemption=policy):
            if isinstance(d, Preempt):
                count += 1
                state[d.job_id].update(running=False, n=state[d.job_id]["n"] + 1)
                state[d.by].update(running=True, since=float(t))
    assert count <= 2 * policy.max_per_job
    assert count >= 1  # it does preempt when allowed


# ---------------------------------------------------------------------- quotas, fair share, dependencies


def tjob(job_id, team, submitted_at=0.0, workers=1, priority=0, deps=()):
    return QueuedJob(job_id, priority, submitted_at, (Bundle(1),) * workers, None, False, team, tuple(deps))


def test_fair_share_orders_within_a_priority_then_submission_time():
    shares = fair_shares({"heavy": 1000.0, "light": 10.0, "double": 1000.0},
                         {"double": TeamQuota(weight=200.0)})
    assert shares == {"heavy": 1000.0, "light": 10.0, "double": 5.0}
    q = [tjob("h1", "heavy", 1), tjob("l1", "light", 2), tjob("d1", "double", 3), tjob("l2", "light", 0),
         tjob("top", "heavy", 9, priority=1)]
    assert [j.job_id for j in queue_order(q, shares)] == ["top", "d1", "l2", "l1", "h1"]
    d = schedule(q, nodes(2), nodes(8), now=NOW, shares=shares)
    assert started(d) == ["top", "d1"]


def test_usage_decays_over_the_half_life():
    h = 3600.0
    # One CPU for one hour, ending now, vs. the same hour ending one half-life ago.
    recent = decayed_usage([(NOW - h, NOW, 1.0)], NOW, h)
    old = decayed_usage([(NOW - 2 * h, NOW - h, 1.0)], NOW, h)
    assert old == pytest.approx(recent / 2)
    assert recent == pytest.approx(h / (2 * math.log(2)))
    assert decayed_usage([(NOW - 10, None, 2.0)], NOW, 0) == pytest.approx(20.0)  # no decay


def test_a_job_over_its_team_quota_waits_and_says_so():
    quotas = {"nlp": TeamQuota(cpus=3)}
    run = [running("r", 2, team="nlp")]
    q = [tjob("a", "nlp", 0, workers=2), tjob("b", "vision", 1, workers=2), tjob("c", "nlp", 2, workers=1)]
    d = by_id(schedule(q, nodes(6), nodes(8), now=NOW, running=run, quotas=quotas))
    assert d["a"].waiting_for == "quota" and "holds 2 of its 3 CPUs" in d["a"].reason
    assert isinstance(d["b"], Start) and isinstance(d["c"], Start)  # c fits the quota's last CPU
    # Starts within one pass count too.
    d = by_id(schedule([tjob("x", "nlp", 0, workers=2), tjob("y", "nlp", 1, workers=2)], nodes(8), nodes(8),
                       now=NOW, quotas=quotas))
    assert isinstance(d["x"], Start) and d["y"].waiting_for == "quota"


def test_dependencies_hold_and_a_failed_one_fails_the_job():
    q = [tjob("waits", "", deps=[("d1", "SUCCEEDED"), ("d2", "RUNNING")]),
         tjob("ok", "", deps=[("d1", "SUCCEEDED")]),
         tjob("doomed", "", deps=[("d3", "FAILED")])]
    d = by_id(schedule(q, nodes(4), nodes(4), now=NOW))
    assert d["waits"].waiting_for == "dependency" and "d2 (RUNNING)" in d["waits"].reason
    assert isinstance(d["ok"], Start)
    assert isinstance(d["doomed"], Fail) and "d3 ended FAILED" in d["doomed"].reason
