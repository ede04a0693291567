"""Errors meant for people: one line saying what is wrong and what to do."""


class UserError(Exception):
    """A user mistake (bad spec value, missing file, unreachable cluster): one line, no restart.

    The one type for it, raised anywhere (CLI, controller, ranks): the CLI
    turns it into exit code 2, the controller into FAILED at once.
    """


UsageError = UserError
"""The name the CLI side has always used; the same class."""


def root_cause(err: BaseException) -> BaseException:
    """The UserError a rank raised, unwrapped from Ray's task error (its ``cause``); else ``err`` itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else err
