"""Checkpoints written behind training, on a real DeepSpeed engine (one gloo rank in a child process, no Ray):
a save holds the state of its step while training goes on, a write that fails or dies leaves the previous
checkpoint the latest, and a resume on an object store downloads only the rank's own ZeRO shards."""
from __future__ import annotations

import errno
import os
import socket

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, here and in the child

import pytest
import torch
import torch.multiprocessing as mp

from data.storage import Storage
from tests.conftest import tiny_spec
from workers import checkpoint as ck

VOCAB = 256


def _train_step(engine, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (4, 32), generator=g)
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()


def _child(port: int, root: str) -> None:
    """Saves at steps 2 (trains on while it is written), 4 (its write fails), 6 (dies mid-write)."""
    import threading

    from workers.rank import import_deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    deepspeed = import_deepspeed()  # as a rank imports it (the prebuilt ops come from conftest's environment)

    from workers import checkpoint_writer
    from workers.parallel.engine import build_engine
    from workers.tasks import build_model, model_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    spec = tiny_spec(**{"resources.workers": 1, "data.seq_len": 32, "parallel.zero_stage": 1})
    torch.manual_seed(0)
    engine = build_engine(build_model(model_config(spec, VOCAB)), spec)
    storage, run_dir = Storage(root), os.path.join(root, "run")
    saver = ck.Checkpointer(spec, storage, run_dir, 0, 1, attempt=ck.begin_attempt(storage, run_dir, "run"))
    for step in (1, 2):
        _train_step(engine, step)
    at_two = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    real, trained = checkpoint_writer.write_safetensors, threading.Event()

    def after_training(*args, **kwargs):
        trained.wait()
        real(*args, **kwargs)

    checkpoint_writer.write_safetensors = after_training
    saver.save(2, engine, {"data": {}}, ck.CheckpointState())
    for step in (3, 4):                                   # trains before step 2's weights are written
        _train_step(engine, step)
    trained.set()
    saver.wait()
    torch.save(at_two, os.path.join(root, "at_two.pt"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(run_dir, "checkpoints"))

    checkpoint_writer.write_safetensors = full
    saver.save(4, engine, {"data": {}}, ck.CheckpointState())
    try:
        saver.wait()
    except ck.StorageFault as err:
        open(os.path.join(root, "fault.txt"), "w").write(str(err))
    never = threading.Event()
    checkpoint_writer.write_safetensors = lambda *a, **k: never.wait()   # the consolidated file never ends
    for step in (5, 6):
        _train_step(engine, step)
    saver.save(6, engine, {"data": {}}, ck.CheckpointState())
    staged = storage.local_path(ck.staging_dir(run_dir, saver.attempt, 6))
    while not any(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(staged) for n in ns):
        never.wait(0.05)
    checkpoint_writer.write_safetensors = real
    os._exit(0)                                           # dies with step 6 half written: no wait, no publish


def test_saves_hold_their_step_and_a_failed_or_dead_write_leaves_the_previous_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_child, args=(port, str(tmp_path)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0, proc.exitcode
    st, run_dir = Storage(str(tmp_path)), str(tmp_path / "run")
    assert [c.step for c in ck.list_checkpoints(st, run_dir)] == [2]
    assert ck.resume_choice(st, run_dir).step == 2                       # complete and its checksums match
    saved = ck.load_consolidated(st, ck.checkpoint_dir(run_dir, 2))
    at_two = torch.load(tmp_path / "at_two.pt", weights_only=True)
    assert saved.keys() <= at_two.keys() and saved
    for k, v in saved.items():   # the weights of step 2, although steps 3 and 4 trained while they were written
        assert torch.equal(v, at_two[k].float()), k
    fault = (tmp_path / "fault.txt").read_text()
    assert "is full (no space left)" in fault and "the checkpoint at step 2 is intact" in fault
    assert not os.path.exists(ck.checkpoint_dir(run_dir, 4))             # the failed write published nothing
    staged = [n for d, _, ns in os.walk(tmp_path / "run" / "checkpoints" / ck.STAGING) for n in ns]
    assert staged and not os.path.exists(ck.checkpoint_dir(run_dir, 6))  # step 6 died half written: ignored


def test_a_rank_downloads_only_its_own_zero_shards():
    files = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    assert ck.rank_files(files, 1) == files[:1] + files[2:]
    assert ck.rank_files(files, 0) == files[:2] + files[-1:]
    assert ck.rank_files(files, None) == files                         # no ZeRO: every file


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_written_tensor_by_tensor_load_back(tmp_path, dtype):
    from safetensors.torch import load_file

    from workers.checkpoint_writer import write_safetensors

    weights = {"w": torch.randn(3, 5).to(dtype), "b": torch.arange(4), "s": torch.tensor(1.5), "e": torch.zeros(0)}
    weights["tied"] = weights["w"]                                     # shared storage: written once
    with open(tmp_path / "m.safetensors", "wb") as f:
        write_safetensors(f, weights, as_float=dtype == torch.bfloat16)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert set(back) == {"w", "b", "s", "e"}
    for k, v in back.items():
        want = weights[k].float() if dtype == torch.bfloat16 else weights[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k
