"""The analysis facade: loaded traces + specs + options -> per-step metrics and metrics.json.

Per-step costs are computed once per (steps file, model spec) on flat buffers and cached as
Parquet; every aggregate is then a DuckDB query over the `step_metrics` view, so windows, phases
and GPU re-targeting are cheap and memory stays bounded for huge traces.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moecap.schemas import is_driver_side

from .errors import InputError, SpecError
from .load import LoadedFile, LoadedRun, TraceDB, step_request_sums
from .metrics.step_costs import (
    SUM_LOGITS,
    SUM_NEW,
    StepCostModel,
    cost_model,
    request_sums,
    step_costs_from_sums,
    sum_kv,
    sum_pairs,
    sum_windows,
)
from .metrics.steps import (
    STEP_SMBU_SQL,
    STEP_SMFU_SQL,
    WINDOW_STEPS_SQL,
    host_gap_and_wall_s,
    quantile_rows,
    step_time_s,
    summary_rows,
)
from .metrics.window import RUN_WINDOWS_COLUMNS, Window, WindowSpec, resolve_window
from .parquet_writer import BackgroundParquetWriter
from .settings import METRICS_SCHEMA, Options, Settings  # noqa: F401 (the names this module used to define)
from .specs import GpuSpec, ModelSpec, model_spec_from_config, resolve_gpu

_STEP_COLUMNS = [
    "step",
    "t_start_ns",
    "t_end_ns",
    "gpu_start_ns",
    "gpu_end_ns",
    "phase",
    "is_draft",
    "num_reqs",
    "num_tokens",
]


@dataclass
class RunContext:
    """A run with its resolved model and GPU specs."""

    run: LoadedRun
    spec: ModelSpec | None
    spec_error: str | None
    gpu: GpuSpec | None
    gpu_error: str | None
    num_gpus: int
    peak_dtype: str
    warnings: list[str] = field(default_factory=list)
    step_files: list[str] = field(default_factory=list)
    """Cached step_metrics Parquet of the run (set by define_step_metrics_view)."""
    retargeted: bool = False
    """Analysed as another GPU than the trace's (`--gpu`)."""


def resolve_context(run: LoadedRun, options: Options) -> RunContext:
    """Model spec from the embedded config.json, GPU spec from the trace (or --gpu)."""
    md = run.metadata
    warnings: list[str] = []
    spec = None
    spec_error = None
    config = options.model_config or md.model.config
    try:
        if not config:
            raise SpecError(f"run {run.run_id}: the trace embeds no model config.json; pass --model-config")
        spec = model_spec_from_config(config)
    except SpecError as exc:
        spec_error = str(exc)
    gpu = None
    gpu_error = None
    gpu_name = options.gpu or (md.gpus[0].name if md.gpus else None)
    try:
        if not gpu_name:
            raise SpecError("the trace names no GPU (a CPU run?)")
        gpu = resolve_gpu(gpu_name, overrides_yaml=options.gpu_overrides)
    except SpecError as exc:
        if options.gpu:
            raise  # the user named it: an error, not a warning
        gpu_error = f"{exc}; pass --gpu to analyse as a known GPU"
    uuids = {g.uuid for f in run.files for g in f.run.gpus if g.uuid} | {
        u for f in run.files for u in f.run.rank.gpu_uuids if u
    }
    num_gpus = options.num_gpus or len(uuids) or len(md.gpus) or 1
    peak_dtype = spec.activation_dtype("routed_expert") if spec else "bf16"
    return RunContext(
        run,
        spec,
        spec_error,
        gpu,
        gpu_error,
        num_gpus,
        peak_dtype,
        warnings,
        retargeted=options.gpu is not None,
    )


# -- per-step metrics -----------------------------------------------------------------------------
def _gpus_per_file(f: LoadedFile, ctx: RunContext) -> int:
    """GPUs a recording file's steps stand for: its rank's listed GPUs, else its stage's TP ranks."""
    if f.run.rank.gpu_uuids:
        return len(f.run.rank.gpu_uuids)
    return max(1, f.run.parallelism.tp) if ctx.num_gpus > 1 else 1


def _spec_key(ctx: RunContext, f: LoadedFile) -> str:
    """What a steps file's cached step metrics depend on besides the file: the spec, its layers, and
    the counts whose activated experts they use (an experts file or a sum over ranks: its cache key)."""
    assert ctx.spec is not None
    counts = ctx.run.counting_file_for(f)
    raw = json.dumps(
        [
            repr(ctx.spec),
            f.run.rank.layer_start,
            f.run.rank.layer_end,
            f.run.model.kv_bytes_per_token_per_layer,
            counts.cache_key if counts is not None else None,
            "v5",
        ],
        default=str,
    )
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def step_metrics_files(db: TraceDB, ctx: RunContext) -> list[str]:
    """Cached Parquet of per-step costs for the run's recording files (computed when missing)."""
    out: list[str] = []
    if ctx.spec is None:
        return out
    for f in ctx.run.recording_files:
        if f.rows == 0:
            ctx.warnings.append(f"{f.path.name}: the steps file holds no rows; no step metrics from it")
            continue
        steps_parquet = f.parquet["step_scalars"]
        target = steps_parquet.with_name(
            steps_parquet.name.replace(".step_scalars.parquet", f".step_metrics.{_spec_key(ctx, f)}.parquet")
        )
        if not target.exists():
            _compute_step_metrics(ctx, f, target)
        out.append(str(target))
    return out


def _active_experts_for(ctx: RunContext, f: LoadedFile) -> tuple[np.ndarray, np.ndarray] | None:
    counts = ctx.run.counting_file_for(f)
    if counts is None or not f.run.moe.counts_available:
        return None
    t = pq.read_table(counts.parquet["expert_step_stats"], columns=["step", "active_experts"])
    steps = t.column("step").to_numpy()
    order = np.argsort(steps, kind="stable")
    return steps[order], t.column("active_experts").to_numpy()[order].astype(np.float64)


_TIME_SOURCES = pa.array(["host", "gpu"])
# Columns the cache is written with dictionaries (the repeated strings; read back as dictionaries, so
# neither side hashes a string per row) and with statistics (the columns queries filter on).
_DICT_COLUMNS = ["run_id", "phase", "time_source"]
_DELTA_COLUMNS = ["step", "t_start_ns", "t_end_ns", "span_start_ns", "span_end_ns"]
_STAT_COLUMNS = [
    "run_id",
    "dp",
    "pp",
    "tp",
    "ep",
    "step",
    "phase",
    "is_draft",
    "num_reqs",
    "t_start_ns",
    "time_s",
]


def _compute_step_metrics(ctx: RunContext, f: LoadedFile, target: Path) -> None:
    assert ctx.spec is not None
    model = cost_model(
        ctx.spec,
        layer_start=f.run.rank.layer_start,
        layer_end=f.run.rank.layer_end,
        kv_bytes_per_token_per_layer=f.run.model.kv_bytes_per_token_per_layer,
    )
    active = _active_experts_for(ctx, f)
    gpus = _gpus_per_file(f, ctx)
    # The repeated strings are cached with dictionaries: read as dictionary arrays, they are
    # written back as such (no string copied or hashed per row).
    pf = pq.ParquetFile(f.parquet["step_scalars"], read_dictionary=["run_id", "phase"])
    windows = set(model.kv_bytes_by_window)
    sum_columns = [
        SUM_NEW,
        SUM_LOGITS,
        *(c for w in sorted(windows | {0}) for c in (sum_kv(w), sum_pairs(w))),
    ]
    # The cache holds the request sums for the trace's own attention windows; a spec with others
    # (--model-config) gets them from one more streaming pass over the trace.
    rescanned = None
    if not windows <= sum_windows(pf.schema_arrow.names):
        rescanned = step_request_sums(f.path, windows, request_sums)
        sum_columns = [c for c in sum_columns if c in rescanned.column_names]
    read_columns = ["run_id", "dp", "pp", "tp", "ep", *_STEP_COLUMNS]
    if rescanned is None:
        read_columns += sum_columns
    tmp = target.with_suffix(".tmp")
    # Written on a second thread while the next batch is computed. The write was this pass's
    # critical path (1e7 steps: 3.3 s with zstd-1 and plain integers, 1.8 s as here, file 335 ->
    # 192 MB): lz4, delta-encoded step / ns columns (monotonic, so tiny deltas), 64k-value write
    # batches. Dictionaries only for the repeated strings: trying them on float columns costs time.
    # No Arrow schema stored: readers see plain strings, as before the columns were dictionary arrays.
    writer = BackgroundParquetWriter(
        tmp,
        compression="lz4",
        use_dictionary=_DICT_COLUMNS,
        column_encoding={c: "DELTA_BINARY_PACKED" for c in _DELTA_COLUMNS},
        write_batch_size=65536,
        write_statistics=_STAT_COLUMNS,
        store_schema=False,
    )

    def flush(cols: dict[str, Any], next_span_start: np.ndarray) -> None:
        cols.pop("_span_start")
        end = cols.pop("_span_end")
        gap, wall = host_gap_and_wall_s(cols.pop("_busy"), end, next_span_start)
        cols["host_gap_s"] = pa.array(gap)
        cols["wall_s"] = pa.array(wall)
        writer.write(pa.table(cols))

    try:
        _step_metric_batches(pf, read_columns, f, sum_columns, rescanned, active, model, gpus, flush)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    os.replace(tmp, target)


_BATCH_ROWS = 262144


def _fixed_batches(pf: pq.ParquetFile, columns: list[str]) -> Iterator[pa.Table]:
    """`pf`'s rows in tables of exactly `_BATCH_ROWS` rows (the last one shorter), zero-copy.

    Dictionary-read columns make `iter_batches` cut its batches at every row group of the cache;
    these tables keep the boundaries of plain `iter_batches(batch_size=_BATCH_ROWS)`. They become
    the step-metrics file's row groups, so DuckDB sums over the same partial sums as before."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        held.append(batch)
        rows += batch.num_rows
        while rows >= _BATCH_ROWS:
            table = pa.Table.from_batches(held)
            yield table.slice(0, _BATCH_ROWS)
            rest = table.slice(_BATCH_ROWS)
            held, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(held)


def _step_metric_batches(
    pf: pq.ParquetFile,
    read_columns: list[str],
    f: LoadedFile,
    sum_columns: list[str],
    rescanned: pa.Table | None,
    active: tuple[np.ndarray, np.ndarray] | None,
    model: StepCostModel,
    gpus: int,
    flush: Callable[[dict[str, Any], np.ndarray], None],
) -> None:
    """Compute the step costs batch by batch and hand each finished table to `flush(cols,
    next_span_start)`; each step's host gap needs the next step's GPU start, so tables are handed
    over one batch late."""
    offset = 0
    pending: dict[str, Any] | None = None
    for batch in _fixed_batches(pf, read_columns):
        steps = batch.column("step").to_numpy()
        if rescanned is None:
            sums = {c: batch.column(c) for c in sum_columns}
        else:
            part = rescanned.slice(offset, batch.num_rows)
            if not np.array_equal(part.column("step").to_numpy(), steps):
                raise InputError(f"{f.path}: the trace no longer matches its cache; load it again")
            sums = {c: part.column(c) for c in sum_columns}
        offset += batch.num_rows
        act = None
        if active is not None:
            keys, values = active
            pos = np.clip(np.searchsorted(keys, steps), 0, max(len(keys) - 1, 0))
            hit = (keys[pos] == steps) if len(keys) else np.zeros(len(steps), bool)
            act = np.where(hit, values[pos] if len(keys) else np.nan, np.nan)
        costs = step_costs_from_sums(
            {"num_tokens": batch.column("num_tokens"), "num_reqs": batch.column("num_reqs"), **sums},
            model,
            act,
        )
        t_start = batch.column("t_start_ns").to_numpy().astype(np.int64)
        t_end = batch.column("t_end_ns").to_numpy().astype(np.int64)
        g0f = np.asarray(batch.column("gpu_start_ns").to_numpy(zero_copy_only=False), dtype=np.float64)
        g1f = np.asarray(batch.column("gpu_end_ns").to_numpy(zero_copy_only=False), dtype=np.float64)
        busy, has_gpu = step_time_s(g0f, g1f, t_start, t_end)
        cols = {
            "run_id": batch.column("run_id"),
            "dp": batch.column("dp"),
            "pp": batch.column("pp"),
            "tp": batch.column("tp"),
            "ep": batch.column("ep"),
            "step": batch.column("step"),
            "phase": batch.column("phase"),
            "is_draft": batch.column("is_draft"),
            "num_reqs": batch.column("num_reqs"),
            "num_tokens": batch.column("num_tokens"),
            "t_start_ns": pa.array(t_start),
            "t_end_ns": pa.array(t_end),
            # The step on the GPU timeline (host times where the engine recorded no GPU span).
            "span_start_ns": pa.array(np.where(has_gpu, g0f, t_start).astype(np.int64)),
            "span_end_ns": pa.array(np.where(has_gpu, g1f, t_end).astype(np.int64)),
            "time_s": pa.array(busy),
            # Indices into two strings (a numpy string array would be built and converted per row).
            "time_source": pa.DictionaryArray.from_arrays(pa.array(has_gpu.view(np.int8)), _TIME_SOURCES),
            "gpus": pa.array(np.full(len(steps), gpus, dtype=np.int32)),
            "active_experts": pa.array(np.full(len(steps), np.nan) if act is None else act),
        }
        for k, v in costs.items():
            cols[k] = pa.array(v)
        span_start = np.where(has_gpu, g0f, t_start).astype(np.int64)
        cols["_span_end"] = np.where(has_gpu, g1f, t_end).astype(np.int64)
        cols["_busy"] = busy
        if pending is not None:
            flush(pending, np.append(pending["_span_start"], span_start[:1])[1:])
        cols["_span_start"] = span_start
        pending = cols
    if pending is None:
        raise InputError(f"{f.path}: no steps to analyse")
    # The last step has no next step: no gap.
    last_next = np.append(pending["_span_start"][1:], pending["_span_end"][-1:])
    flush(pending, last_next)


RUN_SETTINGS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR"),
    ("model_id", "VARCHAR"),
    ("gpu", "VARCHAR"),
    ("retargeted", "BOOLEAN"),
    ("batch_size", "INTEGER"),
    ("gpu_bandwidth", "DOUBLE"),
    ("gpu_peak_flops", "DOUBLE"),
    ("peak_dtype", "VARCHAR"),
    ("num_gpus", "INTEGER"),
    ("last_pp", "INTEGER"),
    ("num_moe_layers", "INTEGER"),
)
"""`run_settings`: per run, the constants the step views read (bound as parameters, never pasted)."""


def _create_table(
    con: Any, name: str, columns: tuple[tuple[str, str], ...], rows: list[tuple[Any, ...]]
) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {name} (" + ", ".join(f"{c} {t}" for c, t in columns) + ")")
    if rows:
        con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})", rows)


def run_settings_row(ctx: RunContext) -> tuple[Any, ...]:
    """The run's row of `run_settings` (RUN_SETTINGS_COLUMNS order)."""
    bw = ctx.gpu.memory_bandwidth if ctx.gpu is not None else None
    peak = ctx.gpu.peak_flops(ctx.peak_dtype, fallback="bf16") if ctx.gpu is not None else None
    return (
        ctx.run.run_id,
        ctx.run.metadata.model.id,
        ctx.gpu.name if ctx.gpu is not None else None,
        ctx.retargeted,
        target_concurrency(ctx.run),
        bw,
        peak,
        ctx.peak_dtype,
        ctx.num_gpus,
        max(0, ctx.run.metadata.parallelism.pp - 1),
        ctx.spec.num_moe_layers if ctx.spec is not None else None,
    )


def define_step_metrics_view(db: TraceDB, contexts: list[RunContext]) -> None:
    """`step_metrics`: per-step costs + per-step S-MBU / S-MFU on each run's (re-targeted) GPU, and
    the `run_settings` table it reads each run's bandwidth and peak from."""
    files: list[str] = []
    for ctx in contexts:
        mine = step_metrics_files(db, ctx)
        ctx.step_files = mine if ctx.gpu is not None else []
        files += ctx.step_files
    _create_table(db.con, "run_settings", RUN_SETTINGS_COLUMNS, [run_settings_row(c) for c in contexts])
    if files:
        listing = ", ".join("'" + p.replace("'", "''") + "'" for p in files)
        db.con.execute(
            f"""CREATE OR REPLACE VIEW step_metrics AS
            SELECT s.*, {STEP_SMBU_SQL} AS s_mbu, {STEP_SMFU_SQL} AS s_mfu
            FROM (SELECT p.*, r.gpu_bandwidth, r.gpu_peak_flops
                  FROM read_parquet([{listing}]) p JOIN run_settings r USING (run_id)) s"""
        )
    else:
        cols = ", ".join(f"NULL::{t} AS {c}" for c, t in EMPTY_STEP_METRICS_COLUMNS)
        db.con.execute(f"CREATE OR REPLACE VIEW step_metrics AS SELECT {cols} WHERE false")


# The columns of `step_metrics` when no run has step metrics (a trace of driver tables alone): the
# same as a real run's, so every query over the view runs and finds no row (a test keeps them equal).
EMPTY_STEP_METRICS_COLUMNS: tuple[tuple[str, str], ...] = (
    *((c, "VARCHAR" if c == "run_id" else "INTEGER") for c in ("run_id", "dp", "pp", "tp", "ep")),
    ("step", "BIGINT"),
    ("phase", "VARCHAR"),
    ("is_draft", "BOOLEAN"),
    ("num_reqs", "INTEGER"),
    ("num_tokens", "INTEGER"),
    *((c, "BIGINT") for c in ("t_start_ns", "t_end_ns", "span_start_ns", "span_end_ns")),
    ("time_s", "DOUBLE"),
    ("time_source", "VARCHAR"),
    ("gpus", "INTEGER"),
    ("active_experts", "DOUBLE"),
    *(
        (c, "DOUBLE")
        for c in (
            "bytes_weights",
            "bytes_routed_experts",
            "bytes_static_weights",
            "bytes_kv_read",
            "bytes_kv_write",
            "bytes_total",
            "flops_linear",
            "flops_lm_head",
            "flops_attention",
            "flops_total",
            "logit_rows",
        )
    ),
    ("logits_known", "BOOLEAN"),
    ("context_tokens", "DOUBLE"),
    *((c, "DOUBLE") for c in ("host_gap_s", "wall_s", "gpu_bandwidth", "gpu_peak_flops", "s_mbu", "s_mfu")),
)


# -- windows --------------------------------------------------------------------------------------
def target_concurrency(run: LoadedRun) -> int | None:
    """Requests the workload kept in flight: the engine files' workload, else (a server traced by
    `serve`, driven by `moecap-collect drive`) the driver's files' closed-loop concurrency."""
    sources = [run.metadata] + [f.run for f in run.files if is_driver_side(f.run)]
    for meta in sources:
        wl = meta.workload or {}
        target = wl.get("batch_size") or wl.get("concurrency")
        if target:
            return int(target)
    return None


def resolve_run_window(db: TraceDB, ctx: RunContext, spec: WindowSpec) -> Window:
    """The run's window (metrics/window.py) from its steps."""
    rid = ctx.run.run_id
    first = None
    if spec.kind == "time":
        first = db.con.execute("SELECT min(t_start_ns) FROM step_metrics WHERE run_id = ?", [rid]).fetchall()[
            0
        ][0]

    def steps_reaching(threshold: int) -> int:
        return db.con.execute(
            "SELECT count(*) FROM step_metrics WHERE run_id = ? AND num_reqs >= ? AND NOT is_draft",
            [rid, threshold],
        ).fetchall()[0][0]

    return resolve_window(
        spec,
        first_t_start_ns=first,
        target_concurrency=target_concurrency(ctx.run),
        steps_reaching=steps_reaching,
    )


def define_window_views(db: TraceDB, windows: dict[str, Window]) -> None:
    """`run_windows` (one row per run: its resolved window) and `window_steps` (the step_metrics rows
    inside it that every run-level step metric counts)."""
    _create_table(db.con, "run_windows", RUN_WINDOWS_COLUMNS, [w.row(rid) for rid, w in windows.items()])
    db.con.execute(f"CREATE OR REPLACE VIEW window_steps AS {WINDOW_STEPS_SQL}")


# -- aggregation ----------------------------------------------------------------------------------
def step_aggregates(db: TraceDB, run_id: str) -> dict[str, Any]:
    """Per phase and `all`: every step metric of metrics/steps.py over the run's window, plus the
    p50/p90/p99 of per-step S-MBU, S-MFU and step time."""
    source = "(SELECT * FROM window_steps WHERE run_id = ?)"
    out = summary_rows(db.con, source, params=[run_id]).get(run_id, {})
    for column, key in (
        ("s_mbu", "s_mbu_p50_p90_p99"),
        ("s_mfu", "s_mfu_p50_p90_p99"),
        ("time_s", "step_time_s_p50_p90_p99"),
    ):
        q = quantile_rows(db.con, source, f"s.{column}", params=[run_id]).get(run_id, {})
        for phase, values in out.items():
            values[key] = q.get(phase)
    for values in out.values():
        if values["s_mbu"] is None:
            values["s_mbu_p50_p90_p99"] = None
    return out


def asdict_safe(obj: Any) -> Any:
    return asdict(obj)
