"""`make bench` (``python -m benchmarks``): one results file with each benchmark's last-line JSON, the commit
and the machine, and the README's figures table generated from it. One cheap benchmark in quick mode."""
import ast
import json
import os
import subprocess
import sys

import pytest

from benchmarks import readme, suite

ROOT = suite.ROOT


def test_every_script_is_in_the_suite_and_reports_met():
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                     if f.endswith(".py") and f not in ("__init__.py", "__main__.py", "suite.py", "readme.py"))
    assert sorted(b.script for b in suite.BENCHMARKS.values()) == scripts
    assert set(readme.FIGURES) == set(suite.BENCHMARKS)
    for name in scripts:
        source = open(os.path.join(ROOT, "benchmarks", name)).read()
        ast.parse(source)
        # Its last JSON line carries met: a "met" key or met= in the dict it prints.
        assert '"met"' in source or "met=" in source, f"{name} prints no 'met'"


def test_last_json_and_block_replacement():
    assert suite.last_json('x\n{"a": 1}\n') == {"a": 1}
    assert suite.last_json("no json here\n") is None
    text = f"# T\nbefore\n{readme.BEGIN}\nold table\n{readme.END}\nafter\n"
    new = readme.replace_block(text, "NEW")
    assert new == f"# T\nbefore\n{readme.BEGIN}\nNEW\n{readme.END}\nafter\n"
    assert readme.replace_block(new, "NEW") == new
    with pytest.raises(ValueError, match="no generated-figures block"):
        readme.replace_block("# T\n", "x")


def test_a_skipped_benchmark_gets_its_row():
    """A benchmark skipped for want of its input (fit_epoch without SWITCHYARD_EPOCH_CSV) has no command."""
    results = {"commit": "abc", "machine": {}, "benchmarks": {
        "fit_epoch": {"script": "fit_epoch.py", "skipped": "set SWITCHYARD_EPOCH_CSV to the input file it needs",
                      "met": None}}}
    row = next(line for line in readme.render_table(results).splitlines() if "fit_epoch.py" in line)
    assert row.startswith("| `python benchmarks/fit_epoch.py` |") and "skipped: set SWITCHYARD_EPOCH_CSV" in row


def test_bench_writes_the_results_file_and_the_readme_table_matches_it(tmp_path):
    out, doc = tmp_path / "results.json", tmp_path / "README.md"
    with open(os.path.join(ROOT, "README.md")) as f:
        original = f.read()
    assert readme.BEGIN in original and readme.END in original  # the real README has the block
    doc.write_text(original)
    env = dict(os.environ, SWITCHYARD_BENCH_ONLY="fit_speed", SWITCHYARD_BENCH_QUICK="1")
    head_before = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(out), "--readme", str(doc)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert results["commit"] in (head_before, head) and results["quick"] is True  # others may commit meanwhile
    head = results["commit"]
    m = results["machine"]
    assert m["cores"] == os.cpu_count() and m["memory_gib"] > 0 and m["device"]
    entry = results["benchmarks"]["fit_speed"]
    assert list(results["benchmarks"]) == ["fit_speed"]
    assert entry["rc"] == 0 and entry["result"]["converged"] is True and isinstance(entry["met"], bool)
    assert entry["met"] == entry["result"]["met"] and entry["commit"] in (head_before, head)

    # The README's block is exactly the table rendered from the file; the rest of the README is untouched.
    text = doc.read_text()
    block = text[text.index(readme.BEGIN) + len(readme.BEGIN):text.index(readme.END)].strip("\n")
    assert block == readme.render_table(results)
    assert text[:text.index(readme.BEGIN)] == original[:original.index(readme.BEGIN)]
    assert text[text.index(readme.END):] == original[original.index(readme.END):]
    assert head[:12] in block and f"{m['cores']} cores" in block and "quick mode" in block
    row = next(line for line in block.splitlines() if "fit_speed.py" in line)
    assert f"{entry['result']['fit_cpu_s']:.3g} s CPU" in row and row.endswith("| yes |" if entry["met"] else "| no |")
    assert "not run in this results file" in next(line for line in block.splitlines() if "throughput.py" in line)

    # --merge keeps what an earlier run measured; the README generator alone reproduces the block.
    results["benchmarks"]["ppo"] = {"script": "ppo.py", "command": "python benchmarks/ppo.py", "rc": 0, "met": True,
                                    "result": {"episodes_per_s": 40.0, "kv_cache_speedup": 8.5, "same_tokens": True,
                                               "time_split": {"generate": 0.25}, "met": True}}
    out.write_text(json.dumps(results))
    subprocess.run([sys.executable, "-m", "benchmarks.readme", "--results", str(out), "--readme", str(doc)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert "40 episodes/s (generate 25%); KV cache 8.5x faster" in doc.read_text()


def test_the_plain_torch_baseline_trains_the_specs_model_with_its_schedule():
    # benchmarks/throughput.py and job_overhead.py measure the engine against this loop.
    import torch

    from tests.conftest import tiny_spec
    from workers.parallel.engine import PlainTorch, lr_lambda

    spec = tiny_spec(**{"train.steps": 6, "train.warmup_steps": 2, "train.grad_clip": 0.5})
    plain = PlainTorch(spec, 320)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 320, (4, spec.data.seq_len), generator=g)
    y = torch.roll(x, -1, 1)
    losses, lrs = [], []
    for step in range(6):
        lrs.append(plain.opt.param_groups[0]["lr"])
        losses.append(plain.step(x, y).item())
        assert all(p.grad is None for p in plain.model.parameters())
    assert losses[-1] < losses[0]
    assert lrs == [spec.train.lr * lr_lambda(spec)(s) for s in range(6)]
