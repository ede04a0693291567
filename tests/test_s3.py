"""Checkpoints and resume through s3fs against a local S3-compatible server (moto, server mode)."""
import json
import re
import socket
import subprocess
import sys
import time

import pytest

from data.storage import Storage
from orchestrator.cluster_config import ClusterConfig
from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import checkpoint_dir, list_checkpoints

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


def test_checkpoints_and_resume_on_s3(ray_cluster, s3_server, tmp_path):
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    storage = Storage("s3://switchyard-test/runs", options)
    import boto3

    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="switchyard-test")
    cfg = ClusterConfig.model_validate({"storage": "s3://switchyard-test/runs", "storage_options": options,
                                        "job_store": str(tmp_path / "jobs.db")})
    spec = tiny_spec(**{"parallel.zero_stage": 2, "data.max_docs": 150})
    first = run_job(spec, cfg, log=lambda *a, **k: None)
    assert first["state"] == "SUCCEEDED"
    run_dir = first["run_dir"]
    assert run_dir.startswith("s3://switchyard-test/runs/")
    assert [c.step for c in list_checkpoints(storage, run_dir)] == [4, 8]
    rows = [json.loads(x) for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    full = [r["loss"] for r in rows]
    assert storage.exists(f"{run_dir}/logs/rank_1.log")
    # Interrupt after step 4: the step-8 checkpoint loses its manifest, so it must be ignored.
    storage.fs.rm(f"{checkpoint_dir(run_dir, 8)}/manifest.json")
    again = run_job(spec, cfg, resume_dir=run_dir, log=lambda *a, **k: None)
    assert again["state"] == "SUCCEEDED" and again["steps"] == 8
    rows = [json.loads(x) for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]   # the replayed steps' old rows dropped
    assert [r["loss"] for r in rows] == pytest.approx(full, rel=1e-5, abs=1e-5)
    assert [c.step for c in list_checkpoints(storage, run_dir)] == [4, 8]
    for rank in (0, 1):  # each rank downloaded its own ZeRO shard and the shared files, not the other's shard
        log = storage.read_text(f"{run_dir}/logs/rank_{rank}.log")
        line = next(x for x in log.splitlines() if "resume: downloaded" in x)
        got, every = (int(n) for n in re.search(r"downloaded (\d+) of the (\d+) files", line).groups())
        assert got == every - 1, line
    # The checkpoint on s3 evaluates whole and in shards (each shard fetches model.safetensors to its disk).
    import ray

    from workers.evaluator import evaluate_checkpoint
    from workers.sharded_eval import evaluate_sharded

    ckpt = checkpoint_dir(run_dir, 8)
    whole = evaluate_checkpoint(storage, run_dir, ckpt, 8, spec.eval.batches, spec.train.micro_batch)
    shards = tiny_spec(**{"parallel.zero_stage": 2, "data.max_docs": 150, "eval.shards": 2})
    scored = ray.get(ray.remote(evaluate_sharded).options(num_cpus=0).remote(
        storage, shards, run_dir, ckpt, 8, spec.eval.batches, spec.train.micro_batch))
    assert scored["loss"] == pytest.approx(whole["loss"], rel=1e-5) and scored["extra"]["shards"] == 2
