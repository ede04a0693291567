"""Elastic resume decisions: fewer workers, the same global batch (no cluster needed)."""
import pytest

from orchestrator.elastic import Resize, resize, waited_long_enough
from specs.errors import UsageError
from specs.job import validate_spec


def _spec(workers=4, micro=2, accum=1, **resources):
    return validate_spec({"train": {"steps": 10, "micro_batch": micro, "grad_accum": accum},
                          "resources": {"workers": workers, "elastic": True, **resources},
                          "parallel": {"zero_stage": 1}}).to_dict()


def test_resize_takes_the_most_workers_that_fit_and_keeps_the_global_batch():
    spec = _spec(workers=4, micro=2, accum=1)  # global batch 8
    assert resize(spec, lambda w: w <= 2) == Resize(2, 2)
    assert resize(spec, lambda w: w <= 3) == Resize(2, 2)  # 3 workers cannot split 8 samples in micro-batches of 2
    assert resize(spec, lambda w: w <= 1) == Resize(1, 4)
    shrunk = Resize(2, 2).apply(spec)
    assert shrunk["resources"]["workers"] * shrunk["train"]["micro_batch"] * shrunk["train"]["grad_accum"] == 8
    assert spec["resources"]["workers"] == 4  # the original is untouched
    validate_spec(shrunk)


def test_resize_respects_min_workers_and_says_none_when_nothing_fits():
    spec = _spec(workers=4, min_workers=2)
    assert resize(spec, lambda w: w <= 1) is None
    assert resize(spec, lambda w: False) is None


def test_waiting_counts_only_for_elastic_jobs_that_ran():
    spec = _spec(elastic_wait_s=30)
    assert waited_long_enough(spec, True, 100.0, 131.0)
    assert not waited_long_enough(spec, True, 100.0, 120.0)
    assert not waited_long_enough(spec, False, 100.0, 1000.0)  # never ran: it just waits in the queue
    assert not waited_long_enough(spec, True, None, 1000.0)
    plain = validate_spec({"resources": {"workers": 2}}).to_dict()
    assert not waited_long_enough(plain, True, 0.0, 1e9)


@pytest.mark.parametrize("resources, parallel, field", [
    ({"workers": 2, "min_workers": 1}, {}, "resources.min_workers: only elastic jobs"),
    ({"workers": 2, "elastic": True, "min_workers": 3}, {}, "resources.min_workers: must be at most"),
    ({"workers": 2, "elastic": True}, {"pp": 2, "zero_stage": 1}, "resources.elastic"),
])
def test_elastic_settings_are_validated(resources, parallel, field):
    with pytest.raises(UsageError, match=field):
        validate_spec({"train": {"steps": 10, "grad_accum": 2}, "resources": resources, "parallel": parallel})
