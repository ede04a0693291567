"""Unit tests for the scheduling and failure policies: plain values in, decisions out."""
from __future__ import annotations

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
