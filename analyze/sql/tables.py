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
from typing import TYPE_CHECKING, Any

import duckdb
import polars
import pyarrow as pa

if TYPE_CHECKING:
    from ..metrics.window import Window

from ..analysis import Options, RunContext, define_step_metrics_view, resolve_context
from ..load import LoadedRun, TraceDB, default_cache_dir, load_traces, require_runs
from ..pipeline import Analysis, analyze_paths
from .views import define_request_views, define_run_views

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RUN_LEVEL_VIEWS = ("window_steps", "run_metrics")
"""Views that need the run-level metrics (metrics.json): computed on first use when loaded without."""
_RUN_LEVEL = re.compile(r"\b(" + "|".join(RUN_LEVEL_VIEWS) + r")\b", re.IGNORECASE)


def needs_run_metrics(query: str) -> bool:
    """Whether `query` names a view that needs the run-level metrics (window_steps, run_metrics)."""
    return bool(_RUN_LEVEL.search(query))


@dataclass
class _LoadArgs:
    paths: list[str]
    options: Options
    cache_dir: str | os.PathLike[str] | None
    strict: bool
    memory_limit: str | None
    threads: int | None


@dataclass
class Tables:
    """Views over loaded traces. `con` is a DuckDB connection; `lazy(view)` a Polars LazyFrame.

    Built with `metrics=False`, the run-level metrics (metrics.json, and the views `window_steps`
    and `run_metrics` over them) are computed on first use: by `document` / `windows` / `analysis`,
    or by a query through `sql` / `pl` / `lazy` that names one of those views. Computing them opens
    a new connection (`con` changes; views you created yourself on the old one are gone).
    """

    db: TraceDB
    contexts: list[RunContext]
    _args: _LoadArgs = field(repr=False)
    _analysis: Analysis | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection holding every view (see docs/sql.md)."""
        return self.db.con

    @property
    def analysis(self) -> Analysis:
        """The full analysis (`moecap.analyze.pipeline.Analysis`), computed on first use."""
        return self.ensure_run_metrics()

    @property
    def document(self) -> dict[str, Any]:
        """The metrics document (what `moecap-analyze --out` writes as metrics.json)."""
        return self.ensure_run_metrics().document

    @property
    def windows(self) -> dict[str, Window]:
        """run_id -> that run's metrics window (analyze/metrics/window.py)."""
        return self.ensure_run_metrics().windows

    @property
    def has_run_metrics(self) -> bool:
        return self._analysis is not None

    @property
    def runs(self) -> dict[str, LoadedRun]:
        return self.db.runs

    @property
    def errors(self) -> list[str]:
        """One line per input file that could not be loaded."""
        return self.db.errors

    @property
    def warnings(self) -> list[str]:
        return self.db.warnings

    @property
    def views(self) -> list[str]:
        """Names of the views and tables a query can use (run-level ones included, computed on use)."""
        # current_database(): the loader's registered Python objects live in the `temp` catalog.
        rows = self.con.sql(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = 'main'"
        ).fetchall()
        return sorted({r[0] for r in rows} | set(RUN_LEVEL_VIEWS))

    def ensure_run_metrics(self) -> Analysis:
        """Compute the run-level metrics and define `window_steps` and `run_metrics` (once)."""
        if self._analysis is None:
            a = self._args
            analysis = analyze_paths(a.paths, a.options, cache_dir=a.cache_dir, strict=a.strict)
            _configure(analysis.db.con, a)
            define_request_views(analysis.db.con)
            define_run_views(analysis.db.con)
            self.db.con.close()
            self.db, self.contexts, self._analysis = analysis.db, analysis.contexts, analysis
        return self._analysis

    def _prepare(self, query: str) -> None:
        if self._analysis is None and needs_run_metrics(query):
            self.ensure_run_metrics()

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """A DuckDB relation for `query` (call `.pl()`, `.fetchall()`, `.df()`, `.write_parquet(...)` on it)."""
        self._prepare(query)
        return self.con.sql(query, params=params)

    def pl(self, query: str, params: list[Any] | None = None) -> polars.DataFrame:
        """`query`'s result as a Polars DataFrame."""
        return self.sql(query, params=params).pl()

    def lazy(self, view_or_query: str) -> polars.LazyFrame:
        """A Polars LazyFrame over a view (`"steps"`) or a SELECT query, evaluated by DuckDB on collect.

        Each collect runs on its own DuckDB cursor, so frames of one `Tables` can be joined with each
        other (and with themselves) freely.
        """
        text = view_or_query.strip()
        query = f'SELECT * FROM "{text}"' if _IDENTIFIER.match(text) else text
        self._prepare(query)
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
    metrics: bool = True,
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
    `metrics=False` defers the run-level metrics (metrics.json, `window_steps`, `run_metrics`) to
    their first use: much faster over many runs when a query needs only the per-step and
    per-request views. `memory_limit` ("4GB") caps DuckDB's memory; beyond it DuckDB spills to
    `<cache_dir>/spill`.
    """
    if options is not None and option_fields:
        raise TypeError("pass either options or option keywords, not both")
    options = options or Options(**option_fields)
    args = _LoadArgs([str(p) for p in paths], options, cache_dir, strict, memory_limit, threads)
    if metrics:
        analysis = analyze_paths(args.paths, options, cache_dir=cache_dir, strict=strict, progress=progress)
        t = Tables(analysis.db, analysis.contexts, args, analysis)
    else:
        db = load_traces(args.paths, cache_dir=cache_dir, strict=strict, progress=progress)
        require_runs(db)
        contexts = [resolve_context(run, options) for run in db.runs.values()]
        define_step_metrics_view(db, contexts)
        t = Tables(db, contexts, args)
    _configure(t.con, args)
    define_request_views(t.con)
    if t._analysis is not None:
        define_run_views(t.con)
    return t


def _configure(con: duckdb.DuckDBPyConnection, args: _LoadArgs) -> None:
    spill = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    con.execute(f"SET temp_directory = '{_quote(str(spill / 'spill'))}'")
    if args.memory_limit:
        con.execute(f"SET memory_limit = '{_quote(args.memory_limit)}'")
    if args.threads:
        con.execute(f"SET threads = {int(args.threads)}")


def _quote(text: str) -> str:
    return text.replace("'", "''")


# -- Polars LazyFrames ----------------------------------------------------------------------------
class _CursorScan:
    """A query that DuckDB's Polars source (`duckdb.polars_io.duckdb_source`) refines with project /
    limit / filter and then reads; the read runs on a fresh cursor of the connection, so several
    scans (a join of two frames, a self-join) can be open at once: one DuckDB connection serves
    only one running query."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        query: str,
        ops: tuple[tuple[str, Any], ...] = (),
        *,
        columns: list[str] | None = None,
        types: list[Any] | None = None,
    ):
        self._con = con
        self._query = query
        self._ops = ops
        # The query's column names and DuckDB types, as a relation has them: duckdb's Polars source
        # reads them to decide which filters it may push down (DuckDB >= 2.0).
        self.columns = columns or []
        self.types = types or []

    def _then(self, op: str, arg: Any) -> _CursorScan:
        return _CursorScan(
            self._con, self._query, (*self._ops, (op, arg)), columns=self.columns, types=self.types
        )

    def project(self, columns: str) -> _CursorScan:
        return self._then("project", columns)

    def limit(self, n: int) -> _CursorScan:
        return self._then("limit", n)

    def filter(self, expression: Any) -> _CursorScan:
        return self._then("filter", expression)

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
    """A LazyFrame over `query` on `con` (column selection, limits and filters pushed into DuckDB).

    Scans run on fresh cursors of `con`. A query over data registered from Python on `con` itself
    (connection-local, so invisible to cursors) runs on `con`: two such frames cannot be read at once.
    """
    from duckdb.polars_io import duckdb_source

    cursor = con.cursor()
    try:
        rel = cursor.sql(query)
        columns, types = list(rel.columns), list(rel.types)
        sample = rel.limit(0).to_arrow_table()
    except duckdb.CatalogException:
        return con.sql(query).pl(lazy=True)
    finally:
        cursor.close()
    scan = _CursorScan(con, query, columns=columns, types=types)
    return duckdb_source(scan, polars.from_arrow(sample).schema)  # type: ignore[arg-type, union-attr]
