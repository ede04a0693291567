"""The dashboard's server side with a real HTTP client against the real API server (no Ray, no browser):
the shell is served without a token and nothing else is, and the JSON the pages draw from."""
import json
import os
import urllib.error
import urllib.request

import pytest

from orchestrator.cluster_config import ClusterConfig
from orchestrator.job_store import JobState, JobStore
from tests.dashboard_data import REPORT, SWEEP_BUDGETS, SWEEP_SIZES, make_pipeline, make_sweep

SPEC = {
    "name": "dashjob",
    "model": {"family": "llama", "preset": "tiny"},
    "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 300},
    "train": {"steps": 4, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


@pytest.fixture
def server(tmp_path):
    from orchestrator.api import serve_in_thread

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    store = JobStore(cfg.job_store)
    tokens = {u: store.create_token(u) for u in ("alice", "bob")}
    srv = serve_in_thread(cfg, "127.0.0.1:0")
    yield cfg, srv, tokens
    srv.stop()


def get(srv, path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(srv.url + path, headers=headers)) as resp:
        body = resp.read()
        return resp.status, resp.headers, body


def get_json(srv, path, token):
    return json.loads(get(srv, path, token)[2])


def status_of(srv, path, token=None) -> int:
    try:
        return get(srv, path, token)[0]
    except urllib.error.HTTPError as err:
        return err.code


def submit(cfg, owner="alice", **fields):
    from orchestrator.cli_jobs import submit_raw

    return submit_raw(cfg, {**SPEC, **fields}, 0, [], owner=owner)


def test_the_shell_needs_no_token_and_the_data_does(server):
    _, srv, tokens = server
    status, headers, body = get(srv, "/dashboard/")
    assert status == 200 and b'id="login-form"' in body and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "pages.js", "job.js", "chart.js", "style.css"):
        assert status_of(srv, f"/dashboard/{name}") == 200
    assert get(srv, "/")[2] == body  # / redirects to the dashboard
    assert status_of(srv, "/dashboard/..%2Fapi.py") == 404
    assert status_of(srv, "/dashboard/nope.js") == 404
    for path in ("/api/v1/dashboard/queue", "/api/v1/dashboard/sweeps", "/api/v1/dashboard/pipelines",
                 "/api/v1/jobs"):
        assert status_of(srv, path) == 401
        assert status_of(srv, path, tokens["alice"] + "x") == 401
        assert status_of(srv, path, tokens["alice"]) == 200


def test_metrics_since_a_step_and_across_a_rewrite(server):
    cfg, srv, tokens = server
    job = submit(cfg)
    run_dir = JobStore(cfg.job_store).get(job).run_dir
    path = f"/api/v1/dashboard/jobs/{job}/metrics"
    assert get_json(srv, path, tokens["bob"]) == {"rows": [], "offset": 0, "last_step": 0}
    os.makedirs(run_dir, exist_ok=True)
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0 + s, "expert_share": [0.5, 0.5]}
            for s in range(1, 6)]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 6, "loss"')  # a row being written
    got = get_json(srv, path, tokens["bob"])
    assert [r["step"] for r in got["rows"]] == [1, 2, 3, 4, 5] and got["last_step"] == 5
    assert "expert_share" not in got["rows"][0] and got["rows"][0]["tokens_per_s"] == 101.0
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(': 4.4}\n{"step": 7, "loss": 4.3}\n')
    more = get_json(srv, f"{path}?since={got['last_step']}&offset={got['offset']}", tokens["bob"])
    assert [(r["step"], r["loss"]) for r in more["rows"]] == [(6, 4.4), (7, 4.3)]
    # A resumed run rewrites the file (rows up to its checkpoint, then on): the old offset is no row boundary.
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 10))
    again = get_json(srv, f"{path}?since={more['last_step']}&offset={more['offset'] + 3}", tokens["bob"])
    assert [r["step"] for r in again["rows"]] == [8, 9]
    assert status_of(srv, f"{path}?since=-1", tokens["bob"]) == 400
    assert status_of(srv, "/api/v1/dashboard/jobs/sy-nope/metrics", tokens["bob"]) == 404


def test_log_tail_then_what_follows(server):
    cfg, srv, tokens = server
    job = submit(cfg)
    logs = os.path.join(JobStore(cfg.job_store).get(job).run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    big = "".join(f"line {i} " + "x" * 90 + "\n" for i in range(2000))  # ~200 KB: the first look is a tail
    with open(os.path.join(logs, "rank_0.log"), "w") as f:
        f.write(big)
    with open(os.path.join(logs, "rank_1.log"), "w") as f:
        f.write("hello from 1\n")
    path = f"/api/v1/dashboard/jobs/{job}/logs"
    first = get_json(srv, path, tokens["bob"])
    assert first["ranks"] == [0, 1] and first["done"] is False
    zero = [line for line in first["lines"] if line.startswith("[rank_0]")]
    assert zero[-1].startswith("[rank_0] line 1999 ") and 0 < len(zero) < 2000 and zero[0].startswith("[rank_0] line ")
    assert "[rank_1] hello from 1" in first["lines"]
    with open(os.path.join(logs, "rank_1.log"), "a") as f:
        f.write("step 1\nhalf a li")
    cursor = urllib.request.quote(json.dumps(first["cursor"]))
    nxt = get_json(srv, f"{path}?cursor={cursor}", tokens["bob"])
    assert nxt["lines"] == ["[rank_1] step 1"]
    only = get_json(srv, f"{path}?rank=1", tokens["bob"])
    assert only["lines"] == ["hello from 1", "step 1"] and list(only["cursor"]) == ["rank_1.log"]
    assert status_of(srv, f"{path}?cursor=%7B%22a%22%3A-1%7D", tokens["bob"]) == 400
    assert status_of(srv, f"{path}?rank=x", tokens["bob"]) == 400


def test_queue_in_order_with_reasons_and_preemptions(server):
    cfg, srv, tokens = server
    store = JobStore(cfg.job_store)
    first, second, third = (submit(cfg, name=f"q{i}") for i in range(3))
    store.update(second, pending={"position": 1, "waiting_for": "capacity", "reason": "needs 1 CPU, 0 free"})
    store.update(first, pending={"position": 2, "waiting_for": "quota", "reason": "team nlp: cpus 4 in use"})
    for s in (JobState.STARTING, JobState.RUNNING):
        store.transition(third, s, s.value)
    store.transition(third, JobState.PREEMPTED, "preempted by a higher priority", preempted_by=second)
    q = get_json(srv, "/api/v1/dashboard/queue", tokens["bob"])
    assert [j["id"] for j in q["queued"]] == [second, first]
    assert q["queued"][0]["pending"]["reason"] == "needs 1 CPU, 0 free" and q["queued"][1]["owner"] == "alice"
    assert [j["id"] for j in q["running"]] == [third]
    assert [(p["id"], p["by"]) for p in q["preemptions"]] == [(third, second)]


def test_sweep_points_and_fit(server):
    cfg, srv, tokens = server
    made = make_sweep(cfg, "iso")
    listed = get_json(srv, "/api/v1/dashboard/sweeps", tokens["bob"])
    assert [(s["name"], s["runs"], s["jobs"]) for s in listed] == [("iso", 12, {"SUCCEEDED": 12})]
    s = get_json(srv, "/api/v1/dashboard/sweeps/iso", tokens["bob"])
    assert s["results"] == s["runs"] == 12 and s["state"] == "SUCCEEDED" and len(s["plan"]) == 12
    assert len(s["children"]) == 12 and s["owner"] == "alice"
    points = s["points"]
    assert len(points) == 12 and {p["loss_column"] for p in points} == {"held_out_loss"}
    by_budget = {}
    for p in points:
        by_budget.setdefault(p["budget"], []).append(p)
    assert sorted(by_budget) == [0, 1, 2] and all(len(v) == SWEEP_SIZES for v in by_budget.values())
    for b, runs in by_budget.items():  # each run sits under its own budget
        assert all(abs(p["c"] / SWEEP_BUDGETS[b] - 1) < 0.05 for p in runs)
    rows = {r["run_id"]: r for r in made["runs"]}
    assert all(p["loss"] == rows[p["run_id"]]["held_out_loss"] for p in points)
    fit = s["fit_report"]
    assert fit["approach3"]["E"] == pytest.approx(1.69, abs=0.3)
    iv = fit["approach3"]["intervals"]["alpha"]
    assert iv["low"] <= fit["approach3"]["alpha"] <= iv["high"]
    assert len(fit["approach2"]["budgets"]) == 3
    assert status_of(srv, "/api/v1/dashboard/sweeps/nope", tokens["bob"]) == 400


def test_pipelines_list_and_report(server):
    cfg, srv, tokens = server
    pid = make_pipeline(cfg, "igpt")
    assert [p["id"] for p in get_json(srv, "/api/v1/dashboard/pipelines", tokens["bob"])] == [pid]
    out = get_json(srv, f"/api/v1/jobs/{pid}", tokens["bob"])  # the API's own status carries stages and report
    assert [s["state"] for s in out["stages"]] == ["SUCCEEDED"] * 3
    assert out["report"]["ppo_win_rate_vs_sft"] == REPORT["ppo_win_rate_vs_sft"]
