"""Every documented way to reach a cluster: `address: auto` and `ray://` against a head started outside Switchyard."""
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
JOB = ["--set", "train.steps=2", "--set", "checkpoint.every=2", "--set", "data.max_docs=200",
       "--set", "data.seq_len=64", "--set", "model.preset=tiny", "--set", "eval.held_out_tokens=2048",
       "--set", "eval.batches=1", "--json"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outside_head():
    """`ray start --head --ray-client-server-port` as a user would, with its own temp dir and token."""
    tmp = tempfile.mkdtemp(prefix="syat")
    token = os.path.join(tmp, "token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token, DS_ACCELERATOR="cpu")
    gcs, client = _port(), _port()
    out = subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                          "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                          "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    session = os.path.basename(os.path.realpath(os.path.join(tmp, "ray", "session_latest")))
    yield {"env": env, "tmp": tmp, "client": f"ray://127.0.0.1:{client}", "gcs": f"127.0.0.1:{gcs}"}
    from orchestrator.local_head import stop_session

    stop_session(session)


def _sy(head, address, *args, env=None):
    cluster = os.path.join(head["tmp"], f"cluster-{abs(hash(address))}.yaml")
    with open(cluster, "w") as f:
        json.dump({"ray": {"address": address}, "storage": os.path.join(head["tmp"], "runs"),
                   "job_store": os.path.join(head["tmp"], "state", "jobs.db")}, f)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "--cluster", cluster, *args],
                          env=env or head["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("how", ["auto", "ray://"])
def test_a_job_runs_on_a_head_started_outside_switchyard(outside_head, how):
    address = "auto" if how == "auto" else outside_head["client"]
    out = _sy(outside_head, address, "run", os.path.join(ROOT, "examples", "pretrain.yaml"), *JOB)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "SUCCEEDED"


def test_a_wrong_token_or_no_cluster_gets_one_line(outside_head, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text(secrets.token_hex(32))
    env = dict(outside_head["env"], RAY_AUTH_TOKEN_PATH=str(wrong))
    example = os.path.join(ROOT, "examples", "pretrain.yaml")
    refused = _sy(outside_head, outside_head["gcs"], "run", example, env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "token" in refused.stderr
    nothing = _sy(outside_head, f"127.0.0.1:{_port()}", "run", example)
    assert nothing.returncode == 2 and nothing.stderr.count("\n") == 1, nothing.stderr[-2000:]
    assert "cannot reach the Ray cluster" in nothing.stderr
