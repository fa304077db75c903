"""Errors a user can cause when reading traces. The CLIs print them as one line."""


class TraceError(Exception):
    """A trace file is unreadable, foreign, of an unsupported version, or inconsistent with its run.

    The message always starts with the file's path, so one line says which file and what was expected.
    """
