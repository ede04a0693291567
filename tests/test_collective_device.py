"""Collectives run on the rank's device: the GPU under NCCL (which has no CPU tensors), the CPU under gloo."""
import pytest
import torch
import torch.distributed as dist

from workers import metrics


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_under_gloo_collectives_run_on_the_cpu(gloo_world_of_one):
    from workers.rlhf.stages import _reduce_sum

    assert metrics.collective_device() == torch.device("cpu")
    assert metrics.all_sum([1.0, 2.5]) == [1.0, 2.5]
    assert _reduce_sum(torch.tensor([float(3)])).tolist() == [3.0]   # PPO passes CPU scalars like this one


def test_under_nccl_the_collective_device_is_the_ranks_gpu(gloo_world_of_one, monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert metrics.collective_device() == torch.device("cuda", 3)

    def fake_tensor(values, dtype=None, device=None):  # no GPU here: record where all_sum puts its tensor
        seen.append(device)
        raise RuntimeError("stop")

    monkeypatch.setattr(torch, "tensor", fake_tensor)
    with pytest.raises(RuntimeError, match="stop"):
        metrics.all_sum([1.0])   # every caller without a device: the RLHF evaluations, the data checks
    assert seen == [torch.device("cuda", 3)]
