"""moecap.analyze — derive CAP metrics from moecap traces (and MoE-CAP record files) on any machine.

Never imports torch or a serving engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    import duckdb

    from .analysis import Options
    from .sql.tables import Tables


def __getattr__(name: str) -> Any:
    from importlib.metadata import PackageNotFoundError, version

    # The installed version is read on first use: importlib.metadata scans the environment, which
    # `moecap-analyze --help` should not wait for.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return version("moecap")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


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
