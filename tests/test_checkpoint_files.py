"""Checkpoint completeness and retention, on plain files (no Ray)."""
import json
import os

from data.storage import Storage
from workers.checkpoint import apply_retention, checkpoint_dir, latest_checkpoint, list_checkpoints


def _fake(storage, run_dir, step, manifest=True, corrupt=False):
    path = checkpoint_dir(run_dir, step)
    storage.makedirs(f"{path}/ds")
    storage.write_text(f"{path}/ds/shard.pt", "x" * 10)
    if manifest:
        files = {"ds/shard.pt": 11 if corrupt else 10}
        storage.write_text(f"{path}/manifest.json", json.dumps({"step": step, "files": files}))
    return path


def test_only_complete_checkpoints_are_listed(tmp_path):
    st = Storage(str(tmp_path))
    run = str(tmp_path / "run")
    _fake(st, run, 10)
    _fake(st, run, 20, manifest=False)   # crashed before the manifest
    _fake(st, run, 30, corrupt=True)     # a listed file has the wrong size
    assert [c.step for c in list_checkpoints(st, run)] == [10]
    assert latest_checkpoint(st, run).step == 10


def test_retention_keeps_newest_and_protected(tmp_path):
    st = Storage(str(tmp_path))
    run = str(tmp_path / "run")
    paths = [_fake(st, run, s) for s in (10, 20, 30, 40)]
    deleted = apply_retention(st, run, keep=2, protect={paths[0]})
    assert deleted == [paths[1]]
    assert [c.step for c in list_checkpoints(st, run)] == [10, 30, 40]


def test_atomic_write_never_leaves_temp_files(tmp_path):
    st = Storage(str(tmp_path))
    st.write_json(str(tmp_path / "a" / "m.json"), {"x": 1})
    st.write_json(str(tmp_path / "a" / "m.json"), {"x": 2})
    assert st.read_json(str(tmp_path / "a" / "m.json")) == {"x": 2}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json"]


class _Payload:
    """Unpickling this would run code: what a tampered checkpoint on shared storage could hold."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/switchyard-pwned",))


def test_checkpoint_loads_are_tensors_only(tmp_path):
    import os as _os

    import pytest
    import torch

    from workers.checkpoint import tensors_only

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "step": 3, "nested": [1.0, "x"]}, good)
    torch.save({"w": torch.ones(2), "evil": _Payload()}, bad)
    with tensors_only():
        assert torch.load(good)["step"] == 3
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            torch.load(bad, weights_only=False)  # DeepSpeed asks for this; it is overridden
    assert not _os.path.exists("/tmp/switchyard-pwned")


def test_metrics_of_replayed_steps_are_dropped_on_resume(tmp_path):
    """A run resumed from step 2's checkpoint runs steps 3.. again: their old rows (and a torn line) go."""
    from workers.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo')
    writer = MetricsWriter(Storage(str(tmp_path)), str(tmp_path), enabled=True, start_step=2)
    writer.log({"step": 3, "loss": 0.25})
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
