"""What `switchyard list` and `status` print for queued jobs: no reason said twice, names that stay apart."""
from orchestrator.cli_jobs import NAME_MAX, _clip, pending_line


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
