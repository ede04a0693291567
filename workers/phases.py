"""Start-up phases: what a starting job is doing, since when, and what it waits for.

A cold job spends tens of seconds before its first step (connecting to Ray,
placing the gang, starting rank processes, tokenizing, building DeepSpeed
engines, loading a checkpoint). Whoever runs a phase records it in one small
file, ``<run_dir>/startup.json``: the driver (``switchyard run``, or the
controller's starter thread) for the phases up to joining torch.distributed,
rank 0 for building engines, loading a checkpoint and the first step. The
writers take turns (the driver waits while the rank works), so each write
is a read-modify-write of the whole file.

Readers: ``switchyard run`` prints each phase as it begins with its elapsed
time (``Watcher``, polled from a thread while the job starts), ``status``
shows the current phase (``describe``) and ``logs`` prints the phases before
the rank logs. The file is advisory: a failed write never fails a job.

File layout::

    {"phase": "preparing_data", "label": "preparing data", "detail": "data prepare: 3/10 shards ...",
     "since": 1764639000.1, "started": 1764638990.0, "done": false,
     "history": [{"phase": "connecting", "label": "connecting to Ray", "detail": "...",
                  "start": ..., "end": ...}, ...]}
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

FILE = "startup.json"

PHASES = {
    "connecting": "connecting to Ray",
    "waiting_for_gang": "waiting for the gang",
    "reusing_gang": "taking over a warm gang",
    "starting_workers": "starting workers",
    "preparing_data": "preparing data",
    "joining": "joining torch.distributed",
    "building_engines": "building engines",
    "loading_checkpoint": "loading a checkpoint",
    "first_step": "running the first step",
}
"""Phase key -> what ``run``, ``status`` and ``logs`` call it, in the order a cold job goes through them."""


def _uri(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{FILE}"


def read(storage, run_dir: str) -> dict | None:
    """The job's start-up record, or None when it has none (yet) or it cannot be read."""
    try:
        if not storage.exists(_uri(run_dir)):
            return None
        return storage.read_json(_uri(run_dir))
    except Exception:  # advisory: a half-written or unreadable file is "nothing to show"
        return None


def _write(storage, run_dir: str, rec: dict) -> None:
    try:
        storage.write_json(_uri(run_dir), rec)
    except Exception as err:  # advisory: never fails the job
        log.debug("could not write %s: %s", _uri(run_dir), err)


def enter(storage, run_dir: str, phase: str, detail: str = "", now: float | None = None,
          fresh: bool = False) -> dict:
    """Record that the job now is in ``phase`` (a key of PHASES), ending the phase before it.

    ``fresh``: a new attempt starts (the driver's first phase): earlier attempts' phases are dropped.
    """
    now = time.time() if now is None else now
    rec = None if fresh else read(storage, run_dir)
    if rec is None or rec.get("done"):
        rec = {"started": now, "history": []}
    _close(rec, now)
    rec.update(phase=phase, label=PHASES[phase], detail=detail, since=now, done=False)
    rec["history"].append({"phase": phase, "label": PHASES[phase], "detail": detail, "start": now, "end": None})
    _write(storage, run_dir, rec)
    return rec


def set_detail(storage, run_dir: str, detail: str) -> None:
    """Update what the current phase is doing (data preparation's progress line, say)."""
    rec = read(storage, run_dir)
    if rec is None or rec.get("done") or not rec.get("history"):
        return
    rec["detail"] = rec["history"][-1]["detail"] = detail
    _write(storage, run_dir, rec)


def finish(storage, run_dir: str, now: float | None = None) -> None:
    """The first step completed: start-up is over."""
    rec = read(storage, run_dir)
    if rec is None or rec.get("done"):
        return
    now = time.time() if now is None else now
    _close(rec, now)
    rec.update(done=True, phase=None, label=None, detail="", since=now, seconds=round(now - rec["started"], 3))
    _write(storage, run_dir, rec)


def _close(rec: dict, now: float) -> None:
    if rec["history"] and rec["history"][-1]["end"] is None:
        rec["history"][-1]["end"] = now


def describe(rec: dict | None, now: float | None = None) -> str | None:
    """One line for ``status``: the current phase, its elapsed time and detail; None once training."""
    if not rec or rec.get("done") or not rec.get("phase"):
        return None
    now = time.time() if now is None else now
    text = f"{rec['label']} for {now - rec['since']:.0f} s (starting for {now - rec['started']:.0f} s)"
    return text + (f": {rec['detail']}" if rec.get("detail") else "")


def summary(rec: dict | None) -> str | None:
    """One line of where a finished start-up's time went, e.g. "start-up 48 s: waiting for the gang 1.2 s, ..."."""
    if not rec or not rec.get("history"):
        return None
    parts = [f"{h['label']} {(h['end'] or time.time()) - h['start']:.1f} s" for h in rec["history"]]
    total = (rec.get("seconds") if rec.get("done") else None) or time.time() - rec["started"]
    return f"start-up {total:.1f} s: " + ", ".join(parts)


class Watcher:
    """Turns successive reads of the record into lines to print: a phase as it begins (with what it waits
    for), new detail of the current phase, the end of start-up."""

    def __init__(self, storage, run_dir: str, since: float = 0.0):
        self.storage, self.run_dir, self.since = storage, run_dir, since
        self._shown = 0
        self._detail = None
        self._done = False

    def poll(self) -> list[str]:
        rec = read(self.storage, self.run_dir)
        if rec is None or rec.get("started", 0) < self.since - 1.0:
            return []  # nothing yet, or an earlier attempt's record
        lines = []
        history = rec.get("history", [])
        for i in range(self._shown, len(history)):
            h = history[i]
            at = h["start"] - rec["started"]
            lines.append(f"startup +{at:.1f}s: {h['label']}" + (f" ({h['detail']})" if h.get("detail") else ""))
            self._detail = h.get("detail")
        self._shown = len(history)
        if history and not rec.get("done") and rec.get("detail") and rec["detail"] != self._detail:
            self._detail = rec["detail"]
            lines.append(f"startup +{time.time() - rec['started']:.1f}s: {rec['label']}: {rec['detail']}")
        if rec.get("done") and not self._done:
            self._done = True
            lines.append(summary(rec))
        return lines

    def current(self) -> str | None:
        """The live status line: the current phase and its elapsed time."""
        return describe(read(self.storage, self.run_dir))

    @property
    def done(self) -> bool:
        return self._done


def for_rank(rank: int, storage, run_dir: str):
    """What a rank calls: rank 0 records its phases, the other ranks record nothing. One recorder per run
    directory and process, so that ``stepped`` after every step costs a dict look-up."""
    if rank != 0:
        return _NO_PHASES
    rec = _RANK_PHASES.get(run_dir)
    if rec is None or rec.storage is not storage:
        rec = _RANK_PHASES[run_dir] = _RankPhases(storage, run_dir)
    return rec


class _RankPhases:
    def __init__(self, storage, run_dir: str):
        self.storage, self.run_dir, self._finished = storage, run_dir, False

    def enter(self, phase: str, detail: str = "") -> None:
        log.info("startup: %s%s", PHASES[phase], f" ({detail})" if detail else "")
        self._finished = False
        enter(self.storage, self.run_dir, phase, detail)

    def detail(self, text: str) -> None:
        set_detail(self.storage, self.run_dir, text)

    def stepped(self) -> None:
        """Called after every step; the first one ends start-up (one file write, then nothing)."""
        if not self._finished:
            self._finished = True
            finish(self.storage, self.run_dir)


class _NoPhases:
    def enter(self, phase: str, detail: str = "") -> None:
        pass

    def detail(self, text: str) -> None:
        pass

    def stepped(self) -> None:
        pass


_NO_PHASES = _NoPhases()
_RANK_PHASES: dict[str, _RankPhases] = {}
