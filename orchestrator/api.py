"""The HTTP JSON API the controller serves, so the CLI (and the dashboard) work from any machine.

Every request carries ``Authorization: Bearer <token>``; ``switchyard token
create USER`` makes one on the head and the job store keeps only its SHA-256.
No token or an unknown one: 401. Every user may read every job; cancelling or
changing a job needs its owner or an admin (a token made with ``--admin``, or
a user in ``admins:`` of cluster.yaml): 403 otherwise. Errors are
``{"error": "one line for people"}`` with 400 (a bad spec or request),
401, 403, 404 (no such job) or 409 (the job cannot do that now).

Endpoints (all JSON unless noted; ``{id}`` takes a unique id prefix too):

    GET  /api/v1/whoami                    {user, admin}
    GET  /api/v1/cluster                   controller, queue (in order, with pending reasons), running, teams
    GET  /api/v1/jobs[?state=S&owner=U]    [job]  (job = the status dict of `switchyard status --json`)
    GET  /api/v1/jobs?limit=L[&page=P&state=S&owner=U]   {jobs, total, page, limit}: page 1 is the newest L
    POST /api/v1/jobs                      {spec, priority?, set?, after?} -> {id, ...}; a spec with
                                           `pipeline:` starts an InstructGPT pipeline, one with `budgets:`
                                           a sweep (as POST /sweeps); `after` holds every kind
    GET  /api/v1/jobs/{id}                 job (a pipeline's stages and report included)
    PATCH /api/v1/jobs/{id}                {priority} -> job  (owner or admin; a pipeline's or sweep's
                                           live stages or runs too; {id} may be its name)
    POST /api/v1/jobs/{id}/cancel          {checkpoint?} -> job  (owner or admin; {id} may be a pipeline's or
                                           sweep's name; checkpoint: a running job saves one at its next step)
    POST /api/v1/jobs/{id}/requeue         {set?} -> job, QUEUED again: a FAILED or CANCELLED job resumes from
                                           its latest complete checkpoint (owner or admin; 409 for any other
                                           job, with what to do instead)
    GET  /api/v1/jobs/{id}/wait?timeout=S  job once terminal, or after S s (at most 60) as it is
    GET  /api/v1/jobs/{id}/logs?rank=R&tail=N&follow=1   text/plain (the last N lines of each rank's log
                                           with tail), streamed while the job runs
    POST /api/v1/sweeps                    {sweep: mapping or YAML text, dry_run?, after?, priority?,
                                           flops_per_s?} -> the submission summary and the plan's `log`;
                                           the caller owns the sweep (resubmitting one: owner or admin)
    GET  /api/v1/sweeps/{name}             sweep progress (owner, after, runs, results, fit)
    GET  /api/v1/sweeps/{name}/fit         the fit results (fit.json) once the sweep is fitted
    POST /api/v1/tokens                    {user, admin?, expires_in_s?} -> {user, admin, expires_in_s, token}
                                           (admins only; no expires_in_s: valid until revoked)
    GET  /api/v1/tokens[?user=U]           [{id, user, admin, created_at, expires_at}]: every token for an admin,
                                           the caller's own otherwise (never a token, only its id)
    DELETE /api/v1/tokens/{id}             -> the revoked token's {id, ...}  (its user or an admin;
                                           {id} takes a unique prefix of 4+ hex digits)
    DELETE /api/v1/tokens?user=U           -> {user, revoked}: every token of U  (U itself or an admin)

Specs are validated here again whatever the client did. A spec that names a
file must name one the cluster can read (storage URI or a path on the
cluster); the client refuses paths that exist only on the laptop.

The server runs its own asyncio loop in a thread (the controller's actor
keeps ticking) and does the job store and storage work in worker threads.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass

from aiohttp import web

from orchestrator.job_store import JobNotFoundError, JobState, JobStore, TokenNotFoundError
from specs.errors import UsageError
from specs.job import apply_overrides
from specs.validate import check_priority

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a spec is at most 1 MiB of YAML
WAIT_MAX_S = 60.0


@dataclass(frozen=True)
class Caller:
    user: str
    admin: bool


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _positive(query, key: str, default: str | None) -> int:
    """A query parameter that must be a whole number >= 1 (``limit``, ``page``)."""
    raw = query.get(key, default)
    if raw is None or not raw.isdigit() or int(raw) < 1 or int(raw) > 1 << 31:
        raise ApiError(400, f"{key}: give a whole number from 1, got {raw!r}")
    return int(raw)


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


class Api:
    """The request handlers; ``cluster`` is the validated ClusterConfig of the head."""

    def __init__(self, cluster):
        from data.storage import Storage

        self.cluster = cluster
        self.store = JobStore(cluster.job_store)
        self.storage = Storage(cluster.storage, dict(cluster.storage_options))

    # -------------------------------------------------------------- plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_get(f"{PREFIX}/whoami", self.whoami)
        r.add_get(f"{PREFIX}/cluster", self.cluster_view)
        r.add_get(f"{PREFIX}/jobs", self.list_jobs)
        r.add_post(f"{PREFIX}/jobs", self.submit)
        r.add_get(f"{PREFIX}/jobs/{{id}}", self.job)
        r.add_patch(f"{PREFIX}/jobs/{{id}}", self.change)
        r.add_post(f"{PREFIX}/jobs/{{id}}/cancel", self.cancel)
        r.add_post(f"{PREFIX}/jobs/{{id}}/requeue", self.requeue)
        r.add_get(f"{PREFIX}/jobs/{{id}}/wait", self.wait)
        r.add_get(f"{PREFIX}/jobs/{{id}}/logs", self.logs)
        r.add_post(f"{PREFIX}/sweeps", self.submit_sweep)
        r.add_get(f"{PREFIX}/sweeps/{{name}}", self.sweep)
        r.add_get(f"{PREFIX}/sweeps/{{name}}/fit", self.sweep_fit)
        r.add_post(f"{PREFIX}/tokens", self.create_token)
        r.add_get(f"{PREFIX}/tokens", self.list_tokens)
        r.add_delete(f"{PREFIX}/tokens", self.revoke_user_tokens)
        r.add_delete(f"{PREFIX}/tokens/{{id}}", self.revoke_token)
        from orchestrator import dashboard  # the web pages at /dashboard/ and their JSON, same token auth

        dashboard.add_routes(app, self)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ApiError as err:
            return _json({"error": str(err)}, err.status)
        except (JobNotFoundError, TokenNotFoundError) as err:
            return _json({"error": str(err)}, 404)
        except UsageError as err:
            return _json({"error": str(err)}, 400)
        except web.HTTPException:
            raise
        except Exception as err:  # a bug: say so in one line, keep serving
            log.exception("API request %s %s failed", request.method, request.path)
            return _json({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    @web.middleware
    async def _auth(self, request, handler):
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "no token: send Authorization: Bearer <token> (`switchyard token create USER`)")
        found = await asyncio.to_thread(self.store.check_token, token)
        if found is None:
            raise ApiError(401, "unknown, expired or revoked token (an admin makes a new one: `switchyard token "
                                "create`)")
        user, admin = found
        request["caller"] = Caller(user, admin or user in self.cluster.admins)
        return await handler(request)

    async def _body(self, request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _own(self, caller: Caller, rec, what: str = "cancel or change") -> None:
        if not caller.admin and rec.owner != caller.user:
            raise ApiError(403, f"{rec.id} belongs to {rec.owner or 'nobody'}; only its owner or an admin may "
                                f"{what} it")

    @staticmethod
    def _run(fn, *args, **kwargs):
        return asyncio.to_thread(fn, *args, **kwargs)

    # -------------------------------------------------------------- who and where

    async def whoami(self, request):
        c = request["caller"]
        return _json({"user": c.user, "admin": c.admin})

    async def cluster_view(self, request):
        return _json(await self._run(self._cluster_view))

    def _cluster_view(self) -> dict:
        from orchestrator.cli_jobs import HEARTBEAT_STALE_S, queue_and_running

        info = self.store.controller()
        out = {"controller": {"pid": info.pid if info else None,
                              "alive": info is not None and time.time() - info.heartbeat < HEARTBEAT_STALE_S,
                              "heartbeat": info.heartbeat if info else None},
               **queue_and_running(self.store, self.cluster.workers.max_time_limit_s),
               "teams": {n: t.model_dump() for n, t in self.cluster.teams.items()},
               "preemption": self.cluster.preemption.model_dump()}
        try:  # inside the controller Ray is connected; elsewhere (tests) the nodes are left out
            from orchestrator.ray_cluster import cluster_resources
            import ray

            if ray.is_initialized():
                out["nodes"] = [{"node": nid, **n} for nid, n in cluster_resources().items()]
        except Exception:
            pass
        return out

    # -------------------------------------------------------------- jobs

    async def list_jobs(self, request):
        state, owner = request.query.get("state"), request.query.get("owner")
        try:
            states = [JobState(s.strip().upper()) for s in state.split(",")] if state else None
        except ValueError:
            raise ApiError(400, f"state: one of {', '.join(s.value for s in JobState)}") from None
        if "limit" not in request.query:
            recs = await self._run(self.store.list, states)
            return _json([r.to_status_dict() for r in recs if owner is None or r.owner == owner])
        limit, page = (_positive(request.query, k, d) for k, d in (("limit", None), ("page", "1")))
        from orchestrator.cli_jobs import progress

        recs, total = await self._run(lambda: self.store.page(states, limit=limit, page=page, owner=owner))
        cap = self.cluster.workers.max_time_limit_s
        return _json({"jobs": [{**r.to_status_dict(), **progress(r, cap)} for r in recs], "total": total, "page": page,
                      "limit": limit})

    async def job(self, request):
        return _json(await self._run(self._status, request.match_info["id"]))

    def _status(self, key: str) -> dict:
        from orchestrator.cli_jobs import job_status

        return job_status(self.store, key, self.storage, self.cluster.workers.max_time_limit_s)

    async def submit(self, request):
        body = await self._body(request)
        caller = request["caller"]
        return _json(await self._run(self._submit, caller, body), 201)

    def _submit(self, caller: Caller, body: dict) -> dict:
        from orchestrator.cli_jobs import submit_raw

        raw, priority = body.get("spec"), body.get("priority")
        overrides, after = body.get("set") or [], body.get("after") or []
        if not isinstance(raw, dict):
            raise ApiError(400, "spec: send the spec as a JSON object (the YAML file's contents)")
        if priority is not None:
            check_priority(priority)
        if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise ApiError(400, "set must be a list of KEY=VALUE strings")
        if not (isinstance(after, list) and all(isinstance(a, str) for a in after)):
            raise ApiError(400, "after must be a list of job ids")
        source = str(body.get("source") or "spec")[:200]
        from orchestrator.sweep import is_sweep_file

        if is_sweep_file(raw):
            return self._submit_sweep(caller, {**body, "sweep": apply_overrides(raw, overrides)})
        if "pipeline" in raw:
            from orchestrator.instructgpt import submit_pipeline

            return submit_pipeline(self.cluster, raw, source=source, priority=priority, overrides=overrides,
                                   log=lambda *a, **k: None, owner=caller.user, after=after)
        job_id = submit_raw(self.cluster, raw, 0 if priority is None else priority, overrides, source=source,
                            owner=caller.user, after=after)
        return {"id": job_id}

    async def change(self, request):
        from orchestrator.cli_jobs import find_job  # an id, or a pipeline's or sweep's name

        body = await self._body(request)
        rec = await self._run(find_job, self.store, request.match_info["id"])
        self._own(request["caller"], rec)
        if set(body) != {"priority"}:
            raise ApiError(400, "send {\"priority\": N}: priority is the one field a job's owner may change")
        check_priority(body["priority"])
        if rec.terminal:
            raise ApiError(409, f"{rec.id} is {rec.state.value}: nothing to change")
        await self._run(self.store.set_priority, rec.id, body["priority"])
        return _json(await self._run(self._status, rec.id))

    async def cancel(self, request):
        from orchestrator.cli_jobs import find_job  # an id, or a pipeline's or sweep's name

        body = await self._body(request) if request.can_read_body else {}
        if set(body) - {"checkpoint"} or not isinstance(body.get("checkpoint", False), bool):
            raise ApiError(400, "send nothing, or {\"checkpoint\": true} to let a running job save a checkpoint "
                                "first")
        rec = await self._run(find_job, self.store, request.match_info["id"])
        self._own(request["caller"], rec)
        await self._run(self.store.request_cancel, rec.id, request["caller"].user, body.get("checkpoint", False))
        return _json(await self._run(self._status, rec.id))

    async def requeue(self, request):
        from orchestrator.cli_jobs import find_job
        from orchestrator.job_control import refusal, requeue_job

        body = await self._body(request) if request.can_read_body else {}
        overrides = body.get("set") or []
        if set(body) - {"set"} or not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise ApiError(400, "send {\"set\": [\"KEY=VALUE\", ...]} or nothing: the spec fields to change")
        rec = await self._run(find_job, self.store, request.match_info["id"])
        self._own(request["caller"], rec, "requeue")
        why = await self._run(refusal, self.store, rec)
        if why:
            raise ApiError(409, why)
        await self._run(requeue_job, self.cluster, self.store, rec, request["caller"].user, overrides)
        return _json(await self._run(self._status, rec.id))

    async def wait(self, request):
        try:
            timeout = min(float(request.query.get("timeout", WAIT_MAX_S)), WAIT_MAX_S)
        except ValueError:
            raise ApiError(400, "timeout must be a number of seconds") from None
        rec = await self._run(self.store.get, request.match_info["id"])
        deadline = time.time() + timeout
        while not rec.terminal and time.time() < deadline:
            await asyncio.sleep(0.5)
            rec = await self._run(self.store.get, rec.id)
        return _json(await self._run(self._status, rec.id))

    async def logs(self, request):
        rec = await self._run(self.store.get, request.match_info["id"])
        rank, tail = request.query.get("rank"), request.query.get("tail")
        for name, value in (("rank", rank), ("tail", tail)):
            if value is not None and not value.isdigit():
                raise ApiError(400, f"{name} must be a non-negative integer")
        follow = request.query.get("follow") in ("1", "true", "yes")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        offsets: dict[str, int] = {}
        while True:
            chunk = await self._run(self._read_logs, rec.run_dir, rank, offsets, None if tail is None else int(tail))
            if chunk:
                await resp.write(chunk.encode())
            if not follow or (await self._run(self.store.get, rec.id)).terminal:
                if not follow:
                    break
                chunk = await self._run(self._read_logs, rec.run_dir, rank, offsets)  # what the end flushed
                if chunk:
                    await resp.write(chunk.encode())
                break
            await asyncio.sleep(1.0)
        await resp.write_eof()
        return resp

    def _read_logs(self, run_dir: str, rank: str | None, offsets: dict[str, int], tail: int | None = None) -> str:
        from orchestrator.job_logs import log_files, read_new

        return "".join(line + "\n" for line in read_new(self.storage, log_files(self.storage, run_dir, rank),
                                                         offsets, tail))

    # -------------------------------------------------------------- sweeps and fits

    async def submit_sweep(self, request):
        body = await self._body(request)
        return _json(await self._run(self._submit_sweep, request["caller"], body), 201)

    def _submit_sweep(self, caller: Caller, body: dict) -> dict:
        """Validate the sweep here whatever the client did; resubmitting someone else's sweep is theirs or an admin's."""
        import yaml

        from orchestrator.sweep import find_sweep, submit_sweep
        from scaling.sweep_spec import validate_sweep

        raw, after, rate = body.get("sweep"), body.get("after") or [], body.get("flops_per_s")
        if isinstance(raw, str):
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise ApiError(400, f"sweep: not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "sweep: send the sweep file's contents (a mapping or its YAML text)")
        if not (isinstance(after, list) and all(isinstance(a, str) for a in after)):
            raise ApiError(400, "after must be a list of job ids")
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0):
            raise ApiError(400, "flops_per_s must be a positive number")
        source = str(body.get("source") or "sweep")[:200]
        if body.get("priority") is not None:
            raw = {**raw, "priority": body["priority"]}
        spec = validate_sweep(raw, source=source)
        parent = find_sweep(self.store, spec.name)
        if parent is not None and not body.get("dry_run"):
            self._own(caller, parent, "resubmit")
        lines: list[str] = []
        out = submit_sweep(self.cluster, spec, dry_run=bool(body.get("dry_run")), flops_per_s=rate, source=source,
                           log=lambda *a, **k: lines.append(" ".join(map(str, a))), owner=caller.user,
                           admin=caller.admin, after=after)
        return {**out, "log": lines}

    async def sweep(self, request):
        from orchestrator.sweep import sweep_status

        return _json(await self._run(sweep_status, self.cluster, request.match_info["name"]))

    async def sweep_fit(self, request):
        from orchestrator.sweep import sweep_status

        out = await self._run(sweep_status, self.cluster, request.match_info["name"])
        if not out.get("fit"):
            raise ApiError(404, f"sweep {out['sweep']} has no fit yet ({out['state']}; "
                                f"{out['results']}/{out['runs']} runs in the table)")
        return _json(await self._run(self.storage.read_json, out["fit"]))

    # -------------------------------------------------------------- tokens

    async def create_token(self, request):
        caller = request["caller"]
        if not caller.admin:
            raise ApiError(403, "only admins may create tokens (or run `switchyard token create` on the head)")
        body = await self._body(request)
        user, admin, expires = body.get("user"), bool(body.get("admin", False)), body.get("expires_in_s")
        if not isinstance(user, str):
            raise ApiError(400, "user: give the user name")
        token = await self._run(self.store.create_token, user, admin, expires)
        return _json({"user": user.lower(), "admin": admin, "expires_in_s": expires, "token": token}, 201)

    async def list_tokens(self, request):
        caller, user = request["caller"], request.query.get("user")
        if not caller.admin:
            if user is not None and user.lower() != caller.user:
                raise ApiError(403, "only admins may list another user's tokens; leave the user out to list yours")
            user = caller.user
        return _json([t.to_dict() for t in await self._run(self.store.tokens, user)])

    async def revoke_token(self, request):
        caller = request["caller"]
        info = await self._run(self.store.token_by_id, request.match_info["id"])
        if not caller.admin and info.user != caller.user:
            raise ApiError(403, f"token {info.id} belongs to {info.user}; only its user or an admin may revoke it")
        return _json((await self._run(self.store.revoke_token, info.id)).to_dict())

    async def revoke_user_tokens(self, request):
        caller, user = request["caller"], request.query.get("user")
        if not user:
            raise ApiError(400, f"user: give ?user=NAME (or DELETE {PREFIX}/tokens/ID for one token)")
        if not caller.admin and user.lower() != caller.user:
            raise ApiError(403, f"only {user.lower()} or an admin may revoke {user.lower()}'s tokens")
        return _json({"user": user.lower(), "revoked": await self._run(self.store.revoke_tokens, user)})


# ---------------------------------------------------------------------- serving


class ApiServer:
    """The API on its own event loop in a daemon thread; ``url`` once it listens, ``stop()`` to end it."""

    def __init__(self, cluster, host: str, port: int):
        self.cluster, self.host, self.port = cluster, host, port
        self.url: str | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="switchyard-api", daemon=True)

    def _ssl(self):
        api = self.cluster.api
        if not api.certfile:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(api.certfile, api.keyfile)
        return ctx

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(Api(self.cluster).app(), access_log=None)
        await self._runner.setup()
        context = self._ssl()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        self.url = f"{'https' if context else 'http'}://{shown}:{port}"

    def start(self) -> ApiServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise UsageError(f"api.listen {self.host}:{self.port}: could not serve the API: {self._error}")
        return self

    def stop(self) -> None:
        async def _down():
            if self._runner is not None:
                await self._runner.cleanup()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_down(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)


def serve_in_thread(cluster, listen: str | None = None) -> ApiServer:
    """Serve the API of ``cluster`` on ``listen`` (default ``api.listen``, "host:port"; port 0 picks one)."""
    listen = listen or cluster.api.listen
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"api.listen {listen!r}: give host:port, e.g. 0.0.0.0:8642")
    return ApiServer(cluster, host or "0.0.0.0", int(port)).start()
