"""Training across separate network hosts: namespace hosts with their own raylets (see tests/hosts.py).

The head host runs Ray's head, the controller and an S3 server (moto); worker hosts run one rank each.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import pytest

from tests.hosts import Hosts, can_build_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(can_build_hosts() is not None,
                                                  reason=str(can_build_hosts()))]

STEPS, EVERY = 24, 8
SPEC = ["--set", f"train.steps={STEPS}", "--set", f"checkpoint.every={EVERY}", "--set", "data.max_docs=300",
        "--set", "data.seq_len=64", "--set", "model.preset=tiny", "--set", "resources.cpus_per_worker=1",
        "--set", "eval.held_out_tokens=2048", "--set", "eval.batches=2"]
EXAMPLE = os.path.join("examples", "pretrain.yaml")
S3_PORT = 5000


@pytest.fixture(scope="module")
def hosts():
    workdir = tempfile.mkdtemp(prefix="syh")  # short: Ray's socket paths live under it
    h = Hosts(workdir)
    h.env["TMPDIR"] = workdir
    try:
        for name in ("head", "w1", "w2"):
            h.add(name)
        h.ray_start("head", cpus=0, head=True)
        h.ray_start("w1", cpus=1)
        h.ray_start("w2", cpus=1)
        head_ip = h.hosts["head"].ip
        h.moto = h.popen("head", [sys.executable, "-m", "moto.server", "-H", head_ip, "-p", str(S3_PORT)],
                         os.path.join(workdir, "moto.log"))
        h.endpoint = f"http://{head_ip}:{S3_PORT}"
        make_bucket = ("import boto3, sys, time\n"
                       "for _ in range(60):\n"
                       "    try:\n"
                       "        boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket='sy-runs'); break\n"
                       "    except Exception: time.sleep(0.5)\n"
                       "else: sys.exit('no S3 server')\n")
        h.run("head", [sys.executable, "-c", make_bucket, h.endpoint])
        h.wait_nodes(3)
        yield h
    finally:
        h.teardown()


def _cluster_file(h: Hosts, name: str, storage: str, options: dict | None = None) -> str:
    path = os.path.join(h.workdir, f"{name}.yaml")
    cfg = {"ray": {"address": h.head_address}, "storage": storage,
           "storage_options": options or {}, "job_store": os.path.join(h.workdir, name, "jobs.db")}
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def _running_past_first_checkpoint(h: Hosts, name: str, job: str):
    """The job's record once it runs past its first checkpoint. Read from the job store file every 50 ms (a
    `status` subprocess per poll is slower than the job's remaining steps, which may then all be done)."""
    from orchestrator.job_store import JobState, JobStore

    store = JobStore(os.path.join(h.workdir, name, "jobs.db"))
    deadline = time.time() + 600
    while True:
        rec = store.get(job)
        if rec.state == JobState.RUNNING and (rec.step or 0) > EVERY:
            return rec
        assert rec.state in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING), (rec.state, rec.reason)
        assert time.time() < deadline, "the job never passed its first checkpoint"
        time.sleep(0.05)


def _losses(h: Hosts, cluster: str, run_dir: str) -> list[float]:
    """Per-step losses from a run's metrics.jsonl, read on the head host through the run's storage."""
    read = ("import json, sys\n"
            "from orchestrator.cluster_config import load_cluster_config\n"
            "from data.storage import Storage\n"
            "c = load_cluster_config(sys.argv[1])\n"
            "s = Storage(c.storage, dict(c.storage_options))\n"
            "rows = [json.loads(l) for l in s.read_text(sys.argv[2] + '/metrics.jsonl').splitlines() if l]\n"
            "print(json.dumps([r['loss'] for r in sorted(rows, key=lambda r: r['step'])]))\n")
    return json.loads(h.run("head", [sys.executable, "-c", read, cluster, run_dir]).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_host_run(hosts):
    """The reference: one uninterrupted 2-rank job, one rank on each worker host, shared-folder storage."""
    cluster = _cluster_file(hosts, "shared", os.path.join(hosts.workdir, "runs"))
    out = hosts.sy("head", cluster, "run", EXAMPLE, *SPEC, "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED", result
    return result, _losses(hosts, cluster, result["run_dir"])


def test_a_job_across_two_hosts_matches_one_host(hosts, two_host_run, ray_cluster, cluster_cfg):
    from orchestrator.runner import run_job
    from specs.job import load_spec

    result, losses = two_host_run
    logs = [open(os.path.join(result["run_dir"], "logs", f"rank_{r}.log")).read() for r in (0, 1)]
    bound = {ip for ip in (hosts.hosts["w1"].ip, hosts.hosts["w2"].ip) for log in logs if f"({ip})" in log}
    assert bound == {hosts.hosts["w1"].ip, hosts.hosts["w2"].ip}  # each rank bound to its own host's address
    assert len(losses) == STEPS
    sets = [SPEC[i + 1] for i in range(0, len(SPEC), 2)]
    one_host = run_job(load_spec(os.path.join(os.path.dirname(os.path.dirname(__file__)), EXAMPLE), sets),
                       cluster_cfg, log=lambda *a, **k: None)
    assert one_host["state"] == "SUCCEEDED"
    reference = [json.loads(x)["loss"] for x in open(os.path.join(one_host["run_dir"], "metrics.jsonl"))]
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_losing_a_host_restarts_on_a_replacement_with_equal_losses(hosts, two_host_run):
    """Checkpoints on S3 (moto on the head host); w2's cable is pulled mid-run and w3 joins."""
    _, reference = two_host_run
    cluster = _cluster_file(hosts, "s3", "s3://sy-runs/runs",
                            {"key": "testing", "secret": "testing",
                             "client_kwargs": {"endpoint_url": hosts.endpoint, "region_name": "us-east-1"}})
    hosts.sy("head", cluster, "up")
    try:
        job = hosts.sy("head", cluster, "submit", EXAMPLE, *SPEC).stdout.strip()
        _running_past_first_checkpoint(hosts, "s3", job)
        hosts.cut("w2")
        hosts.add("w3")
        hosts.ray_start("w3", cpus=1)
        assert hosts.sy("head", cluster, "wait", job, "--timeout", "600", check=False,
                        timeout=700).returncode == 0
        status = json.loads(hosts.sy("head", cluster, "status", job, "--json").stdout)
        assert status["restarts"] >= 1 and "RESTARTING" in [t["to"] for t in status["history"]]
        assert status["run_dir"].startswith("s3://sy-runs/runs/")
        nodes = {w["ip"] for w in status["workers"]} if status.get("workers") else set()
        assert hosts.hosts["w2"].ip not in nodes
        assert _losses(hosts, cluster, status["run_dir"]) == pytest.approx(reference, rel=1e-6, abs=1e-6)
        # The lost host's cable goes back in. Ray declared its raylet dead; it and its stale rank must corrupt nothing.
        hosts.restore("w2")
        hosts.down.add("w2")  # not a node of the cluster any more
        time.sleep(10.0)
        after = json.loads(hosts.sy("head", cluster, "status", job, "--json").stdout)
        assert after["state"] == "SUCCEEDED" and after["step"] == STEPS
        assert _losses(hosts, cluster, status["run_dir"]) == pytest.approx(reference, rel=1e-6, abs=1e-6)
    finally:
        hosts.sy("head", cluster, "down", check=False)


def test_an_elastic_job_finishes_on_the_hosts_that_remain_with_equal_losses(hosts, two_host_run):
    """No replacement this time: after resources.elastic_wait_s the job resumes on one host, grad_accum 2."""
    _, reference = two_host_run
    cluster = _cluster_file(hosts, "elastic", os.path.join(hosts.workdir, "runs"))
    alive = hosts.workers_up()
    assert len(alive) == 2
    hosts.wait_nodes(1 + len(alive))
    hosts.sy("head", cluster, "up")
    try:
        job = hosts.sy("head", cluster, "submit", EXAMPLE, *SPEC, "--set", "resources.elastic=true",
                       "--set", "resources.min_workers=1", "--set", "resources.elastic_wait_s=5").stdout.strip()
        rec = _running_past_first_checkpoint(hosts, "elastic", job)
        assert {w["ip"] for w in rec.workers} == {hosts.hosts[n].ip for n in alive}
        hosts.cut(alive[-1])
        assert hosts.sy("head", cluster, "wait", job, "--timeout", "600", check=False,
                        timeout=700).returncode == 0
        status = json.loads(hosts.sy("head", cluster, "status", job, "--json").stdout)
        assert any(t["reason"].startswith("elastic: resuming on 1 of 2 workers") for t in status["history"])
        assert _losses(hosts, cluster, status["run_dir"]) == pytest.approx(reference, rel=1e-3, abs=1e-3)
    finally:
        hosts.sy("head", cluster, "down", check=False)
