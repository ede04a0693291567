"""Errors meant for people: one line saying what is wrong and what to do."""


class UserError(Exception):
    """A user mistake (bad spec value, missing file, unreachable cluster): one line, no restart.

    The one type for it, raised anywhere (CLI, controller, ranks): the CLI
    turns it into exit code 2, the controller into FAILED at once.
    """


UsageError = UserError
"""The name the CLI side has always used; the same class."""


def clip_middle(text: str, width: int, mark: str = " ... ") -> str:
    """``text`` cut to ``width`` characters in the middle: both ends stay: where a name tells its runs apart,
    and where an error line says what is left and what to do."""
    if len(text) <= width:
        return text
    head = (width - len(mark)) // 2
    return f"{text[:head]}{mark}{text[len(text) - (width - len(mark) - head):]}"


def root_cause(err: BaseException) -> BaseException:
    """The UserError a rank raised, unwrapped from Ray's task error (its ``cause``); else ``err`` itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else err
