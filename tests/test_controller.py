"""The controller on a real (simulated multi-node) Ray cluster: queue, gang admission, faults, evals."""
import json
import os
import re
import time

import pytest
import ray

from orchestrator.cli_jobs import submit_spec
from orchestrator.controller import start_controller
from orchestrator.job_store import JobState, JobStore
from orchestrator.runner import run_job
from specs.errors import UsageError
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.ray


def _state(store, job_id):
    return store.get(job_id).state


def _losses(run_dir):
    """Per-step losses; a resumed run keeps one row per step (the replayed steps' old rows are dropped)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def test_node_loss_restarts_from_checkpoint_with_the_same_losses(ray_cluster, controller):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    # 2 ranks x 3 CPUs: the 4-CPU head holds one, the other must go to another node.
    node_b = ray_cluster.add_node(num_cpus=3)
    ray_cluster.wait_for_nodes()
    spec = tiny_spec(**{"resources.workers": 2, "resources.cpus_per_worker": 3, "resources.torch_threads": 1,
                        "train.steps": 100, "train.micro_batch": 2, "checkpoint.every": 4, "max_restarts": 2})
    job = submit_spec(cfg, spec, priority=0)
    wait_for(lambda: _state(store, job) == JobState.RUNNING, what="RUNNING")
    nodes = {w["node"] for w in store.get(job).workers}
    assert len(nodes) == 2, "the job's workers span two nodes"
    wait_for(lambda: (store.get(job).step or 0) >= 6, what="step 6")
    from data.storage import Storage
    from workers.checkpoint_store import latest_checkpoint

    # Checkpoints are written behind training: the one of step 4 may still be on its way at step 6.
    wait_for(lambda: latest_checkpoint(Storage(cfg.storage), store.get(job).run_dir) is not None, what="a checkpoint")
    ray_cluster.remove_node(node_b)
    node_c = ray_cluster.add_node(num_cpus=3)  # a replacement joins
    wait_for(lambda: store.get(job).terminal, timeout=300, what="job end")
    rec = store.get(job)
    assert rec.state == JobState.SUCCEEDED, rec.reason
    assert rec.restarts == 1
    assert [h.to_state for h in rec.history].count(JobState.RESTARTING) == 1
    after = [h.reason for h in rec.history if h.from_state == JobState.RESTARTING]    # says where it resumes
    assert len(after) == 1 and re.fullmatch(r"waiting to restart from its checkpoint at step (\d+)", after[0])
    assert int(after[0].rsplit(" ", 1)[1]) % 4 == 0 and int(after[0].rsplit(" ", 1)[1]) >= 4, after
    resumed = _losses(rec.run_dir)
    reference = run_job(spec, cfg, log=lambda *a, **k: None)
    assert reference["state"] == "SUCCEEDED"
    assert resumed == pytest.approx(_losses(reference["run_dir"]), rel=1e-4, abs=1e-4)
    # Every kept checkpoint gets evaluated; the best is marked and survives retention.
    wait_for(lambda: len(store.get(job).evals) >= 2, what="evals")
    rec = store.get(job)
    best = min(rec.evals, key=lambda e: e.loss)
    wait_for(lambda: store.get(job).best_checkpoint == best.checkpoint, what="best checkpoint")
    assert os.path.exists(os.path.join(rec.run_dir, "evals.jsonl"))
    ray_cluster.remove_node(node_c)


def test_priority_then_fifo_with_gang_admission(controller):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    big = {"resources.workers": 2, "resources.cpus_per_worker": 2, "resources.torch_threads": 1}
    first = submit_spec(cfg, tiny_spec(name="first", **big, **{"train.steps": 10}), priority=0)
    wait_for(lambda: _state(store, first) == JobState.RUNNING, what="first RUNNING")
    low = submit_spec(cfg, tiny_spec(name="low", **big, **{"train.steps": 4}), priority=0)
    high = submit_spec(cfg, tiny_spec(name="high", **{"resources.workers": 1, "resources.cpus_per_worker": 2,
                                                      "train.steps": 4}), priority=5)
    for j in (first, low, high):
        wait_for(lambda: store.get(j).terminal, timeout=300, what=f"{j} end")
        assert store.get(j).state == JobState.SUCCEEDED, store.get(j).reason
    recs = {j: store.get(j) for j in (first, low, high)}
    # RUNNING = every worker of the gang placed and started.
    starts = {j: next(h.ts for h in r.history if h.to_state == JobState.RUNNING) for j, r in recs.items()}
    # Nothing started while "first" held all 4 CPUs; then the higher priority went first.
    assert starts[high] >= recs[first].finished_at - 1.0
    assert starts[high] < starts[low]
    # Gang: "low" needs both 2-CPU bundles, so it waited for "high" to free its CPUs: never a partial start.
    assert starts[low] >= recs[high].finished_at - 1.0


def test_cancel_frees_resources_promptly(controller):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    free_before = ray.available_resources().get("CPU", 0)
    job = submit_spec(cfg, tiny_spec(name="long", **{"train.steps": 5000, "checkpoint.every": 1000,
                                                     "resources.workers": 1, "resources.cpus_per_worker": 2}),
                      priority=0)
    wait_for(lambda: (store.get(job).step or 0) >= 2, what="training")
    assert ray.available_resources().get("CPU", 0) <= free_before - 2
    t0 = time.time()
    store.request_cancel(job)
    wait_for(lambda: _state(store, job) == JobState.CANCELLED, timeout=30, what="CANCELLED")
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= free_before, timeout=30, what="CPUs back")
    assert time.time() - t0 < 30
    queued = submit_spec(cfg, tiny_spec(name="never", **{"resources.workers": 64}), priority=0)
    wait_for(lambda: store.get(queued).terminal, timeout=30, what="impossible job fails")
    assert "needs 64 workers" in store.get(queued).reason


def test_cancel_with_a_checkpoint_then_requeue_resumes_exactly_there(controller):
    """`cancel --checkpoint` stops at a step boundary with a checkpoint; `requeue` resumes at that step."""
    from orchestrator.job_control import requeue_job

    cfg, _ = controller
    store = JobStore(cfg.job_store)
    spec = tiny_spec(name="paused", **{"train.steps": 5000, "checkpoint.every": 1000, "resources.workers": 1,
                                       "resources.cpus_per_worker": 2})
    job = submit_spec(cfg, spec, priority=0)
    wait_for(lambda: (store.get(job).step or 0) >= 3, what="training")
    assert store.request_cancel(job, by="alice", checkpoint=True).cancel_checkpoint
    wait_for(lambda: store.get(job).terminal, timeout=60, what="CANCELLED")
    stopped = store.get(job)
    assert stopped.state == JobState.CANCELLED and stopped.step >= 3, stopped.reason
    assert stopped.reason == f"cancelled by alice: stopped at step {stopped.step} with a checkpoint"
    end = stopped.step + 3
    requeue_job(cfg, store, stopped, "alice", [f"train.steps={end}"])
    wait_for(lambda: store.get(job).terminal, timeout=300, what="the requeued job's end")
    rec = store.get(job)
    assert rec.state == JobState.SUCCEEDED and rec.step == end, rec.reason
    assert [h.reason for h in rec.history if h.to_state == JobState.QUEUED][-1] == (
        f"requeued by alice with train.steps={end}")
    assert [h.reason for h in rec.history if h.to_state == JobState.STARTING][-1].endswith("(resuming)")
    with open(os.path.join(rec.run_dir, "logs", "rank_0.log")) as f:
        assert f"(step {stopped.step}, position" in f.read()  # the cancel's own checkpoint, not an older one
    assert len(_losses(rec.run_dir)) == end


def test_a_job_past_its_time_limit_saves_a_checkpoint_and_fails_saying_how_to_continue(controller):
    from data.storage import Storage
    from orchestrator.job_control import requeue_job
    from workers.checkpoint_store import latest_checkpoint

    cfg, _ = controller
    store = JobStore(cfg.job_store)
    spec = tiny_spec(name="timed", **{"train.steps": 5000, "checkpoint.every": 1000, "resources.workers": 1,
                                      "resources.cpus_per_worker": 2, "resources.time_limit_s": 3})
    job = submit_spec(cfg, spec, priority=0)
    wait_for(lambda: store.get(job).terminal, timeout=120, what="the time limit")
    rec = store.get(job)
    assert rec.state == JobState.FAILED and rec.restarts == 0, rec.reason
    assert rec.reason == (f"time limit of 3 s reached (resources.time_limit_s): stopped at step {rec.step} with a "
                          f"checkpoint; `switchyard requeue {job} --set resources.time_limit_s=SECONDS` continues it")
    running = sum(end - start for start, end in rec.run_intervals)
    assert 3 <= running < 3 + 30, running  # stopped at a tick and step boundary soon after, not 5000 steps on
    assert latest_checkpoint(Storage(cfg.storage), rec.run_dir).step == rec.step > 0
    from orchestrator.cli_jobs import job_status

    shown = job_status(store, job)  # `status` says the limit and the time used
    assert shown["time_limit_s"] == 3 and shown["run_s"] == pytest.approx(running)
    with pytest.raises(UsageError, match="has run \\d+ s, all of its time limit of 3 s; give it more with --set"):
        requeue_job(cfg, store, rec, "root")  # it would stop again at once
    back = requeue_job(cfg, store, rec, "root", ["resources.time_limit_s=600"])
    assert back.state == JobState.QUEUED and back.spec["resources"]["time_limit_s"] == 600
    store.request_cancel(job)


def test_killed_controller_comes_back_and_loses_no_job(controller):
    cfg, handle = controller
    store = JobStore(cfg.job_store)
    one = {"resources.workers": 1}   # what matters here is the controller, not the gang
    job = submit_spec(cfg, tiny_spec(name="survivor", **one, **{"train.steps": 16, "checkpoint.every": 4}),
                      priority=0)
    wait_for(lambda: (store.get(job).step or 0) >= 5, what="step 5")
    old_pid = store.controller().pid
    ray.kill(handle, no_restart=False)  # Ray restarts the detached actor
    queued_meanwhile = submit_spec(cfg, tiny_spec(name="meanwhile", **one, **{"train.steps": 3}), priority=0)
    wait_for(lambda: store.controller().pid != old_pid, timeout=60, what="new controller")
    for j in (job, queued_meanwhile):
        wait_for(lambda: store.get(j).terminal, timeout=300, what=f"{j} end")
        assert store.get(j).state == JobState.SUCCEEDED, store.get(j).reason
    assert store.get(job).step == 16
    assert any("controller restarted" in h.reason for h in store.get(job).history)


def test_a_stopped_controller_checkpoints_its_jobs_and_spends_no_restart(controller):
    """`switchyard down` (stop_controller): the running job saves a checkpoint, waits QUEUED, resumes at `up`."""
    from orchestrator.controller import stop_controller

    cfg, _ = controller
    store = JobStore(cfg.job_store)
    job = submit_spec(cfg, tiny_spec(name="downed", **{"resources.workers": 1, "train.steps": 150,
                                                       "checkpoint.every": 1000}), priority=0)
    wait_for(lambda: (store.get(job).step or 0) >= 3, what="step 3")
    assert stop_controller(cfg.ray.namespace)
    rec = store.get(job)
    assert rec.state == JobState.QUEUED and rec.restarts == 0, (rec.state, rec.reason)
    assert rec.reason.startswith("stopped with the controller (switchyard down); resumes from its checkpoint at step")
    stopped_at = int(rec.reason.split("at step ")[1].split()[0])
    assert 3 <= stopped_at < 150  # a checkpoint the stop wrote: none is due before step 1000
    start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    wait_for(lambda: store.get(job).terminal, timeout=300, what="the job to end")
    rec = store.get(job)
    assert rec.state == JobState.SUCCEEDED and rec.step == 150 and rec.restarts == 0, rec.reason
    assert len(_losses(rec.run_dir)) == 150


def test_user_errors_fail_at_once_without_restarts(controller, tmp_path):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    # Submit refuses this spec now (the model shape is checked at validation), so it goes into the store
    # directly, as a spec written by an older Switchyard would be: the controller fails it once, no restart.
    raw = tiny_spec(name="badmodel", **{"resources.workers": 1}).to_dict()
    raw["model"].update(preset=None, d_model=30, n_layers=1, n_heads=4)
    job = store.submit("badmodel", "train", raw, 0, {"workers": 1, "cpus_per_worker": 1}, 3,
                       run_dir_for=lambda jid: os.path.join(cfg.storage, f"badmodel-{jid}")).id
    wait_for(lambda: store.get(job).terminal, timeout=120, what="failure")
    rec = store.get(job)
    assert rec.state == JobState.FAILED and rec.restarts == 0
    assert "d_model" in rec.reason


def test_warm_gang_is_reused_with_identical_results(controller):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    # Each job fills the 4-CPU head, so the next one waits for (and takes over) the previous gang.
    spec = tiny_spec(name="warm", **{"train.steps": 4, "checkpoint.every": 100, "resources.cpus_per_worker": 2,
                                     "resources.torch_threads": 1})
    jobs = []
    for _ in range(3):
        jobs.append(submit_spec(cfg, spec, priority=0))
    for j in jobs:
        wait_for(lambda: store.get(j).terminal, timeout=300, what=f"{j} end")
        assert store.get(j).state == JobState.SUCCEEDED, store.get(j).reason
    reasons = [next(h.reason for h in store.get(j).history if h.to_state == JobState.STARTING) for j in jobs]
    assert reasons[0] == "resources available" and reasons[1:] == ["warm workers reused"] * 2
    pids = [sorted(w["pid"] for w in _workers_seen(store, j)) for j in jobs]
    assert pids[0] == pids[1] == pids[2]
    curves = [_losses(store.get(j).run_dir) for j in jobs]
    assert curves[1] == pytest.approx(curves[0], abs=1e-6) and curves[2] == pytest.approx(curves[0], abs=1e-6)
    # Each job's rank logs went to its own run directory.
    for j in jobs:
        assert os.path.getsize(os.path.join(store.get(j).run_dir, "logs", "rank_0.log")) > 0


def _workers_seen(store, job_id):
    rec = store.get(job_id)
    running = [h for h in rec.history if h.to_state == JobState.RUNNING]
    assert running
    return json.load(open(os.path.join(rec.run_dir, "workers.json")))


def test_the_controller_posts_what_it_decides_to_cluster_yaml_s_webhooks(ray_cluster, storage_root, tmp_path):
    """A job the cluster can never hold fails at once; the webhook hears of it (tests/test_notify.py: filters)."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import stop_controller
    from tests.test_notify import Receiver

    receiver = Receiver()
    cfg = ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp_path / "jobs.db"),
                                        "ray": {"namespace": f"hook-{tmp_path.name}"}, "workers": {"warm_pool": 0},
                                        "webhooks": [{"url": f"{receiver.url}/team", "states": ["FAILED"]}]})
    start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    try:
        job = submit_spec(cfg, tiny_spec(name="huge", **{"resources.workers": 64}), priority=0)
        got = receiver.wait(1, timeout=60)
        assert len(got) == 1 and got[0][0] == "/team", got
        body = got[0][2]
        assert body["job"]["id"] == job and (body["from"], body["to"]) == ("QUEUED", "FAILED")
        assert "needs 64 workers" in body["reason"] and body["text"].startswith(f"switchyard: {job} huge (")
    finally:
        stop_controller(cfg.ray.namespace)
        receiver.close()


def test_time_limits_tell_the_head_when_it_starts_and_let_a_short_job_through_the_gap(ray_cluster, storage_root,
                                                                                      tmp_path):
    """The controller's side of the time-limit backfill (tests/test_scheduler.py has the policy): the head of
    the queue is told when it can start, from the running job's time limit, and behind it, with the backfill
    window spent (0 here), only a job whose own limit ends before then starts."""
    from orchestrator.cli_jobs import pending_line
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import START_ALLOWANCE_S, stop_controller
    from orchestrator.estimates import GRAIN_S

    cfg = ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp_path / "jobs.db"),
                                        "ray": {"namespace": f"easy-{tmp_path.name}"}, "workers": {"warm_pool": 0}})
    stop_s = cfg.preemption.stop_timeout_s
    start_controller(cfg, tick_s=0.3, backfill_window_s=0)
    store = JobStore(cfg.job_store)
    one = {"resources.workers": 1, "resources.torch_threads": 1, "checkpoint.every": 1000}
    try:
        long = submit_spec(cfg, tiny_spec(name="long", **one, **{"train.steps": 50000, "resources.cpus_per_worker": 2,
                                                               "resources.time_limit_s": 600}), priority=0)
        wait_for(lambda: _state(store, long) == JobState.RUNNING, what="long RUNNING")
        big = submit_spec(cfg, tiny_spec(name="big", **one, **{"resources.cpus_per_worker": 4,
                                                               "resources.time_limit_s": 300}), priority=0)
        short = submit_spec(cfg, tiny_spec(name="short", **one, **{"train.steps": 3, "resources.cpus_per_worker": 2,
                                                                 "resources.time_limit_s": 60}), priority=0)
        unbounded = submit_spec(cfg, tiny_spec(name="unbounded", **one, **{"train.steps": 3}), priority=0)
        wait_for(lambda: store.get(short).terminal, timeout=120, what="the short job to run in the gap")
        assert store.get(short).state == JobState.SUCCEEDED, store.get(short).reason
        assert 60 + START_ALLOWANCE_S + stop_s < 600 + stop_s  # why it fit: it ends before `long` must
        wait_for(lambda: (store.get(unbounded).pending or {}).get("waiting_for") == "backfill", what="held")
        assert _state(store, long) == JobState.RUNNING and _state(store, big) == JobState.QUEUED
        head = store.get(big).pending
        expected = store.get(long).running_since + 600 + stop_s  # long's limit, then the longest stop
        assert head["position"] == 1 and abs(head["starts_by"] - expected) < 3, (head, expected)
        assert "starts within about 1" in pending_line(store.get(big).to_status_dict())  # ~15m, minus a few s
        # Ray's free view may lag a gang's removal by a tick (no bound then); notes are rewritten every 5 s.
        gap = "only a job whose time limit ends before then"
        wait_for(lambda: gap in store.get(unbounded).pending["reason"], timeout=30, what="the gap in the held note")
        assert store.get(unbounded).pending["reason"].startswith(f"held for {big}")
        assert _state(store, unbounded) == JobState.QUEUED
        # Further back, the queue played forward (orchestrator/estimates.py): `unbounded` fits beside `long`
        # now, but would keep the room `big` needs, so it starts when `big`'s limit (and a start and a stop) ends.
        wait_for(lambda: store.get(unbounded).pending.get("starts_by"), timeout=30, what="an estimate further back")
        after_big = expected + 300 + START_ALLOWANCE_S + stop_s
        assert after_big <= store.get(unbounded).pending["starts_by"] <= after_big + 2 * GRAIN_S + 3
    finally:
        stop_controller(cfg.ray.namespace)
