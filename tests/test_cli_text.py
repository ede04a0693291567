"""What `switchyard list` and `status` print for queued jobs: no reason said twice, names that stay apart."""
import time

from orchestrator.cli_jobs import NAME_MAX, _clip, left_text, pending_line, progress
from orchestrator.job_store import JobState, JobStore, safe_join
from tests.conftest import tiny_spec


def _queued(waiting_for, reason, **extra):
    return {"state": "QUEUED", "pending": {"position": 3, "waiting_for": waiting_for, "reason": reason, **extra}}


def test_a_reason_that_says_what_it_waits_for_is_not_prefixed_again():
    capacity = _queued("capacity", "waiting for resources: needs 2 workers x {1 CPU}, free now: 0 CPUs")
    assert pending_line(capacity) == "#3, waiting for resources: needs 2 workers x {1 CPU}, free now: 0 CPUs"
    quota = _queued("quota", "team nlp is at its quota (cpus 4 of 4)", preempted_by="sy-1")
    assert pending_line(quota) == "#3, waiting for quota: team nlp is at its quota (cpus 4 of 4) (preempted by sy-1)"
    assert pending_line({"state": "RUNNING", "pending": quota["pending"]}) == ""


def test_long_names_are_cut_in_the_middle_so_runs_of_a_sweep_stay_apart():
    a, b = "isoflop-demo-c1.2e12-n109088-s0-with-a-long-tail", "isoflop-demo-c1.2e12-n109088-s1-with-a-long-tail"
    assert len(_clip(a, NAME_MAX)) == NAME_MAX and _clip(a, NAME_MAX) != _clip(b, NAME_MAX)
    assert _clip(a, NAME_MAX).startswith("isoflop-demo") and _clip(a, NAME_MAX).endswith("a-long-tail")
    assert _clip("short", NAME_MAX) == "short"


def test_the_head_says_when_it_starts_and_a_running_job_when_its_time_limit_stops_it():
    now = time.time()
    head = _queued("capacity", "waiting for resources: needs 2 workers x {1 CPU}", starts_by=now + 900)
    assert pending_line(head).endswith("(starts within about 15m)")
    assert pending_line(_queued("capacity", "waiting", starts_by=now - 5)).endswith("(should start at any moment)")
    assert left_text({"eta_s": 6000.0, "limit_left_s": 240.0}) == "about 100m left, its time limit stops it in about 4m"
    assert left_text({"eta_s": 60.0, "limit_left_s": 240.0}) == "about 60s left"
    assert left_text({"eta_s": None}) == ""


def test_progress_counts_the_clusters_cap_as_the_time_limit_of_a_job_without_one(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    spec = tiny_spec(name="capped", **{"train.steps": 1000}).to_dict()
    rec = store.submit("capped", "train", spec, 0, {"workers": 1, "cpus_per_worker": 1}, 0,
                       lambda j: safe_join(str(tmp_path), j))
    store.transition(rec.id, JobState.STARTING, "test")
    store.transition(rec.id, JobState.RUNNING, "test")
    store.update(rec.id, step=100, metrics={"steps_per_s": 1.0})
    rec = store.get(rec.id)
    assert progress(rec)["time_limit_s"] is None and progress(rec)["limit_left_s"] is None
    shown = progress(rec, cap=600.0)
    assert shown["time_limit_s"] == 600.0 and shown["eta_s"] == 900.0 and 595 < shown["limit_left_s"] <= 600
    assert "its time limit stops it in about 10m" in left_text(shown)
