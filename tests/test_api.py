"""The HTTP API with a real client against the real server: tokens, authorization, submit/list/status/logs,
and the CLI end to end from a process with no Ray and no job store."""
import json
import os
import socket
import subprocess
import sys
import time
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
    second = alice.submit(SPEC)["id"]
    page = bob.jobs_page(limit=1, owner="alice")  # pages of the store, the newest first
    assert [j["id"] for j in page["jobs"]] == [second] and page["total"] == 2 and page["page"] == 1
    assert [j["id"] for j in bob.jobs_page(limit=1, page=2)["jobs"]] == [job]
    with pytest.raises(ApiRequestError) as err:
        bob.jobs_page(limit=0)
    assert err.value.status == 400 and "limit" in str(err.value)
    gone = ops.cancel(second)  # an admin's cancel says whose it was
    assert gone["state"] == "CANCELLED" and gone["reason"] == "cancelled by ops" and gone["cancelled_by"] == "ops"
    with pytest.raises(ApiRequestError) as err:
        bob.cancel(job)
    assert err.value.status == 403 and "belongs to alice" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        bob.set_priority(job, 9)
    assert err.value.status == 403
    assert JobStore(cfg.job_store).get(job).state == JobState.QUEUED
    assert ops.set_priority(job, 7)["priority"] == 7
    for bad in (10**7, True, "3", 2.5):
        with pytest.raises(ApiRequestError) as err:
            alice.set_priority(job, bad)
        assert err.value.status == 400 and "priority" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        alice.submit(SPEC, priority=-(10**7))
    assert err.value.status == 400 and "from -1000000 to 1000000" in str(err.value)
    assert alice.cancel(job)["state"] == "CANCELLED"
    assert bob.wait(job, 5)["state"] == "CANCELLED"
    # Tokens over the API: admins only.
    with pytest.raises(ApiRequestError) as err:
        alice.create_token("mallory", admin=True)
    assert err.value.status == 403
    new = ops.create_token("dana")["token"]
    assert client(srv, new).whoami() == {"user": "dana", "admin": False}


def test_tokens_are_listed_and_revoked_over_the_api_and_from_a_laptop(server, tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    cfg, srv, tokens = server
    alice, bob, ops = (client(srv, tokens[u]) for u in ("alice", "bob", "ops"))
    spare = ops.create_token("alice")["token"]
    every = ops.tokens()
    assert [t["user"] for t in every] == ["alice", "bob", "root", "ops", "alice"]
    assert all(t["expires_at"] is None for t in every)
    assert not any(tok in json.dumps(every) for tok in [*tokens.values(), spare])  # ids, never the tokens
    mine = alice.tokens()
    assert [t["user"] for t in mine] == ["alice", "alice"] and alice.tokens("alice") == mine
    with pytest.raises(ApiRequestError) as err:
        alice.tokens("bob")
    assert err.value.status == 403
    bobs = next(t["id"] for t in every if t["user"] == "bob")
    for attempt, status in ((lambda: alice.revoke_token(bobs), 403), (lambda: alice.revoke_tokens("bob"), 403),
                            (lambda: alice.revoke_token("000000000000"), 404), (lambda: alice.revoke_token("xy"), 400)):
        with pytest.raises(ApiRequestError) as err:
            attempt()
        assert err.value.status == status
    assert bob.whoami()["user"] == "bob"
    # Revoked: the very next request with it is refused.
    assert alice.revoke_token(mine[1]["id"][:6])["id"] == mine[1]["id"]
    with pytest.raises(ApiRequestError) as err:
        client(srv, spare).whoami()
    assert err.value.status == 401 and "revoked" in str(err.value)
    assert alice.whoami()["user"] == "alice"
    brief = ops.create_token("hal", expires_in_s=1)
    assert brief["expires_in_s"] == 1 and client(srv, brief["token"]).whoami()["user"] == "hal"
    time.sleep(1.1)
    with pytest.raises(ApiRequestError) as err:
        client(srv, brief["token"]).whoami()
    assert err.value.status == 401 and "expired" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        ops.create_token("hal", expires_in_s=-1)
    assert err.value.status == 400 and "expires" in str(err.value)
    assert ops.revoke_tokens("BOB") == {"user": "bob", "revoked": 1}
    with pytest.raises(ApiRequestError) as err:
        bob.jobs()
    assert err.value.status == 401

    # The CLI on a laptop (api: in its cluster.yaml) goes through the same endpoints.
    laptop = _laptop(tmp_path, srv)
    monkeypatch.setenv("SWITCHYARD_TOKEN", tokens["ops"])
    assert main(["--cluster", laptop, "whoami"]) == 0
    assert capsys.readouterr().out == f"ops over the API at {srv.url}; an admin: may cancel or change anyone's job\n"
    assert main(["--cluster", laptop, "token", "list"]) == 0
    table = capsys.readouterr().out
    assert "alice" in table and "root" in table and "bob" not in table and tokens["ops"] not in table
    assert main(["--cluster", laptop, "token", "revoke", "--id", mine[0]["id"]]) == 0
    assert f"revoked token {mine[0]['id']} of alice" in capsys.readouterr().out
    with pytest.raises(ApiRequestError):
        alice.whoami()
    assert main(["--cluster", laptop, "token", "revoke", "alice", "--id", mine[0]["id"]]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["--cluster", laptop, "token", "list", "--json"]) == 0
    assert [t["user"] for t in json.loads(capsys.readouterr().out)] == ["root", "ops", "hal"]
    assert not (tmp_path / "nothing").exists()


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


def test_a_failed_or_cancelled_job_is_requeued_by_its_owner_over_the_api_and_from_a_laptop(server, tmp_path,
                                                                                           monkeypatch, capsys):
    from orchestrator.cli import main

    cfg, srv, tokens = server
    alice, bob, ops = (client(srv, tokens[u]) for u in ("alice", "bob", "ops"))
    job = alice.submit(SPEC)["id"]
    with pytest.raises(ApiRequestError) as err:
        alice.requeue(job)
    assert err.value.status == 409 and "is QUEUED, not over" in str(err.value)
    with pytest.raises(ApiRequestError) as err:
        alice.call("POST", f"/jobs/{job}/cancel", {"checkpoint": "yes"})
    assert err.value.status == 400 and "checkpoint" in str(err.value)
    assert ops.cancel(job, checkpoint=True)["state"] == "CANCELLED"  # queued: nothing to save, cancelled now
    with pytest.raises(ApiRequestError) as err:
        bob.requeue(job)
    assert err.value.status == 403 and "only its owner or an admin may requeue it" in str(err.value)
    for body, status in (({"set": "train.steps=9"}, 400), ({"priority": 3}, 400),
                         ({"set": ["train.steps=-9"]}, 400), ({"set": ["name=x"]}, 400)):
        with pytest.raises(ApiRequestError) as err:
            alice.call("POST", f"/jobs/{job}/requeue", body)
        assert err.value.status == status and "\n" not in str(err.value)
    assert alice.job(job)["state"] == "CANCELLED"
    back = alice.requeue(job, ["train.steps=6"])
    assert back["state"] == "QUEUED" and back["cancelled_by"] is None
    assert back["history"][-1]["reason"] == "requeued by alice with train.steps=6"
    assert JobStore(cfg.job_store).get(job).spec["train"]["steps"] == 6

    laptop = _laptop(tmp_path, srv)  # the CLI on a laptop goes through the same route
    monkeypatch.setenv("SWITCHYARD_TOKEN", tokens["alice"])
    ops.cancel(job)
    capsys.readouterr()
    assert main(["--cluster", laptop, "requeue", job]) == 0
    assert capsys.readouterr().out == (f"{job}: QUEUED again (was CANCELLED at step 0); it resumes from its latest "
                                       "complete checkpoint\n")
    assert main(["--cluster", laptop, "requeue", job]) == 2
    assert "is QUEUED, not over" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


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
    assert list(alice.logs(job, tail=1)) == ["[rank_0] step 1", "[rank_1] step 1"]  # each rank's last line
    assert list(alice.logs(job, rank=0, tail=0)) == []
    with pytest.raises(ApiRequestError) as err:
        alice.call("GET", f"/jobs/{job}/logs", query={"tail": "-1"})
    assert err.value.status == 400 and "tail" in str(err.value)
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
        cancelled = _sy(laptop, "list", "--state", "cancelled", "--owner", "alice", env=bob, laptop=True).stdout
        assert long_job in cancelled and job not in cancelled and "cancelled by alice" in cancelled
        assert not (laptop_dir / "nothing").exists()  # the laptop never made a job store or storage
    finally:
        _sy(head, "down", check=False)


# ---------------------------------------------------------------------- sweeps, fits and pipelines over the API

SWEEP = {"name": "apisweep", "family": "llama", "vary": "width", "n_layers": 1, "head_dim": 8, "width_step": 8,
         "budgets": [2.0e10, 8.0e10], "sizes_per_budget": 3, "size_range": 4,
         "base": {"data": {"corpus": "builtin:stdlib", "seq_len": 32, "max_docs": 100},
                  "train": {"micro_batch": 4, "lr": 3.0e-3}, "resources": {"workers": 1}}}


def _fit_the_table(sdir):
    """Rows on a known law L = 1.8 + 400/N^0.34 + 400/D^0.28 for the planned runs, fitted into fit.json as the
    controller does, but from 16 starts, with no bootstrap and no plots (they only add seconds here)."""
    import numpy as np

    from scaling.fit_table import load_table
    from scaling.report import report_dict, run_fits
    from scaling.table import append_row, make_row

    for e in json.load(open(os.path.join(sdir, "plan.json"))):
        n, d = e["n_params"], e["tokens"]
        append_row(sdir, make_row(run_id=e["run_id"], family="llama", n_params=n, tokens=d,
                                  n_params_non_embedding=e["n_params_non_embedding"], attention_flops_per_token=0.0,
                                  final_loss=1.8 + 400 / n ** 0.34 + 400 / d ** 0.28, spec_hash="law"))
    starts = np.array([[la, lb, 0.5, al, be] for la in (5.0, 10.0) for lb in (5.0, 10.0) for al in (0.5, 1.0)
                       for be in (0.5, 1.0)])
    data = report_dict(run_fits(load_table(sdir), n_bootstrap=0, starts=starts))
    os.makedirs(os.path.join(sdir, "fit"))
    with open(os.path.join(sdir, "fit", "fit.json"), "w") as f:
        json.dump({**data, "outputs": {"json": os.path.join(sdir, "fit", "fit.json")}}, f)
    return data


def _laptop(tmp_path, srv) -> str:
    laptop = tmp_path / "laptop.yaml"
    laptop.write_text(f"api: {srv.url}\njob_store: {tmp_path / 'nothing' / 'jobs.db'}\n"
                      f"storage: {tmp_path / 'nothing' / 'runs'}\n")
    return str(laptop)


def test_sweeps_over_the_api_have_owners_status_and_fit_results_also_from_a_laptop(server, tmp_path, monkeypatch,
                                                                                  capsys):
    from orchestrator.cli import main

    cfg, srv, tokens = server
    alice, bob, ops = (client(srv, tokens[u]) for u in ("alice", "bob", "ops"))
    with pytest.raises(ApiRequestError) as err:  # validated on the server whatever the client did
        alice.submit_sweep({**SWEEP, "sizes_per_budget": 2})
    assert err.value.status == 400 and "sizes_per_budget" in str(err.value)
    out = alice.submit_sweep(SWEEP)
    assert out["owner"] == "alice" and len(out["submitted"]) == 6 and any("6 runs submitted" in x for x in out["log"])
    store = JobStore(cfg.job_store)
    assert {(r.owner, r.team) for r in store.list(parent_id=out["id"])} == {("alice", "nlp")}
    status = bob.sweep("apisweep")
    assert status["state"] == "RUNNING" and status["runs"] == 6 and status["jobs"] == {"QUEUED": 6}
    assert status["owner"] == "alice" and status["fit"] is None
    with pytest.raises(ApiRequestError) as err:
        bob.sweep_fit("apisweep")
    assert err.value.status == 404 and "no fit yet" in str(err.value)
    for attempt in (lambda: bob.cancel(out["id"]), lambda: bob.cancel("apisweep"), lambda: bob.submit_sweep(SWEEP)):
        with pytest.raises(ApiRequestError) as err:
            attempt()
        assert err.value.status == 403 and "belongs to alice" in str(err.value)
    assert ops.submit_sweep(SWEEP)["submitted"] == []  # an admin may resubmit it; nothing new to run

    written = _fit_the_table(status["sweep_dir"])
    fit = bob.sweep_fit("apisweep")
    assert fit["approach3"] == json.loads(json.dumps(written["approach3"]))
    assert fit["approach3"]["alpha"] == pytest.approx(0.34, abs=0.02)

    # The CLI with api: in its cluster.yaml: sweep status; then from a machine without Ray or the job store,
    # the fit (kept with --out) and a sweep file given to submit.
    laptop, bob_env = _laptop(tmp_path, srv), {"SWITCHYARD_TOKEN": tokens["bob"]}
    monkeypatch.setenv("SWITCHYARD_TOKEN", tokens["bob"])
    assert main(["--cluster", laptop, "sweep", "status", "apisweep"]) == 0
    shown = capsys.readouterr().out
    assert "sweep apisweep" in shown and "6/6 runs in the table" in shown and "owner alice" in shown
    assert main(["--cluster", laptop, "status"]) == 0
    assert capsys.readouterr().out.startswith(f"API: {srv.url}   controller: not running")
    printed = _sy(laptop, "fit", "apisweep", "--out", str(tmp_path / "mine"), env=bob_env, laptop=True).stdout
    assert f"alpha={fit['approach3']['alpha']!r}" in printed
    assert json.load(open(tmp_path / "mine" / "fit.json")) == fit
    (tmp_path / "s.yaml").write_text(json.dumps({**SWEEP, "name": "bobs"}))
    sid = _sy(laptop, "submit", str(tmp_path / "s.yaml"), env=bob_env, laptop=True).stdout.strip()
    assert store.get(sid).kind == "sweep" and store.get(sid).owner == "bob"
    assert not (tmp_path / "nothing").exists()

    assert alice.cancel("apisweep")["id"] == out["id"]
    assert {r.state for r in store.list(parent_id=out["id"])} == {JobState.CANCELLED}


def test_after_holds_a_pipeline_and_a_sweep_and_a_cancelled_dependency_fails_them_saying_why(server, tmp_path,
                                                                                             capsys):
    from orchestrator import instructgpt as pl
    from orchestrator import scheduler as sched
    from orchestrator.parent_jobs import failed_dependency
    from tests.test_instructgpt_pipeline import tiny_pipeline

    cfg, srv, tokens = server
    alice, bob = client(srv, tokens["alice"]), client(srv, tokens["bob"])
    store = JobStore(cfg.job_store)
    first = alice.submit(SPEC)["id"]
    pid = alice.submit(tiny_pipeline(), after=[first])["id"]
    sweep = alice.submit_sweep(SWEEP, after=[first[:-2]])  # a unique prefix is resolved to the id
    parent, sweep_parent = store.get(pid), store.get(sweep["id"])
    [sft] = store.list(parent_id=pid)
    runs = store.list(parent_id=sweep["id"])
    assert parent.after == sft.after == sweep_parent.after == (first,) and {r.after for r in runs} == {(first,)}
    assert bob.job(pid)["after"] == [first] and bob.sweep("apisweep")["after"] == [first]
    with pytest.raises(ApiRequestError) as err:
        bob.cancel(pid)
    assert err.value.status == 403
    assert failed_dependency(store, sweep_parent) is None
    # On the head the CLI's submit takes a sweep file too, with --after and --set; the local user owns it.
    import yaml

    from orchestrator.cli import main
    from orchestrator.cli_jobs import local_user

    (tmp_path / "head.yaml").write_text(yaml.safe_dump({"storage": cfg.storage, "job_store": cfg.job_store}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    assert main(["--cluster", str(tmp_path / "head.yaml"), "submit", str(tmp_path / "s.yaml"), "--after", first,
                 "--set", "name=headsweep"]) == 0
    local = store.get(capsys.readouterr().out.strip())
    assert (local.kind, local.name, local.owner, local.after) == ("sweep", "headsweep", local_user(), (first,))
    assert {r.after for r in store.list(parent_id=local.id)} == {(first,)}

    alice.cancel(first)
    # What the controller does next, step by step: its scheduler fails the stage and the runs...
    queued = [sft] + runs
    decisions = sched.schedule([sched.QueuedJob.from_record(r, {first: "CANCELLED"}) for r in queued],
                               {"n0": {"CPU": 8.0, "GPU": 0.0}}, {"n0": {"CPU": 8.0, "GPU": 0.0}}, now=0.0)
    assert {type(d) for d in decisions} == {sched.Fail} and len(decisions) == 1 + len(runs)
    for d in decisions:
        store.transition(d.job_id, JobState.FAILED, d.reason)
    # ...and the pipeline and the sweep end FAILED with that reason.
    decision = pl.decide(store.get(pid), store.list(parent_id=pid), None, set(), False)
    assert decision.state == JobState.FAILED and f"dependency {first} ended CANCELLED" in decision.reason
    assert failed_dependency(store, sweep_parent).startswith(f"dependency {first} ended CANCELLED")


def test_token_commands_on_the_head(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.cli_jobs import local_user

    head = tmp_path / "head.yaml"
    head.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\n")
    assert main(["--cluster", str(head), "token", "list"]) == 0
    assert "no API tokens yet" in capsys.readouterr().out
    assert main(["--cluster", str(head), "whoami", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": local_user(), "admin": False}
    assert main(["--cluster", str(head), "token", "create", "Eve", "--admin"]) == 0
    eve = capsys.readouterr().out.strip()
    assert main(["--cluster", str(head), "token", "create", "finn"]) == 0
    finn = capsys.readouterr().out.strip()
    store = JobStore(str(tmp_path / "jobs.db"))
    assert store.check_token(eve) == ("eve", True) and store.check_token(finn) == ("finn", False)
    assert main(["--cluster", str(head), "token", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["ID", "USER", "ADMIN", "AGE", "EXPIRES"] and [r.split()[1:3] for r in rows[1:]] == [
        ["eve", "yes"], ["finn", "-"]]
    assert main(["--cluster", str(head), "token", "revoke", "finn"]) == 0
    assert "revoked 1 token(s) of finn" in capsys.readouterr().out and store.check_token(finn) is None
    assert main(["--cluster", str(head), "token", "revoke", "--id", "000000000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no API token has the id 000000000000" in err
    assert main(["--cluster", str(head), "token", "revoke"]) == 2
    assert store.check_token(eve) == ("eve", True)
    capsys.readouterr()
    assert main(["--cluster", str(head), "token", "create", "gil", "--expires", "30d"]) == 0
    out = capsys.readouterr()
    assert "valid for 30d" in out.err and store.check_token(out.out.strip()) == ("gil", False)
    assert main(["--cluster", str(head), "token", "list", "gil"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["in", "30d"]
    for bad in ("0", "-1h", "soon", "4000d"):
        with pytest.raises(SystemExit) as exit_:
            main(["--cluster", str(head), "token", "create", "gil", f"--expires={bad}"])
        assert exit_.value.code == 2 and "expected a duration such as 90m" in capsys.readouterr().err
    assert len(store.tokens("gil")) == 1
