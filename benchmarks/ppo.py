"""PPO throughput: episodes per second, the time split between phases, and what the KV cache buys.

Runs PPO iterations of ``workers.rlhf.steps.ppo_step`` (generate, score,
advantages, update) on the built-in instruction task with the four InstructGPT
roles (policy and reference Decoders, reward and value ScalarHeadModels), single
process, one thread. Weights are freshly initialised: the figures are about
speed, not quality, and speed does not depend on what the weights are.

Then times generation alone, the same prompts and seed, with the key/value
cache and without it (recomputing the whole sequence for every new token), and
checks that both sample the same tokens.

Run: ``.venv/bin/python benchmarks/ppo.py [--preset tiny] [--iters 4] [--rollout 32] [--new-tokens 32]``.
The last line printed is one JSON object. Targets, all in ``met``: generation with the
KV cache samples the same tokens as without it, and is at least MIN_KV_SPEEDUP times faster.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from data.instruct import make_prompts
from data.tokenizer import byte_tokenizer
from models.generate import SamplingConfig, generate
from models.heads import ScalarHeadModel
from models.transformer import Decoder, decoder_config
from workers.rlhf import ppo_math as pm
from workers.rlhf.ppo_config import PPOConfig
from workers.rlhf.steps import PPORoles, adamw, optimizer_step, ppo_step


MIN_KV_SPEEDUP = 2.0  # generation without the cache over with it (measured 8.7x at 32 new tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="llama")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=4, help="timed PPO iterations (after one warm-up)")
    ap.add_argument("--rollout", type=int, default=32, help="prompts (episodes) per iteration")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    tok = byte_tokenizer()
    cfg = decoder_config(args.family, args.preset, vocab_size=tok.padded_vocab_size, seq_len=256)
    policy, reference = Decoder(cfg), Decoder(cfg)
    reference.load_state_dict(policy.state_dict())
    reward, value = ScalarHeadModel(Decoder(cfg)), ScalarHeadModel(Decoder(cfg))
    for frozen in (reference, reward):
        frozen.requires_grad_(False).eval()
    roles = PPORoles(policy=policy, value=value, reference=reference, reward=reward,
                     policy_step=optimizer_step(adamw(policy, 2e-4), policy.parameters()),
                     value_step=optimizer_step(adamw(value, 5e-4), value.parameters()))
    # One sample per prompt: each iteration is exactly --rollout episodes.
    ppo = PPOConfig(rollout_size=args.rollout, minibatch_size=max(1, args.rollout // 2), ppo_epochs=2,
                    max_new_tokens=args.new_tokens, samples_per_prompt=1, loo_baseline=False)
    # Never stop at eos: every episode generates exactly --new-tokens tokens, so runs compare.
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, eos_id=None, pad_id=tok.pad_id)
    prompts = [tok.encode(p) for p in make_prompts(args.rollout * (args.iters + 1), "train")]
    kl_ctl = pm.FixedKLController(ppo.kl_beta)
    gen = torch.Generator().manual_seed(args.seed)

    phases: dict[str, float] = {}
    t_total = 0.0
    for it in range(args.iters + 1):
        batch = prompts[it * args.rollout:(it + 1) * args.rollout]
        t0 = time.perf_counter()
        stats = ppo_step(roles, batch, ppo, kl_ctl, sampling, gen)
        dt = time.perf_counter() - t0
        if it == 0:
            continue  # warm-up: first-call allocations
        t_total += dt
        for key, secs in stats.items():
            if key.startswith("t_"):
                phases[key[2:]] = phases.get(key[2:], 0.0) + secs
        print(f"iteration {it}: {dt:.2f} s, " + ", ".join(f"{k[2:]} {v:.2f}" for k, v in stats.items()
                                                         if k.startswith("t_")))
    episodes_per_s = args.iters * args.rollout / t_total
    split = {k: v / t_total for k, v in phases.items()}

    # Generation alone: with and without the KV cache, same seed, same tokens expected.
    policy.eval()
    batch = prompts[:args.rollout]
    timings, outputs = {}, {}
    for use_cache in (True, False, True, False):
        g = torch.Generator().manual_seed(args.seed + 1)
        t0 = time.perf_counter()
        out = generate(policy, batch, sampling, g, use_cache=use_cache)
        timings.setdefault(use_cache, []).append(time.perf_counter() - t0)
        outputs[use_cache] = out.response_ids
    same = bool(torch.equal(outputs[True], outputs[False]))
    cached, uncached = min(timings[True]), min(timings[False])

    print(f"\nPPO ({args.family}/{args.preset}, {args.rollout} episodes x {args.new_tokens} tokens per iteration, "
          f"1 thread): {episodes_per_s:.2f} episodes/s")
    print("time split: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in split.items()))
    print(f"generation of {args.rollout} x {args.new_tokens} tokens: with KV cache {cached:.3f} s, without "
          f"{uncached:.3f} s: {uncached / cached:.2f}x faster with the cache; same tokens: {same}")
    print(json.dumps({
        "benchmark": "ppo", "family": args.family, "preset": args.preset, "iters": args.iters,
        "episodes_per_iteration": args.rollout, "new_tokens": args.new_tokens,
        "episodes_per_s": round(episodes_per_s, 3), "seconds_per_iteration": round(t_total / args.iters, 3),
        "time_split": {k: round(v, 4) for k, v in split.items()},
        "generate_s_with_cache": round(cached, 4), "generate_s_without_cache": round(uncached, 4),
        "kv_cache_speedup": round(uncached / cached, 3), "same_tokens": same,
        "targets": {"kv_cache_speedup": MIN_KV_SPEEDUP, "same_tokens": True},
        "met_by_target": {"kv_cache_speedup": uncached / cached >= MIN_KV_SPEEDUP, "same_tokens": same},
        "met": bool(same and uncached / cached >= MIN_KV_SPEEDUP),
    }))


if __name__ == "__main__":
    main()
