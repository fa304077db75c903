"""The analysis facade: loaded traces + specs + options -> per-step metrics and metrics.json.

Per-step costs are computed once per (steps file, model spec) on flat buffers and cached as
Parquet; every aggregate is then a DuckDB query over the `step_metrics` view, so windows, phases
and GPU re-targeting are cheap and memory stays bounded for huge traces.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
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
    CostModel,
    cost_model,
    step_costs_from_sums,
    sum_kv,
    sum_pairs,
    sum_windows,
)
from .parquet_writer import BackgroundParquetWriter
from .specs import GpuSpec, ModelSpec, model_spec_from_config, resolve_gpu

METRICS_SCHEMA = "moecap.metrics/1"
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
class Options:
    """What the user chose. gpu: re-analyse as this GPU (default: the trace's). window: steady |
    all | steps:A-B | time:A-B (seconds from the run's first step)."""

    gpu: str | None = None
    gpu_overrides: str | None = None
    window: str = "steady"
    steady_fraction: float = 0.9
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    model_config: dict[str, Any] | None = None
    num_gpus: int | None = None


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
    return RunContext(run, spec, spec_error, gpu, gpu_error, num_gpus, peak_dtype, warnings)


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
        rescanned = step_request_sums(f.path, windows)
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
        gap = np.maximum(next_span_start - end, 0) / 1e9
        cols["host_gap_s"] = pa.array(gap)
        cols["wall_s"] = pa.array(cols.pop("_busy") + gap)
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
    model: CostModel,
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
        g0 = batch.column("gpu_start_ns").to_numpy(zero_copy_only=False)
        g1 = batch.column("gpu_end_ns").to_numpy(zero_copy_only=False)
        g0f = np.asarray(g0, dtype=np.float64)
        g1f = np.asarray(g1, dtype=np.float64)
        has_gpu = ~(np.isnan(g0f) | np.isnan(g1f))
        busy = np.where(has_gpu, (g1f - g0f) / 1e9, (t_end - t_start) / 1e9)
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


def define_step_metrics_view(db: TraceDB, contexts: list[RunContext]) -> None:
    """`step_metrics`: per-step costs + per-step S-MBU / S-MFU on each run's (re-targeted) GPU."""
    parts = []
    for ctx in contexts:
        files = step_metrics_files(db, ctx)
        ctx.step_files = files if ctx.gpu is not None else []
        if not files or ctx.gpu is None:
            continue
        bw = ctx.gpu.memory_bandwidth
        peak = ctx.gpu.peak_flops(ctx.peak_dtype, fallback="bf16")
        listing = ", ".join("'" + p.replace("'", "''") + "'" for p in files)
        parts.append(
            f"""SELECT s.*,
                   bytes_total / ({bw!r}::DOUBLE * time_s * gpus) AS smbu,
                   flops_total / ({peak!r}::DOUBLE * time_s * gpus) AS smfu,
                   {bw!r}::DOUBLE AS gpu_bandwidth, {peak!r}::DOUBLE AS gpu_peak_flops
            FROM read_parquet([{listing}]) s"""
        )
    if parts:
        body = " UNION ALL ".join(parts)
        db.con.execute(
            f"""CREATE OR REPLACE VIEW step_metrics AS
            SELECT * FROM ({body})"""
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
    *((c, "DOUBLE") for c in ("host_gap_s", "wall_s", "smbu", "smfu", "gpu_bandwidth", "gpu_peak_flops")),
)


# -- windows --------------------------------------------------------------------------------------
_WINDOW = re.compile(r"^(all|steady|steps:(\d+)-(\d+)|time:([\d.]+)-([\d.]+))$")


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


def window_predicate(db: TraceDB, ctx: RunContext, options: Options) -> tuple[str, dict[str, Any]]:
    """SQL predicate over step_metrics selecting the window, and its description."""
    m = _WINDOW.match(options.window)
    if not m:
        raise InputError(
            f"--window {options.window!r}: expected steady, all, steps:A-B or time:A-B (seconds)"
        )
    rid = ctx.run.run_id.replace("'", "''")
    if options.window == "all":
        return "TRUE", {"kind": "all", "description": "every recorded step"}
    if m.group(2) is not None:
        a, b = int(m.group(2)), int(m.group(3))
        return f"step BETWEEN {a} AND {b}", {"kind": "steps", "first_step": a, "last_step": b}
    if m.group(4) is not None:
        start_s, end_s = float(m.group(4)), float(m.group(5))
        t0 = (
            db.con.execute(f"SELECT min(t_start_ns) FROM step_metrics WHERE run_id = '{rid}'").fetchall()[0][
                0
            ]
            or 0
        )
        return (
            f"t_start_ns BETWEEN {t0 + int(start_s * 1e9)} AND {t0 + int(end_s * 1e9)}",
            {"kind": "time", "start_s": start_s, "end_s": end_s},
        )
    target = target_concurrency(ctx.run)
    if not target:
        return "TRUE", {
            "kind": "all",
            "description": "steady state asked, but the trace states no target concurrency",
        }
    threshold = math.ceil(options.steady_fraction * int(target))
    n = db.con.execute(
        f"SELECT count(*) FROM step_metrics WHERE run_id = '{rid}' AND num_reqs >= {threshold} AND NOT is_draft"
    ).fetchall()[0][0]
    if not n:
        return "TRUE", {
            "kind": "all",
            "description": f"no step reached {threshold} requests ({options.steady_fraction:.0%} of batch size {target}); every step used",
        }
    return f"num_reqs >= {threshold}", {
        "kind": "steady",
        "description": f"steps with >= {threshold} requests ({options.steady_fraction:.0%} of target concurrency {target})",
        "min_requests": threshold,
    }


# -- aggregation ----------------------------------------------------------------------------------
def step_aggregates(db: TraceDB, ctx: RunContext, where: str) -> dict[str, Any]:
    """Per phase and overall: ratio-of-sums S-MBU/S-MFU over GPU time, distributions, throughput."""
    rid = ctx.run.run_id.replace("'", "''")
    last_pp = max(0, ctx.run.metadata.parallelism.pp - 1)
    selection = f"run_id = '{rid}' AND NOT is_draft AND ({where}) AND time_s > 0"
    rows = db.con.execute(
        f"""
        SELECT coalesce(phase, 'all') AS phase,
               -- Pipeline stages each record the same engine step: count steps and tokens on the first
               -- stage, logit rows on the last; bytes, FLOPs and GPU time sum over every stage.
               count(*) FILTER (WHERE pp = 0) AS steps, sum(num_tokens) FILTER (WHERE pp = 0) AS tokens,
               sum(logit_rows) FILTER (WHERE pp = {last_pp}) AS logit_rows,
               sum(bytes_total) AS bytes, sum(flops_total) AS flops,
               sum(bytes_routed_experts) AS bytes_routed, sum(bytes_kv_read) AS bytes_kv_read,
               sum(time_s * gpus) AS gpu_seconds, sum(time_s) AS busy_s, sum(wall_s) AS wall_s,
               sum(host_gap_s) AS host_gap_s,
               min(t_start_ns) AS t0, max(t_end_ns) AS t1,
               sum(bytes_total) / (any_value(gpu_bandwidth) * sum(time_s * gpus)) AS smbu,
               sum(flops_total) / (any_value(gpu_peak_flops) * sum(time_s * gpus)) AS smfu,
               avg(time_s) AS time_mean,
               sum(active_experts) / count(*) FILTER (WHERE pp = 0) AS active_experts_mean,
               avg(num_reqs) FILTER (WHERE pp = 0) AS batch_mean,
               count(*) FILTER (WHERE time_s <= 0) AS zero_time_steps,
               count(*) FILTER (WHERE isnan(active_experts)) AS steps_without_counts
        FROM step_metrics WHERE {selection}
        GROUP BY ROLLUP (phase) ORDER BY phase NULLS LAST
        """
    ).fetchall()
    names = [d[0] for d in db.con.description]
    # Exact quantiles keep every value of their column in memory: one column per query, so the peak
    # is one column's values (per grouping set), not three columns' beside the other aggregates.
    quantiles: dict[str, dict[str, Any]] = {}
    for column, key in (("smbu", "smbu_q"), ("smfu", "smfu_q"), ("time_s", "time_q")):
        for phase, q in db.con.execute(
            f"""SELECT coalesce(phase, 'all'), quantile_cont({column}, [0.5, 0.9, 0.99])
                FROM step_metrics WHERE {selection} GROUP BY ROLLUP (phase)"""
        ).fetchall():
            quantiles.setdefault(phase, {})[key] = q
    out: dict[str, Any] = {}
    for row in rows:
        r = dict(zip(names, row, strict=True))
        r.update(quantiles.get(r["phase"], {}))
        if not r["steps"]:
            continue  # ROLLUP's grand total over an empty window
        wall = (r["t1"] - r["t0"]) / 1e9 if r["t1"] is not None else None
        smbu = None if r["steps_without_counts"] else _num(r["smbu"])
        out[r["phase"]] = {
            "steps": r["steps"],
            "tokens": r["tokens"],
            "output_tokens": _num(r["logit_rows"]),
            "s_mbu": smbu,
            "s_mfu": _num(r["smfu"]),
            "s_mbu_p50_p90_p99": None if smbu is None else [_num(x) for x in r["smbu_q"]],
            "s_mfu_p50_p90_p99": [_num(x) for x in r["smfu_q"]],
            "step_time_s_mean": _num(r["time_mean"]),
            "step_time_s_p50_p90_p99": [_num(x) for x in r["time_q"]],
            "bytes_total": _num(r["bytes"]),
            "bytes_routed_experts": _num(r["bytes_routed"]),
            "bytes_kv_read": _num(r["bytes_kv_read"]),
            "flops_total": _num(r["flops"]),
            "gpu_seconds": _num(r["gpu_seconds"]),
            "gpu_busy_s": _num(r["busy_s"]),
            "host_gap_s": _num(r["host_gap_s"]),
            "wall_s": wall,
            "gpu_busy_fraction": _num(r["busy_s"] / r["wall_s"]) if r["wall_s"] else None,
            "activated_experts_per_step_mean": _num(r["active_experts_mean"]),
            "activated_experts_per_layer_mean": _num(
                r["active_experts_mean"] / max(1, ctx.spec.num_moe_layers)
            )
            if ctx.spec and r["active_experts_mean"] is not None
            else None,
            "batch_size_mean": _num(r["batch_mean"]),
        }
        if r["phase"] == "all" and wall:
            out["all"]["throughput_tokens_per_s"] = r["tokens"] / wall
            out["all"]["throughput_output_tokens_per_s"] = (r["logit_rows"] or 0) / wall
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def asdict_safe(obj: Any) -> Any:
    return asdict(obj)
