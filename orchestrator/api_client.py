"""A client of the controller's HTTP API (``orchestrator.api``), for the CLI on a machine away from the head.

Standard library only (urllib): a laptop needs neither Ray nor the job store
nor aiohttp. The token comes from the environment variable ``api.token_env``
(default ``SWITCHYARD_TOKEN``) or the file ``api.token_file`` (default
``~/.switchyard/token``).

Files on the laptop are refused, not uploaded: a spec that names a path that
exists on this machine but is no URI (``data.corpus``, ``model.init_from``,
``rlhf.data.*``, ``rlhf.ppo.reward_model``, also in a pipeline's stages or a
sweep's ``base``) fails here with one line saying
to put the file in the cluster's storage and name its URI. Paths that do not
exist here are passed on: they may be paths on the cluster, and the server
checks them.
"""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from specs.errors import UsageError

PREFIX = "/api/v1"


def read_token(api) -> str:
    token = os.environ.get(api.token_env, "").strip()
    if token:
        return token
    path = os.path.expanduser(api.token_file)
    if os.path.exists(path):
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    raise UsageError(f"no API token: set ${api.token_env} or write it to {api.token_file} "
                     "(an admin makes one on the head with `switchyard token create USER`)")


class ApiClient:
    def __init__(self, url: str, token: str, cafile: str | None = None, timeout_s: float = 120.0):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self._ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None

    @classmethod
    def from_cluster(cls, cluster) -> ApiClient:
        return cls(cluster.api.url, read_token(cluster.api), cluster.api.cafile)

    def _request(self, method: str, path: str, body: dict | None = None, query: dict | None = None,
                 timeout_s: float | None = None):
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{self.url}{PREFIX}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s, context=self._ctx)
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read().decode()).get("error") or err.reason
            except Exception:
                message = err.reason
            raise ApiRequestError(err.code, f"{message} (HTTP {err.code} from {self.url})") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UsageError(f"cannot reach the Switchyard API at {self.url}: {reason}; is the controller up "
                             "with api.listen set, and is api.url right?") from None

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None,
             timeout_s: float | None = None):
        with self._request(method, path, body, query, timeout_s) as resp:
            return json.loads(resp.read().decode())

    def stream(self, path: str, query: dict | None = None) -> Iterator[str]:
        """Lines of a streamed text response, as they arrive."""
        with self._request("GET", path, None, query, timeout_s=3600) as resp:
            for raw in resp:
                yield raw.decode(errors="replace").rstrip("\n")

    # -------------------------------------------------------------- the endpoints

    def whoami(self) -> dict:
        return self.call("GET", "/whoami")

    def submit(self, raw: dict, priority: int | None = None, overrides: list[str] | None = None,
               after: list[str] | None = None, source: str = "spec") -> dict:
        return self.call("POST", "/jobs", {"spec": raw, "priority": priority, "set": overrides or [],
                                           "after": after or [], "source": source})

    def jobs(self, state: str | None = None, owner: str | None = None) -> list[dict]:
        return self.call("GET", "/jobs", query={"state": state, "owner": owner})

    def jobs_page(self, limit: int, page: int = 1, state: str | None = None, owner: str | None = None) -> dict:
        """{jobs, total, page, limit}: page 1 holds the newest ``limit`` jobs."""
        return self.call("GET", "/jobs", query={"limit": limit, "page": page, "state": state, "owner": owner})

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/jobs/{urllib.parse.quote(job_id)}")

    def cancel(self, job_id: str, checkpoint: bool = False) -> dict:
        return self.call("POST", f"/jobs/{urllib.parse.quote(job_id)}/cancel",
                         {"checkpoint": True} if checkpoint else None)

    def requeue(self, job_id: str, overrides: list[str] | None = None) -> dict:
        return self.call("POST", f"/jobs/{urllib.parse.quote(job_id)}/requeue", {"set": list(overrides or [])})

    def set_priority(self, job_id: str, priority: int) -> dict:
        return self.call("PATCH", f"/jobs/{urllib.parse.quote(job_id)}", {"priority": priority})

    def wait(self, job_id: str, timeout_s: float = 60.0) -> dict:
        return self.call("GET", f"/jobs/{urllib.parse.quote(job_id)}/wait", query={"timeout": timeout_s},
                         timeout_s=timeout_s + 30)

    def logs(self, job_id: str, rank: int | None = None, follow: bool = False,
             tail: int | None = None) -> Iterator[str]:
        return self.stream(f"/jobs/{urllib.parse.quote(job_id)}/logs",
                           {"rank": rank, "follow": "1" if follow else None, "tail": tail})

    def cluster(self) -> dict:
        return self.call("GET", "/cluster")

    def submit_sweep(self, sweep: dict | str, dry_run: bool = False, flops_per_s: float | None = None,
                     after: list[str] | None = None, source: str = "sweep", priority: int | None = None) -> dict:
        """``sweep``: the sweep file's contents (a mapping, or its YAML text)."""
        return self.call("POST", "/sweeps", {"sweep": sweep, "dry_run": dry_run, "flops_per_s": flops_per_s,
                                             "after": after or [], "source": source, "priority": priority})

    def sweep(self, name: str) -> dict:
        return self.call("GET", f"/sweeps/{urllib.parse.quote(name)}")

    def sweep_fit(self, name: str) -> dict:
        return self.call("GET", f"/sweeps/{urllib.parse.quote(name)}/fit")

    def create_token(self, user: str, admin: bool = False, expires_in_s: float | None = None) -> dict:
        return self.call("POST", "/tokens", {"user": user, "admin": admin, "expires_in_s": expires_in_s})

    def tokens(self, user: str | None = None) -> list[dict]:
        return self.call("GET", "/tokens", query={"user": user})

    def revoke_token(self, token_id: str) -> dict:
        return self.call("DELETE", f"/tokens/{urllib.parse.quote(token_id)}")

    def revoke_tokens(self, user: str) -> dict:
        return self.call("DELETE", "/tokens", query={"user": user})


class ApiRequestError(UsageError):
    """The server answered with an error status; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- laptop-side checks

_FILE_FIELDS = (("data", "corpus"), ("model", "init_from"), ("distill", "teacher"), ("rlhf", "ppo", "reward_model"),
                ("rlhf", "data", "demonstrations"), ("rlhf", "data", "demonstrations_heldout"),
                ("rlhf", "data", "comparisons"), ("rlhf", "data", "comparisons_heldout"),
                ("rlhf", "data", "prompts"), ("rlhf", "data", "eval_prompts"))


def local_files(raw: dict) -> list[tuple[str, str]]:
    """(field, path) of every file the spec names that exists on this machine and is no URI."""
    out = []
    sections = [raw] + [v for k, v in raw.items() if k in ("base", "sft", "rm", "ppo", "common") and isinstance(v, dict)]
    for sec in sections:
        for path in _FILE_FIELDS:
            v = sec
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, str) and v and "://" not in v and not v.startswith("builtin:") \
                    and os.path.exists(os.path.expanduser(v)):
                out.append((".".join(path), v))
    return out


def check_remote_spec(raw, source: str) -> None:
    """Validate a job spec here before sending it (the server validates again) and refuse laptop files.

    The model's shape is checked here too: its config needs no torch (``workers/model_config.py``)."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of sections (model, data, train, ...)")
    if "pipeline" not in raw:
        from specs.job import validate_spec

        validate_spec(raw, source=source)
    refuse_local_files(raw, source)


def refuse_local_files(raw: dict, source: str, prefix: str = "") -> None:
    """One line naming the first field of ``raw`` (a job spec, a pipeline file or a sweep's base) that names
    a file on this machine."""
    files = local_files(raw)
    if files:
        field, path = files[0]
        raise UsageError(f"{source}: {prefix}{field}: {path} is a file on this machine, which the cluster cannot "
                         "read; copy it to the cluster's storage (e.g. s3://bucket/...) and name that URI")
