"""Checkpoint evaluation: held-out loss and perplexity of one complete checkpoint.

Runs as a Ray task on resources the controller reserves for it
(``workers.eval_cpus`` CPUs, and one GPU when the job's ranks had GPUs; with
``eval.shards`` > 1, that much for each shard actor), so it
neither steals cores from training ranks nor waits behind them for a share of
an oversubscribed CPU. It reads only tensors (the consolidated safetensors) and
the held-out slice of the token stream that training never sees, in batches of
the job's micro batch, on the GPU when it has one.
"""
from __future__ import annotations

import math


def evaluate_checkpoint(storage, run_dir: str, ckpt_path: str, step: int, batches: int, micro_batch: int,
                        threads: int = 1, gpus: int = 0) -> dict:
    """One checkpoint's held-out evaluation. With ``eval.shards`` > 1 this task only drives the shard actors
    (``workers.sharded_eval``), each on ``threads`` CPUs and ``gpus`` GPUs of its own."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray set CUDA_VISIBLE_DEVICES
    from data.sampler import DataPlan
    from data.shards import TokenCache
    from specs.job import validate_spec
    from workers.checkpoint import load_consolidated
    from workers.few_shot import with_few_shot
    from workers.tasks import build_model, config_from_dict, make_task
    from workers.weights import load_state

    info = storage.read_json(f"{run_dir}/data.json")
    spec = validate_spec(storage.read_json(f"{run_dir}/spec.json"))
    if spec.kind == "classify":
        from workers.classify import evaluate_classify_checkpoint

        return evaluate_classify_checkpoint(storage, spec, run_dir, ckpt_path, step)
    if spec.eval.shards > 1:
        from workers.sharded_eval import evaluate_sharded

        return evaluate_sharded(storage, spec, run_dir, ckpt_path, step, batches, micro_batch, threads, gpus)
    if spec.kind not in ("pretrain", "distill"):                 # a distill run holds its student only
        return with_few_shot(evaluate_stage_checkpoint(storage, spec, run_dir, ckpt_path, step), storage, spec, run_dir)
    cfg = config_from_dict(spec.model.family, storage.read_json(f"{run_dir}/model_config.json")["model"])
    model = build_model(cfg)
    state = load_consolidated(storage, ckpt_path)
    load_state(model, state, f"checkpoint {ckpt_path}")
    model.to(device).eval()
    cache = TokenCache.load(info["token_cache"], storage)
    plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
    task = make_task(spec, cfg, plan, cache.tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(batches):
            batch = task.held_out(i, micro_batch)
            if batch is None:
                break
            batch = {k: (torch.as_tensor(v).to(device, non_blocking=True) if v is not None else None)
                     for k, v in batch.items()}
            n = len(next(iter(batch.values())))
            loss, extras = task.loss(model, batch)
            total += extras.get("mlm_loss", float(loss)) * n
            count += n
    if count == 0:
        raise RuntimeError("eval.held_out_tokens is too small for one held-out sample")
    loss = total / count
    return with_few_shot({"checkpoint": ckpt_path, "step": step, "loss": loss, "perplexity": math.exp(min(loss, 50)),
                          "tokens": count * spec.data.seq_len}, storage, spec, run_dir, model, cache.tokenizer)


def evaluate_stage_checkpoint(storage, spec, run_dir: str, ckpt_path: str, step: int) -> dict:
    """An InstructGPT stage's checkpoint, on the stage's own held-out data; lower ``loss`` is better.

    sft: held-out loss on response tokens. rm: held-out ranking loss (and
    pairwise accuracy). ppo: -(reward - kl_beta * KL) of samples on held-out
    prompts, the objective PPO maximises, with reward and KL as extras.
    """
    import torch

    from workers.rlhf import datasets as stages
    from workers.weights import load_policy, load_reward_model, run_tokenizer

    tok = run_tokenizer(storage, run_dir)
    files = stages.stage_files(spec, run_dir)
    if spec.kind == "sft":
        _, held = stages.sft_data(spec, files)
        total, count = stages.sft_heldout_sums(load_policy(storage, ckpt_path), tok, held, spec.rlhf.sft.response_only)
        loss = total / max(count, 1.0)
        return {"checkpoint": ckpt_path, "step": step, "loss": loss, "perplexity": math.exp(min(loss, 50)),
                "tokens": int(count), "extra": {}}
    if spec.kind == "rm":
        _, held = stages.rm_data(spec, files)
        right, pairs, loss, prompts = stages.rm_heldout_sums(load_reward_model(storage, ckpt_path), tok, held)
        return {"checkpoint": ckpt_path, "step": step, "loss": loss / prompts, "perplexity": None,
                "tokens": 0, "extra": {"accuracy": right / pairs}}
    from models.generate import SamplingConfig
    from workers.rlhf.steps import reward_and_kl

    p = spec.rlhf.ppo
    _, prompts = stages.ppo_data(spec, files)
    prompts = [x for x in prompts if len(tok.encode(x)) + p.max_new_tokens <= spec.data.seq_len][:p.eval_prompts]
    sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ckpt = storage.read_json(f"{ckpt_path}/manifest.json")
    r = reward_and_kl(load_policy(storage, ckpt_path), load_policy(storage, spec.model.init_from),
                      load_reward_model(storage, p.reward_model), tok, prompts, sampling,
                      torch.Generator().manual_seed(spec.train.seed))
    beta = float(ckpt.get("kl_beta", p.kl_beta))
    return {"checkpoint": ckpt_path, "step": step, "loss": -(r["reward"] - beta * r["kl"]), "perplexity": None,
            "tokens": 0, "extra": {"reward": r["reward"], "kl": r["kl"], "kl_beta": beta}}
