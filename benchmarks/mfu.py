"""Model FLOPs utilization of the project's LLaMA-style decoder, sized to the device, against the device's peak.

The model is ``models.transformer.Decoder`` in the llama style (RMSNorm,
SwiGLU, RoPE, attention through ``F.scaled_dot_product_attention``):

* on a GPU, about 1.0B parameters (d_model 2048, 18 layers, 16 heads, vocab
  32,000, sequence 2048, micro batch 4), built on the device; bf16 autocast
  where the GPU supports bf16 (fp32 weights and AdamW state, fused AdamW);
* on a CPU, a small one (d_model 256, 4 layers, sequence 256, vocab 8192,
  batch 4), in bf16 autocast when the CPU has bf16 instructions
  (avx512_bf16 / amx_bf16), else fp32.

Tokens are random ids generated on the device (nothing is downloaded; the
speed of a step does not depend on the values). FLOPs per token are PaLM's
``6N + 12 * layers * heads * head_dim * seq`` (``flops_per_token``'s
``with_attention``). The peak is, in this order: ``--peak-flops``,
``workers.peak_flops`` of cluster.yaml, the dense bf16 table of known GPUs
(``workers.metrics.PEAK_FLOPS``), or, on a CPU or an unknown GPU, the best
large-matmul throughput measured here in the run's dtype (a practical peak:
said so in the output as ``peak_source: "measured"``).

Targets (``met``): MFU >= 0.30 against a table or configured peak (large
training systems reach 0.33-0.47; an uncompiled PyTorch loop sits lower),
and >= 0.30 against a measured matmul peak on a CPU.

Run: ``.venv/bin/python benchmarks/mfu.py [--steps 20] [--warmup 5] [--device auto|cpu|cuda]
[--batch N] [--seq N] [--compile]``. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_MFU = 0.30
SIZES = {
    "cuda": dict(d_model=2048, n_layers=18, n_heads=16, seq_len=2048, vocab_size=32000, batch=4),
    "cpu": dict(d_model=256, n_layers=4, n_heads=8, seq_len=256, vocab_size=8192, batch=4),
}


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_dtype(device) -> "torch.dtype":
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak(device, dtype, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` on ``device``."""
    import torch

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats + 1):                           # the first one warms up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def configured_peak() -> float | None:
    """``workers.peak_flops`` of cluster.yaml (None when unset or there is no cluster file)."""
    from orchestrator.cluster_config import load_cluster_config

    try:
        return load_cluster_config().workers.peak_flops
    except Exception:  # noqa: BLE001 -- a broken cluster file is not this benchmark's business
        return None


def peak(device, dtype, given: float | None) -> tuple[float, str]:
    """(peak FLOP/s of the device, where it came from)."""
    from workers.metrics import PEAK_FLOPS

    if given:
        return given, "--peak-flops"
    if (conf := configured_peak()) is not None:
        return conf, "cluster.yaml"
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops, f"table ({key})"
    return measured_peak(device, dtype), "measured"


def train(cfg, device, dtype, batch: int, steps: int, warmup: int, compile_model: bool) -> dict:
    """Steps of AdamW on random tokens; timings of the steps after ``warmup``."""
    import torch

    from models.transformer import Decoder

    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model) if compile_model else model
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    T = cfg.seq_len
    times = []
    for _ in range(warmup + steps):
        x = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
        sync(device)
        t0 = time.perf_counter()
        with amp:
            _, loss = step_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    steady = times[warmup:]
    out = {"tokens_per_s": batch * T * len(steady) / sum(steady), "median_step_s": sorted(steady)[len(steady) // 2],
           "final_loss": loss.item()}
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="micro batch (default: by device)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: by device)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: by device)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    ap.add_argument("--peak-flops", type=float, default=None, help="the device's peak FLOP/s")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")

    import torch

    from models.transformer import decoder_config, flops_per_token, param_counts

    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
    size = dict(SIZES[kind])
    batch = size.pop("batch")
    batch = args.batch or batch
    size["seq_len"] = args.seq or size["seq_len"]
    size["n_layers"] = args.layers or size["n_layers"]
    cfg = decoder_config("llama", None, **size)
    dtype = run_dtype(device)
    n_params = param_counts(cfg)["total"]
    fpt = flops_per_token(cfg, cfg.seq_len)["with_attention"]
    peak_flops, source = peak(device, dtype, args.peak_flops)
    name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
    print(f"mfu: llama decoder, {n_params / 1e6:.1f}M parameters (d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, vocab {cfg.vocab_size}), batch {batch} x seq {cfg.seq_len}, {str(dtype)[6:]} on "
          f"{name}; peak {peak_flops / 1e12:.2f} TFLOP/s ({source}); {args.steps} steps after {args.warmup}")
    res = train(cfg, device, dtype, batch, args.steps, args.warmup, args.compile)
    mfu = res["tokens_per_s"] * fpt / peak_flops
    print(f"{res['tokens_per_s']:.0f} tokens/s, {res['tokens_per_s'] * fpt / 1e12:.3f} TFLOP/s achieved, "
          f"MFU {100 * mfu:.1f}% (target >= {100 * TARGET_MFU:.0f}%: {'met' if mfu >= TARGET_MFU else 'MISSED'})")
    print(json.dumps({
        "benchmark": "mfu", "device": name, "dtype": str(dtype)[6:], "n_params": n_params,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
        "batch": batch, "seq_len": cfg.seq_len, "steps": args.steps, "warmup": args.warmup,
        "compiled": args.compile, "flops_per_token": fpt, "peak_flops": peak_flops, "peak_source": source,
        "threads": torch.get_num_threads(), **{k: round(v, 4) for k, v in res.items()},
        "mfu": round(mfu, 4), "target_mfu": TARGET_MFU, "met": mfu >= TARGET_MFU,
    }))


if __name__ == "__main__":
    main()
