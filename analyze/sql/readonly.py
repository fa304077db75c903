"""Read-only mode of `moecap-analyze sql` / `shell` (their default; `--allow-writes` turns it off).

A query may come from someone else (a shared `@FILE`, a notebook cell pasted into the shell), so by
default it can read the trace views and nothing else, and can write nothing. DuckDB enforces it
(`lock_down`): no file outside the cache directory (and the `--out` file) can be opened
(`enable_external_access = false` with `allowed_directories` / `allowed_paths`), no extension is
installed or loaded (`autoinstall_known_extensions`, `autoload_known_extensions`, external access),
and `lock_configuration` keeps a query from setting any of it back. The cache directory stays
open (the views read its Parquet files; request lists and step metrics are cached there on first
use; DuckDB spills there), so the statements that write files or attach databases are refused by
their type, as DuckDB's own parser classifies them (`refused_statement`): COPY … TO, EXPORT /
COPY DATABASE, ATTACH, INSTALL / LOAD. In-memory tables and views (CREATE TABLE, INSERT, …) stay
allowed: they write nothing to disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import duckdb

REFUSED = {
    "COPY": "COPY writes or reads files",
    "COPY_DATABASE": "COPY DATABASE writes a database",
    "EXPORT": "EXPORT DATABASE writes files",
    "ATTACH": "ATTACH opens or creates a database file",
    "LOAD": "INSTALL / LOAD fetch or load extensions",
    "EXTENSION": "extension statements fetch or load extensions",
}
"""Statement types refused in read-only mode, with why (None: allowed after all)."""

HINT = "the sql and shell commands are read-only by default; pass --allow-writes to allow it"


def lock_down(
    con: duckdb.DuckDBPyConnection,
    readable_dirs: Iterable[str | os.PathLike[str]],
    writable_files: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Make `con` read-only: only `readable_dirs` (the cache) and `writable_files` (an `--out` file,
    written by our own code) can be opened; no extension is installed or loaded; the configuration
    is locked, so no query can undo this."""
    dirs = [str(Path(d).resolve()) + os.sep for d in readable_dirs]
    files = [str(Path(f).resolve()) for f in writable_files]
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allowed_directories = ?", [dirs])
    if files:
        con.execute("SET allowed_paths = ?", [files])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def refused_statement(con: duckdb.DuckDBPyConnection, text: str) -> str | None:
    """Why read-only mode refuses one of the statements of `text` (None: every one may run).

    DuckDB's parser classifies them; text it cannot parse is left to run (and fail with DuckDB's
    own syntax error)."""
    try:
        kinds = [s.type.name for s in con.extract_statements(text)]
    except duckdb.Error:
        return None
    except ValueError:  # a statement type this duckdb module has no name for (UPDATE EXTENSIONS)
        return f"a statement of a kind read-only mode does not know; {HINT}"
    for i, kind in enumerate(kinds):
        why = REFUSED.get(kind)
        if why:
            return f"statement {i + 1} refused: {why}; {HINT}"
    return None
