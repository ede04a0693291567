"""Every benchmark in benchmarks/, run one after another, into one results file.

Each benchmark is a script that prints its figures and, on its last line, one
JSON object whose ``met`` says whether it reached every target it states.
``run_suite`` runs them as child processes (as a user would, from the
repository root), keeps each one's last-line JSON, exit code and seconds, and
writes them with the commit and the machine (cores, memory, device) to one
JSON file, ``benchmarks/results.json`` by default. The README's figures table
is generated from that file (``benchmarks/readme.py``).

``quick`` runs each with small arguments: the same code paths in seconds to
minutes, figures that say nothing about speed. The tests use it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results.json")
EPOCH_CSV_ENV = "SWITCHYARD_EPOCH_CSV"
"""Path of Epoch AI's svg_extracted_data.csv for fit_epoch (not shipped; the benchmark is skipped without it)."""


@dataclass(frozen=True)
class Benchmark:
    """One script of benchmarks/ and how the suite calls it."""

    script: str
    """File name in benchmarks/."""
    what: str
    """One line for the README table."""
    target: str
    """The targets its ``met`` covers, as the script documents them."""
    args: tuple[str, ...] = ()
    """Arguments of a full run (the script's defaults when empty)."""
    quick: tuple[str, ...] = ()
    """Arguments of a quick run (same code paths, small sizes)."""
    needs_env: str | None = None
    """An environment variable whose value is passed as the first argument; skipped when it is unset."""


BENCHMARKS: dict[str, Benchmark] = {
    "throughput": Benchmark(
        "throughput.py", "tokens/s of a 1-worker `switchyard run` vs a plain PyTorch loop, same model, batch, threads",
        "wall ratio >= 0.95",
        quick=("--steps", "14", "--warmup", "4", "--rounds", "1", "--max-docs", "100", "--preset", "tiny")),
    "zero_memory": Benchmark(
        "zero_memory.py", "per-rank bytes/param of model state under ZeRO 0-3, 2 ranks, vs the ZeRO paper's accounting",
        "every stage and precision <= 1.3 x theory",
        quick=("--stages", "0,3", "--precision", "fp32", "--preset", "tiny")),
    "job_overhead": Benchmark(
        "job_overhead.py", "fixed overhead per job: `switchyard submit` vs Ray Train `TorchTrainer`, same 2-worker job",
        "warm gang start <= 0.05 x Ray Train, total <= 0.1 x; cold first job (warm pool) start <= 0.1 x, total <= 1 x",
        quick=("--steps", "2", "--repeats", "1")),
    "sweep_overhead": Benchmark(
        "sweep_overhead.py", "50 tiny one-worker runs submitted at once to the controller on a 4-CPU local Ray",
        "wall <= 1.2 x (sum of the runs' step times / 4)",
        quick=("--runs", "4", "--steps", "4")),
    "moe": Benchmark(
        "moe.py", "Switch (8 experts every other block) vs dense with the same active parameters, same batches",
        "tokens/s ratio >= 0.8; Switch held-out CE <= dense",
        quick=("--steps", "24", "--batch", "8", "--seq", "64")),
    "ppo": Benchmark(
        "ppo.py", "PPO iterations of the stages' `ppo_step` (tiny LLaMA roles); generation with and without the KV cache",
        "KV cache same tokens and >= 2x faster",
        quick=("--iters", "1", "--rollout", "8", "--new-tokens", "24")),
    "fit_speed": Benchmark(
        "fit_speed.py", "Chinchilla approach 3, full 4500-start grid, 300 points, vs scipy's L-BFGS-B from "
        "every start; bootstrap of 100 vs 100 full fits", "converged; fit CPU <= 0.25 x scipy's; bootstrap CPU "
        "<= 0.02 x 100 fits", quick=("--points-per-budget", "6", "--bootstrap", "0", "--scipy", "3")),
    "fit_epoch": Benchmark(
        "fit_epoch.py", "approach 3 and intervals on Epoch AI's 240 Chinchilla points",
        "E, alpha, beta equal Epoch's refit to 4 digits; converged; intervals contain estimates",
        quick=("--bootstrap", "10"), needs_env=EPOCH_CSV_ENV),
    "data_scale": Benchmark(
        "data_scale.py", "tokenization pool throughput; rank RSS and time to first step on 10 MB to 2 GB corpora",
        "pool >= 0.8 x actors x 1-core baseline; RSS growth <= 100 MB; first step <= 5 s later",
        quick=("--sizes-mb", "1", "2", "--tok-mb", "1", "--steps", "2")),
    "distill": Benchmark(
        "distill.py", "a 2-layer student trained with its 4-layer teacher (kind: distill) vs the same student alone",
        "held-out loss with the teacher < alone (same steps, init, batches), from scratch and from its layers",
        quick=("--teacher-steps", "6", "--steps", "4", "--max-docs", "400", "--eval-batches", "2",
               "--no-from-layers")),
    "mfu": Benchmark(
        "mfu.py", "MFU of the llama decoder sized to the device (~1B params on a GPU, small on CPU), bf16 where supported",
        "MFU >= 0.30 of the device's peak (GPU table, cluster.yaml, or a measured matmul peak on CPU)",
        quick=("--steps", "2", "--warmup", "1", "--layers", "1", "--seq", "64")),
    "checkpoint_stall": Benchmark(
        "checkpoint_stall.py", "step time while a checkpoint is written behind training; rank 0's peak memory",
        "step during a write <= 1.2 x without; peak during consolidation <= 1.2 x the training peak",
        quick=("--preset", "tiny", "--steps", "2")),
    "preemption": Benchmark(
        "preemption.py", "a high-priority job on a full cluster: its wait, and what the preempted job loses",
        "wait <= checkpoint interval + a start; 0 steps lost; losses equal an uninterrupted run",
        quick=("--steps", "24", "--every", "4", "--at", "6")),
    "controller_scale": Benchmark(
        "controller_scale.py", "the controller's scheduling tick, submits, `list` and `status` at 10,000 and 100,000 "
        "queued jobs on 64 nodes",
        "changed tick <= 100 ms (10k) and <= 1 s (100k) CPU; >= 500 submits/s",
        quick=("--sizes", "300,1000", "--ticks", "2")),
}


def git_commit(root: str = ROOT) -> dict:
    """The commit the tree is at, and whether tracked files differ from it (the suite's own outputs, the
    results file and README.md's table, aside: a ``--merge`` run starts with them changed)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("status", "--porcelain", "-uno", "--", ".", f":!{RESULTS}", ":!README.md")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed)}


def machine() -> dict:
    """Cores, memory and device of this machine, with what else shapes the figures."""
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        mem_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "memory_gib": mem_gib, "device": device, "cpu": cpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch_version}


def last_json(stdout: str) -> dict | None:
    """The last line of the output that is a JSON object, or None."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def run_one(name: str, quick: bool = False, timeout: float | None = None, log=print) -> dict:
    """Run one benchmark as a child process; its entry for the results file."""
    b = BENCHMARKS[name]
    args = list(b.quick if quick else b.args)
    if b.needs_env:
        path = os.environ.get(b.needs_env)
        if not path:
            return {"script": b.script, "skipped": f"set {b.needs_env} to the input file it needs", "met": None}
        args = [path, *args]
    cmd = [sys.executable, os.path.join("benchmarks", b.script), *args]
    shown = " ".join(["python", cmd[1], *args])
    log(f"== {name}: {shown}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    commit = git_commit()  # the tree the benchmark starts on (others may commit while it runs)
    t0 = time.time()
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = None if timeout is None else t0 + timeout
        for line in proc.stdout:  # echoed as it comes: a long benchmark is never silent
            lines.append(line)
            log(f"   {line.rstrip()}")
            if deadline and time.time() > deadline:
                proc.kill()
                break
        rc = proc.wait()
    except OSError as e:
        return {"script": b.script, "command": shown, "rc": None, "error": str(e), "met": None}
    seconds = round(time.time() - t0, 1)
    result = last_json("".join(lines))
    entry = {"script": b.script, "command": shown, "quick": quick, "rc": rc, "seconds": seconds,
             "met": result.get("met") if result else None, "result": result,
             "date": datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).isoformat(timespec="seconds"), **commit}
    if rc != 0 or result is None:
        entry["error"] = "".join(lines[-20:]) or f"exit code {rc}, no output"
    if result is not None and "met" not in result:
        entry["error"] = "its last JSON line has no 'met'"
    return entry


def run_suite(names: list[str] | None = None, quick: bool = False, out: str = RESULTS, merge: bool = False,
              timeout: float | None = None, log=print) -> dict:
    """Run the benchmarks (all, or ``names``) and write the results file; returns its contents.

    ``merge``: keep the entries of an existing results file for benchmarks not run now (each entry
    names its own commit and date).
    """
    names = list(names or BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; one of {', '.join(BENCHMARKS)}")
    path = out if os.path.isabs(out) else os.path.join(ROOT, out)
    previous = {}
    if merge and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("benchmarks", {})
    results = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(), "machine": machine(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "quick": quick, "benchmarks": dict(previous),
    }
    for name in names:
        entry = run_one(name, quick=quick, timeout=timeout, log=log)
        entry["machine"] = results["machine"]
        results["benchmarks"][name] = entry
        log(f"== {name}: " + (f"skipped ({entry['skipped']})" if entry.get("skipped")
                              else f"met={entry['met']} rc={entry.get('rc')} in {entry.get('seconds')} s"))
    results["benchmarks"] = {n: results["benchmarks"][n] for n in BENCHMARKS if n in results["benchmarks"]}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return results
