"""The cluster view agrees with `ray status`: CPUs held by anything on the cluster are used, never offered."""
import time

import pytest
import ray

from orchestrator.cli_jobs import submit_spec
from orchestrator.job_store import JobState, JobStore
from orchestrator.ray_cluster import cluster_resources
from tests.conftest import tiny_spec, wait_for

pytestmark = pytest.mark.ray


class Holder:
    """An actor that is not Switchyard's, holding CPUs."""

    def ping(self) -> bool:
        return True


def _free_cpus() -> float:
    return sum(n["free"]["CPU"] for n in cluster_resources().values())


def _total_cpus() -> float:
    return sum(n["total"]["CPU"] for n in cluster_resources().values())


def test_cpus_held_outside_switchyard_show_as_used(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    wait_for(lambda: _free_cpus() == _total_cpus(), timeout=60, what="an idle cluster")
    total = _total_cpus()
    holder = ray.remote(Holder).options(num_cpus=2).remote()
    ray.get(holder.ping.remote())
    wait_for(lambda: _free_cpus() == total - 2, timeout=30, what="the actor's CPUs to show as used")
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    wait_for(lambda: _free_cpus() == total - 3, timeout=30, what="the placement group's CPU to show as used")
    remove_placement_group(pg)
    ray.kill(holder)
    wait_for(lambda: _free_cpus() == total, timeout=30, what="the CPUs to be free again")


def test_a_job_waits_while_a_foreign_actor_holds_the_cpus(ray_cluster, controller):
    cfg, _ = controller
    store = JobStore(cfg.job_store)
    wait_for(lambda: _free_cpus() == _total_cpus(), timeout=60, what="an idle cluster")
    holder = ray.remote(Holder).options(num_cpus=_total_cpus() - 1).remote()  # leaves 1 CPU; the job needs 2
    ray.get(holder.ping.remote())
    # The GCS learns of the actor's CPUs from its raylet's next resource report (the view the controller
    # and `ray status` read); a job submitted before that may start and wait for its gang instead.
    wait_for(lambda: _free_cpus() == 1, timeout=30, what="the actor's CPUs to show as used")
    job = submit_spec(cfg, tiny_spec(name="waits", **{"train.steps": 4}), priority=0)
    try:
        time.sleep(5.0)  # many controller ticks
        assert store.get(job).state == JobState.QUEUED
        ray.kill(holder)
        wait_for(lambda: store.get(job).state in (JobState.RUNNING, JobState.SUCCEEDED), what="the job to start")
        wait_for(lambda: store.get(job).terminal, what="the job to end")
        assert store.get(job).state == JobState.SUCCEEDED
    finally:
        ray.kill(holder)
