"""Preemption on a real multi-node Ray cluster: a high-priority job takes the room of a running one,
which resumes exactly; owners, quotas and dependencies through the real controller."""
import json
import os
import time

import pytest

from orchestrator.cli_jobs import submit_spec
from orchestrator.cluster_config import ClusterConfig
from orchestrator.controller import start_controller, stop_controller
from orchestrator.job_store import JobState, JobStore
from orchestrator.runner import run_job
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.ray

BIG = {"resources.cpus_per_worker": 2, "resources.torch_threads": 1}


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.fixture
def preempting_controller(ray_cluster, storage_root, tmp_path):
    """A controller whose guards let a job be preempted once it runs, at most twice."""
    cfg = ClusterConfig.model_validate({
        "storage": storage_root, "job_store": str(tmp_path / "jobs.db"),
        "ray": {"namespace": f"pre-{tmp_path.name}"},
        "preemption": {"min_run_s": 0, "max_per_job": 2, "backoff_s": 0},
        "teams": {"capped": {"users": ["carol"], "cpus": 2}},
    })
    handle = start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    yield cfg, handle
    stop_controller(cfg.ray.namespace)


def test_high_priority_preempts_and_the_preempted_job_resumes_exactly(ray_cluster, preempting_controller):
    cfg, _ = preempting_controller
    store = JobStore(cfg.job_store)
    node = ray_cluster.add_node(num_cpus=2)  # 6 CPUs on two nodes
    ray_cluster.wait_for_nodes()
    try:
        # 3 ranks x 2 CPUs fill both nodes.
        low_spec = tiny_spec(name="low", **BIG, **{"resources.workers": 3, "train.steps": 24,
                                                   "train.micro_batch": 2, "checkpoint.every": 4})
        low = submit_spec(cfg, low_spec, priority=0, owner="alice")
        wait_for(lambda: (store.get(low).step or 0) >= 6, what="low at step 6")
        high = submit_spec(cfg, tiny_spec(name="high", **BIG, **{"resources.workers": 2, "train.steps": 4}),
                           priority=5, owner="bob")
        wait_for(lambda: store.get(high).terminal, timeout=300, what="high ends")
        assert store.get(high).state == JobState.SUCCEEDED, store.get(high).reason
        wait_for(lambda: store.get(low).terminal, timeout=300, what="low ends")
        rec = store.get(low)
        assert rec.state == JobState.SUCCEEDED, rec.reason
        assert rec.owner == "alice" and rec.team == "default"
        states = [h.to_state for h in rec.history]
        i = states.index(JobState.PREEMPTED)
        assert states[i + 1] == JobState.QUEUED and states[i + 2] == JobState.STARTING
        assert rec.preemptions == 1 and rec.restarts == 0 and rec.preempted_by == high
        assert f"preempted by {high}" in rec.history[i].reason and f"preempted by {high}" in rec.history[i + 1].reason
        # The high-priority job ran while the low one was out, before it came back.
        hi = store.get(high)
        back = rec.history[i + 3].ts  # low RUNNING again
        assert hi.started_at < back and hi.finished_at <= back + 1.0
        # Exact resume: the same per-step losses as an uninterrupted run.
        reference = run_job(low_spec, cfg, log=lambda *a, **k: None)
        assert reference["state"] == "SUCCEEDED"
        assert _losses(rec.run_dir) == pytest.approx(_losses(reference["run_dir"]), rel=1e-4, abs=1e-4)
    finally:
        ray_cluster.remove_node(node)


def test_quota_and_dependencies_through_the_controller(preempting_controller):
    cfg, _ = preempting_controller
    store = JobStore(cfg.job_store)
    small = {"resources.workers": 1, "resources.cpus_per_worker": 2, "resources.torch_threads": 1}
    first = submit_spec(cfg, tiny_spec(name="q1", **small, **{"train.steps": 6}), priority=0, owner="carol")
    second = submit_spec(cfg, tiny_spec(name="q2", **small, **{"train.steps": 2}), priority=0, owner="carol",
                         after=[first])
    # A dependency that does not succeed fails its dependent, with the reason.
    bad = submit_spec(cfg, tiny_spec(name="bad", **small), priority=-1, owner="dave", after=[first])
    doomed = submit_spec(cfg, tiny_spec(name="doomed", **small), priority=0, owner="dave", after=[bad])
    store.request_cancel(bad)
    wait_for(lambda: store.get(doomed).terminal, timeout=120, what="doomed fails")
    assert store.get(doomed).state == JobState.FAILED
    assert f"dependency {bad} ended CANCELLED" in store.get(doomed).reason
    # While q1 runs, q2 waits for it (a dependency), and says so with its position.
    wait_for(lambda: store.get(first).state == JobState.RUNNING, what="q1 RUNNING")
    wait_for(lambda: (store.get(second).pending or {}).get("waiting_for") == "dependency", what="q2 pending")
    assert first in store.get(second).pending["reason"]
    # Once q1 is done, carol's quota (2 CPUs) lets q2 run; a third job of hers waits on the quota meanwhile.
    third = submit_spec(cfg, tiny_spec(name="q3", **small, **{"train.steps": 2}), priority=0, owner="carol")
    wait_for(lambda: (store.get(third).pending or {}).get("waiting_for") == "quota" or store.get(third).terminal,
             what="q3 waits on the quota")
    assert "team capped is at its quota" in store.get(third).pending["reason"]
    for j in (first, second, third):
        wait_for(lambda: store.get(j).terminal, timeout=300, what=f"{j} ends")
        assert store.get(j).state == JobState.SUCCEEDED, store.get(j).reason
    assert store.get(second).started_at >= store.get(first).finished_at


def test_two_jobs_of_alternating_priority_do_not_ping_pong(preempting_controller):
    """Each time one job gets the cluster, the other is raised above it: the cap ends the exchange."""
    cfg, _ = preempting_controller
    store = JobStore(cfg.job_store)
    # One rank that takes the whole 4-CPU head: each job holds the cluster alone, as two 2-CPU ranks would.
    spec = {"resources.workers": 1, "resources.cpus_per_worker": 4, "resources.torch_threads": 1,
            "train.steps": 20, "train.micro_batch": 2, "checkpoint.every": 2}
    a = submit_spec(cfg, tiny_spec(name="ping", **spec), priority=0, owner="alice")
    wait_for(lambda: store.get(a).state == JobState.RUNNING, what="ping RUNNING")
    b = submit_spec(cfg, tiny_spec(name="pong", **spec), priority=1, owner="bob")
    top, holder = 1, a
    deadline = time.time() + 600
    while not (store.get(a).terminal and store.get(b).terminal):
        assert time.time() < deadline, "the two jobs did not finish"
        recs = {j: store.get(j) for j in (a, b)}
        running = [j for j, r in recs.items() if r.state == JobState.RUNNING]
        if len(running) == 1 and running[0] != holder:  # the other one got the cluster: raise the loser
            holder = running[0]
            loser = b if holder == a else a
            if not recs[loser].terminal:
                top += 1
                store.update(loser, priority=top)
        time.sleep(0.3)
    recs = {j: store.get(j) for j in (a, b)}
    for r in recs.values():
        assert r.state == JobState.SUCCEEDED, r.reason
        assert r.preemptions <= 2  # max_per_job
    total = sum(r.preemptions for r in recs.values())
    assert 1 <= total <= 4
    # pong (same shape) started on the gang ping left at its step boundary, not on new rank processes.
    first_start = next(h for h in recs[b].history if h.to_state == JobState.STARTING)
    assert first_start.reason.startswith("warm workers reused"), first_start.reason
    # However often it moved, each job's curve is the uninterrupted one.
    assert _losses(recs[a].run_dir) == pytest.approx(_losses(recs[b].run_dir), rel=1e-4, abs=1e-4)
