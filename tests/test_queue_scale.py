"""The queue at scale (issue #15): indexed queries, the incremental queue view, pagination, retention, and the
scheduling pass that reuses answers per job shape. No Ray: real SQLite stores in temporary folders."""
from __future__ import annotations

import random

import pytest

from orchestrator import scheduler as sched
from orchestrator.job_retention import RetentionPolicy, compact
from orchestrator.job_store import JobState, JobStore, safe_join
from orchestrator.queue_view import EXACT_POSITIONS, QueueView
from tests.scheduler_reference import reference_schedule

S = JobState
KINDS = ("train", "sweep-run", "pipeline-stage")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return JobStore(tmp_path / "jobs.db", clock=clock)


def submit(store: JobStore, name: str = "job", workers: int = 1, cpus: float = 1, priority: int = 0,
           kind: str = "train", **kw):
    return store.submit(name, kind, {"train": {"steps": 1}}, priority,
                        {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": 0}, 0,
                        lambda j: safe_join("/tmp/runs", j), **kw)


def plan(store: JobStore, query: str, params: tuple = ()) -> str:
    with store._read() as conn:
        return " | ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + query, params))


def test_the_queries_a_tick_and_a_listing_make_use_indexes(store):
    from orchestrator.queue_view import _COLUMNS

    queue = plan(store, f"SELECT {_COLUMNS} FROM jobs WHERE state = 'QUEUED'")
    changes = plan(store, f"SELECT {_COLUMNS} FROM jobs WHERE rev > ?", (0,))
    assert "SEARCH jobs USING INDEX jobs_state_submitted (state=?)" in queue, queue
    assert "jobs_rev" in changes, changes
    assert "jobs_name" in plan(store, "SELECT * FROM jobs WHERE name = ? AND kind = ? ORDER BY submitted_at, id",
                               ("a", "sweep"))
    page = plan(store, "SELECT * FROM jobs WHERE 1 ORDER BY submitted_at DESC, id DESC LIMIT 100 OFFSET 5")
    assert "jobs_submitted" in page and "TEMP B-TREE" not in page, page
    queued_page = plan(store, "SELECT * FROM jobs WHERE state IN (?) ORDER BY submitted_at DESC, id DESC LIMIT 100",
                       ("QUEUED",))
    assert "jobs_state_submitted" in queued_page and "TEMP B-TREE" not in queued_page, queued_page
    quota = plan(store, "SELECT COUNT(*) FROM jobs WHERE team = ? AND state = ? AND parent_id IS NULL", ("a", "QUEUED"))
    assert "jobs_team_state" in quota, quota
    for query in (queue, changes):
        assert "SCAN jobs" not in query.replace("SCAN jobs USING", ""), query


def test_list_pages_newest_first_in_submission_order(store):
    ids = [submit(store, f"j{i}", owner="ann" if i % 2 else "bob").id for i in range(7)]
    page1, total = store.page(limit=3)
    assert total == 7 and [r.id for r in page1] == ids[4:]
    assert [r.id for r in store.page(limit=3, page=2)[0]] == ids[1:4]
    assert [r.id for r in store.page(limit=3, page=3)[0]] == ids[:1]
    assert store.page(limit=3, page=4) == ([], 7)
    store.transition(ids[5], S.CANCELLED, "x")
    queued, n = store.page([S.QUEUED], limit=2, owner="ann")
    assert n == 2 and [r.id for r in queued] == [ids[1], ids[3]]  # ann's 5 is cancelled
    assert queued[0].history[0].to_state == S.QUEUED  # full records, history included
    assert [r.id for r in store.by_name("j3", "train")] == [ids[3]] and store.by_name("j3", "sweep") == []
    with pytest.raises(ValueError, match="limit"):
        store.page(limit=0)


def test_cli_list_shows_a_page_and_says_how_to_see_the_rest(tmp_path, capsys):
    from orchestrator.cli import main

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\n")
    store = JobStore(tmp_path / "jobs.db")
    ids = [submit(store, f"j{i}").id for i in range(5)]
    assert main(["--cluster", str(cfg), "list", "--limit", "2", "--page", "2"]) == 0
    out = capsys.readouterr().out
    assert [i for i in ids if i in out] == ids[1:3] and "jobs 3-4 of 5" in out and "--page 3" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--cluster", str(cfg), "list", "--limit", "0"])
    assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err


def test_cli_list_filters_by_state_and_owner_and_says_why_a_job_failed(tmp_path, capsys):
    from orchestrator.cli import main

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\n")
    store = JobStore(tmp_path / "jobs.db")
    ids = [submit(store, f"j{i}").id for i in range(3)]
    store.transition(ids[1], JobState.FAILED, "needs 64 workers x {1 CPU} but the cluster has 2 CPUs " + "x" * 200
                     + " ask for fewer or smaller workers")
    assert main(["--cluster", str(cfg), "list", "--state", "failed,cancelled"]) == 0
    out = capsys.readouterr().out
    assert [i for i in ids if i in out] == [ids[1]]
    line = next(ln for ln in out.splitlines() if ids[1] in ln)
    assert "needs 64 workers" in line and line.endswith("ask for fewer or smaller workers") and " ... " in line
    assert main(["--cluster", str(cfg), "list", "--state", "QUEUED", "--owner", "nobody"]) == 0
    assert capsys.readouterr().out == "no jobs match --state/--owner\n"
    assert main(["--cluster", str(cfg), "list", "--state", "dead"]) == 2
    err = capsys.readouterr().err
    assert "list --state dead: not a job state; give one or more of queued," in err


def _full_read(store: JobStore) -> list[sched.QueuedJob]:
    """What the controller read before issue #15: every queued job in full, dependencies one by one."""
    queued = [r for r in store.list([S.QUEUED]) if r.kind in KINDS]
    deps = {d: store.get(d).state.value for r in queued for d in r.after}
    return [sched.QueuedJob.from_record(r, deps) for r in queued]


@pytest.mark.parametrize("move_at_most", [0.0, 1.0])  # sort it all every time / move the changed jobs
def test_incremental_view_sees_what_a_full_read_sees_and_decides_the_same(store, monkeypatch, move_at_most):
    """Random submits, starts, finishes, cancels, priority changes and dependencies; after each tick the view
    holds the same queue, in the same order, as a full read, and the scheduler decides the same from either."""
    import orchestrator.queue_view as qv

    monkeypatch.setattr(qv, "MOVE_AT_MOST", move_at_most)
    rng, view, live = random.Random(7), QueueView(KINDS), []
    nodes = {f"n{i}": {"CPU": 8.0, "GPU": 0.0} for i in range(3)}
    for step in range(60):
        for _ in range(rng.randint(0, 4)):
            after = [rng.choice(live)] if live and rng.random() < 0.2 else []
            kind = rng.choice(KINDS + ("sweep",))
            live.append(submit(store, f"j{step}", rng.choice((1, 2, 4)), rng.choice((1, 2)), rng.choice((0, 0, 5)),
                               kind, team=rng.choice(("a", "b")), after=after).id)
        for job_id in rng.sample(live, min(3, len(live))):
            state = store.get(job_id).state
            action = rng.random()
            if state == S.QUEUED and action < 0.3:
                store.transition(job_id, S.STARTING, "start")
            elif state == S.STARTING and action < 0.6:
                store.transition(job_id, rng.choice((S.RUNNING, S.QUEUED, S.FAILED)), "moved")
            elif state == S.RUNNING:
                store.transition(job_id, S.SUCCEEDED, "done")
            elif state == S.QUEUED and action < 0.5:
                store.update(job_id, priority=rng.randint(-3, 9))
            elif not state.terminal and action < 0.7:
                store.request_cancel(job_id)
        view.refresh(store)
        if step % 10 == 0:  # new fair shares now and then: the view sorts again; in between it moves jobs
            shares = {"a": rng.random(), "b": rng.choice((0.0, 0.5))}
        expected = sched.queue_order(_full_read(store), shares)
        assert view.jobs(shares) == expected and view.counts == sched.shape_counts(expected)
        now = 2_000_000.0 + step
        decisions = sched.schedule(view.jobs(shares), nodes, nodes, now=now, shares=shares)
        assert decisions == sched.schedule(expected, nodes, nodes, now=now, shares=shares)
        for d in decisions:  # the controller's notes go back without echoing through rev
            if isinstance(d, sched.Wait) and view.rows[d.job_id].blocked_since is None:
                view.note_blocked(d.job_id, now)
        rev = view.rev
        view.flush(store)
        assert view.refresh(store) == 0 and view.rev == rev
    assert len(view.rows) > 5 and view.dep_states


def test_pending_notes_are_written_in_one_batch_and_far_positions_are_rate_limited(store, monkeypatch):
    import orchestrator.queue_view as qv

    monkeypatch.setattr(qv, "EXACT_POSITIONS", 2)
    ids = [submit(store, f"j{i}", workers=4).id for i in range(5)]
    view = QueueView(KINDS)
    view.refresh(store)
    wait = lambda j: sched.Wait(j, "waiting for resources")
    for pos, j in enumerate(ids, 1):
        view.note_pending(j, pos, wait(j), now=100.0)
    assert view.flush(store) == 5 and store.get(ids[4]).pending["position"] == 5
    for pos, j in enumerate(ids[1:], 1):  # the head started: everyone moves up one
        view.note_pending(j, pos, wait(j), now=110.0)
    view.flush(store)
    # near the head (either position <= EXACT_POSITIONS) at once; further back it waits FAR_REFRESH_S
    assert [store.get(j).pending["position"] for j in ids[1:]] == [1, 2, 4, 5]
    for pos, j in enumerate(ids[1:], 1):  # a minute later the far ones catch up
        view.note_pending(j, pos, wait(j), now=110.0 + qv.FAR_REFRESH_S)
    view.flush(store)
    assert [store.get(j).pending["position"] for j in ids[1:]] == [1, 2, 3, 4]
    assert EXACT_POSITIONS >= 100  # the shipped default keeps every position a person looks at exact


def _random_pass(rng: random.Random):
    nodes = {f"n{i}": {"CPU": float(rng.choice((4, 8, 16))), "GPU": float(rng.choice((0, 0, 2)))} for i in range(5)}
    free = {n: {"CPU": float(rng.randint(0, int(r["CPU"]))), "GPU": float(rng.randint(0, int(r["GPU"])))}
            for n, r in nodes.items()}
    shapes = [sched.bundles_of({"workers": w, "cpus_per_worker": c, "gpus_per_worker": g})
              for w in (1, 2, 3, 8) for c in (1, 2, 4) for g in (0, 1)]
    shapes.append((sched.Bundle(2, 1), sched.Bundle(1, 0)))  # a mixed gang
    queue = [sched.QueuedJob(f"q{i}", rng.choice((0, 0, 1, 5)), float(rng.randint(0, 50)), rng.choice(shapes),
                             rng.choice((None, 0.0, 990.0)), rng.random() < 0.03, rng.choice(("a", "b", "c")),
                             tuple((f"d{k}", rng.choice(("SUCCEEDED", "RUNNING", "FAILED")))
                                   for k in range(rng.random() < 0.1)),
                             rng.choice((None, None, 5.0, 50.0, 400.0, 2000.0)))
             for i in range(rng.randint(1, 60))]
    running = [sched.RunningJob(f"r{i}", rng.choice((0, 1, 3)), b, tuple(rng.choice(sorted(nodes)) for _ in b),
                                rng.choice((None, 500.0, 990.0)), rng.randint(0, 3), rng.choice(("a", "b")),
                                rng.random() < 0.1, rng.choice((None, 1010.0, 1100.0, 1500.0)))
               for i, b in enumerate(rng.choice(shapes[:12]) for _ in range(rng.randint(0, 8)))]
    return queue, free, nodes, running


def test_the_pass_that_reuses_answers_per_shape_decides_exactly_as_the_pass_before_it():
    rng = random.Random(3)
    quotas = {"a": sched.TeamQuota(cpus=12.0), "b": sched.TeamQuota(gpus=2.0)}
    for _ in range(300):
        queue, free, nodes, running = _random_pass(rng)
        kw = dict(now=1000.0, backfill_window_s=rng.choice((0.0, 30.0, 120.0)), running=running,
                  preemption=rng.choice((None, sched.PreemptionPolicy(min_run_s=100.0))), quotas=quotas,
                  shares={"a": rng.random(), "b": rng.random()})
        assert sched.schedule(queue, free, nodes, **kw) == reference_schedule(queue, free, nodes, **kw)


def test_a_tick_that_stops_early_leaves_only_waits_and_decides_them_as_the_full_pass_does(monkeypatch):
    monkeypatch.setattr(sched, "FREEZE_CHECK_EVERY", 1)
    rng, stopped = random.Random(5), 0
    for _ in range(300):
        queue, free, nodes, running = _random_pass(rng)
        kw = dict(now=1000.0, backfill_window_s=rng.choice((0.0, 120.0)), running=running,
                  preemption=rng.choice((None, sched.PreemptionPolicy(min_run_s=100.0))),
                  shares={"a": rng.random(), "b": rng.random()})
        full = reference_schedule(queue, free, nodes, **kw)
        plan = sched.plan_tick(queue, free, nodes, exact=rng.choice((0, 3)), **kw)
        stopped += plan.cut < len(plan.order)
        got = {d.job_id: d for d in plan.decisions if not isinstance(d, sched.Preempt)}
        positions = dict(plan.positions)
        for job in plan.order[plan.cut:]:
            if job.job_id not in got:
                got[job.job_id], positions[job.job_id] = plan.wait_for(job.job_id)
        jobs_only = [d for d in full if not isinstance(d, sched.Preempt)]
        assert [got[j.job_id] for j in plan.order] == jobs_only
        assert [d for d in plan.decisions if isinstance(d, sched.Preempt)] == \
            [d for d in full if isinstance(d, sched.Preempt)]
        counted = [d.job_id for d in jobs_only if isinstance(d, (sched.Start, sched.Wait))]
        assert positions == {j: i for i, j in enumerate(counted, 1)}
    assert stopped > 50  # the early stop itself was exercised


def test_retention_deletes_old_finished_jobs_with_their_history_and_keeps_what_is_needed(store, clock):
    day = 86400.0
    old = submit(store, "old")
    store.transition(old.id, S.CANCELLED, "x")
    store.add_eval(old.id, "ckpt", 1, 2.0)
    waited_for = submit(store, "dep")
    store.transition(waited_for.id, S.CANCELLED, "x")
    sweep = submit(store, "sweep", workers=0, kind="sweep")
    done_run, live_run = (submit(store, f"run{i}", kind="sweep-run", parent_id=sweep.id) for i in range(2))
    store.transition(done_run.id, S.CANCELLED, "x")
    store.transition(sweep.id, S.CANCELLED, "x")  # its run is still queued
    clock.t += 40 * day
    waiting = submit(store, "waiting", after=[waited_for.id])
    recent = submit(store, "recent")
    store.transition(recent.id, S.CANCELLED, "x")
    # Tokens that expired over 30 days ago go; one that expired since, and one with no expiry, stay.
    clock.t -= 40 * day
    store.create_token("gone", expires_in_s=day)
    clock.t += 35 * day
    store.create_token("lapsed", expires_in_s=day)
    store.create_token("kept")
    clock.t += 5 * day
    done = compact(store, RetentionPolicy(finished_days=30), now=clock.t)
    assert done.deleted == 1 and done.kept_for_dependents == 1 and done.tokens == 1
    assert [t.user for t in store.tokens()] == ["lapsed", "kept"]
    left = {r.id for r in store.list()}
    assert old.id not in left and {waited_for.id, sweep.id, done_run.id, recent.id, waiting.id} <= left
    with store._read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM transitions WHERE job_id = ?", (old.id,)).fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM evals WHERE job_id = ?", (old.id,)).fetchone()[0] == 0
    store.request_cancel(waiting.id)
    store.transition(live_run.id, S.CANCELLED, "x")
    done = compact(store, RetentionPolicy(finished_days=30, max_finished=1), now=clock.t)
    # the sweep and both runs go as one tree; max_finished keeps only the newest finished job
    assert done.deleted == 5 and [r.id for r in store.list()] == [waiting.id]
    assert compact(store, RetentionPolicy(finished_days=30), now=clock.t) == type(done)(0, 0)


def test_a_v2_store_is_migrated_and_its_jobs_get_revs(tmp_path):
    import sqlite3

    from orchestrator.job_schema import _SCHEMA

    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA + "PRAGMA user_version = 2;")
    conn.execute("INSERT INTO jobs (id, name, kind, spec_json, priority, state, submitted_at, updated_at,"
                 " max_restarts, run_dir, resources_json) VALUES ('sy-old', 'old', 'train', '{}', 0, 'QUEUED', 1, 1,"
                 " 0, '/tmp/x', '{\"workers\": 1, \"cpus_per_worker\": 1}')")
    conn.commit()
    conn.close()
    store = JobStore(path)
    view = QueueView(KINDS)
    view.refresh(store)
    assert list(view.rows) == ["sy-old"]
    new = submit(store, "new")
    store.update("sy-old", priority=3)
    assert view.refresh(store) == 2 and view.rows["sy-old"].priority == 3 and new.id in view.rows


def test_cli_priority_reorders_the_queue_at_the_next_refresh_and_reaches_a_sweeps_live_runs(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.cli_jobs import local_user

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"storage: {tmp_path / 'runs'}\njob_store: {tmp_path / 'jobs.db'}\n")
    store = JobStore(tmp_path / "jobs.db")
    me = local_user()
    a, b, c = (submit(store, n, owner=me).id for n in ("a", "b", "c"))
    view = QueueView(KINDS)
    view.refresh(store)
    assert [j.job_id for j in view.jobs()] == [a, b, c]
    assert main(["--cluster", str(cfg), "priority", c, "5"]) == 0
    assert f"{c}: priority 0 -> 5 (QUEUED)" in capsys.readouterr().out
    assert view.refresh(store) == 1 and [j.job_id for j in view.jobs()] == [c, a, b]

    sweep = store.submit("sw", "sweep", {"runs": 2}, 0, {"workers": 0, "cpus_per_worker": 0, "gpus_per_worker": 0},
                         0, lambda j: safe_join("/tmp/runs", j), owner=me)
    runs = [submit(store, f"sw-{i}", kind="sweep-run", parent_id=sweep.id, owner=me).id for i in range(3)]
    store.transition(runs[0], JobState.CANCELLED, "done with")
    assert main(["--cluster", str(cfg), "priority", "sw", "9"]) == 0  # by the sweep's name
    assert "and 2 of its live stages or runs" in capsys.readouterr().out
    assert [store.get(r).priority for r in runs] == [0, 9, 9] and store.get(sweep.id).priority == 9

    theirs = submit(store, "theirs", owner="someone-else").id
    for args, says in (([theirs, "3"], "belongs to someone-else"), ([runs[0], "3"], "is CANCELLED"),
                       ([a, "2000000"], "from -1000000 to 1000000"), (["nope", "1"], "nope")):
        try:
            code = main(["--cluster", str(cfg), "priority", *args])
        except SystemExit as exit_:  # argparse's refusal of the number
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and says in err and err.count("\n") == 1, err
    assert store.get(theirs).priority == 0 and store.get(a).priority == 0
