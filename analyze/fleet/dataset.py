"""Reading a fleet dataset (local or in a bucket) with the analyzer's views.

Only committed runs are read: the files each run's manifest lists, so a task that died half-way (or
a run being rewritten) is never half-counted. The tables are registered with DuckDB as pyarrow
datasets (no DuckDB extension is downloaded: S3 goes through pyarrow's filesystem), then the
analyzer's own run-level views are defined over them by the analyzer's own SQL: `window_steps`
(`metrics.steps.WINDOW_STEPS_SQL` over `step_metrics` and each run's stored `run_windows` row) and
`run_metrics` (`sql.views.define_run_views`, reading the stored `run_settings` rows), plus
`fleet_hourly`. `request_metrics` is the table each run's task wrote (the local analysis' rows).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import InputError
from ..metrics.steps import WINDOW_STEPS_SQL
from ..sql.views import define_run_views
from ..storage import is_uri, join, resolve
from .aggregates import FLEET_HOURLY_SQL
from .layout import MANIFEST_DIR, PARTITION_KEYS, TABLES


def is_dataset(path: str) -> bool:
    """Whether `path` (URI or local path) is a fleet dataset (it has a `_manifest/` folder)."""
    try:
        fs, base = resolve(path if is_uri(path) else _abs(path))
        return fs.get_file_info(join(base, MANIFEST_DIR)).type == pafs.FileType.Directory
    except (InputError, OSError, ValueError):
        return False


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)


def manifests(dataset: str) -> list[dict[str, Any]]:
    """Every committed run's manifest."""
    fs, base = resolve(dataset)
    infos = fs.get_file_info(pafs.FileSelector(join(base, MANIFEST_DIR), allow_not_found=True))
    paths = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json")]

    def read(p: str) -> dict[str, Any] | None:
        try:
            with fs.open_input_stream(p) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [m for m in pool.map(read, sorted(paths)) if m]


def _table_dataset(fs: pafs.FileSystem, base: str, table: str, files: list[str]) -> ds.Dataset:
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda p: pq.read_schema(p, filesystem=fs), files))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    # A column the files store under a partition key's name (`run_settings.gpu`, `runs.engine`) is
    # read from the files: a partition value would replace it with its path-safe spelling.
    keys = [k for k in PARTITION_KEYS if k not in schema.names]
    for key in keys:
        schema = schema.append(pa.field(key, pa.string()))
    partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")
    return ds.dataset(
        files,
        schema=schema,
        filesystem=fs,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=join(base, table),
    )


@dataclass
class FleetTables:
    """A DuckDB connection with the dataset's views (the `sql` command's `Tables` for a dataset)."""

    con: duckdb.DuckDBPyConnection
    runs: int
    errors: list[str] = field(default_factory=list)

    def ensure_run_metrics(self) -> None:
        """Run-level views are defined when the dataset is opened."""

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> FleetTables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_dataset(dataset: str, memory_limit: str | None = None) -> FleetTables:
    """The committed runs of a fleet dataset as DuckDB views: step_metrics, requests, expert_totals,
    request_metrics, run_settings, run_windows, runs (the tables), window_steps, run_metrics,
    fleet_hourly (derived)."""
    dataset = dataset if is_uri(dataset) else _abs(dataset)
    fs, base = resolve(dataset)
    found = manifests(dataset)
    if not found:
        raise InputError(f"{dataset}: no analysed run in this fleet dataset (no {MANIFEST_DIR}/*.json)")
    con = duckdb.connect(config={"memory_limit": memory_limit} if memory_limit else {})
    for table in TABLES:
        files = [
            join(base, out) for m in found for out in m.get("outputs", []) if out.startswith(table + "/")
        ]
        if not files:
            raise InputError(f"{dataset}: no {table} files among the committed runs")
        con.register(f"_fleet_{table}", _table_dataset(fs, base, table, files))
        con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _fleet_{table}")
    con.execute(f"CREATE OR REPLACE VIEW window_steps AS {WINDOW_STEPS_SQL}")
    define_run_views(con)
    con.execute(FLEET_HOURLY_SQL)
    errors = [e for m in found for e in m.get("file_errors", [])]
    return FleetTables(con=con, runs=len(found), errors=errors)
