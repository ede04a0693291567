"""Expert parallelism over two real ranks: ep_size=2 trains exactly like ep_size=1.

Two processes (torch.multiprocessing spawn, gloo, DeepSpeed on its CPU
accelerator) build the same tiny Switch decoder (4 experts) from one seed and
train it a few steps with ZeRO-1 in fp32, once with the experts replicated
(ep_size=1) and once sharded two per rank (ep_size=2), on the same data. The
per-rank, per-step losses must agree. Before training, both converted models
must also reproduce the single-device SwitchMLP model's loss.
"""
from __future__ import annotations

import json
import os
import socket

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, here and in the children

import pytest
import torch
import torch.multiprocessing as mp

from models.moe import SwitchConfig
from models.transformer import Decoder, decoder_config

WORLD_SIZE = 2
STEPS = 4
MICRO_BATCH, SEQ = 4, 32
VOCAB_USED = 64


def tiny_switch_config():
    moe = SwitchConfig(num_experts=4, every=1, capacity_factor_train=1.0, capacity_factor_eval=4.0,
                       min_capacity=0, alpha=0.01, z_loss=1e-3)
    return decoder_config("gpt2", "tiny", d_model=32, n_layers=2, n_heads=2, seq_len=SEQ, moe=moe)


def batch(step: int, rank: int) -> torch.Tensor:
    """Counting sequences mod VOCAB_USED from random starts: learnable, different per rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    start = torch.randint(0, VOCAB_USED, (MICRO_BATCH, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB_USED                                      # (B, T)


def run_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), LOCAL_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    from workers.rank import import_deepspeed

    deepspeed = import_deepspeed()  # as a rank imports it (the prebuilt ops come from conftest's environment)

    from workers.parallel.experts import DeepSpeedSwitch, expert_parallel, moe_param_groups

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    result: dict = {}
    eval_idx = batch(-1, rank)
    for ep_size in (1, 2):
        torch.manual_seed(0)
        model = Decoder(tiny_switch_config())
        model.eval()
        with torch.no_grad():
            reference = model(eval_idx, eval_idx)[1].item()                              # single-device SwitchMLP
        expert_parallel(model, ep_size)
        assert sum(isinstance(m, DeepSpeedSwitch) for m in model.modules()) == 2
        optimizer = torch.optim.AdamW(moe_param_groups(model), lr=3e-3, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        engine.eval()
        with torch.no_grad():
            converted = engine(eval_idx, eval_idx)[1].item()
        engine.train()
        losses, dropped = [], []
        for step in range(STEPS):
            idx = batch(step, rank)
            _, loss = engine(idx, idx)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            dropped.append(float(model.blocks[0].mlp.stats["dropped"]))
        n_local = sum(p.numel() for n, p in model.named_parameters() if "deepspeed_experts" in n)
        result[str(ep_size)] = dict(reference=reference, converted=converted, losses=losses,
                                    dropped=dropped, local_expert_params=n_local)
        if ep_size == 2:
            result["resume"] = resume_from_own_files(engine, rank, out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leave together and tear gloo down: a rank exiting while its peer still talks to it can abort in
    # gloo's threads ("terminate called without an active exception", SIGABRT; once in a fresh-clone run).
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def resume_from_own_files(engine, rank: int, out_dir: str) -> dict:
    """Save, then load from a folder holding only the files ``workers.checkpoint.rank_files`` gives this rank
    (what it downloads from object storage): with every weight shifted first, the reload gives back the loss
    of the saved model."""
    import shutil

    import torch.distributed as dist

    from workers.checkpoint import _dp_rank, expert_share, rank_files

    saved = os.path.join(out_dir, "ckpt")
    engine.save_checkpoint(saved, tag="t")
    dist.barrier()
    every = sorted(os.listdir(os.path.join(saved, "t")))
    mine = rank_files(every, _dp_rank(engine), expert_share(engine))
    own = os.path.join(out_dir, f"own{rank}", "t")
    os.makedirs(own)
    for name in mine:
        shutil.copy(os.path.join(saved, "t", name), own)
    idx = batch(STEPS, rank)
    with torch.no_grad():
        before = engine(idx, idx)[1].item()
        for p in engine.module.parameters():                  # the reload must put every weight back
            p.add_(0.5)
    engine.load_checkpoint(os.path.dirname(own), tag="t")
    with torch.no_grad():
        after = engine(idx, idx)[1].item()
    return dict(every=every, mine=mine, before=before, after=after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep2_matches_ep1_over_two_ranks(tmp_path):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        with open(tmp_path / f"rank{rank}.json") as f:
            r = json.load(f)
        ep1, ep2 = r["1"], r["2"]
        # conversion keeps the function (eval capacity 4.0 drops nothing, so token choice can't differ)
        assert ep1["converted"] == pytest.approx(ep1["reference"], rel=1e-5)
        assert ep2["converted"] == pytest.approx(ep2["reference"], rel=1e-5)
        # experts really are sharded: half of them live on each rank
        assert ep2["local_expert_params"] * 2 == ep1["local_expert_params"]
        # same training trajectory, step by step (with tokens dropped at capacity factor 1.0)
        assert ep2["losses"] == pytest.approx(ep1["losses"], rel=1e-4)
        assert ep2["dropped"] == pytest.approx(ep1["dropped"], abs=1e-6)
        assert max(ep1["dropped"]) > 0
        assert ep1["losses"][-1] < ep1["losses"][0]
        # a rank reads only its own experts: 2 MoE layers x 4 experts saved, 2 x 2 of them loaded, and the
        # engine loaded from just those files computes what it computed before the reload
        res = r["resume"]
        experts = [n for n in res["every"] if "_expert_" in n]
        assert len(experts) == 8
        own = [n for n in res["mine"] if "_expert_" in n]
        assert own == sorted(f"layer_{layer}_expert_{2 * rank + i}_mp_rank_00_model_states.pt"
                             for layer in (0, 1) for i in (0, 1))
        assert res["after"] == pytest.approx(res["before"], rel=1e-6)


def test_deepspeed_gating_runs_eagerly_and_compiles_nothing():
    """DeepSpeed wraps its gating helpers in torch.compile (12 s of inductor per rank process on a CPU, then a
    graph break); DeepSpeedSwitch takes the wrapper off, so gating, in training and at another shape, compiles
    no frame and gives the same routing."""
    from torch._dynamo.utils import counters

    from workers.parallel.experts import GATE_HELPERS, eager_gate_helpers
    from workers.rank import import_deepspeed

    import_deepspeed()
    from deepspeed.moe import sharded_moe

    eager_gate_helpers()
    eager_gate_helpers()                                                               # idempotent
    assert not any(hasattr(getattr(sharded_moe, name), "_torchdynamo_orig_callable") for name in GATE_HELPERS)
    counters.clear()
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    _, combine, dispatch, counts = sharded_moe.top1gating(logits, capacity_factor=1.25, min_capacity=4,
                                                          use_rts=False)[:4]
    sharded_moe.top1gating(logits[:40], capacity_factor=2.0, min_capacity=4, use_rts=False)
    assert not counters["frames"], dict(counters["frames"])
    capacity = max(4, -(-64 * 1.25 // 4))                                             # ceil(S / N x factor)
    assert dispatch.shape == (64, 4, capacity) and int(dispatch.sum()) == int(counts.clamp(max=capacity).sum())
