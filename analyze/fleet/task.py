"""The per-run work of a fleet analysis: the local analysis of one run's files, written into the dataset.

`analyze_group` is a plain function (Ray runs it as a task; tests call it directly too). It stages the
run's trace objects to worker-local scratch (`moecap.analyze.storage`; local paths are read in place),
runs the same pipeline as `moecap-analyze PATHS…` (`pipeline.analyze_paths`: validation, conversion,
per-step costs and metrics, windows, expert summaries, metrics.json; then
`sql.views.define_request_views`), and streams the rows of the views and tables the dataset's views
read (`step_metrics`, `requests`, `expert_totals`, `request_metrics`, `run_settings`, `run_windows`,
`runs`) into the dataset, one Parquet file per (table, run). The run's manifest is written last: a
task killed before it leaves no manifest, so its run counts as not analysed and the retry rewrites
the same files.
No formula lives here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moecap.schemas import TraceError

from ..errors import AnalyzeError
from ..storage import ObjectInfo, is_uri, join, resolve, stage
from .layout import DATASET_VERSION, MANIFEST_DIR, PARTITION_KEYS, TABLES, partition_value, run_file_name

_BATCH_ROWS = 131072
_PARQUET = {"compression": "zstd", "compression_level": 1}


@dataclass
class RunGroup:
    """The trace objects of one run (grouped by the run id in their file names)."""

    run_id: str
    objects: list[ObjectInfo]

    def input_keys(self) -> list[list[Any]]:
        """What identifies this version of the run's inputs: [URI, size, mtime ns] per object."""
        return sorted([o.uri, o.size, o.mtime_ns] for o in self.objects)


@dataclass
class TaskResult:
    """What one task did: rows written per table, files it could not use, the run's warnings."""

    run_id: str
    ok: bool
    rows: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False


def analyze_group(
    group: RunGroup,
    dataset: str,
    options: Any = None,
    cost_settings: Any = None,
    scratch: str | None = None,
) -> TaskResult:
    """Analyse one run's objects and write its rows and manifest into `dataset` (URI or path).

    A run none of whose files can be used gives `ok=False` with one line per problem; it never raises
    for bad input."""
    from ..analysis import Options
    from ..pipeline import analyze_paths
    from ..sql.views import define_request_views

    options = options or Options()
    if cost_settings is not None:
        options = replace(options, cost=cost_settings)
    work = tempfile.mkdtemp(prefix="moecap-fleet-", dir=scratch or os.environ.get("MOECAP_FLEET_SCRATCH"))
    result = TaskResult(run_id=group.run_id, ok=False)
    analysis = None
    try:
        local: list[str] = []
        names: dict[str, str] = {}
        for obj in group.objects:
            if not is_uri(obj.uri):  # a local (or shared-filesystem) path: read in place
                local.append(obj.uri)
                continue
            try:
                path = stage(obj, os.path.join(work, "objects"))
            except AnalyzeError as exc:
                result.errors.append(str(exc))
                continue
            local.append(str(path))
            names[str(path)] = obj.uri
        if not local:
            return result
        try:
            analysis = analyze_paths(
                local, options, cache_dir=os.path.join(work, "cache"), expert_counts=False
            )
        except (AnalyzeError, TraceError) as exc:
            result.errors.append(_rename(str(exc), names))
            return result
        result.errors.extend(_rename(e, names) for e in analysis.db.errors)
        define_request_views(analysis.db.con)
        docs = {r["run_id"]: r for r in analysis.document["runs"]}
        rates = dict(analysis.costs.select("run_id", "usd_per_hour").iter_rows())
        for ctx in analysis.contexts:
            rid = ctx.run.run_id
            # metrics.json's entry, written at the edge (the dataset's `runs.metrics_json`); every
            # figure the dataset's tables hold comes from the views and the façade's frames.
            doc = _rename(json.dumps(docs[rid], default=str, sort_keys=True), names)
            written = _write_run(analysis.db, ctx, doc, rates.get(rid), group, dataset)
            for table, (out, rows) in written.items():
                result.rows[table] = result.rows.get(table, 0) + rows
                result.outputs.append(out)
            result.warnings.extend(_rename(w, names) for w in analysis.warnings.get(rid, []))
        _commit(dataset, group, result)
        result.ok = True
        return result
    finally:
        if analysis is not None and analysis.db is not None:
            analysis.db.close()
        shutil.rmtree(work, ignore_errors=True)


def _rename(text: str, names: dict[str, str]) -> str:
    """Messages name the objects' URIs, not the worker's staged copies."""
    for local, uri in names.items():
        text = text.replace(local, uri)
    return text


def _anchor_sql(ctx: Any, kinds: tuple[str, ...]) -> str:
    """VALUES (dp, pp, tp, offset_ns) mapping each recording rank's monotonic clock to Unix ns."""
    rows = {}
    for f in ctx.run.files:
        if f.table_kind in kinds:
            r = f.run.rank
            rows[(r.dp, r.pp, r.tp)] = int(f.run.clock.unix_ns) - int(f.run.clock.monotonic_ns)
    if not rows:
        return (
            "SELECT NULL::INTEGER dp, NULL::INTEGER pp, NULL::INTEGER tp, NULL::BIGINT offset_ns WHERE false"
        )
    values = ", ".join(f"({dp}, {pp}, {tp}, {off})" for (dp, pp, tp), off in sorted(rows.items()))
    return f"SELECT * FROM (VALUES {values}) AS a(dp, pp, tp, offset_ns)"


def _write_run(
    db: Any, ctx: Any, doc: str, usd_per_hour: float | None, group: RunGroup, dataset: str
) -> dict[str, tuple[str, int]]:
    md = ctx.run.metadata
    rid = ctx.run.run_id.replace("'", "''")
    parts = {
        "model": partition_value(md.model.id),
        "gpu": partition_value(md.gpus[0].name if md.gpus else None),
        "engine": partition_value(md.engine.name),
        "date": partition_value(str(md.created_at)[:10]),
    }
    con = db.con
    hour = "date_trunc('hour', make_timestamptz(((x.{col} + a.offset_ns) / 1000)::BIGINT))"
    queries = {
        "step_metrics": f"""SELECT x.*, {hour.format(col="t_start_ns")} AS hour FROM step_metrics x
            LEFT JOIN ({_anchor_sql(ctx, ("steps",))}) a USING (dp, pp, tp)
            WHERE x.run_id = '{rid}' ORDER BY x.dp, x.pp, x.step""",
        # The driver's files carry rank dp0-pp0-tp0 in the views; their anchor is the driver's clock.
        "requests": f"""SELECT x.*, {hour.format(col="arrival_ns")} AS hour FROM requests x
            LEFT JOIN ({_anchor_sql(ctx, ("requests",))}) a USING (dp, pp, tp)
            WHERE x.run_id = '{rid}' ORDER BY x.arrival_ns""",
        "expert_totals": f"SELECT * FROM expert_totals WHERE run_id = '{rid}'",
        # The run's rows of the local analysis' tables the run-level views read (`sql.views`):
        # its per-request metrics, its constants and its resolved window.
        "request_metrics": f"SELECT * FROM request_metrics WHERE run_id = '{rid}'",
        "run_settings": f"SELECT * FROM run_settings WHERE run_id = '{rid}'",
        "run_windows": f"SELECT * FROM run_windows WHERE run_id = '{rid}'",
    }
    written: dict[str, tuple[str, int]] = {}
    for table, query in queries.items():
        path = _table_path(dataset, table, parts, ctx.run.run_id)
        written[table] = (path, _write_stream(con.sql(query).to_arrow_reader(_BATCH_ROWS), path))
    run_row = con.sql(f"SELECT * FROM runs WHERE run_id = '{rid}'").to_arrow_table()
    complete = all(f.complete for f in ctx.run.files)
    extra = {
        "metrics_json": doc,
        "host": md.host,
        "complete": complete,
        "input_files": len(group.objects),
        "input_bytes": sum(o.size for o in group.objects),
        "analyzed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "usd_per_hour": usd_per_hour,  # `Analysis.costs` (cost/section.py's headline scope)
    }
    types = {c.name: c.type for c in TABLES["runs"].added}
    arrow_types = {"VARCHAR": pa.string(), "BOOLEAN": pa.bool_(), "INTEGER": pa.int32(), "BIGINT": pa.int64()}
    for name, value in extra.items():
        run_row = run_row.append_column(name, pa.array([value], arrow_types.get(types[name], pa.float64())))
    path = _table_path(dataset, "runs", parts, ctx.run.run_id)
    written["runs"] = (path, _write_stream(run_row.to_reader(), path))
    return written


def _table_path(dataset: str, table: str, parts: dict[str, str], run_id: str) -> str:
    return join(dataset, table, *(f"{k}={parts[k]}" for k in PARTITION_KEYS), run_file_name(run_id))


def _write_stream(reader: pa.RecordBatchReader, uri: str) -> int:
    """Stream `reader` into one Parquet file at `uri` (local: written aside, then renamed). Rows."""
    fs, path = resolve(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.{os.getpid()}.tmp" if local else path
    if local:  # object stores have no directories to make (nor markers)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    rows = 0
    with fs.open_output_stream(target) as sink, pq.ParquetWriter(sink, reader.schema, **_PARQUET) as w:
        for batch in reader:
            w.write_batch(batch)
            rows += batch.num_rows
    if local:
        fs.move(target, path)
    return rows


def manifest_uri(dataset: str, run_id: str) -> str:
    return join(dataset, MANIFEST_DIR, f"{partition_value(run_id)}.json")


def read_manifest(dataset: str, run_id: str) -> dict[str, Any] | None:
    """A run's manifest (None when the run was never committed)."""
    fs, path = resolve(manifest_uri(dataset, run_id))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _commit(dataset: str, group: RunGroup, result: TaskResult) -> None:
    """Write the run's manifest (its commit marker) and delete files an earlier analysis of the run
    wrote elsewhere (a run whose partition values changed)."""
    previous = read_manifest(dataset, group.run_id)
    manifest = {
        "dataset_version": DATASET_VERSION,
        "run_id": group.run_id,
        "inputs": group.input_keys(),
        # Relative to the dataset root, so a copied or moved dataset still reads.
        "outputs": [_relative(dataset, o) for o in result.outputs],
        "rows": result.rows,
        "file_errors": result.errors,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    fs, path = resolve(manifest_uri(dataset, group.run_id))
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    now = set(manifest["outputs"])
    for old in (previous or {}).get("outputs", []):
        if old not in now:
            ofs, opath = resolve(join(dataset, old))
            with contextlib.suppress(FileNotFoundError, OSError):
                ofs.delete_file(opath)


def _relative(dataset: str, uri: str) -> str:
    root = dataset.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def result_dict(result: TaskResult) -> dict[str, Any]:
    return asdict(result)
