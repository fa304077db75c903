"""`TraceDB`: the DuckDB connection with the views defined, plus what loading found."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from ..errors import InputError
from .convert import cache_request_lists
from .runs import LoadedRun
from .views import define_steps_view


class TraceDB:
    """A DuckDB connection with the views defined, plus what loading found.

    `con` is the connection with every documented view complete: on first access it caches the
    request lists of steps files loaded without them (one more streaming pass over each trace) and
    redefines `steps` over them. Metric code that reads no request list runs inside
    `defer_request_lists()`, where `con` is handed out as it is and `steps` has only its scalar
    columns (a query naming a list column then fails loudly, never silently).
    """

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        runs: dict[str, LoadedRun],
        errors: list[str],
        warnings: list[str],
        cache_dir: Path | None = None,
    ) -> None:
        self._con = con
        self.runs = runs
        self.errors = errors
        self.warnings = warnings
        self.cache_dir = cache_dir
        self._deferred = 0

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if not self._deferred and self.request_lists_pending:
            self.ensure_request_lists()
        return self._con

    @property
    def request_lists_pending(self) -> bool:
        """Whether some steps file feeding the views has no cached request lists yet."""
        return any("steps" not in f.parquet for run in self.runs.values() for f in run.recording_files)

    def ensure_request_lists(self) -> None:
        """Cache the request lists of every recording steps file that lacks them; redefine `steps`."""
        if not self.request_lists_pending:
            return
        assert self.cache_dir is not None
        for run in self.runs.values():
            for f in run.recording_files:
                if "steps" not in f.parquet:
                    cache_request_lists(f, self.cache_dir)
        define_steps_view(self._con, self.runs)

    @contextmanager
    def defer_request_lists(self) -> Iterator[TraceDB]:
        """Within: `con` does not cache request lists (for code that reads none)."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query, params=params)

    def close(self) -> None:
        self._con.close()


def require_runs(db: TraceDB) -> None:
    """InputError when nothing could be loaded (with the file errors)."""
    if not db.runs:
        detail = f": {db.errors[0]}" if db.errors else ""
        raise InputError(f"no readable moecap trace among the inputs{detail}")
