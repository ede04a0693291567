"""Validating and submitting a spec imports neither torch, scipy, matplotlib nor Ray, and still checks the model.

``switchyard submit`` with no controller validates the spec, the model's own invariants included (its config
is built by ``workers/model_config.py`` from the torch-free ``models/*_config.py`` modules), and writes a row
to the job store. Each test runs a fresh interpreter, since this one has imported torch long ago.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "scipy", "matplotlib", "ray")


def _fresh_python(tmp_path, code: str, *args: str) -> tuple[list[str], dict]:
    """Run ``code`` in a new interpreter (HOME in tmp_path); its stdout lines before the last, and the last as JSON."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_submit_queues_the_job_without_torch_scipy_matplotlib_or_ray(tmp_path):
    from orchestrator.job_store import JobStore

    store = tmp_path / "state" / "jobs.db"
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {store}\n")
    code = ("import json, sys\n"
            "from orchestrator.cli import main\n"
            "code = main(['--cluster', sys.argv[1], 'submit', sys.argv[2]])\n"
            f"print(json.dumps({{'code': code, 'imported': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    printed, result = _fresh_python(tmp_path, code, str(cluster), os.path.join(ROOT, "examples", "pretrain.yaml"))
    assert result == {"code": 0, "imported": []}
    [rec] = JobStore(str(store)).list()
    assert printed == [rec.id] and rec.name == "pretrain-tiny" and rec.state == "QUEUED"
    assert rec.resources["workers"] == 2


# A bad shape of every family, and what validation says about it (the same lines as when it imported torch).
SHAPE_ERRORS = [
    ({"model.family": "gpt2", "model.d_model": 100, "model.n_heads": 3},
     "model: d_model (100) must be divisible by n_heads (3)"),
    ({"model.family": "llama", "model.preset": "huge"},
     "model: unknown preset 'huge'; choose one of ['base', 'gpt3-13b', 'gpt3-175b', 'gpt3-2.7b', 'gpt3-6.7b', "
     "'gpt3-large', 'gpt3-medium', 'gpt3-small', 'gpt3-xl', 'large', 'medium', 'mini', 'small', 'tiny']"),
    ({"model.family": "palm", "model.n_kv_heads": 3}, "model: n_kv_heads (3) must divide n_heads (4)"),
    ({"model.family": "llama", "model.moe": {"jitter": 1.5}}, "model: moe.jitter must be in [0, 1), got 1.5"),
    ({"model.family": "bert", "model.n_heads": 5}, "model: d_model (96) must be divisible by n_heads (5)"),
    ({"model.family": "albert", "model.moe": {"every": 2}},
     "model: share_layers uses one block for all layers, so moe.every must be 1, got 2"),
    ({"model.family": "electra", "model.d_model": 16, "model.n_heads": 2},
     "model: the generator (gen_d_model=32) must not be wider than the discriminator (d_model=16)"),
    ({"model.family": "electra", "model.moe": {"num_experts": 4}},
     "model: electra has no Switch (MoE) layers; leave model.moe out"),
    ({"model.family": "t5", "data.seq_len": 4096},
     "model: t5 has 127 sentinels for noise spans, and data.seq_len 4096 makes 205; use a shorter data.seq_len "
     "or a longer data.noising.mean_span_length"),
    ({"model.family": "bart", "model.tie_embeddings": False},
     "model: bart always ties its output head to the shared embedding; leave tie_embeddings out"),
    ({"model.family": "bart", "model.d_model": 100, "model.n_heads": 7},
     "model: d_model (100) must be divisible by n_heads (7)"),
    ({"eval.shards": 4}, "eval.shards: 4 shards for 3 blocks; use at most one shard per block"),
]


def test_model_shape_errors_of_every_family_are_caught_at_validation_without_torch(tmp_path):
    code = ("import json, sys\n"
            "from specs.job import SpecError, apply_overrides, validate_spec\n"
            "base = {'name': 't', 'model': {'family': 'llama', 'preset': 'tiny'},\n"
            "        'data': {'corpus': 'builtin:stdlib', 'seq_len': 64}, 'train': {'steps': 8}}\n"
            "said = []\n"
            "for case in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        validate_spec(apply_overrides(base, [f'{k}={json.dumps(v)}' for k, v in case.items()]), 's.yaml')\n"
            "        said.append(None)\n"
            "    except SpecError as err:\n"
            "        said.append(str(err))\n"
            f"print(json.dumps({{'said': said, 'imported': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    _, result = _fresh_python(tmp_path, code, json.dumps([case for case, _ in SHAPE_ERRORS]))
    assert result["said"] == [f"s.yaml: {message}" for _, message in SHAPE_ERRORS]
    assert result["imported"] == []

