"""The failure policy: a failed rank's error becomes a decision, ``Restart`` or ``Fail``, with its reason.

The worker group reports one ``PollStatus`` (``workers/worker_group.py``);
when it carries an error, ``decide`` says what the controller does, as Ray
Train v2's ``FailurePolicy`` does: a ``UserError`` (bad spec value, missing
file) fails at once, anything else is an infrastructure fault that restarts
from the latest checkpoint until ``max_restarts`` is used up
(``scheduler.on_failure``).
"""
from __future__ import annotations

import ray

from orchestrator import scheduler as sched
from specs.errors import UserError, clip_middle, root_cause

USER_LINE_MAX = 1000   # a UserError's one line, long paths and all
INFRA_LINE_MAX = 300   # the last line of anything else (a library's error can be a page long)


def describe(err: BaseException) -> tuple[str, str]:
    """(error kind "user" or "infra", one line for people) of a rank's failure."""
    if isinstance(err, ray.exceptions.RayActorError):
        return "infra", "a rank's process died or its node was lost"
    cause = root_cause(err)
    text = str(cause).strip()
    line = text.splitlines()[-1].strip() if text else type(cause).__name__
    if isinstance(cause, UserError):  # our own line: its end says what is intact and what to do
        return "user", clip_middle(line, USER_LINE_MAX)
    return "infra", clip_middle(line, INFRA_LINE_MAX)


def decide(err: BaseException, restarts: int, max_restarts: int, job_id: str) -> sched.Restart | sched.Fail:
    """What to do about a job whose rank failed with ``err`` after ``restarts`` restarts."""
    kind, message = describe(err)
    return sched.on_failure(restarts, max_restarts, kind, message, job_id=job_id)
