"""The warm worker pool and parallel starts: real rank processes, real jobs through the controller."""
import json
import os
from types import SimpleNamespace

import pytest
import ray

from orchestrator.cli_jobs import submit_spec
from orchestrator.job_store import JobState, JobStore
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.ray


@pytest.fixture
def pooled_controller(ray_cluster, storage_root, tmp_path):
    """A controller with a warm pool of two members of the default shape (1 CPU each), once it is full."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import start_controller, stop_controller

    cfg = ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp_path / "jobs.db"),
                                        "ray": {"namespace": f"pool-{tmp_path.name}"},
                                        "workers": {"warm_pool": 2}})
    handle = start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    pool = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(ray.get(handle.ping.remote())["pool"]),
                    timeout=120, what="a full warm pool")
    yield cfg, handle, set(pool)
    stop_controller(cfg.ray.namespace)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _ended(store, job_id):
    try:
        wait_for(lambda: store.get(job_id).terminal, timeout=240, what=f"{job_id} end")
    except AssertionError:
        rec = store.get(job_id)
        raise AssertionError(f"{job_id} still {rec.state.value}: {rec.reason}; "
                             + "; ".join(f"{h.to_state.value}: {h.reason}" for h in rec.history)) from None
    return store.get(job_id)


def _first(rec, state):
    return next(h for h in rec.history if h.to_state == state)


def test_pool_members_run_a_job_and_a_parallel_cold_start_never_waits_for_them(pooled_controller):
    cfg, handle, pool = pooled_controller
    store = JobStore(cfg.job_store)
    spec = tiny_spec(name="pooled", **{"train.steps": 3, "checkpoint.every": 3, "eval.batches": 1})
    a = submit_spec(cfg, spec, priority=0)
    b = submit_spec(cfg, tiny_spec(name="cold", **{"train.steps": 3, "checkpoint.every": 3, "eval.batches": 1}),
                    priority=0)
    ra, rb = _ended(store, a), _ended(store, b)
    assert ra.state == rb.state == JobState.SUCCEEDED, (ra.reason, rb.reason)
    # Both admitted in one pass (4 CPUs: two in the pool, two free), both STARTING before either RUNNING.
    assert max(_first(r, JobState.STARTING).ts for r in (ra, rb)) < min(_first(r, JobState.RUNNING).ts
                                                                         for r in (ra, rb))
    assert _first(ra, JobState.STARTING).reason == "warm pool workers"
    assert _first(rb, JobState.STARTING).reason == "resources available"
    # The first job ran in the pool's own processes; the second in fresh ones; each gang whole.
    wa, wb = (json.load(open(os.path.join(r.run_dir, "workers.json"))) for r in (ra, rb))
    assert {w["pid"] for w in wa} == pool
    assert len(wb) == 2 and not {w["pid"] for w in wb} & pool
    assert sorted(w["rank"] for w in wa) == sorted(w["rank"] for w in wb) == [0, 1]
    assert os.path.getsize(os.path.join(ra.run_dir, "logs", "rank_1.log")) > 0  # its log, in its run dir
    # Idle workers (two warm gangs now) give way to a placement group from outside the controller (a
    # `switchyard run`) well before they would expire.
    from ray.util.placement_group import placement_group, remove_placement_group

    outside = placement_group([{"CPU": 1}] * 4, strategy="PACK")
    try:
        ray.get(outside.ready(), timeout=20)
    finally:
        remove_placement_group(outside)


def test_a_job_of_another_shape_gets_the_pools_room_at_once(pooled_controller):
    cfg, handle, pool = pooled_controller
    store = JobStore(cfg.job_store)
    # 1 rank x 3 CPUs fits the 4-CPU head only with the pool's two CPUs.
    job = submit_spec(cfg, tiny_spec(name="wide", **{"resources.workers": 1, "resources.cpus_per_worker": 3,
                                                     "resources.torch_threads": 1, "train.steps": 2,
                                                     "checkpoint.every": 2, "eval.batches": 1}), priority=0)
    rec = _ended(store, job)
    assert rec.state == JobState.SUCCEEDED, rec.reason
    assert rec.pending is None, f"it waited: {rec.pending}"        # the pool never made it wait
    assert _first(rec, JobState.STARTING).reason == "resources available"
    wait_for(lambda: not any(_alive(p) for p in pool), timeout=30, what="pool members gone")


def test_a_reused_rank_process_sees_none_of_the_previous_jobs_environment(ray_cluster, tmp_path):
    from data.storage import Storage
    from workers.rank import RankWorker

    storage = Storage(str(tmp_path))
    member = ray.remote(RankWorker).options(num_cpus=0).remote(None)
    clean = ray.get(member.__ray_call__.remote(lambda w: dict(os.environ)))

    def dirty(w):  # what a job leaves in its process: rendezvous, interface, threads, its own variables
        import torch

        os.environ.update(MASTER_ADDR="10.9.9.9", RANK="5", GLOO_SOCKET_IFNAME="eth9", OMP_NUM_THREADS="7",
                          TORCH_EXTENSIONS_DIR="/tmp/elsewhere", SWITCHYARD_TOKEN="secret-of-job-1")
        torch.set_num_threads(3)

    try:
        info = ray.get(member.assign.remote(0, 1, str(tmp_path / "job1"), storage, 1))
        ray.get(member.__ray_call__.remote(dirty))
        ray.get(member.assign.remote(0, 1, str(tmp_path / "job2"), storage, 2))
        env, threads = ray.get(member.__ray_call__.remote(
            lambda w: (dict(os.environ), __import__("torch").get_num_threads())))
    finally:
        ray.kill(member)
    assert info["rank"] == 0 and info["pid"] > 0
    assert env == {**clean, "OMP_NUM_THREADS": "2"} and threads == 2
    assert os.path.getsize(tmp_path / "job2" / "logs" / "rank_0.log") > 0


def test_parallel_starts_never_promise_the_same_room_twice(monkeypatch):
    """The controller's free view on 4 CPUs, two of them held by the warm pool: the pool's room is free;
    each start in flight whose gang is not placed yet (Ray's view does not show it) takes its bundles."""
    import threading

    from orchestrator import ray_cluster
    from orchestrator import scheduler as sched
    from orchestrator.controller import Active, Controller

    monkeypatch.setattr(ray_cluster, "cluster_resources",
                        lambda: {"n1": {"total": {"CPU": 4.0, "GPU": 0.0}, "free": {"CPU": 2.0, "GPU": 0.0}}})
    ctl = Controller.__new__(Controller)
    ctl.active, ctl.warm = {}, []
    ctl.pool = SimpleNamespace(held=lambda: {"n1": {"CPU": 2.0, "GPU": 0.0}})
    gang = sched.bundles_of({"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0})
    assert ctl._free_and_total()[0] == {"n1": {"CPU": 4.0, "GPU": 0.0}}
    placing = threading.Event()
    try:
        for job_id in ("a", "b"):
            act = Active(job_id, SimpleNamespace(group=None), bundles=gang)
            act.starter = threading.Thread(target=placing.wait, daemon=True)
            act.starter.start()
            ctl.active[job_id] = act
            free, _ = ctl._free_and_total()
            assert free["n1"]["CPU"] == 4.0 - 2 * len(ctl.active)
        assert not sched.fits(gang, free)  # a third 2-rank job waits: never a gang on room already promised
    finally:
        placing.set()
    for act in ctl.active.values():
        act.starter.join()
    assert ctl._free_and_total()[0] == {"n1": {"CPU": 4.0, "GPU": 0.0}}  # no start in flight holds anything
