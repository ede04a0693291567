"""Errors meant for people: one line saying what is wrong and what to do."""


class UsageError(Exception):
    """A user mistake: one line message, exit code 2, nothing started."""
