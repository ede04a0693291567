"""Commands that change a job its owner (or an admin) controls: ``cancel [--checkpoint]``, ``requeue``, ``priority``.

They work on the head, against the job store, or from a laptop over the HTTP
API; the API's routes call ``requeue_job`` and ``refusal`` here too.

``switchyard requeue JOB [--set k=v ...]`` puts a FAILED or CANCELLED job back
in the queue, resuming where it was.

A job that failed for a reason someone has since fixed (a full disk, a data
file that was missing, ``max_restarts`` spent on a flaky node) or that was
cancelled by mistake keeps its id, run directory, checkpoints, metrics and
evaluations. Requeueing puts it back in the queue with a fresh restart
budget, and the controller resumes it from its latest complete checkpoint at
the exact data position, as after a fault (from step 0 if it never wrote
one). ``--set`` changes spec fields on the way: a smaller micro batch after an
out-of-memory, more restarts, another worker count for an elastic job. A
change the checkpoint cannot take (the model's shape) fails the resume with
its reason, like any resume. The name cannot change, because it names the run
directory.

Pipeline stages, sweep runs and the pipeline and sweep records themselves
are refused with what to do instead: submitting the pipeline or sweep file
again continues it. Jobs that waited for this one (``--after``) and failed
with it stay failed; they are submitted again.
"""
from __future__ import annotations

import sys

from orchestrator.cli_jobs import _cluster, _controller_alive, _remote, _store, authorize, find_job, local_user
from orchestrator.job_records import effective_time_limit
from orchestrator.job_store import IllegalTransitionError, JobState
from specs.errors import UsageError

REQUEUABLE = (JobState.FAILED, JobState.CANCELLED)
NOTE_MAX = 200  # characters of the --set list the history row keeps


def refusal(store, rec) -> str | None:
    """Why ``rec`` cannot be requeued, as one line that says what to do instead; None when it can."""
    if rec.parent_id is not None or rec.kind in ("sweep", "pipeline"):
        parent = store.get(rec.parent_id) if rec.parent_id is not None else rec
        sweep = parent.kind == "sweep"
        what = (f"{rec.id} is {'a run of ' if parent is not rec else ''}sweep {parent.name}" if sweep else
                f"{rec.id} is {'a stage of ' if parent is not rec else ''}pipeline {parent.name}")
        again = "switchyard sweep SWEEP.yaml" if sweep else "switchyard submit PIPELINE.yaml"
        return f"requeue: {what}; submit its file again (`{again}`): that continues it where it stopped"
    if rec.kind != "train":
        return f"requeue: {rec.id} is a {rec.kind} job; only training jobs are requeued"
    if rec.state is JobState.SUCCEEDED:
        return (f"requeue: {rec.id} SUCCEEDED, so there is nothing to resume; to train it further, submit a new "
                f"job with model.init_from: {rec.run_dir}")
    if rec.state not in REQUEUABLE:
        return f"requeue: {rec.id} is {rec.state.value}, not over; only a FAILED or CANCELLED job is requeued"
    return None


def requeue_job(cluster, store, rec, by: str, overrides: list[str] | tuple[str, ...] = ()):
    """Requeue ``rec`` for ``by`` (who must own it or be an admin: the caller checks), with ``overrides``
    applied to its spec; its record, QUEUED. UsageError, with nothing changed, when it cannot be."""
    from data.storage import Storage
    from orchestrator.cli_jobs import checked_resources
    from specs.job import apply_overrides, validate_spec

    why = refusal(store, rec)
    if why:
        raise UsageError(why)
    spec = validate_spec(apply_overrides(rec.spec, list(overrides)), source=f"requeue {rec.id}")
    if spec.name != rec.name:
        raise UsageError(f"requeue: --set name={spec.name}: a requeued job keeps its name, which names its run "
                         f"directory {rec.run_dir}; submit the spec as a new job to change it")
    resources = checked_resources(cluster, spec)  # its files must still be there, its paths inside the roots
    _check_time_left(cluster, rec, spec)
    quota = cluster.teams.get(rec.team)
    fields = dict(spec=spec.to_dict(), resources=resources, max_restarts=spec.max_restarts,
                  note=", ".join(overrides)[:NOTE_MAX]) if overrides else {}
    try:
        new = store.requeue(rec.id, by, max_queued=quota.queued_jobs if quota is not None else None, **fields)
    except IllegalTransitionError:  # it changed since it was read (a second requeue won)
        raise UsageError(refusal(store, store.get(rec.id)) or f"requeue: {rec.id} changed meanwhile; try again") \
            from None
    if overrides:  # what `switchyard run --resume RUN_DIR` and `export` read
        Storage(cluster.storage, dict(cluster.storage_options)).write_json(f"{rec.run_dir}/spec.json",
                                                                           fields["spec"])
    return new


def _check_time_left(cluster, rec, spec) -> None:
    """UsageError when the job has already run for all of its time limit: it would stop again at once."""
    cap = cluster.workers.max_time_limit_s
    limit, used = effective_time_limit(spec.resources.time_limit_s, cap), rec.run_seconds()
    if limit is not None and used >= limit:
        most = f" (at most {cap:g}, workers.max_time_limit_s)" if cap is not None else ""
        raise UsageError(f"requeue: {rec.id} has run {used:.0f} s, all of its time limit of {limit:g} s; "
                         f"give it more with --set resources.time_limit_s=SECONDS{most}")


def requeued_line(out: dict) -> str:
    """'sy-...: QUEUED again (was FAILED at step 40); it resumes from its latest complete checkpoint'."""
    was = next((h["from"] for h in reversed(out.get("history") or []) if h["to"] == "QUEUED"
                and h["from"] in ("FAILED", "CANCELLED")), "FAILED")  # the controller may have started it since
    return (f"{out['id']}: QUEUED again (was {was} at step {out.get('step', 0)}); it resumes from its latest "
            "complete checkpoint")


def cmd_requeue(args) -> int:
    client = _remote(args)
    if client is not None:
        print(requeued_line(client.requeue(args.job, args.set)))
        return 0
    cluster = _cluster(args)
    store = _store(cluster)
    rec = find_job(store, args.job)
    user = local_user()
    authorize(cluster, user, rec, "requeue")
    print(requeued_line(requeue_job(cluster, store, rec, user, args.set).to_status_dict()))
    if not _controller_alive(store):
        print("note: no controller is running; the job waits in the queue until `switchyard up`", file=sys.stderr)
    return 0


def cmd_cancel(args) -> int:
    client = _remote(args)
    if client is not None:
        out = client.cancel(args.job, checkpoint=args.checkpoint)
    else:
        cluster = _cluster(args)
        store = _store(cluster)
        rec = find_job(store, args.job)
        user = local_user()
        authorize(cluster, user, rec)
        out = store.request_cancel(rec.id, by=user, checkpoint=args.checkpoint).to_status_dict()
    live = out["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED")
    how = " (stopping after a checkpoint at the next step)" if live and out.get("cancel_checkpoint") else \
        " (stopping)" if live else ""
    print(f"{out['id']}: {out['state']}{how}")
    return 0


def cmd_priority(args) -> int:
    """`switchyard priority JOB P`: a live job's (or a whole pipeline's or sweep's) new priority."""
    client = _remote(args)
    if client is not None:
        out = client.set_priority(args.job, args.priority)
        print(f"{out['id']}: priority {out['priority']} ({out['state']})")
        return 0
    cluster = _cluster(args)
    store = _store(cluster)
    rec = find_job(store, args.job)
    authorize(cluster, local_user(), rec)
    if rec.terminal:
        raise UsageError(f"priority: {rec.id} is {rec.state.value}; only a queued or running job's priority changes")
    changed = store.set_priority(rec.id, args.priority)
    more = f", and {len(changed) - 1} of its live stages or runs" if len(changed) > 1 else ""
    print(f"{rec.id}: priority {rec.priority} -> {args.priority}{more} ({rec.state.value})")
    return 0


def register(sub) -> None:
    from specs.validate import PRIORITY_MAX, PRIORITY_MIN, int_arg

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job")
    p.add_argument("--checkpoint", action="store_true",
                   help="let a running job finish its step and save a checkpoint first (`requeue` resumes there)")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("requeue", help="put a FAILED or CANCELLED job back in the queue; it resumes from its "
                                       "latest complete checkpoint with a fresh restart budget")
    p.add_argument("job", help="a job id (or unique prefix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a spec field on the way, e.g. train.micro_batch=4 (not the name)")
    p.set_defaults(func=cmd_requeue)
    p = sub.add_parser("priority", help="change a queued or running job's priority (a pipeline's or sweep's: all "
                                        "of its live jobs); the queue reorders at the next tick")
    p.add_argument("job", help="a job id (or unique prefix), or a pipeline's or sweep's name")
    p.add_argument("priority", type=int_arg(PRIORITY_MIN, PRIORITY_MAX), help="higher runs first")
    p.set_defaults(func=cmd_priority)
