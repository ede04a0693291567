"""CLI commands that talk to the controller and the job store: up, down, submit, list, status, wait.

``submit``, ``list``, ``status JOB``, ``logs``, ``cancel`` and ``wait`` read and
write the SQLite job store directly (the store is the source of truth; the
controller picks new jobs up within a tick), so they are quick and work even
while the controller restarts. ``up``/``down`` and the cluster view of
``status`` connect to Ray.

Remote mode: when cluster.yaml names ``api.url`` (a laptop's cluster.yaml
needs nothing else), the same commands go through the controller's HTTP API
(``orchestrator.api_client``) and touch neither Ray nor the job store. The
spec is validated here and again on the server.
"""
from __future__ import annotations

import os
import sys
import time

from orchestrator import json_output
from orchestrator.job_text import (  # noqa: F401  (re-exported: the CLI's text lives in job_text)
    NAME_MAX,
    WHY_MAX,
    _clip,
    left_text,
    list_why,
    pending_line,
    starts_text,
    step_text,
)
from orchestrator.packing import span
from specs.errors import UsageError

HEARTBEAT_STALE_S = 15.0


def _cluster(args):
    from orchestrator.cluster_config import load_cluster_config

    return load_cluster_config(args.cluster)


def _store(cluster):
    from orchestrator.job_store import JobStore

    return JobStore(cluster.job_store)


def _remote(args):
    """The API client when cluster.yaml names ``api.url``, else None (run against the head's store and Ray)."""
    cluster = _cluster(args)
    if not cluster.api.url:
        return None
    from orchestrator.api_client import ApiClient

    return ApiClient.from_cluster(cluster)


# ---------------------------------------------------------------------- up / down


def cmd_up(args) -> int:
    if _cluster(args).api.url:
        raise UsageError("up: run it on the head node (this cluster.yaml names api.url: it is a remote client)")
    import ray

    from orchestrator.controller import start_controller
    from orchestrator.local_head import recorded_head, start_head
    from orchestrator.ray_cluster import connect

    cluster = _cluster(args)
    if cluster.ray.address == "local" and recorded_head(cluster) is None:
        start_head(cluster)
    address = connect(cluster, allow_embedded=False)
    handle = start_controller(cluster)
    info = ray.get(handle.ping.remote())
    print(f"switchyard is up: Ray at {address}, controller pid {info['pid']}, storage {cluster.storage}, "
          f"job store {cluster.job_store}")
    return 0


def cmd_down(args) -> int:
    if _cluster(args).api.url:
        raise UsageError("down: run it on the head node (this cluster.yaml names api.url: it is a remote client)")
    import ray

    from orchestrator.controller import stop_controller
    from orchestrator.local_head import record_head, recorded_head, stop_session
    from orchestrator.ray_cluster import connect

    cluster = _cluster(args)
    head = recorded_head(cluster) if cluster.ray.address == "local" else cluster.ray.address
    if head is None:
        record_head(cluster, None)
        print("switchyard is not running")
        return 0
    connect(cluster, allow_embedded=False)
    stop_controller(cluster.ray.namespace)
    session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
    ray.shutdown()
    if cluster.ray.address == "local":
        stop_session(session)
        record_head(cluster, None)
    unfinished = [r for r in _store(cluster).list() if not r.terminal]
    note = f"; {len(unfinished)} unfinished job(s) resume at the next `switchyard up`" if unfinished else ""
    print(f"switchyard is down{note}")
    return 0


# ---------------------------------------------------------------------- submit


def local_user() -> str:
    """The job owner for commands run on the head: the login name, made a safe name."""
    import getpass
    import re

    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        name = os.environ.get("USER") or "local"
    name = re.sub(r"[^a-z0-9._-]", "-", name.lower()).strip("-.") or "local"
    return name[:64]


def checked_resources(cluster, spec) -> dict:
    """The gang ``spec`` asks of ``cluster``, once its paths are inside cluster.yaml's roots and the files it
    names exist (UsageError otherwise): what a job is queued with."""
    from data.storage import Storage
    from orchestrator.preflight import preflight
    from specs.paths import check_job_paths
    from workers.resources import worker_resources

    check_job_paths(spec, cluster.path_roots())  # cluster.yaml's read/write roots (the ranks check again)
    cap, limit = cluster.workers.max_time_limit_s, spec.resources.time_limit_s
    if cap is not None and limit is not None and limit > cap:
        raise UsageError(f"resources.time_limit_s: {limit:g} s is over this cluster's limit of {cap:g} s "
                         "(workers.max_time_limit_s in cluster.yaml)")
    preflight(spec, Storage(cluster.storage, dict(cluster.storage_options)))
    res = worker_resources(spec, cluster)
    return {"workers": res.workers, "cpus_per_worker": res.cpus, "gpus_per_worker": res.gpus}


def submit_spec(cluster, spec, priority: int, kind: str = "train", parent_id: str | None = None, *,
                owner: str | None = None, after: tuple[str, ...] | list[str] = ()) -> str:
    from orchestrator.job_store import safe_join

    resources = checked_resources(cluster, spec)
    owner = owner or local_user()
    team = cluster.team_of(owner)
    quota = cluster.teams.get(team)
    rec = _store(cluster).submit(
        spec.name, kind, spec.to_dict(), priority, resources,
        spec.max_restarts, run_dir_for=lambda job_id: safe_join(cluster.storage, f"{spec.name}-{job_id}"),
        parent_id=parent_id, owner=owner, team=team, after=list(after),
        max_queued=quota.queued_jobs if quota is not None and parent_id is None else None)
    return rec.id


def _controller_alive(store) -> bool:
    info = store.controller()
    return info is not None and time.time() - info.heartbeat < HEARTBEAT_STALE_S


def submit_raw(cluster, raw, priority: int = 0, overrides: list[str] | None = None, source: str = "spec", *,
               owner: str | None = None, after: list[str] | tuple[str, ...] = ()) -> str:
    """Validate a raw spec (as read from YAML) and queue it; nothing is stored unless it is valid."""
    from specs.job import SpecError, apply_overrides, validate_spec

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of sections (model, data, train, ...)")
    spec = validate_spec(apply_overrides(raw, overrides or []), source=source)
    return submit_spec(cluster, spec, priority, owner=owner, after=after)


def _after(args) -> list[str]:
    return [a.strip() for a in (getattr(args, "after", None) or "").split(",") if a.strip()]


def cmd_submit(args) -> int:
    from orchestrator.sweep import is_sweep_file
    from specs.job import read_yaml

    cluster = _cluster(args)
    raw = read_yaml(args.spec)
    client = _remote(args)
    log = lambda *a, **k: print(*a, file=sys.stderr, **k)  # noqa: E731  (stdout is the id alone)
    if client is not None and is_sweep_file(raw):
        from orchestrator.sweep import submit_remote

        print(submit_remote(client, raw, args.spec, args.priority, args.set, _after(args), log=log)["id"])
        return 0
    if client is not None:
        from orchestrator.api_client import check_remote_spec
        from specs.job import apply_overrides

        if isinstance(raw, dict) and "pipeline" not in raw:
            check_remote_spec(apply_overrides(raw, args.set or []), args.spec)
        else:
            check_remote_spec(raw, args.spec)
        out = client.submit(raw, args.priority, args.set, _after(args), source=os.path.basename(args.spec))
        print(out["id"])
        return 0
    if is_sweep_file(raw):  # a scaling-law sweep: the same as `switchyard sweep FILE`
        from orchestrator.sweep import submit_sweep, sweep_of_file

        _, spec = sweep_of_file(raw, args.spec, args.priority, args.set)
        job_id = submit_sweep(cluster, spec, source=args.spec, after=_after(args), log=log)["id"]
    elif isinstance(raw, dict) and "pipeline" in raw:  # an InstructGPT pipeline file, not one job's spec
        from orchestrator.instructgpt import print_submit_note, submit_pipeline

        out = submit_pipeline(cluster, raw, source=args.spec, priority=args.priority, overrides=args.set,
                              log=log, after=_after(args))
        print_submit_note(out)
        job_id = out["id"]
    else:
        job_id = submit_raw(cluster, raw, 0 if args.priority is None else args.priority, args.set,
                            source=args.spec, after=_after(args))
    print(job_id)
    if not _controller_alive(_store(cluster)):
        print("note: no controller is running; the job waits in the queue until `switchyard up`", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- list / status


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


QUEUED_SHOWN = 20  # the cluster `status` lists the queue's head; --json and `list` have every job
def _states(arg: str | None) -> list[str] | None:
    """``--state failed,queued`` -> ['FAILED', 'QUEUED'], or UsageError naming the states there are."""
    from orchestrator.job_records import JobState

    if not arg:
        return None
    names = [s.strip().upper() for s in arg.split(",") if s.strip()]
    known = [s.value for s in JobState]
    if bad := [n for n in names if n not in known]:
        raise UsageError(f"list --state {bad[0].lower()}: not a job state; give one or more of "
                         f"{', '.join(k.lower() for k in known)}, comma-separated")
    return names


def cmd_list(args) -> int:
    states = _states(args.state)
    client = _remote(args)
    if client is not None:
        got = client.jobs_page(args.limit, args.page, state=",".join(states) if states else None, owner=args.owner)
        rows, total = got["jobs"], got["total"]
    else:
        recs, total = _store(_cluster(args)).page(states, limit=args.limit, page=args.page, owner=args.owner)
        cap = _cluster(args).workers.max_time_limit_s
        rows = [{**r.to_status_dict(), **progress(r, cap)} for r in recs]
    if args.json:
        print(json_output.dumps(rows))
        return 0
    if not total:
        print("no jobs match --state/--owner" if states or args.owner else
              "no jobs yet: `switchyard submit SPEC` queues one")
        return 0
    w = min(NAME_MAX, max([4] + [len(r["name"]) for r in rows]))
    print(f"{'ID':<20} {'NAME':<{w}} {'OWNER':<10} {'STATE':<11} {'PRIO':>4} {'STEP':>13} {'RESTARTS':>8} "
          f"{'AGE':>6}  WHY")
    for r in sorted(rows, key=lambda r: r["submitted_at"]):
        why = list_why(r)
        print(f"{r['id']:<20} {_clip(r['name'], w):<{w}} {(r.get('owner') or '-')[:10]:<10} {r['state']:<11} "
              f"{r['priority']:>4} {step_text(r):>13} {r['restarts']:>8} {_age(r['submitted_at']):>6}  {why}")
    if total > len(rows):
        newest = (args.page - 1) * args.limit
        print(f"page {args.page}: jobs {newest + 1}-{newest + len(rows)} of {total}, newest first by page; "
              f"--page {args.page + 1} for older ones, --limit N for longer pages")
    return 0


def find_job(store, key: str):
    """A job by id (or unique id prefix), or the newest pipeline or the sweep of that name."""
    from orchestrator.job_store import JobNotFoundError
    from orchestrator.instructgpt import find_parent
    from orchestrator.sweep import find_sweep

    try:
        return store.get(key)
    except JobNotFoundError:
        rec = find_parent(store, key.strip().lower()) or find_sweep(store, key.strip().lower())
        if rec is None:
            raise
        return rec


def job_status(store, job_id: str, storage=None, cap: float | None = None) -> dict:
    rec = find_job(store, job_id)
    if rec.kind == "pipeline" and storage is not None:
        from orchestrator.instructgpt import pipeline_status

        return pipeline_status(store, storage, rec)
    out = rec.to_status_dict()
    out.update(progress(rec, cap))
    if storage is not None and rec.run_dir:
        from workers import phases

        startup = phases.read(storage, rec.run_dir)  # the phase a starting job is in (workers/phases.py)
        out["startup"] = None if startup is None else {
            "phase": startup.get("phase"), "current": None if rec.terminal else phases.describe(startup),
            "summary": phases.summary(startup)}
        if rec.kind == "train":
            from workers.checkpoint_store import unevaluated

            try:
                out["evals_pending"] = len(unevaluated(storage, rec.run_dir))
            except (OSError, ValueError):  # the run directory is gone or unreadable: nothing to say
                out["evals_pending"] = 0
    children = store.list(parent_id=rec.id)
    if children:
        out["stages"] = [{"id": c.id, "name": c.name, "state": c.state.value, "step": c.step} for c in children]
    return out


def progress(rec, cap: float | None = None) -> dict:
    """``steps_total`` of a training job, ``run_s`` (its time running, all attempts), the ``time_limit_s`` that
    applies (its own or ``cap``, cluster.yaml's ``workers.max_time_limit_s``), and while it runs ``eta_s``: its
    steps left at this attempt's rate, and ``limit_left_s``: its time limit left."""
    from orchestrator.job_records import TRAINING_KINDS
    from specs.job import validate_spec

    if rec.kind not in TRAINING_KINDS:
        return {}
    try:
        total = validate_spec(rec.spec, source=rec.id).total_steps
    except Exception:  # a spec an older Switchyard wrote: status still works, without the total
        return {}
    rate = (rec.metrics or {}).get("steps_per_s")
    running = rec.state.value == "RUNNING" and isinstance(rate, (int, float)) and rate > 0
    limit, used = rec.time_limit(cap), rec.run_seconds()
    return {"steps_total": total, "eta_s": max(0, total - rec.step) / rate if running else None,
            "time_limit_s": limit, "run_s": used,
            "limit_left_s": max(0.0, limit - used) if running and limit is not None else None}


def _eval_line(e: dict, best: bool) -> str:
    """One evaluation: loss, perplexity when there is one (not for rm/ppo stages), and what else was measured."""
    parts = [f"eval step {e['step']}: loss {e['loss']:.4f}"]
    if e.get("perplexity") is not None:
        parts.append(f"ppl {e['perplexity']:.2f}")
    for k, v in (e.get("extra") or {}).items():
        if k != "tokens" and v is not None:
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts) + (" (best)" if best else "")


def cluster_status(cluster, store) -> dict:
    import ray

    from orchestrator.ray_cluster import cluster_resources, connect

    info = store.controller()
    out = {"controller": {"pid": info.pid if info else None, "alive": _controller_alive(store),
                          "heartbeat": info.heartbeat if info else None}}
    try:
        out["address"] = connect(cluster, allow_embedded=False)
        out["nodes"] = [{"node": nid, **n} for nid, n in cluster_resources().items()]
        ray.shutdown()
    except UsageError as err:
        out["address"], out["nodes"], out["error"] = None, [], str(err)
    out.update(queue_and_running(store, cluster.workers.max_time_limit_s))
    return out


def queue_and_running(store, cap: float | None = None) -> dict:
    """The cluster view's jobs: ``queued`` in queue order with why each waits, and ``running`` (live, holding
    workers) with their step of the total and time left; for `status` on the head and the API's /cluster."""
    from orchestrator.job_store import JobState

    brief = lambda r: {"id": r.id, "name": r.name, "state": r.state.value, "priority": r.priority, "step": r.step,  # noqa: E731
                       "owner": r.owner, "team": r.team, "pending": r.pending, "resources": r.resources}
    queued = sorted(store.list([JobState.QUEUED]),
                    key=lambda r: ((r.pending or {}).get("position") or 1 << 30, r.submitted_at))
    running = store.list([JobState.STARTING, JobState.RUNNING, JobState.RESTARTING, JobState.PREEMPTED])
    return {"queued": [brief(r) for r in queued], "running": [{**brief(r), **progress(r, cap)} for r in running]}


def cmd_status(args) -> int:
    cluster = _cluster(args)
    client = _remote(args)
    if client is not None:
        out = client.job(args.job) if args.job else client.cluster()
    elif args.job:
        from data.storage import Storage

        out = job_status(_store(cluster), args.job, Storage(cluster.storage, dict(cluster.storage_options)),
                         cluster.workers.max_time_limit_s)
    else:
        out = cluster_status(cluster, _store(cluster))
    if args.json:
        print(json_output.dumps(out, default=str))
        return 0
    if args.job and out["kind"] == "pipeline":
        from orchestrator.instructgpt import format_status

        print("\n".join(format_status(out)))
        if out.get("reason") and out["state"] in ("FAILED", "CANCELLED"):
            print(f"reason: {out['reason']}")
    elif args.job:
        m = out.get("metrics") or {}
        print(f"{out['id']}  {out['name']}  {out['state']}  priority {out['priority']}  step {step_text(out)}  "
              f"restarts {out['restarts']}  owner {out.get('owner') or '-'} ({out.get('team') or '-'})")
        if out.get("eta_s") is not None:
            done = 100.0 * out["step"] / max(1, out["steps_total"])
            print(f"progress: {done:.0f}%, {m['steps_per_s']:.3g} steps/s, {left_text(out)}")
        if out.get("time_limit_s"):
            print(f"time limit: {span(out['time_limit_s'])}, {span(out['run_s'])} used (resources.time_limit_s, "
                  "or cluster.yaml's workers.max_time_limit_s)")
        print(f"run_dir: {out['run_dir']}")
        if pending_line(out):
            print(f"queued: {pending_line(out)}")
        startup = out.get("startup") or {}
        if startup.get("current"):
            print(f"starting: {startup['current']}")
        elif startup.get("summary") and out["state"] in ("RUNNING", "STARTING"):
            print(startup["summary"])
        if out.get("after"):
            print(f"after: {', '.join(out['after'])}")
        if out.get("preemptions"):
            print(f"preempted {out['preemptions']} time(s), last by {out.get('preempted_by')}")
        if m:
            print("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        for e in out.get("evals", []):
            print(_eval_line(e, e["checkpoint"] == out.get("best_checkpoint")))
        if out.get("evals_pending"):
            print(f"eval: {out['evals_pending']} checkpoint(s) not evaluated yet; the controller evaluates each "
                  "when the cluster has room for it (workers.eval_cpus)")
        for w in out.get("workers") or []:
            print(f"rank {w['rank']}: node {str(w['node'])[:12]} pid {w['pid']}")
        for s in out.get("stages", []):
            print(f"stage {s['name']}: {s['state']} (step {s['step']})")
        for h in out.get("history", []):
            print(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))} {h['from'] or '-'} -> {h['to']}: {h['reason']}")
        if out.get("reason") and out["state"] in ("FAILED", "CANCELLED"):
            print(f"reason: {out['reason']}")
    else:
        c = out["controller"]
        where = f"API: {cluster.api.url}" if client is not None else f"Ray: {out.get('address') or 'not running'}"
        print(f"{where}   controller: "
              f"{'pid ' + str(c['pid']) if c['alive'] else 'not running'}"
              + ("" if c["alive"] or client is not None else "   (`switchyard up` starts them)"))
        for n in out.get("nodes", []):
            print(f"node {n['node'][:12]} {n['address']}: CPU {n['free']['CPU']:g}/{n['total']['CPU']:g} free, "
                  f"GPU {n['free']['GPU']:g}/{n['total']['GPU']:g} free")
        print(f"running: {len(out['running'])}  queued: {len(out['queued'])}")
        for r in out["running"] + out["queued"][:QUEUED_SHOWN]:
            why = pending_line(r)
            left = f", {t}" if (t := left_text(r)) else ""
            print(f"  {r['id']} {r['name']} {r['state']} prio {r['priority']} step {step_text(r)}{left}"
                  + (f"  {why}" if why else ""))
        if len(out["queued"]) > QUEUED_SHOWN:
            print(f"  ... and {len(out['queued']) - QUEUED_SHOWN} more queued (`switchyard list` pages through all)")
    return 0


# ---------------------------------------------------------------------- logs / cancel / wait


def authorize(cluster, user: str, rec, what: str = "cancel or change") -> None:
    """Anyone may read every job; cancelling or changing one (or resubmitting a sweep) needs its owner or an admin."""
    if rec.owner and rec.owner != user and user not in cluster.admins:
        raise UsageError(f"{rec.id} belongs to {rec.owner}; only its owner or an admin (admins: in cluster.yaml) "
                         f"may {what} it")


def _remote_wait(client, args) -> int:
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        left = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.time()))
        out = client.wait(args.job, left)
        if out["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        if deadline and time.time() >= deadline:
            print(f"{out['id']}: still {out['state']} after {args.timeout:g}s", file=sys.stderr)
            return 3
    print(f"{out['id']}: {out['state']}" + (f" ({out['reason']})" if out.get("reason") and out["state"] != "SUCCEEDED"
                                            else ""))
    return 0 if out["state"] == "SUCCEEDED" else 1


def cmd_wait(args) -> int:
    client = _remote(args)
    if client is not None:
        return _remote_wait(client, args)
    store = _store(_cluster(args))
    deadline = time.time() + args.timeout if args.timeout else None
    rec = find_job(store, args.job)
    while not rec.terminal:
        if deadline and time.time() > deadline:
            print(f"{rec.id}: still {rec.state.value} after {args.timeout:g}s", file=sys.stderr)
            return 3
        time.sleep(0.5)
        rec = store.get(rec.id)
    print(f"{rec.id}: {rec.state.value}" + (f" ({rec.reason})" if rec.reason and rec.state.value != "SUCCEEDED" else ""))
    return 0 if rec.state.value == "SUCCEEDED" else 1


def register(sub) -> None:
    from orchestrator.job_logs import cmd_logs as logs_command
    from specs.validate import PRIORITY_MAX, PRIORITY_MIN, float_arg, int_arg

    p = sub.add_parser("up", help="start (or attach to) the cluster from cluster.yaml and the controller")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the controller (and the local Ray head); unfinished jobs resume at `up`")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("submit", help="queue a job, or start/continue an InstructGPT pipeline file; prints its id")
    p.add_argument("spec")
    p.add_argument("--priority", type=int_arg(PRIORITY_MIN, PRIORITY_MAX), default=None,
                   help="higher runs first (default 0; a pipeline file's own priority)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--after", default=None, metavar="JOB[,JOB...]",
                   help="start only once these jobs have SUCCEEDED (fails if one fails or is cancelled)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("list", help="jobs, a page at a time (the newest first)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int_arg(1, 100_000), default=100, help="jobs per page (default 100)")
    p.add_argument("--page", type=int_arg(1, 1 << 31), default=1, help="1: the newest jobs, 2: the ones before, ...")
    p.add_argument("--state", default=None, metavar="STATE[,STATE...]",
                   help="only jobs in these states (queued, running, failed, ...)")
    p.add_argument("--owner", default=None, help="only this user's jobs")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("status", help="one job, or the cluster")
    p.add_argument("job", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("logs", help="the output of a job's ranks")
    p.add_argument("job")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--rank", type=int_arg(0, 1 << 20), default=None)
    p.add_argument("--tail", type=int_arg(0, 1 << 30), default=None, metavar="N",
                   help="only the last N lines of each rank's log (then what follows, with --follow)")
    p.set_defaults(func=logs_command)
    from orchestrator.job_control import register as register_control

    register_control(sub)
    p = sub.add_parser("wait", help="block until a job ends; exit 0 on SUCCEEDED")
    p.add_argument("job")
    p.add_argument("--timeout", type=float_arg(0, 1e9), default=None)
    p.set_defaults(func=cmd_wait)
