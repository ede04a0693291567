"""Webhooks (orchestrator/notify.py): job state changes posted to a real HTTP server, filtered per hook.

The controller posting a finished job's change is in tests/test_controller.py.
"""
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.cluster_config import ClusterConfig, load_cluster_config
from orchestrator.job_store import JobState, JobStore
from orchestrator.notify import Notifier
from specs.errors import UsageError


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it, by path."""

    def __init__(self):
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n, timeout=10.0):
        deadline = time.time() + timeout
        while len(self.got) < n and time.time() < deadline:
            time.sleep(0.05)
        return self.got

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_changes_are_posted_to_each_hook_that_wants_them(tmp_path, receiver, caplog, monkeypatch):
    import socket

    monkeypatch.setattr("orchestrator.notify.RETRY_S", (0.01, 0.01))

    with socket.socket() as s:  # a port nothing listens on: that hook's posts fail, the others' do not wait
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    cfg = ClusterConfig.model_validate({"job_store": str(tmp_path / "jobs.db"), "webhooks": [
        {"url": dead},
        {"url": f"{receiver.url}/all"},
        {"url": f"{receiver.url}/bob-failed", "states": ["failed"], "owners": ["bob"]},
        {"url": f"{receiver.url}/runs", "states": ["CANCELLED"], "runs": True}]})
    store = JobStore(cfg.job_store)
    res = {"workers": 1, "cpus_per_worker": 1}
    before = store.submit("early", "train", {}, 0, res, 0, run_dir_for=lambda j: f"/r/e-{j}", owner="alice").id
    notifier = Notifier(cfg.webhooks, store)
    assert notifier.poll() == 0  # the first poll starts from now: nothing from before it is sent
    store.request_cancel(before, by="alice")
    mine = store.submit("mine", "train", {}, 0, res, 0, run_dir_for=lambda j: f"/r/m-{j}", owner="bob").id
    store.transition(mine, JobState.STARTING, "resources available")
    store.transition(mine, JobState.RUNNING, "all workers started")
    store.transition(mine, JobState.FAILED, "rank 0: out of memory")
    sweep = store.submit("iso", "sweep", {}, 0, {"workers": 0, "cpus_per_worker": 0}, 0,
                         run_dir_for=lambda j: f"/r/s-{j}", owner="alice").id
    store.submit("iso-r1", "sweep-run", {}, 0, res, 0, run_dir_for=lambda j: f"/r/r-{j}", parent_id=sweep)
    with caplog.at_level(logging.WARNING, logger="orchestrator.notify"):
        assert notifier.poll() == 2 + 2 + 1 + 1  # dead: early, mine; all: the same; bob-failed: mine; runs: early
        assert notifier.poll() == 0
        store.request_cancel(sweep, by="ops")  # the sweep and its run
        assert notifier.poll() == 1 + 1 + 2
        assert notifier.drain(20.0)
    by_path = {}
    for path, ctype, body in receiver.wait(7):
        assert ctype == "application/json"
        by_path.setdefault(path, []).append(body)
    assert sorted(by_path) == ["/all", "/bob-failed", "/runs"]
    assert [(b["job"]["id"], b["from"], b["to"]) for b in by_path["/all"]] == [
        (before, "QUEUED", "CANCELLED"), (mine, "RUNNING", "FAILED"), (sweep, "QUEUED", "CANCELLED")]
    failed = by_path["/bob-failed"]
    assert len(failed) == 1 and failed[0]["job"]["owner"] == "bob" and failed[0]["reason"] == "rank 0: out of memory"
    assert failed[0]["text"] == f"switchyard: {mine} mine (bob): RUNNING -> FAILED: rank 0: out of memory"
    assert failed[0]["job"]["run_dir"] == f"/r/m-{mine}" and isinstance(failed[0]["ts"], float)
    assert sorted(b["job"]["name"] for b in by_path["/runs"]) == ["early", "iso", "iso-r1"]
    # The dead hook: three tries each, then one warning line that names its host, never its path.
    warnings = [r.getMessage() for r in caplog.records if "not sent after 3 tries" in r.getMessage()]
    assert len(warnings) == 3 and all(dead.rsplit("/", 1)[0] in w and "/hook" not in w for w in warnings)


def test_after_a_controller_died_its_successor_sends_what_changed_since_its_last_tick(tmp_path, receiver):
    cfg = ClusterConfig.model_validate({"job_store": str(tmp_path / "jobs.db"),
                                        "webhooks": [{"url": f"{receiver.url}/h", "states": ["CANCELLED"]}]})
    store = JobStore(cfg.job_store)
    res = {"workers": 1, "cpus_per_worker": 1}
    old, new = (store.submit(n, "train", {}, 0, res, 0, run_dir_for=lambda j: f"/r/{j}").id for n in ("old", "new"))
    store.request_cancel(old)
    last_tick = time.time()
    time.sleep(0.01)
    store.request_cancel(new)  # while no controller ran
    notifier = Notifier(cfg.webhooks, store, since=last_tick)
    assert notifier.poll() == 1 and notifier.drain(10.0)
    assert [b["job"]["name"] for _, _, b in receiver.wait(1)] == ["new"]


def test_a_controller_started_after_a_down_sends_what_changed_while_none_ran(tmp_path, receiver, monkeypatch):
    from orchestrator import notify
    from orchestrator.notify import webhook_cursor

    cfg = ClusterConfig.model_validate({"job_store": str(tmp_path / "jobs.db"),
                                        "webhooks": [{"url": f"{receiver.url}/h", "states": ["CANCELLED"]}]})
    store = JobStore(cfg.job_store)
    res = {"workers": 1, "cpus_per_worker": 1}
    before, during, stale = (store.submit(n, "train", {}, 0, res, 0, run_dir_for=lambda j: f"/r/{j}").id
                             for n in ("before", "during", "stale"))
    store.request_cancel(before)  # before any controller: a store that never had webhooks starts from now
    up = Notifier(cfg.webhooks, store)
    assert up.poll() == 0 and webhook_cursor(store) == up.seq
    store.request_cancel(during)  # after `switchyard down`: no controller runs
    again = Notifier(cfg.webhooks, store)  # the next `switchyard up`: no predecessor died, so no `since`
    assert again.poll() == 1 and again.drain(10.0)
    assert [b["job"]["name"] for _, _, b in receiver.wait(1)] == ["during"]
    store.request_cancel(stale)
    monkeypatch.setattr(notify, "REPLAY_S", 0.05)  # a down longer than the replay window
    time.sleep(0.1)
    assert Notifier(cfg.webhooks, store).poll() == 0  # too old to be news


def test_a_bad_webhook_in_cluster_yaml_is_one_line(tmp_path):
    for hook, said in (("{url: ftp://x}", "webhooks.0.url"), ("{url: 'http://x', states: [DONE]}", "'DONE' is not"),
                       ("{url: 'http://x', color: red}", "webhooks.0.color")):
        path = tmp_path / "cluster.yaml"
        path.write_text(f"webhooks: [{hook}]\n")
        with pytest.raises(UsageError) as err:
            load_cluster_config(str(path))
        assert said in str(err.value) and "\n" not in str(err.value), str(err.value)
