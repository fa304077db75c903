"""Errors a user can cause in the analyzer. The CLI prints them as one line, without a traceback."""


class AnalyzeError(Exception):
    """Base of every user-facing analyzer error."""


class SpecError(AnalyzeError):
    """A model config or GPU spec is missing, unknown or lacks a field a formula needs."""


class InputError(AnalyzeError):
    """An input file (records, YAML override, flag value) is malformed or inconsistent."""
