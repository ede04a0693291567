"""The user's path through the CLI, in subprocesses: up, submit, status, logs, wait, list, cancel, down."""
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sy(cluster, *args, check=True, timeout=300):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--cluster", str(cluster), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"switchyard {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


def test_cli_lifecycle(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'state' / 'jobs.db'}\n"
                       "ray: {num_cpus: 4}\n")
    spec = ["--set", "train.steps=6", "--set", "checkpoint.every=3", "--set", "data.max_docs=300",
            "--set", "data.seq_len=64", "--set", "model.preset=tiny"]
    try:
        assert "switchyard is up" in sy(cluster, "up").stdout
        token = tmp_path / "state" / "ray_auth_token"  # Switchyard's own token, kept with its state
        assert token.exists() and (token.stat().st_mode & 0o777) == 0o600 and len(token.read_text()) == 64
        address = (tmp_path / "state" / "ray_address").read_text()
        assert address.startswith("127.0.0.1:")
        gcs = [c.laddr.ip for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == int(address.split(":")[1])]
        assert gcs and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in gcs), gcs  # not every interface
        job = sy(cluster, "submit", os.path.join(ROOT, "examples", "pretrain.yaml"), "--priority", "3",
                 *spec).stdout.strip()
        assert job.startswith("sy-")
        long_job = sy(cluster, "submit", os.path.join(ROOT, "examples", "pretrain.yaml"),
                      "--set", "train.steps=100000", "--set", "name=long").stdout.strip()
        assert sy(cluster, "wait", job, "--timeout", "240").returncode == 0
        status = json.loads(sy(cluster, "status", job, "--json").stdout)
        for key in ("id", "name", "state", "priority", "step", "restarts", "run_dir", "metrics", "evals",
                    "best_checkpoint", "workers", "history"):
            assert key in status
        assert status["state"] == "SUCCEEDED" and status["priority"] == 3 and status["step"] == 6
        assert [h["to"] for h in status["history"]][:4] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
        logs = sy(cluster, "logs", job).stdout
        assert "[switchyard] rank 0/2" in logs and "[switchyard] rank 1/2" in logs
        tail = sy(cluster, "logs", job, "--tail", "2").stdout.splitlines()  # each rank's last 2 lines only
        assert len(tail) == 4 and all(
            [t for t in tail if t.startswith(f"[{r}] ")] == [x for x in logs.splitlines() if x.startswith(f"[{r}] ")][-2:]
            for r in ("rank_0", "rank_1")), tail
        cluster_view = json.loads(sy(cluster, "status", "--json").stdout)
        assert cluster_view["controller"]["alive"] and cluster_view["nodes"]
        assert cluster_view["nodes"][0]["total"]["CPU"] == 4
        assert {j["id"] for j in cluster_view["running"] + cluster_view["queued"]} == {long_job}
        deadline = time.time() + 120  # a running job's status says how far it is and how long it has left
        while "progress:" not in (text := sy(cluster, "status", long_job).stdout) and time.time() < deadline:
            time.sleep(1)
        assert "/100000  restarts" in text and " steps/s, about " in text, text
        assert sy(cluster, "cancel", long_job, "--checkpoint").stdout == (
            f"{long_job}: RUNNING (stopping after a checkpoint at the next step)\n")
        assert sy(cluster, "wait", long_job, "--timeout", "240", check=False).returncode == 1
        assert "with a checkpoint" in json.loads(sy(cluster, "status", long_job, "--json").stdout)["reason"]
        listing = sy(cluster, "list").stdout
        assert job in listing and "SUCCEEDED" in listing and "CANCELLED" in listing
        assert " 6/6 " in next(line for line in listing.splitlines() if line.startswith(job))
        again = sy(cluster, "requeue", long_job).stdout  # back in the queue; cancelled again below
        assert again.startswith(f"{long_job}: QUEUED again (was CANCELLED at step "), again
        assert sy(cluster, "cancel", long_job).returncode == 0
        bad = sy(cluster, "status", "sy-nope", check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    finally:
        sy(cluster, "down", check=False)
    assert not (tmp_path / "state" / "ray_address").exists()


def _interrupted_run(cluster, sig, *args):
    """`switchyard run ...` stopped with ``sig`` once it trains; returns (exit code, its output)."""
    import signal

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--cluster", str(cluster), "run", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's Ctrl-C
    try:
        out = []
        for line in p.stdout:
            out.append(line)
            if line.startswith("start-up "):  # the first step is done
                break
        time.sleep(3.0)
        p.send_signal(sig)
        out.append(p.stdout.read())
        return p.wait(timeout=120), "".join(out)
    finally:
        p.kill()


def test_ctrl_c_and_sigterm_stop_a_run_at_a_saved_step_that_resume_continues(tmp_path):
    import signal

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'state' / 'jobs.db'}\n")
    spec = [os.path.join(ROOT, "examples", "pretrain.yaml"), "--set", "train.steps=100000",
            "--set", "checkpoint.every=100000", "--set", "data.max_docs=300", "--set", "resources.workers=1"]
    rc, out = _interrupted_run(cluster, signal.SIGINT, *spec)
    assert rc == 1 and "interrupted: stopping the workers" in out and "Traceback" not in out, out[-2000:]
    run_dir = out.split("switchyard run --resume ")[1].split(")")[0]
    first = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert len(first) == 1 and "CANCELLED: sy-" in out
    stopped_at = int(first[0].split("_")[1])
    assert f"steps={stopped_at} " in out  # the checkpoint is the step it stopped at (none was due)
    rc, out = _interrupted_run(cluster, signal.SIGTERM, "--resume", run_dir)
    assert rc == 1 and "interrupted: stopping the workers" in out and "SIGTERM received" not in out, out[-2000:]
    second = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert second[0] == first[0] and len(second) == 2 and int(second[1].split("_")[1]) > stopped_at
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert steps == list(range(1, len(steps) + 1))  # the resume went on from the saved step
