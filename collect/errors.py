"""Errors a user can cause in the collector. The CLI prints them as one line, without a traceback."""


class CollectError(Exception):
    """Base of every user-facing collector error (bad flag, unknown dataset, unreachable server, …)."""
