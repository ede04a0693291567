"""Start times for the queue's first jobs, played forward from the time limits (orchestrator/estimates.py)."""
from orchestrator.estimates import GRAIN_S, start_estimates
from orchestrator.scheduler import Bundle, QueuedJob, RunningJob

NOW = 1_000_000.0


def waiting(job_id, cpus, max_run_s, workers=1):
    return QueuedJob(job_id, 0, 0.0, (Bundle(cpus),) * workers, max_run_s=max_run_s)


def holding(job_id, cpus, ends_in, node="n0"):
    return RunningJob(job_id, 0, (Bundle(cpus),), (node,), NOW - 10, ends_by=None if ends_in is None else NOW + ends_in)


def test_each_job_takes_the_first_time_it_fits_for_its_whole_time_limit_beside_those_ahead():
    total = {"n0": {"CPU": 4, "GPU": 0}}
    q = [waiting("a", 4, 300), waiting("b", 2, 600), waiting("c", 4, None), waiting("d", 1, 100)]
    got = start_estimates(q, total, [holding("r", 2, 600)], NOW)
    # a: when r ends; b: now, beside r, and done when a starts; c: after a, for good; d: never (c keeps all).
    assert got == {"a": NOW + 600, "b": NOW, "c": NOW + 900, "d": None}
    assert start_estimates(q, total, [holding("r", 2, 600)], NOW, limit=2) == {"a": NOW + 600, "b": NOW}


def test_a_gang_keeps_its_nodes_for_its_whole_run_and_times_round_up_to_the_grain():
    total = {"n0": {"CPU": 2, "GPU": 0}, "n1": {"CPU": 2, "GPU": 0}}
    holders = [holding("r0", 2, 300, "n0"), holding("r1", 2, 601, "n1")]
    got = start_estimates([waiting("one", 2, 60), waiting("both", 2, 60, workers=2)], total, holders, NOW)
    assert got["one"] == NOW + 300  # n0 frees first
    # Both nodes: n1 at 601 s, rounded up to the next grain; "one" holds n0 over 300-360 s only.
    assert got["both"] == NOW + 11 * GRAIN_S
    # Nothing in the way ends: no estimate; a holder still being placed counts where it would go.
    assert start_estimates([waiting("x", 2, 60, workers=2)], total, [holding("r", 1, None)], NOW) == {"x": None}
    placing = RunningJob("p", 0, (Bundle(2),), ("?",), None, ends_by=NOW + 120)
    assert start_estimates([waiting("x", 2, 60, workers=2)], total, [placing], NOW) == {"x": NOW + 120}


def test_a_job_without_a_limit_never_goes_ahead_and_nothing_is_promised_behind_a_job_with_no_start():
    total = {"n0": {"CPU": 4, "GPU": 0}, "n1": {"CPU": 1, "GPU": 0}}
    q = [waiting("a", 4, 300), waiting("forever", 1, None), waiting("brief", 1, 60)]
    got = start_estimates(q, total, [holding("r", 4, 600)], NOW)
    # n1 is free now, but a job with no limit waits its turn (n1 from 600 s on); one with a limit that ends
    # before then uses the gap.
    assert got == {"a": NOW + 600, "forever": NOW + 600, "brief": NOW}
    q = [waiting("a", 4, 300), waiting("brief", 1, 60), waiting("later", 1, 60)]
    stuck = start_estimates(q, total, [holding("r", 4, None)], NOW)
    assert stuck == {"a": None, "brief": None, "later": None}


def test_the_windows_minimum_of_every_start_at_once_is_the_plain_one():
    import numpy as np

    from orchestrator.estimates import _range_min

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 64, 129):
        a = rng.integers(-5, 50, size=(n, 4))
        ends = np.array([rng.integers(k + 1, n + 1) for k in range(n)])
        assert (_range_min(a, ends) == np.array([a[k:e].min(axis=0) for k, e in enumerate(ends)])).all()
