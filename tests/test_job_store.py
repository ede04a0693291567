"""Unit tests for the SQLite job store: no Ray, a temporary file per test."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.job_store import (
    LEGAL_TRANSITIONS,
    AmbiguousJobIdError,
    IllegalTransitionError,
    InvalidNameError,
    JobNotFoundError,
    JobState,
    JobStore,
    TokenNotFoundError,
    safe_join,
    validate_name,
)
from specs.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}
S = JobState


def submit(store: JobStore, name: str = "job", parent_id: str | None = None, **kw):
    args = dict(kind="train", spec={"train": {"steps": 10}}, priority=0, resources=RES, max_restarts=3,
                run_dir_for=lambda jid: safe_join("s3://bucket/runs", jid))
    args.update(kw)
    return store.submit(name, parent_id=parent_id, **args)


class Clock:
    """A clock the test moves by hand, for exact timestamps."""

    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "state" / "jobs.db")


# Shortest legal path from QUEUED to each state.
PATH_TO = {
    S.QUEUED: [],
    S.STARTING: [S.STARTING],
    S.RUNNING: [S.STARTING, S.RUNNING],
    S.RESTARTING: [S.STARTING, S.RUNNING, S.RESTARTING],
    S.SUCCEEDED: [S.STARTING, S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.CANCELLED],
    S.PREEMPTED: [S.STARTING, S.RUNNING, S.PREEMPTED],
}


def drive(store: JobStore, job_id: str, states) -> None:
    for s in states:
        store.transition(job_id, s, f"to {s}")


# ---------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a..b", "..", ".hidden", "-x", "my job", "x" * 65,
                                 "/abs", "a\\b", "é"])
def test_validate_name_rejects_unsafe(bad):
    with pytest.raises(InvalidNameError):
        validate_name(bad)


def test_validate_name_lowercases():
    assert validate_name("My-Job_1.0") == "my-job_1.0"
    assert validate_name("x" * 64) == "x" * 64


@pytest.mark.parametrize("root, parts, want", [
    ("s3://bucket/prefix", ("sy-1", "ckpt"), "s3://bucket/prefix/sy-1/ckpt"),
    ("s3://bucket/prefix/", ("sy-1",), "s3://bucket/prefix/sy-1"),
    ("s3://bucket", ("a",), "s3://bucket/a"),
    ("/tmp/runs//", ("a",), "/tmp/runs/a"),
    ("/", ("a",), "/a"),
    ("file:///", ("a",), "file:///a"),
    ("./runs", (), "./runs"),
])
def test_safe_join(root, parts, want):
    assert safe_join(root, *parts) == want


@pytest.mark.parametrize("part", ["..", "../x", "/etc", "a/b", "A", "", ".", "a..b", "x" * 65, "s3://x"])
def test_safe_join_refuses_escapes(part):
    with pytest.raises(InvalidNameError):
        safe_join("s3://bucket/runs", part)


def test_store_needs_local_path():
    with pytest.raises(Exception, match="local file path"):
        JobStore("s3://bucket/jobs.db")


# ---------------------------------------------------------------------- submit and get


def test_submit_queues_job_with_history_and_wal(tmp_path):
    clock = Clock()
    store = JobStore(tmp_path / "a" / "b" / "jobs.db", clock=clock)  # parent dirs are created
    rec = submit(store, "My-Run", spec={"x": [1, 2]}, priority=5)
    day = datetime.fromtimestamp(clock.t, timezone.utc).strftime("%Y%m%d")
    assert re.fullmatch(rf"sy-{day}-[0-9a-f]{{6}}", rec.id)
    assert rec.name == "my-run" and rec.kind == "train" and rec.priority == 5
    assert rec.state is S.QUEUED and rec.spec == {"x": [1, 2]} and rec.resources == RES
    assert rec.run_dir == f"s3://bucket/runs/{rec.id}"
    assert rec.submitted_at == clock.t and rec.restarts == 0 and rec.workers == [] and rec.metrics == {}
    [h] = rec.history
    assert (h.from_state, h.to_state, h.reason, h.ts) == (None, S.QUEUED, "submitted", clock.t)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("kw, match", [
    ({"resources": {"workers": 2}}, "cpus_per_worker"),
    ({"resources": {"workers": -1, "cpus_per_worker": 1}}, "workers"),
    ({"resources": {"workers": 2, "cpus_per_worker": 0}}, "some CPUs or GPUs"),
    ({"resources": {"workers": 2, "cpus_per_worker": 1, "tpus": 1}}, "unknown keys"),
    ({"priority": True}, "priority"),
    ({"max_restarts": -1}, "max_restarts"),
    ({"spec": {"f": object()}}, "JSON"),
    ({"kind": "../x"}, "job kind"),
])
def test_submit_validates(store, kw, match):
    with pytest.raises(ValueError, match=match):
        submit(store, **kw)
    assert store.list() == []


def test_submit_rolls_back_when_run_dir_for_fails(store):
    def bad(jid):
        return safe_join("/runs", "..", jid)

    with pytest.raises(InvalidNameError):
        submit(store, run_dir_for=bad)
    assert store.list() == []


def test_submit_needs_existing_parent(store):
    with pytest.raises(JobNotFoundError):
        submit(store, parent_id="sy-20240101-abcdef")


def test_get_by_prefix(store):
    a, b = submit(store), submit(store)
    assert store.get(a.id).id == a.id
    assert store.get(a.id.upper()).id == a.id
    day_prefix = a.id[: len("sy-yyyymmdd-")]
    with pytest.raises(AmbiguousJobIdError, match="matches 2 jobs"):
        store.get(day_prefix)
    # The shortest prefix that tells them apart resolves.
    n = next(i for i in range(len(a.id)) if a.id[i] != b.id[i]) + 1
    assert store.get(b.id[:n]).id == b.id
    with pytest.raises(JobNotFoundError):
        store.get("sy-19990101")
    with pytest.raises(JobNotFoundError):
        store.get("")


def test_list_filters_by_state_and_parent(store):
    parent = submit(store, "sweep", kind="sweep", resources={"workers": 0, "cpus_per_worker": 0})
    kids = [submit(store, f"run-{i}", kind="sweep-run", parent_id=parent.id) for i in range(3)]
    drive(store, kids[0].id, PATH_TO[S.RUNNING])
    assert [r.id for r in store.list()] == [parent.id] + [k.id for k in kids]
    assert {r.id for r in store.list(states=[S.QUEUED])} == {parent.id, kids[1].id, kids[2].id}
    assert [r.id for r in store.list(states=["RUNNING"])] == [kids[0].id]
    assert [r.id for r in store.list(states=[S.QUEUED], parent_id=parent.id)] == [kids[1].id, kids[2].id]
    assert store.list(states=[]) == []
    # Listings carry history too, from the same snapshot.
    assert [len(r.history) for r in store.list(parent_id=parent.id)] == [3, 1, 1]


# ---------------------------------------------------------------------- transitions


@pytest.mark.parametrize("frm", list(S))
def test_transition_table(store, frm):
    """Every (from, to) pair: legal ones succeed, all others raise and change nothing."""
    for to in S:
        rec = submit(store)
        drive(store, rec.id, PATH_TO[frm])
        before = store.get(rec.id)
        if to in LEGAL_TRANSITIONS[frm]:
            after = store.transition(rec.id, to, "test")
            assert after.state is to
            assert after.history[-1].from_state is frm and after.history[-1].to_state is to
        else:
            with pytest.raises(IllegalTransitionError, match="terminal" if frm.terminal else "allowed"):
                store.transition(rec.id, to, "test")
            assert store.get(rec.id) == before


def test_terminal_states_have_no_way_out():
    for s in S:
        assert s.terminal == (s in {S.SUCCEEDED, S.FAILED, S.CANCELLED})
        assert s.terminal == (not LEGAL_TRANSITIONS[s])


def test_history_records_each_transition_with_timestamps(tmp_path):
    clock = Clock(1000.0)
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    rec = submit(store)
    for i, (to, why) in enumerate([(S.STARTING, "admitted"), (S.RUNNING, "ranks up"),
                                   (S.RESTARTING, "rank 1 died"), (S.QUEUED, "requeued"),
                                   (S.STARTING, "admitted"), (S.RUNNING, "ranks up"),
                                   (S.SUCCEEDED, "done")], start=1):
        clock.t = 1000.0 + 10 * i
        store.transition(rec.id, to, why)
    hist = store.history(rec.id)
    assert [(h.from_state, h.to_state) for h in hist] == [
        (None, S.QUEUED), (S.QUEUED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.RESTARTING),
        (S.RESTARTING, S.QUEUED), (S.QUEUED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.SUCCEEDED)]
    assert [h.ts for h in hist] == [1000.0 + 10 * i for i in range(8)]
    assert hist[3].reason == "rank 1 died"
    final = store.get(rec.id)
    assert final.history == tuple(hist)
    assert final.restarts == 1  # entering RESTARTING counts
    assert final.started_at == 1020.0  # the first RUNNING, not the second
    assert final.finished_at == 1070.0 and final.reason == "done"


def test_transition_side_effects(store):
    rec = submit(store)
    store.update(rec.id, blocked_since=5.0)
    rec = store.transition(rec.id, S.STARTING, "admitted")
    assert rec.blocked_since is None
    workers = [{"rank": 0, "node": "n1", "pid": 11}, {"rank": 1, "node": "n2", "pid": 12}]
    rec = store.transition(rec.id, S.RUNNING, "up", workers=workers, step=0)
    assert rec.workers == workers
    rec = store.transition(rec.id, S.FAILED, "boom", report={"error": "boom"})
    assert rec.workers == [] and rec.report == {"error": "boom"} and rec.finished_at is not None
    with pytest.raises(TypeError, match="cannot set job field 'state'"):
        store.transition(submit(store).id, S.STARTING, "x", state="RUNNING")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(list(S)), max_size=8))
def test_random_walks_follow_the_table(walk):
    """Any sequence of requests: the store accepts exactly the legal ones, in order."""
    store = _shared_store()
    rec = submit(store)
    state, accepted = S.QUEUED, [S.QUEUED]
    for to in walk:
        if to in LEGAL_TRANSITIONS[state]:
            store.transition(rec.id, to, "walk")
            state = to
            accepted.append(to)
        else:
            with pytest.raises(IllegalTransitionError):
                store.transition(rec.id, to, "walk")
    final = store.get(rec.id)
    assert final.state is state
    assert [h.to_state for h in final.history] == accepted
    assert final.restarts == accepted.count(S.RESTARTING)


_SHARED: list[JobStore] = []


def _shared_store() -> JobStore:
    # Hypothesis runs many examples per test; one store (a fresh job per example) keeps it fast.
    if not _SHARED:
        _SHARED.append(JobStore(os.path.join(tempfile.mkdtemp(prefix="sy-test-"), "jobs.db")))
    return _SHARED[0]


# ---------------------------------------------------------------------- update, cancel, evals, controller


def test_update_progress_fields(store):
    rec = submit(store)
    rec = store.update(rec.id, step=120, metrics={"loss": 2.5, "tokens_per_s": 1e4}, best_checkpoint="ckpt-100",
                       reason="running: step 120")
    assert (rec.step, rec.metrics["loss"], rec.best_checkpoint) == (120, 2.5, "ckpt-100")
    assert rec.reason == "running: step 120"
    assert rec.state is S.QUEUED and len(rec.history) == 1  # no state change, no history row
    with pytest.raises(TypeError, match="cannot set job field 'restarts'"):
        store.update(rec.id, restarts=0)
    with pytest.raises(ValueError, match="step"):
        store.update(rec.id, step=-1)
    with pytest.raises(JobNotFoundError):
        store.update("sy-20240101-000000", step=1)


def test_cancel_queued_job_is_immediate_and_wins_the_race(store):
    rec = submit(store)
    rec = store.request_cancel(rec.id)
    assert rec.state is S.CANCELLED and rec.cancel_requested and rec.finished_at is not None
    assert rec.history[-1].from_state is S.QUEUED and rec.history[-1].reason == "cancelled by user"
    # A controller that planned to start it loses cleanly.
    with pytest.raises(IllegalTransitionError, match="terminal"):
        store.transition(rec.id, S.STARTING, "admitted")


def test_cancel_running_job_sets_flag_and_cascades(store):
    parent = submit(store, "pipe", kind="pipeline", resources={"workers": 0, "cpus_per_worker": 0})
    drive(store, parent.id, PATH_TO[S.RUNNING])
    sft = submit(store, "sft", parent_id=parent.id)
    drive(store, sft.id, PATH_TO[S.SUCCEEDED])
    rm = submit(store, "rm", parent_id=parent.id)
    drive(store, rm.id, PATH_TO[S.RUNNING])
    ppo = submit(store, "ppo", parent_id=parent.id)
    rec = store.request_cancel(parent.id)
    assert rec.state is S.RUNNING and rec.cancel_requested  # the controller stops it
    got = {r.name: r for r in store.list(parent_id=parent.id)}
    assert got["sft"].state is S.SUCCEEDED and not got["sft"].cancel_requested  # terminal: untouched
    assert got["rm"].state is S.RUNNING and got["rm"].cancel_requested
    assert got["ppo"].state is S.CANCELLED
    assert store.request_cancel(ppo.id).state is S.CANCELLED  # idempotent


def test_a_cancel_names_who_asked(store):
    queued, running = submit(store, "q"), submit(store, "r")
    drive(store, running.id, PATH_TO[S.RUNNING])
    rec = store.request_cancel(queued.id, by="ops")
    assert rec.state is S.CANCELLED and rec.cancelled_by == "ops" and rec.reason == "cancelled by ops"
    assert rec.history[-1].reason == "cancelled by ops" and rec.to_status_dict()["cancelled_by"] == "ops"
    rec = store.request_cancel(running.id, by="alice")
    assert rec.state is S.RUNNING and rec.cancel_requested and rec.cancelled_by == "alice"
    assert rec.cancel_reason == "cancelled by alice"  # what the controller's CANCELLED transition says
    assert submit(store).cancel_reason == "cancelled by user"  # no one named (an older Switchyard's cancel)


def test_v3_and_v4_stores_are_migrated_and_keep_their_jobs(tmp_path):
    path = tmp_path / "v3.db"
    store = JobStore(path)
    rec = submit(store, owner="carol")
    conn = sqlite3.connect(path)
    conn.executescript("ALTER TABLE jobs DROP COLUMN cancelled_by; ALTER TABLE tokens DROP COLUMN expires_at; "
                       "DROP TABLE webhook_cursor; PRAGMA user_version = 3;")
    conn.close()
    store = JobStore(path)
    assert store.get(rec.id).owner == "carol" and store.get(rec.id).cancelled_by is None
    assert store.request_cancel(rec.id, by="dana").reason == "cancelled by dana"
    assert store.check_token(store.create_token("erin", expires_in_s=60)) == ("erin", False)
    from orchestrator.notify import _set_cursor, webhook_cursor

    assert webhook_cursor(store) is None
    _set_cursor(store, 7)
    assert webhook_cursor(store) == 7
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    conn.close()


def test_evals(store):
    rec = submit(store)
    store.add_eval(rec.id, "ckpt-200", 200, 2.0, extra={"win_rate": 0.6})
    store.add_eval(rec.id, "ckpt-100", 100, 3.0)
    store.add_eval(rec.id, "ckpt-200", 200, 1.5)  # re-evaluated: replaces
    store.add_eval(rec.id, "ckpt-300", 300, float("nan"))
    evals = store.evals(rec.id)
    assert [(e.checkpoint, e.loss) for e in evals[:2]] == [("ckpt-100", 3.0), ("ckpt-200", 1.5)]
    assert evals[0].perplexity == pytest.approx(math.exp(3.0))
    assert math.isnan(evals[2].loss) and evals[2].perplexity is None
    assert store.get(rec.id).evals == tuple(evals)
    with pytest.raises(JobNotFoundError):
        store.add_eval("sy-20240101-000000", "c", 1, 1.0)


def test_controller_row(tmp_path):
    clock = Clock(50.0)
    cli, ctl = JobStore(tmp_path / "j.db", clock=clock), JobStore(tmp_path / "j.db", clock=clock)
    assert cli.controller() is None
    ctl.set_controller(4242, "ray://head:10001")
    clock.t = 60.0
    assert ctl.heartbeat(4242) is True
    assert ctl.heartbeat(1) is False  # a stale controller learns it was replaced
    info = cli.controller()
    assert (info.pid, info.address, info.heartbeat) == (4242, "ray://head:10001", 60.0)
    assert cli.clear_controller(1) is False and cli.controller() is not None  # only the recorded one clears it
    assert ctl.clear_controller(4242) is True and cli.controller() is None


def test_status_dict_is_json_ready(store):
    rec = submit(store)
    drive(store, rec.id, PATH_TO[S.RUNNING])
    store.update(rec.id, step=7, metrics={"loss": 2.0}, workers=[{"rank": 0, "node": "n", "pid": 1}])
    store.add_eval(rec.id, "c7", 7, 2.1)
    d = json.loads(json.dumps(store.get(rec.id).to_status_dict()))
    for key in ("id", "name", "state", "priority", "step", "restarts", "run_dir", "metrics", "evals",
                "best_checkpoint", "workers", "history", "reason", "submitted_at"):
        assert key in d
    assert d["state"] == "RUNNING" and d["step"] == 7 and d["evals"][0]["checkpoint"] == "c7"
    assert [h["to"] for h in d["history"]] == ["QUEUED", "STARTING", "RUNNING"]


# ---------------------------------------------------------------------- several writers


def test_two_stores_on_one_file_see_each_other(tmp_path):
    cli, ctl = JobStore(tmp_path / "jobs.db"), JobStore(tmp_path / "jobs.db")
    rec = submit(cli)  # the CLI submits
    assert [r.id for r in ctl.list(states=[S.QUEUED])] == [rec.id]  # the controller sees it
    ctl.transition(rec.id, S.STARTING, "admitted")
    ctl.transition(rec.id, S.RUNNING, "up")
    ctl.update(rec.id, step=3)
    got = cli.get(rec.id)
    assert got.state is S.RUNNING and got.step == 3
    cli.request_cancel(rec.id)  # the CLI asks
    assert ctl.get(rec.id).cancel_requested  # the controller sees the request
    # A store is just its path, so it pickles into a Ray actor.
    assert pickle.loads(pickle.dumps(ctl)).get(rec.id).cancel_requested


def test_concurrent_threads_lose_no_updates(tmp_path):
    path = tmp_path / "jobs.db"
    shared = JobStore(path)
    jobs = [submit(shared, f"j{i}") for i in range(4)]
    racer = submit(shared, "racer")
    cycles, errors, winners = 5, [], []

    def worker(i: int) -> None:
        try:
            store = shared if i % 2 else JobStore(path)  # one shared object, and separate ones
            jid = jobs[i].id
            for c in range(cycles):
                store.transition(jid, S.STARTING, "admitted")
                store.transition(jid, S.RUNNING, "up")
                store.update(jid, step=c + 1, metrics={"thread": i})
                store.add_eval(jid, f"ckpt-{c}", c, 1.0)
                store.transition(jid, S.RESTARTING, "node lost")
                store.transition(jid, S.QUEUED, "requeued")
            try:
                store.transition(racer.id, S.STARTING, f"thread {i}")
                winners.append(i)
            except IllegalTransitionError:
                pass
        except Exception as err:  # surfaced below; a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, job in enumerate(jobs):
        rec = shared.get(job.id)
        assert rec.restarts == cycles and rec.step == cycles and rec.metrics == {"thread": i}
        assert len(rec.history) == 1 + 4 * cycles and len(rec.evals) == cycles
    assert len(winners) == 1  # exactly one thread admitted the racer
    assert [h.to_state for h in shared.history(racer.id)] == [S.QUEUED, S.STARTING]


_CHILD = """
import sys
from orchestrator.job_store import JobStore
store = JobStore(sys.argv[1])
for i in range(15):
    store.submit(f"p{sys.argv[2]}-{i}", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1}, 0,
                 lambda jid: "/runs/" + jid)
"""


def test_concurrent_processes_share_the_file(tmp_path):
    path = str(tmp_path / "jobs.db")
    JobStore(path)
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, path, str(k)], env=env, stderr=subprocess.PIPE)
             for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    names = {r.name for r in JobStore(path).list()}
    assert names == {f"p{k}-{i}" for k in range(2) for i in range(15)}


# ---------------------------------------------------------------------- owners, dependencies, preemption, tokens


def test_owner_team_and_dependencies_are_stored(store):
    dep = submit(store, "first", owner="alice", team="nlp")
    rec = submit(store, "second", owner="bob", team="vision", after=[dep.id[:-1]])
    assert (rec.owner, rec.team, rec.after) == ("bob", "vision", (dep.id,))
    assert store.get(rec.id).to_status_dict()["after"] == [dep.id]
    with pytest.raises(JobNotFoundError):
        submit(store, "third", after=["sy-19990101-000000"])


def test_queued_quota_is_checked_at_submit(store):
    from orchestrator.job_store import QuotaError

    submit(store, team="nlp", max_queued=2)
    submit(store, team="nlp", max_queued=2)
    with pytest.raises(QuotaError, match="queued_jobs: 2"):
        submit(store, team="nlp", max_queued=2)
    submit(store, team="vision", max_queued=2)  # another team's queue is its own


def test_preemption_counts_and_records_who(store):
    clock = Clock()
    store = JobStore(store.path, clock=clock)
    rec = submit(store)
    drive(store, rec.id, [S.STARTING])
    clock.t += 1
    store.transition(rec.id, S.RUNNING, "up")
    clock.t += 10
    rec = store.transition(rec.id, S.PREEMPTED, "preempted by sy-x", preempted_by="sy-x")
    assert rec.preemptions == 1 and rec.restarts == 0 and rec.preempted_by == "sy-x"
    clock.t += 2
    rec = store.transition(rec.id, S.QUEUED, "requeued", pending={"waiting_for": "capacity"})
    assert rec.pending == {"waiting_for": "capacity"}
    assert rec.run_intervals == [(clock.t - 12, clock.t)] and rec.running_since is None
    assert store.transition(rec.id, S.STARTING, "again").pending is None


def test_v1_store_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    from orchestrator import job_store as js

    conn.executescript(js._SCHEMA.replace(",\n    owner            TEXT NOT NULL DEFAULT '',\n"
                                          "    team             TEXT NOT NULL DEFAULT '',\n"
                                          "    after_json       TEXT NOT NULL DEFAULT '[]',\n"
                                          "    preemptions      INTEGER NOT NULL DEFAULT 0,\n"
                                          "    preempted_by     TEXT,\n    pending_json     TEXT", "")
                       + "PRAGMA user_version = 1;")
    conn.close()
    store = JobStore(path)
    rec = submit(store, owner="carol")
    assert store.get(rec.id).owner == "carol"


def test_tokens_store_only_a_hash(store):
    token = store.create_token("alice", admin=True)
    assert store.check_token(token) == ("alice", True)
    assert store.check_token(token + "x") is None and store.check_token("") is None
    raw = open(store.path, "rb").read()
    assert token.encode() not in raw
    assert store.revoke_tokens("alice") == 1 and store.check_token(token) is None


def test_tokens_are_listed_by_id_and_revoked_one_at_a_time(store):
    import hashlib

    a1, a2, b = store.create_token("alice"), store.create_token("Alice"), store.create_token("bob", admin=True)
    listed = store.tokens()
    assert [(t.user, t.admin) for t in listed] == [("alice", False), ("alice", False), ("bob", True)]
    assert [t.id for t in listed] == [hashlib.sha256(x.encode()).hexdigest()[:12] for x in (a1, a2, b)]
    assert not any(x in str([t.to_dict() for t in listed]) for x in (a1, a2, b))
    assert [t.id for t in store.tokens("ALICE")] == [t.id for t in listed[:2]]
    assert store.revoke_token(listed[0].id[:6].upper()).user == "alice"  # a prefix, any case
    assert store.check_token(a1) is None and store.check_token(a2) == ("alice", False)
    assert store.check_token(b) == ("bob", True)
    for bad, says in ((listed[0].id, "no API token has the id"), ("abc", "at least 4 hex digits"),
                      ("zzzz", "at least 4 hex digits"), ("%%%%", "at least 4 hex digits")):
        with pytest.raises(UsageError, match=says):
            store.revoke_token(bad)
    with pytest.raises(TokenNotFoundError):
        store.token_by_id(listed[0].id)
    assert [t.id for t in store.tokens()] == [listed[1].id, listed[2].id]


def test_a_token_with_a_lifetime_is_refused_once_it_is_over(tmp_path):
    clock = Clock()
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    short, forever = store.create_token("alice", expires_in_s=60), store.create_token("bob")
    assert [t.expires_at for t in store.tokens()] == [clock.t + 60, None]
    clock.t += 59
    assert store.check_token(short) == ("alice", False)
    clock.t += 1
    assert store.check_token(short) is None and store.check_token(forever) == ("bob", False)
    assert store.tokens("alice")[0].expires_at <= clock.t  # still listed, so an admin sees it expired
    for bad in (0, -5, 1e12, True, "60"):
        with pytest.raises(UsageError, match="expires: give a lifetime"):
            store.create_token("carol", expires_in_s=bad)
    assert store.tokens("carol") == []
