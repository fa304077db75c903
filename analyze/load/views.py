"""The documented views (docs/sql.md) over the cached Parquet of the loaded runs.

Each view reads the Parquet of the files that feed it (`LoadedRun.recording_files`,
`counting_files`: one TP rank per (dp, pp), or the sum over ranks); a view no file feeds is defined
empty with its documented columns. `runs` and `moe_layers` are small tables from the metadata;
`expert_tokens` is the long form of the counts, computed only when queried.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from moecap.schemas import TABLES

from .cache import identity_schema
from .runs import LoadedRun

_VIEW_TABLES = (
    "steps",
    "experts",
    "expert_step_stats",
    "expert_totals",
    "requests",
    "outputs",
    "gpu_samples",
)


def _empty_view_sql(view: str, schemas: dict[str, pa.Schema] | None = None) -> str:
    """A view with `view`'s columns and no row (no file feeds it)."""
    if view in TABLES:
        schema = identity_schema(pa.schema([pa.field(c.name, c.type) for c in TABLES[view]]))
    elif schemas and view in schemas:
        schema = schemas[view]
    else:  # expert_totals
        return (
            "SELECT NULL::VARCHAR run_id, NULL::INT dp, NULL::INT pp, NULL::INT tp, NULL::INT ep, NULL::VARCHAR phase, "
            "NULL::INT moe_layer, NULL::INT layer, NULL::INT expert, NULL::BIGINT tokens, NULL::BIGINT active_steps WHERE false"
        )
    cols = ", ".join(f"NULL::{_duck_type(f.type)} AS {f.name}" for f in schema)
    return f"SELECT {cols} WHERE false"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    return {
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
        pa.string(): "VARCHAR",
    }.get(t, "VARCHAR")


def _view_sources(runs: dict[str, LoadedRun]) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {v: [] for v in (*_VIEW_TABLES, "step_scalars")}
    for run in runs.values():
        feeding = {id(f) for f in (*run.recording_files, *run.counting_files)}
        for f in (*run.files, *run.summed):
            if f.table_kind in ("steps", "experts") and id(f) not in feeding:
                continue  # a non-recording TP rank's duplicate, or one share of a sum
            for view, parquet in f.parquet.items():
                sources[view].append(str(parquet))
    return sources


def listing(files: list[str]) -> str:
    return ", ".join("'" + p.replace("'", "''") + "'" for p in files)


def define_steps_view(con: duckdb.DuckDBPyConnection, runs: dict[str, LoadedRun]) -> None:
    """(Re)define `steps`: over the full cached tables once every recording file has its request
    lists cached; until then (inside `TraceDB.defer_request_lists`) over the scalar columns only."""
    sources = _view_sources(runs)
    if sources["step_scalars"] and len(sources["steps"]) == len(sources["step_scalars"]):
        body = f"SELECT * FROM read_parquet([{listing(sources['steps'])}], union_by_name=true)"
    elif sources["step_scalars"]:
        # Every cached column but the request sums (named `_req_*`, see metrics.step_costs).
        body = (
            f"SELECT COLUMNS(lambda c: NOT starts_with(c, '_req_')) "
            f"FROM read_parquet([{listing(sources['step_scalars'])}], union_by_name=true)"
        )
    else:
        body = _empty_view_sql("steps")
    con.execute(f"CREATE OR REPLACE VIEW steps AS {body}")


def define_views(
    con: duckdb.DuckDBPyConnection, runs: dict[str, LoadedRun], schemas: dict[str, pa.Schema] | None = None
) -> None:
    """(Re)define every view over the cached Parquet of `runs`; `schemas` gives the columns of a
    derived table (`expert_step_stats`) for the empty view when no file feeds it."""
    sources = _view_sources(runs)
    define_steps_view(con, runs)
    for view in ("steps", "step_scalars"):
        sources.pop(view)
    for view, files in sources.items():
        if files:
            con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet([{listing(files)}], union_by_name=true)"
            )
        else:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {_empty_view_sql(view, schemas)}")
    con.execute(_RUNS_TABLE_SQL)
    rows = [_run_row(run) for run in runs.values()]
    if rows:
        con.executemany("INSERT INTO runs VALUES (" + ", ".join("?" * len(rows[0])) + ")", rows)
    con.execute(_MOE_LAYERS_SQL)
    layer_rows = [
        (run.run_id, i, lid) for run in runs.values() for i, lid in enumerate(run.metadata.moe.layer_ids)
    ]
    if layer_rows:
        con.executemany("INSERT INTO moe_layers VALUES (?, ?, ?)", layer_rows)
    con.execute(_EXPERT_TOKENS_VIEW)


_RUNS_TABLE_SQL = """
CREATE OR REPLACE TABLE runs (
    run_id VARCHAR, model_id VARCHAR, engine VARCHAR, engine_version VARCHAR, gpu_name VARCHAR,
    num_gpus INTEGER, tp INTEGER, pp INTEGER, dp INTEGER, ep INTEGER, dataset VARCHAR, batch_size INTEGER,
    num_experts INTEGER, top_k INTEGER, num_moe_layers INTEGER, counts_available BOOLEAN,
    random_weights BOOLEAN, created_at VARCHAR, files INTEGER, metadata_json VARCHAR
)
"""

_MOE_LAYERS_SQL = "CREATE OR REPLACE TABLE moe_layers (run_id VARCHAR, moe_layer INTEGER, layer INTEGER)"

# Long form of the expert counts, computed only when queried; filters on run/rank/step columns are
# pushed into the Parquet scan before the unnest.
_EXPERT_TOKENS_VIEW = """
CREATE OR REPLACE VIEW expert_tokens AS
WITH flat AS (
    SELECT e.run_id, e.dp, e.pp, e.tp, e.ep, e.step,
           unnest(e.counts) AS tokens, generate_subscripts(e.counts, 1) - 1 AS idx
    FROM experts e
)
SELECT f.run_id, f.dp, f.pp, f.tp, f.ep, f.step,
       m.layer AS layer, (f.idx % r.num_experts)::INTEGER AS expert, f.tokens
FROM flat f
JOIN runs r USING (run_id)
JOIN moe_layers m ON m.run_id = f.run_id AND m.moe_layer = (f.idx // r.num_experts)
"""


def _run_row(run: LoadedRun) -> tuple[Any, ...]:
    md = run.metadata
    uuids = {g.uuid for g in md.gpus if g.uuid}
    for f in run.files:
        uuids.update(u for u in f.run.rank.gpu_uuids if u)
        uuids.update(g.uuid for g in f.run.gpus if g.uuid)
    num_gpus = len(uuids) or len(md.gpus) or None
    wl = md.workload or {}
    return (
        run.run_id,
        md.model.id,
        md.engine.name,
        md.engine.version,
        md.gpus[0].name if md.gpus else None,
        num_gpus,
        md.parallelism.tp,
        md.parallelism.pp,
        md.parallelism.dp,
        md.parallelism.ep,
        wl.get("dataset"),
        wl.get("batch_size") or wl.get("concurrency"),
        md.moe.num_experts,
        md.moe.top_k,
        len(md.moe.layer_ids),
        bool(md.moe.counts_available) and bool(run.files_of("experts")),
        bool(md.model.random_weights),
        md.created_at,
        len(run.files),
        md.to_json(),
    )
