"""moecap.analyze — derive CAP metrics from moecap traces (and MoE-CAP record files) on any machine.

Never imports torch or a serving engine.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    import duckdb

    from .analysis import Options
    from .sql.tables import Tables

try:
    __version__ = version("moecap")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"


def tables(paths: Iterable[str | os.PathLike[str]], options: Options | None = None, **kwargs: Any) -> Tables:
    """The traces at `paths` as a `Tables`: `.con` (DuckDB, every documented view), `.lazy("steps")`
    (Polars LazyFrame), `.sql(query)`, `.document` (metrics.json). Keywords: `cache_dir`, `strict`,
    `memory_limit`, `threads`, or `Options` fields (`gpu="H200"`, `window="all"`). Views: docs/sql.md.
    """
    from .sql.tables import tables as _tables

    return _tables(paths, options, **kwargs)


def connect(
    paths: Iterable[str | os.PathLike[str]], options: Options | None = None, **kwargs: Any
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over the traces at `paths`, with every documented view defined (docs/sql.md).

    Same arguments as `tables`; use `tables(...)` for Polars LazyFrames and the metrics document.
    """
    return tables(paths, options, **kwargs).con
