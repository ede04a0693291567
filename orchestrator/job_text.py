"""How `switchyard list`, `status` and the cluster view put a job into words: why it waits and when it
starts, how far it is, its name in a column. Plain functions of the status dicts (``JobRecord.to_status_dict``
with ``cli_jobs.progress``), so the CLI, the API's clients and the tests share them."""
from __future__ import annotations

import time

from orchestrator.packing import span


def pending_line(job: dict) -> str:
    """'#2, waiting for quota: ...' for a queued job, '' otherwise (status and list show it).

    A reason that already says what it waits for ('waiting for resources: ...') is not prefixed again."""
    p = job.get("pending") or {}
    if job.get("state") != "QUEUED" or not p:
        return ""
    reason = str(p.get("reason") or "")
    said = reason.startswith("waiting for ")
    line = f"#{p.get('position')}, " + (reason if said else f"waiting for {p.get('waiting_for')}: {reason}")
    if p.get("preempted_by"):
        line += f" (preempted by {p['preempted_by']})"
    if starts := starts_text(p):
        line += f" ({starts})"
    return line


def starts_text(pending: dict, now: float | None = None) -> str:
    """'starts within about 12m' for one of the first jobs of the queue, when the time limits of the jobs
    ahead tell (``pending.starts_by``: the scheduler's for the head, ``orchestrator/estimates.py``'s further
    back); '' otherwise."""
    if not pending.get("starts_by"):
        return ""
    left = pending["starts_by"] - (time.time() if now is None else now)
    return f"starts within about {span(left)}" if left > 0 else "should start at any moment"


NAME_MAX = 40  # `list`'s name column: as wide as the longest name on the page, up to this
WHY_MAX = 120  # a failed or cancelled job's reason in `list`, cut in the middle; `status JOB` has all of it


def _clip(name: str, width: int) -> str:
    """A name cut to ``width`` in the middle, so a sweep's or pipeline's runs keep the ends that tell them apart."""
    from specs.errors import clip_middle

    return clip_middle(name, width, mark="~")


def list_why(job: dict) -> str:
    """`list`'s WHY column: where a queued job waits, who preempted it, why it failed or was cancelled."""
    from specs.errors import clip_middle

    if why := pending_line(job):
        return why
    if job["state"] == "PREEMPTED":
        return f"preempted by {job.get('preempted_by')}; checkpointing"
    if job["state"] in ("FAILED", "CANCELLED") and job.get("reason"):
        return clip_middle(" ".join(str(job["reason"]).split()), WHY_MAX)
    return ""


def left_text(job: dict) -> str:
    """'about 12m left', and when the time limit comes first ', its time limit stops it in about 4m'; '' when
    the job is not running."""
    if job.get("eta_s") is None:
        return ""
    text = f"about {span(job['eta_s'])} left"
    if job.get("limit_left_s") is not None and job["limit_left_s"] < job["eta_s"]:
        text += f", its time limit stops it in about {span(job['limit_left_s'])}"
    return text


def step_text(job: dict) -> str:
    """'244/2000': a job's step out of its total (``progress``), or the step alone when the total is unknown."""
    return f"{job.get('step') or 0}" + (f"/{job['steps_total']}" if job.get("steps_total") else "")
