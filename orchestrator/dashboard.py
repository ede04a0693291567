"""The web dashboard the controller's HTTP server serves beside the API (``orchestrator.api``).

Open ``<api url>/dashboard/`` in a browser and paste a token
(``switchyard token create USER``). The page is plain HTML, CSS and
JavaScript from ``dashboard_static/`` (no build step, nothing fetched from
elsewhere; the charts are SVG drawn by ``chart.js`` there). The shell itself
holds no data and is served without a token; everything it shows comes from
the API with ``Authorization: Bearer <token>``, the token kept in the tab's
sessionStorage. No token or a bad one: the API answers 401 and the page asks
for a token again.

Pages: cluster (nodes, controller), queue (position, priority, owner, pending
reason, preemptions), jobs, a job (state timeline, live curves of loss,
learning rate, tokens/s and MFU, evaluations and the best checkpoint, workers,
a log tail that follows, a cancel button for its owner or an admin), pipelines
(stages and the report) and sweeps (progress, IsoFLOP curves, fitted laws
with their intervals).

JSON endpoints this module adds to the API (same auth), for what the API's
own endpoints do not carry:

    GET {PREFIX}/dashboard/queue                          queued jobs in order, running jobs, preemptions
    GET {PREFIX}/dashboard/jobs/{id}/metrics?since=S&offset=B   metrics.jsonl rows with step > S
    GET {PREFIX}/dashboard/jobs/{id}/logs?rank=R&cursor=C       a log tail as JSON, then what follows C
    GET {PREFIX}/dashboard/pipelines                      InstructGPT pipelines
    GET {PREFIX}/dashboard/sweeps                         sweeps and their progress
    GET {PREFIX}/dashboard/sweeps/{name}                  progress, runs, IsoFLOP points and the fit
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import posixpath

from aiohttp import web

from orchestrator.job_store import JobState

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
DASH = f"{PREFIX}/dashboard"
PAGE = "/dashboard"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_static")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
                 ".svg": "image/svg+xml"}
# The shell loads only its own files: no inline script, nothing from another origin.
SHELL_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
METRICS_MAX_ROWS = 20_000    # one answer's rows at most; the page asks again from the last step it got
LOG_TAIL_BYTES = 64 * 1024   # a first look at a log: its last 64 KiB per rank
LOG_CHUNK_BYTES = 256 * 1024  # then at most this much per rank per answer
LIVE_STATES = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.RESTARTING, JobState.PREEMPTED)


def add_routes(app: web.Application, api) -> None:
    """Serve the dashboard from ``app`` (the API's application; ``api`` its ``orchestrator.api.Api``)."""
    app.middlewares.insert(0, _shell)  # outermost: the shell's files pass before the API's token check
    d = Dashboard(api)
    r = app.router
    r.add_get(f"{DASH}/queue", d.queue)
    r.add_get(f"{DASH}/jobs/{{id}}/metrics", d.metrics)
    r.add_get(f"{DASH}/jobs/{{id}}/logs", d.logs)
    r.add_get(f"{DASH}/pipelines", d.pipelines)
    r.add_get(f"{DASH}/sweeps", d.sweeps)
    r.add_get(f"{DASH}/sweeps/{{name}}", d.sweep)


# ---------------------------------------------------------------------- the shell (no data, no token)


def _static_names() -> set[str]:
    return {n for n in os.listdir(STATIC_DIR) if os.path.splitext(n)[1] in CONTENT_TYPES}


def _read_static(name: str) -> bytes:
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return f.read()


@web.middleware
async def _shell(request: web.Request, handler):
    """``/`` and ``/dashboard`` redirect to ``/dashboard/``, which is index.html; ``/dashboard/NAME`` a static
    file by its plain name. Anything else goes on to the API (and its token check)."""
    path = request.path
    if request.method not in ("GET", "HEAD") or not (path in ("/", PAGE) or path.startswith(PAGE + "/")):
        return await handler(request)
    if path in ("/", PAGE):
        raise web.HTTPFound(PAGE + "/")
    name = path[len(PAGE) + 1:] or "index.html"
    if name not in _static_names():  # plain names only: no folders, no '..'
        return web.json_response({"error": f"no dashboard file {name!r}"}, status=404)
    body = await asyncio.to_thread(_read_static, name)
    ctype = CONTENT_TYPES[os.path.splitext(name)[1]]
    return web.Response(body=body, content_type=ctype, charset="utf-8" if ctype.startswith("text") else None,
                        headers=SHELL_HEADERS)


# ---------------------------------------------------------------------- JSON the pages need


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(_finite(d), default=str))


def _finite(obj):
    """NaN and infinities become null: JSON.parse in the browser refuses them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _int_query(request, name: str, default: int) -> int:
    from orchestrator.api import ApiError

    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, f"{name} must be a non-negative integer")
    return int(raw)


def _brief(rec) -> dict:
    """A job as the queue and lists show it."""
    return {"id": rec.id, "name": rec.name, "kind": rec.kind, "state": rec.state.value, "priority": rec.priority,
            "step": rec.step, "owner": rec.owner, "team": rec.team, "pending": rec.pending,
            "resources": dict(rec.resources), "submitted_at": rec.submitted_at, "started_at": rec.started_at,
            "finished_at": rec.finished_at, "preemptions": rec.preemptions, "preempted_by": rec.preempted_by,
            "after": list(rec.after), "restarts": rec.restarts, "parent_id": rec.parent_id, "reason": rec.reason}


class Dashboard:
    def __init__(self, api):
        self.api = api

    @property
    def store(self):
        return self.api.store

    @property
    def storage(self):
        return self.api.storage

    # -------------------------------------------------------------- queue

    async def queue(self, request):
        return _json(await asyncio.to_thread(self._queue))

    def _queue(self) -> dict:
        live = self.store.list(LIVE_STATES)
        queued = sorted((r for r in live if r.state == JobState.QUEUED),
                        key=lambda r: ((r.pending or {}).get("position") or 1 << 30, r.submitted_at))
        preemptions = []
        for rec in live:
            times = [h for h in rec.history if h.to_state == JobState.PREEMPTED]
            for i, h in enumerate(times):
                # The store keeps who preempted a job last; earlier times say so in their reason.
                preemptions.append({"id": rec.id, "name": rec.name, "owner": rec.owner, "state": rec.state.value,
                                    "at": h.ts, "reason": h.reason,
                                    "by": rec.preempted_by if i == len(times) - 1 else None,
                                    "preemptions": rec.preemptions})
        preemptions.sort(key=lambda p: -p["at"])
        return {"queued": [_brief(r) for r in queued],
                "running": [_brief(r) for r in live if r.state != JobState.QUEUED],
                "preemptions": preemptions[:100]}

    # -------------------------------------------------------------- a job's metrics and logs

    async def metrics(self, request):
        since = _int_query(request, "since", 0)
        offset = _int_query(request, "offset", 0)
        rec = await asyncio.to_thread(self.store.get, request.match_info["id"])
        return _json(await asyncio.to_thread(self._metrics, rec.run_dir, since, offset))

    def _metrics(self, run_dir: str, since: int, offset: int) -> dict:
        """Rows of ``metrics.jsonl`` with step > ``since``, read from byte ``offset`` when that still is a row
        boundary (a resumed run rewrites the file: then from the start; its replayed steps are not sent again)."""
        path = f"{run_dir}/metrics.jsonl"
        if not self.storage.exists(path):
            return {"rows": [], "offset": 0, "last_step": since}
        with self.storage.fs.open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            start = offset
            if offset > size:
                start = 0
            elif offset > 0:
                f.seek(offset - 1)
                if f.read(1) != b"\n":
                    start = 0
            f.seek(start)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a torn last line waits for the next answer
        rows, last, pos = [], since, 0
        while pos < end and len(rows) < METRICS_MAX_ROWS:
            nl = data.index(b"\n", pos)
            line, pos = data[pos:nl], nl + 1
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or step <= last:
                continue
            rows.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            last = step
        return {"rows": rows, "offset": start + pos, "last_step": last}

    async def logs(self, request):
        from orchestrator.api import ApiError

        rank = request.query.get("rank") or None
        if rank is not None and not rank.isdigit():
            raise ApiError(400, "rank must be a non-negative integer")
        raw = request.query.get("cursor")
        try:
            cursor = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            cursor = None
        if cursor is not None and not (isinstance(cursor, dict) and all(
                isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in cursor.items())):
            raise ApiError(400, "cursor: send back the cursor of the previous answer")
        rec = await asyncio.to_thread(self.store.get, request.match_info["id"])
        out = await asyncio.to_thread(self._logs, rec.run_dir, rank, cursor)
        out["done"] = rec.terminal
        return _json(out)

    def _logs(self, run_dir: str, rank: str | None, cursor: dict | None) -> dict:
        """Lines of the ranks' logs after ``cursor`` ({file name: byte offset}); with no cursor, the tail."""
        log_dir = posixpath.join(run_dir, "logs")
        files = sorted(self.storage.fs.glob(f"{log_dir}/rank_*.log")) if self.storage.exists(log_dir) else []
        ranks = sorted(int(posixpath.basename(f)[5:-4]) for f in files if posixpath.basename(f)[5:-4].isdigit())
        files = [f for f in files if rank is None or posixpath.basename(f) == f"rank_{rank}.log"]
        lines, new_cursor = [], {}
        for f in files:
            name = posixpath.basename(f)
            with self.storage.fs.open(f, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                if cursor is None:
                    start = max(0, size - LOG_TAIL_BYTES)
                else:
                    start = cursor.get(name, 0)
                    start = 0 if start > size else start  # the file was replaced
                fh.seek(start)
                data = fh.read(LOG_CHUNK_BYTES)
            if cursor is None and start > 0:
                cut = data.find(b"\n") + 1  # the tail starts at a whole line
                data, start = data[cut:], start + cut
            end = data.rfind(b"\n") + 1
            new_cursor[name] = start + end
            prefix = f"[{name[:-4]}] " if len(files) > 1 else ""
            lines += [prefix + line for line in data[:end].decode(errors="replace").splitlines()]
        return {"lines": lines, "cursor": new_cursor, "ranks": ranks}

    # -------------------------------------------------------------- pipelines and sweeps

    async def pipelines(self, request):
        return _json(await asyncio.to_thread(self._of_kind, "pipeline"))

    def _of_kind(self, kind: str) -> list[dict]:
        return [_brief(r) for r in reversed(self.store.list()) if r.kind == kind]

    async def sweeps(self, request):
        return _json(await asyncio.to_thread(self._sweeps))

    def _sweeps(self) -> list[dict]:
        out = []
        for rec in reversed(self.store.list()):
            if rec.kind != "sweep":
                continue
            children = self.store.list(parent_id=rec.id)
            counts: dict[str, int] = {}
            for c in children:
                counts[c.state.value] = counts.get(c.state.value, 0) + 1
            out.append({**_brief(rec), "runs": rec.spec.get("runs"), "jobs": counts,
                        "sweep_dir": rec.spec.get("sweep_dir")})
        return out

    async def sweep(self, request):
        return _json(await asyncio.to_thread(self._sweep, request.match_info["name"]))

    def _sweep(self, name: str) -> dict:
        from orchestrator.sweep import sweep_status

        out = sweep_status(self.api.cluster, name)
        sdir = out["sweep_dir"]
        parent = self.store.get(out["id"])
        out["owner"], out["submitted_at"] = parent.owner, parent.submitted_at
        out["children"] = [_brief(c) for c in self.store.list(parent_id=parent.id)]
        out["plan"] = self.storage.read_json(f"{sdir}/plan.json") if self.storage.exists(f"{sdir}/plan.json") else []
        fit = self.storage.read_json(out["fit"]) if out.get("fit") else None
        out["fit_report"] = fit
        out["points"] = self._points(sdir, fit)
        return out

    def _points(self, sdir: str, fit: dict | None) -> list[dict]:
        """Every finished run as (N, D, C, loss) with its compute budget's index, for the IsoFLOP plot."""
        import numpy as np

        from scaling.fit import group_budgets
        from scaling.table import read_results

        table = read_results(sdir)
        if table.num_rows == 0:
            return []
        rows = table.to_pylist()
        # The loss the fit uses: held-out when any run has one (scaling.fit_table.LOSS_ALIASES), else final.
        key = "held_out_loss" if any(r.get("held_out_loss") is not None for r in rows) else "final_loss"
        rows = [r for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if not rows:
            return []
        c = np.array([float(r["flops_6nd"]) for r in rows])
        budgets = [b["C"] for b in ((fit or {}).get("approach2") or {}).get("budgets") or []]
        if budgets:  # the fit's own budgets: each run to the nearest in log C
            labels = [int(np.argmin(np.abs(np.log(np.asarray(budgets)) - math.log(ci)))) for ci in c]
        else:
            labels = group_budgets(c).tolist()
        return [{"run_id": r["run_id"], "n": r["n_params"], "d": r["tokens"], "c": float(ci), "loss": r[key],
                 "budget": int(b), "loss_column": key} for r, ci, b in zip(rows, c, labels)]
