"""Read a few views from memory while many per-run queries run over them.

`step_metrics`, `expert_totals`, `requests` and `experts` are views over every run's cached files
(schemas unioned by name), so each per-run query re-opens all of them: over the 27 shipped runs a
query cost 15-40 ms, most of it opening files, and the analysis and the report run ~15 per run.
`in_memory(con)` copies each view's rows (bounded: see `MAX_ROWS`) into a table once and shadows
the view with a temp view of the same name, on `con` and on any extra cursors; afterwards every
view reads its files again. The rows are the same, so every figure is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

SHADOWED_VIEWS = {
    "step_metrics": "*",
    "expert_totals": "*",
    "requests": "*",
    "experts": "* EXCLUDE (counts)",
}
"""view -> the columns kept. `experts` keeps its scalar columns only (its counts are read from the
cached files as flat buffers where needed): a query naming `counts` inside the block fails loudly
rather than reading a copy of every count."""

MAX_ROWS = 2_000_000
"""A view with more rows than this is left as it is: its copy would cost memory (~0.3 kB a
`step_metrics` row), and the time saved is per file opened, not per row."""


@contextmanager
def in_memory(con: Any, extra_cursors: int = 0) -> Iterator[list[Any]]:
    """Shadow the `SHADOWED_VIEWS` with in-memory copies on `con` and on `extra_cursors` new
    cursors of its database; yields [con, *cursors]. The copies, temp views and cursors are
    dropped afterwards. A view that does not exist (or lacks a column) is left as it is."""
    shadowed = []
    for view, columns in SHADOWED_VIEWS.items():
        table = f"main._moecap_mem_{view}"
        try:
            (rows,) = con.execute(f"SELECT count(*) FROM {view}").fetchone()
            if rows > MAX_ROWS:
                continue
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT {columns} FROM {view}")
            shadowed.append((view, table))
        except duckdb.Error:
            continue
    cursors = [con] + [con.cursor() for _ in range(extra_cursors)]
    try:
        for c in cursors:
            for view, table in shadowed:
                c.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {table}")
        yield cursors
    finally:
        for i, c in enumerate(cursors):
            for view, _ in shadowed:
                c.execute(f"DROP VIEW IF EXISTS temp.{view}")
            if i:
                c.close()
        for _, table in shadowed:
            con.execute(f"DROP TABLE IF EXISTS {table}")
