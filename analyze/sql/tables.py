"""`Tables`: the loaded traces as a DuckDB connection with every documented view, plus Polars LazyFrames.

    >>> from moecap.analyze import tables
    >>> t = tables(["traces/"])                       # doctest: +SKIP
    >>> t.sql("SELECT phase, count(*) FROM steps GROUP BY phase").pl()   # doctest: +SKIP
    >>> t.lazy("step_metrics").filter(pl.col("phase") == "decode").select("time_s").collect()  # doctest: +SKIP

Nothing is read into memory by building a `Tables`: the trace views are DuckDB views over the Parquet
cache (`read_parquet([...])`), derived views are SQL over them, and a LazyFrame is a Polars IO source
that runs the view through DuckDB on collect with the frame's column selection, row limit and (where
DuckDB can translate it) filter pushed into the query, streaming record batches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars
import pyarrow as pa

from ..analysis import Options
from ..load import LoadedRun, default_cache_dir
from ..pipeline import Analysis, analyze_paths
from .views import define_derived_views

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Tables:
    """Views over loaded traces. `con` is a DuckDB connection; `lazy(view)` a Polars LazyFrame."""

    analysis: Analysis
    _closed: bool = field(default=False, repr=False)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection holding every view (see docs/sql.md)."""
        return self.analysis.db.con

    @property
    def document(self) -> dict[str, Any]:
        """The metrics document (what `moecap-analyze --out` writes as metrics.json)."""
        return self.analysis.document

    @property
    def windows(self) -> dict[str, str]:
        """run_id -> SQL predicate over step_metrics selecting that run's metrics window."""
        return self.analysis.windows

    @property
    def runs(self) -> dict[str, LoadedRun]:
        return self.analysis.db.runs

    @property
    def errors(self) -> list[str]:
        """One line per input file that could not be loaded."""
        return self.analysis.db.errors

    @property
    def warnings(self) -> list[str]:
        return self.analysis.db.warnings

    @property
    def views(self) -> list[str]:
        """Names of the views and tables a query can use."""
        rows = self.con.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY table_name"
        ).fetchall()
        return [r[0] for r in rows]

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """A DuckDB relation for `query` (call `.pl()`, `.fetchall()`, `.df()`, `.write_parquet(...)` on it)."""
        return self.con.sql(query, params=params)

    def pl(self, query: str, params: list[Any] | None = None) -> polars.DataFrame:
        """`query`'s result as a Polars DataFrame."""
        return self.con.sql(query, params=params).pl()

    def lazy(self, view_or_query: str) -> polars.LazyFrame:
        """A Polars LazyFrame over a view (`"steps"`) or a SELECT query, evaluated by DuckDB on collect.

        Each collect runs on its own DuckDB cursor, so frames of one `Tables` can be joined with each
        other (and with themselves) freely.
        """
        text = view_or_query.strip()
        query = f'SELECT * FROM "{text}"' if _IDENTIFIER.match(text) else text
        return lazy_frame(self.con, query)

    def close(self) -> None:
        if not self._closed:
            self.con.close()
            self._closed = True

    def __enter__(self) -> Tables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tables(
    paths: Iterable[str | os.PathLike[str]],
    options: Options | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    memory_limit: str | None = None,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **option_fields: Any,
) -> Tables:
    """Load traces (files, directories, globs) and define every documented view.

    `options` (or its fields as keywords: `gpu="H200"`, `window="all"`, …) choose the GPU the
    per-step metrics are computed for and the metrics window, as `moecap-analyze --gpu/--window` do.
    `memory_limit` ("4GB") caps DuckDB's memory; beyond it DuckDB spills to `<cache_dir>/spill`.
    """
    if options is not None and option_fields:
        raise TypeError("pass either options or option keywords, not both")
    options = options or Options(**option_fields)
    analysis = analyze_paths(paths, options, cache_dir=cache_dir, strict=strict, progress=progress)
    con = analysis.db.con
    spill = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    con.execute(f"SET temp_directory = '{_quote(str(spill / 'spill'))}'")
    if memory_limit:
        con.execute(f"SET memory_limit = '{_quote(memory_limit)}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    define_derived_views(con, analysis.windows, analysis.document)
    return Tables(analysis)


def _quote(text: str) -> str:
    return text.replace("'", "''")


# -- Polars LazyFrames ----------------------------------------------------------------------------
class _CursorScan:
    """A query that DuckDB's Polars source (`duckdb.polars_io.duckdb_source`) refines with project /
    limit / filter and then reads; the read runs on a fresh cursor of the connection, so several
    scans (a join of two frames, a self-join) can be open at once: one DuckDB connection serves
    only one running query."""

    def __init__(self, con: duckdb.DuckDBPyConnection, query: str, ops: tuple[tuple[str, Any], ...] = ()):
        self._con = con
        self._query = query
        self._ops = ops

    def project(self, columns: str) -> _CursorScan:
        return _CursorScan(self._con, self._query, (*self._ops, ("project", columns)))

    def limit(self, n: int) -> _CursorScan:
        return _CursorScan(self._con, self._query, (*self._ops, ("limit", n)))

    def filter(self, expression: Any) -> _CursorScan:
        return _CursorScan(self._con, self._query, (*self._ops, ("filter", expression)))

    def to_arrow_reader(self, batch_size: int | None = None) -> _ClosingReader:
        cursor = self._con.cursor()
        rel = cursor.sql(self._query)
        for op, arg in self._ops:
            rel = getattr(rel, op)(arg)
        reader = rel.to_arrow_reader() if batch_size is None else rel.to_arrow_reader(batch_size)
        return _ClosingReader(reader, cursor)


class _ClosingReader:
    """An Arrow record-batch reader that closes its cursor when closed."""

    def __init__(self, reader: pa.RecordBatchReader, cursor: duckdb.DuckDBPyConnection) -> None:
        self._reader = reader
        self._cursor = cursor

    def read_next_batch(self) -> pa.RecordBatch:
        return self._reader.read_next_batch()

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._cursor.close()


def lazy_frame(con: duckdb.DuckDBPyConnection, query: str) -> polars.LazyFrame:
    """A LazyFrame over `query` on `con` (column selection, limits and filters pushed into DuckDB)."""
    from duckdb.polars_io import duckdb_source

    cursor = con.cursor()
    try:
        schema = polars.from_arrow(cursor.sql(query).limit(0).to_arrow_table()).schema  # type: ignore[union-attr]
    finally:
        cursor.close()
    return duckdb_source(_CursorScan(con, query), schema)  # type: ignore[arg-type]
