"""Webhooks: the controller posts job state changes to the URLs in cluster.yaml (a team's chat, a pager).

    webhooks:
      - url: https://hooks.slack.com/services/T000/B000/XXXX
        states: [FAILED]            # default: SUCCEEDED, FAILED, CANCELLED
        owners: [alice]             # only these users' jobs (default: everyone's)
        runs: false                 # also each pipeline stage and sweep run (default: only top-level jobs)

Every tick the controller reads the transitions written since the last one
(one range query on the history's sequence number, at most ``BATCH`` rows),
so changes made outside it count too: a queued job cancelled from the CLI, a
requeue. Each match becomes one JSON POST, sent by a thread of its own with
``TIMEOUT_S`` per try and three tries (``RETRY_S`` apart), so a slow or dead endpoint never
holds up scheduling; a post that still fails is logged and dropped. The body
carries ``text`` (one line, which Slack and Mattermost incoming webhooks show
as the message) and the change as data: ``job`` (id, name, kind, owner, team,
parent_id, run_dir, step), ``from``, ``to``, ``reason`` and ``ts``.

The last transition looked at is kept in the job store (``webhook_cursor``),
so a controller sends what changed while none ran: after a `switchyard down`
(a queued job cancelled from the CLI meanwhile), and when the one before it
died (Ray restarts it), what changed after that one's last tick. Only the
last ``REPLAY_S`` (a day) of such changes is sent; older ones are skipped.
A store that never had webhooks before starts from what changes next.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

REPLAY_S = 86400.0
"""Changes made while no controller ran are sent when they are at most this old."""
BATCH = 1000      # transitions read per tick at most (a backlog drains over the next ticks)
TIMEOUT_S = 10.0  # per try of one POST
RETRY_S = (1.0, 2.0)  # waits before the second and third try of a POST
BACKLOG = 10_000  # posts waiting to be sent at most; past it new ones are dropped (and logged)

_COLUMNS = ("t.seq, t.job_id, t.ts, t.from_state, t.to_state, t.reason, j.name, j.kind, j.owner, j.team, "
            "j.parent_id, j.run_dir, j.step")


def payload(row: Any) -> dict:
    """The JSON body for one transition row (``_COLUMNS``)."""
    job = {"id": row["job_id"], "name": row["name"], "kind": row["kind"], "owner": row["owner"],
           "team": row["team"], "parent_id": row["parent_id"], "run_dir": row["run_dir"], "step": row["step"]}
    who = f" ({row['owner']})" if row["owner"] else ""
    text = (f"switchyard: {row['job_id']} {row['name']}{who}: {row['from_state'] or 'new'} -> {row['to_state']}"
            + (f": {row['reason']}" if row["reason"] else ""))
    return {"text": text, "job": job, "from": row["from_state"], "to": row["to_state"], "reason": row["reason"],
            "ts": row["ts"]}


def wanted(hook: Any, row: Any) -> bool:
    """Whether ``hook`` (a ``WebhookConfig``) is told of this transition."""
    return (row["to_state"] in hook.states and (not hook.owners or row["owner"] in hook.owners)
            and (hook.runs or row["parent_id"] is None))


def webhook_cursor(store) -> int | None:
    """The last transition (``seq``) the webhooks looked at, kept in the store across controllers; None if
    none has yet."""
    with store._read() as conn:
        row = conn.execute("SELECT seq FROM webhook_cursor WHERE id = 0").fetchone()
    return row["seq"] if row else None


def _set_cursor(store, seq: int) -> None:
    with store._write() as conn:
        conn.execute("INSERT OR REPLACE INTO webhook_cursor (id, seq) VALUES (0, ?)", (int(seq),))


class Notifier:
    """Reads new transitions from the job store and posts the wanted ones to each webhook."""

    def __init__(self, hooks, store, since: float | None = None, post=None):
        self.hooks = list(hooks)
        self.store = store
        self.since = since
        """With no cursor in the store (a store from before it kept one), the first poll sends what changed after
        this time (the last tick of a controller that died); None: only what changes after the first poll."""
        self.seq: int | None = None
        """The last transition looked at; None until the first poll."""
        self._post = post or _post
        self._queues: dict[str, queue.Queue] = {}  # one queue and sender thread per URL: a dead one delays no other
        self._lock = threading.Lock()  # the controller's loop and its shutdown both poll

    def poll(self) -> int:
        """Queue a post for each wanted transition since the last poll; returns how many were queued. Never
        raises: a webhook is not worth a controller tick (a failed read is logged and tried again next time)."""
        if not self.hooks:
            return 0
        try:
            with self._lock:
                return self._poll()
        except Exception:
            log.exception("webhooks: reading new transitions failed")
            return 0

    def _poll(self) -> int:
        first = self.seq is None
        if first:
            self.seq = self._start_seq()
        with self.store._read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM transitions t JOIN jobs j ON j.id = t.job_id "
                                "WHERE t.seq > ? ORDER BY t.seq LIMIT ?", (self.seq, BATCH)).fetchall()
        queued = 0
        for row in rows:
            self.seq = row["seq"]
            for hook in self.hooks:
                if wanted(hook, row):
                    queued += self._enqueue(hook.url, payload(row))
        if rows or first:
            _set_cursor(self.store, self.seq)
        return queued

    def _start_seq(self) -> int:
        """Where the first poll starts: the store's cursor (no older than REPLAY_S), else after ``since``, else
        after the newest transition (only what changes from now on)."""
        cursor = webhook_cursor(self.store)
        with self.store._read() as conn:
            at_most = lambda ts: conn.execute(  # noqa: E731  the newest transition written by then
                "SELECT COALESCE(MAX(seq), 0) FROM transitions" + ("" if ts is None else " WHERE ts <= ?"),
                () if ts is None else (ts,)).fetchone()[0]
            if cursor is not None:
                return max(cursor, at_most(time.time() - REPLAY_S))
            return at_most(self.since)

    def _enqueue(self, url: str, body: dict) -> int:
        if url not in self._queues:
            self._queues[url] = queue.Queue(maxsize=BACKLOG)
            threading.Thread(target=self._send_forever, args=(url, self._queues[url]), name="webhook",
                             daemon=True).start()
        try:
            self._queues[url].put_nowait(body)
            return 1
        except queue.Full:
            log.warning("webhook %s: %d posts are waiting already; dropped: %s", _host(url), BACKLOG, body["text"])
            return 0

    def _send_forever(self, url: str, posts: queue.Queue) -> None:
        while True:
            body = posts.get()
            for attempt in range(len(RETRY_S) + 1):
                try:
                    self._post(url, body)
                    break
                except Exception as err:  # refused, unreachable, slow, an HTTP error: try again, then drop
                    if attempt == len(RETRY_S):
                        log.warning("webhook %s: not sent after %d tries (%s): %s", _host(url), attempt + 1, err,
                                    body["text"])
                    else:
                        time.sleep(RETRY_S[attempt])
            posts.task_done()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued post to be sent or dropped; True if none is left."""
        deadline = time.time() + timeout_s
        while any(q.unfinished_tasks for q in self._queues.values()) and time.time() < deadline:
            time.sleep(0.05)
        return not any(q.unfinished_tasks for q in self._queues.values())


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "switchyard"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        resp.read()


def _host(url: str) -> str:
    """A webhook's scheme and host only: its path is often the secret."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
