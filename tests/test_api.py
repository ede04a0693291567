"""The HTTP API with a real client against the real server: tokens, authorization, submit/list/status/logs,
and the CLI end to end from a process with no Ray and no job store."""
import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest

from orchestrator.api_client import ApiClient, ApiRequestError, check_remote_spec
from orchestrator.cluster_config import ClusterConfig
from orchestrator.job_store import JobState, JobStore
from specs.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {
    "name": "apijob",
    "model": {"family": "llama", "preset": "tiny"},
    "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 300},
    "train": {"steps": 4, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


@pytest.fixture
def server(tmp_path):
    from orchestrator.api import serve_in_thread

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db"),
                                        "admins": ["root"], "teams": {"nlp": {"users": ["alice"], "queued_jobs": 2}}})
    store = JobStore(cfg.job_store)
    tokens = {u: store.create_token(u) for u in ("alice", "bob", "root")}
    tokens["ops"] = store.create_token("ops", admin=True)
    srv = serve_in_thread(cfg, "127.0.0.1:0")
    yield cfg, srv, tokens
    srv.stop()


def client(srv, token):
    return ApiClient(srv.url, token)


def test_no_token_or_a_bad_one_is_refused(server):
    _, srv, tokens = server
    req = urllib.request.Request(f"{srv.url}/api/v1/jobs")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 401 and "no token" in json.loads(err.value.read())["error"]
    with pytest.raises(ApiRequestError) as err:
        client(srv, tokens["alice"] + "x").jobs()
    assert err.value.status == 401
    assert client(srv, tokens["alice"]).whoami() == {"user": "alice", "admin": False}
    assert client(srv, tokens["root"]).whoami()["admin"]  # admins: in cluster.yaml
    assert client(srv, tokens["ops"]).whoami()["admin"]   # a token made with --admin


def test_only_the_owner_or_an_admin_may_cancel_or_change(server):
    cfg, srv, tokens = server
    alice, bob, ops = (client(srv, tokens[u]) for u in ("alice", "bob", "ops"))
    job = alice.submit(SPEC, priority=2)["id"]
    seen = bob.job(job)  # everyone sees every job
    assert seen["owner"] == "alice" and seen["team"] == "nlp" and seen["priority"] == 2
    assert [j["id"] for j in bob.jobs(owner="alice")] == [job]
    with pytest.raises(ApiRequestError) as err:
        bob.cancel(job)
    assert err.value.status == 403 and "belongs to alice" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        bob.set_priority(job, 9)
    assert err.value.status == 403
    assert JobStore(cfg.job_store).get(job).state == JobState.QUEUED
    assert ops.set_priority(job, 7)["priority"] == 7
    assert alice.cancel(job)["state"] == "CANCELLED"
    assert bob.wait(job, 5)["state"] == "CANCELLED"
    # Tokens over the API: admins only.
    with pytest.raises(ApiRequestError) as err:
        alice.create_token("mallory", admin=True)
    assert err.value.status == 403
    new = ops.create_token("dana")["token"]
    assert client(srv, new).whoami() == {"user": "dana", "admin": False}


def test_specs_are_validated_on_the_server_and_quotas_apply(server):
    _, srv, tokens = server
    alice = client(srv, tokens["alice"])
    with pytest.raises(ApiRequestError) as err:
        alice.submit({**SPEC, "train": {**SPEC["train"], "steps": -1}})
    assert err.value.status == 400 and "train.steps" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        alice.submit(SPEC, after=["sy-19990101-000000"])
    assert err.value.status == 404
    first = alice.submit(SPEC)["id"]
    second = alice.submit(SPEC, after=[first])["id"]
    assert alice.job(second)["after"] == [first]
    with pytest.raises(ApiRequestError) as err:  # team nlp: queued_jobs 2
        alice.submit(SPEC)
    assert err.value.status == 400 and "queued_jobs: 2" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        alice.job("sy-nope")
    assert err.value.status == 404


def test_logs_stream_and_cluster_view(server):
    cfg, srv, tokens = server
    alice = client(srv, tokens["alice"])
    job = alice.submit(SPEC)["id"]
    run_dir = JobStore(cfg.job_store).get(job).run_dir
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    for rank in (0, 1):
        with open(os.path.join(run_dir, "logs", f"rank_{rank}.log"), "w") as f:
            f.write(f"hello from {rank}\nstep 1\n")
    lines = list(alice.logs(job))
    assert "[rank_0] hello from 0" in lines and "[rank_1] step 1" in lines
    assert list(alice.logs(job, rank=1)) == ["hello from 1", "step 1"]
    view = alice.cluster()
    assert [q["id"] for q in view["queued"]] == [job] and view["controller"]["alive"] is False
    assert view["preemption"]["min_run_s"] == 120


def test_laptop_files_are_refused_before_sending(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "hi"}\n')
    with pytest.raises(UsageError, match="data.corpus: .* is a file on this machine"):
        check_remote_spec({**SPEC, "data": {**SPEC["data"], "corpus": str(corpus)}}, "spec.yaml")
    check_remote_spec({**SPEC, "data": {**SPEC["data"], "corpus": "s3://bucket/c.jsonl"}}, "spec.yaml")
    with pytest.raises(UsageError, match="train.steps"):
        check_remote_spec({**SPEC, "train": {**SPEC["train"], "steps": 0}}, "spec.yaml")


# ---------------------------------------------------------------------- the CLI from a laptop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sy(cluster, *args, env=None, check=True, laptop=False, timeout=300):
    base = dict(os.environ, **(env or {}))
    base.pop("RAY_ADDRESS", None)
    if laptop:  # a process in which Ray cannot even be imported
        cmd = [sys.executable, "-c", "import sys; sys.modules['ray'] = None; from orchestrator.cli import main; "
               "sys.exit(main(sys.argv[1:]))"]
    else:
        cmd = [sys.executable, "-m", "orchestrator.cli"]
    out = subprocess.run(cmd + ["--cluster", str(cluster), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=base)
    if check and out.returncode != 0:
        raise AssertionError(f"switchyard {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


@pytest.mark.e2e
def test_cli_over_the_api_from_a_machine_without_ray_or_the_job_store(tmp_path):
    port = _free_port()
    head = tmp_path / "head.yaml"
    head.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'state' / 'jobs.db'}\n"
                    f"ray: {{num_cpus: 4}}\napi: {{listen: '127.0.0.1:{port}'}}\n")
    laptop_dir = tmp_path / "laptop"
    laptop_dir.mkdir()
    laptop = laptop_dir / "cluster.yaml"
    laptop.write_text(f"api: http://127.0.0.1:{port}\njob_store: {laptop_dir / 'nothing' / 'jobs.db'}\n"
                      f"storage: {laptop_dir / 'nothing' / 'runs'}\n")
    spec = ["--set", "train.steps=6", "--set", "checkpoint.every=3", "--set", "data.max_docs=300",
            "--set", "data.seq_len=64", "--set", "model.preset=tiny"]
    try:
        assert "switchyard is up" in _sy(head, "up").stdout
        alice = {"SWITCHYARD_TOKEN": _sy(head, "token", "create", "alice").stdout.strip()}
        bob = {"SWITCHYARD_TOKEN": _sy(head, "token", "create", "bob").stdout.strip()}
        assert _sy(laptop, "list", laptop=True, check=False, env={"SWITCHYARD_TOKEN": "wrong"}).returncode == 2
        job = _sy(laptop, "submit", os.path.join(ROOT, "examples", "pretrain.yaml"), "--priority", "3", *spec,
                  env=alice, laptop=True).stdout.strip()
        assert job.startswith("sy-")
        long_job = _sy(laptop, "submit", os.path.join(ROOT, "examples", "pretrain.yaml"), "--set",
                       "train.steps=100000", "--set", "name=long", "--after", job, env=alice, laptop=True).stdout.strip()
        assert _sy(laptop, "wait", job, "--timeout", "240", env=bob, laptop=True).returncode == 0
        status = json.loads(_sy(laptop, "status", job, "--json", env=bob, laptop=True).stdout)
        assert status["state"] == "SUCCEEDED" and status["step"] == 6 and status["owner"] == "alice"
        assert [h["to"] for h in status["history"]][:4] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
        logs = _sy(laptop, "logs", job, env=bob, laptop=True).stdout
        assert "[switchyard] rank 0/2" in logs and "[switchyard] rank 1/2" in logs
        view = json.loads(_sy(laptop, "status", "--json", env=bob, laptop=True).stdout)
        assert view["controller"]["alive"] and {j["id"] for j in view["running"] + view["queued"]} == {long_job}
        refused = _sy(laptop, "cancel", long_job, env=bob, laptop=True, check=False)
        assert refused.returncode == 2 and "belongs to alice" in refused.stderr
        assert _sy(laptop, "cancel", long_job, env=alice, laptop=True).returncode == 0
        assert _sy(laptop, "wait", long_job, "--timeout", "240", env=alice, laptop=True, check=False).returncode == 1
        listing = _sy(laptop, "list", env=bob, laptop=True).stdout
        assert job in listing and "SUCCEEDED" in listing and "CANCELLED" in listing and "alice" in listing
        assert not (laptop_dir / "nothing").exists()  # the laptop never made a job store or storage
    finally:
        _sy(head, "down", check=False)
