"""Read a few views from memory while many per-run queries run over them.

`step_metrics`, `expert_totals`, `requests` and `experts` are views over every run's cached files
(schemas unioned by name), so each per-run query re-opens all of them: over the 27 shipped runs a
query cost 15-40 ms, most of it opening files, and the analysis and the report run ~15 per run.
`in_memory(con)` copies each view's rows (bounded: see `MAX_ROWS`) into a table once and shadows
the view with a temp view of the same name, on `con` and on any extra cursors; afterwards every
view reads its files again. The rows are the same, so every figure is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

SHADOWED_VIEWS = {
    "step_metrics": ("*", True),
    "expert_totals": ("*", False),
    "requests": ("*", False),
    "experts": ("* EXCLUDE (counts)", False),
}
"""view -> (the columns kept, whether to copy it run by run). `experts` keeps its scalar columns only
(its counts are read from the cached files as flat buffers where needed): a query naming `counts`
inside the block fails loudly rather than reading a copy of every count. `step_metrics` is a UNION ALL
of per-run reads whose branches interleave differently from one process to the next: copied in one
go, a run's float sums split differently across DuckDB's threads and their last bits changed from run
to run. Copied run by run, each run's rows sit together in the order a per-run query reads them, and
every figure is the same to the last bit. The other views read one list of files, in order."""

MAX_ROWS = 2_000_000
"""A view with more rows than this is left as it is: its copy would cost memory (~0.3 kB a
`step_metrics` row), and the time saved is per file opened, not per row."""


@contextmanager
def in_memory(con: Any, extra_cursors: int = 0, views: Iterable[str] | None = None) -> Iterator[list[Any]]:
    """Shadow the `SHADOWED_VIEWS` (or those named in `views`) with in-memory copies on `con` and on
    `extra_cursors` new cursors of its database; yields [con, *cursors]. The copies, temp views and
    cursors are dropped afterwards. A view that does not exist (or lacks a column) is left as it is."""
    shadowed = []
    wanted = set(SHADOWED_VIEWS if views is None else views)
    for view, (columns, per_run) in SHADOWED_VIEWS.items():
        if view not in wanted:
            continue
        table = f"main._moecap_mem_{view}"
        try:
            (rows,) = con.execute(f"SELECT count(*) FROM {view}").fetchone()
            if rows > MAX_ROWS:
                continue
            if per_run:
                con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT {columns} FROM {view} WHERE false")
                for (rid,) in con.execute(f"SELECT DISTINCT run_id FROM {view} ORDER BY run_id").fetchall():
                    con.execute(f"INSERT INTO {table} SELECT {columns} FROM {view} WHERE run_id = ?", [rid])
            else:
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
