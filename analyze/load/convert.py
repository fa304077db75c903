"""Conversion: one streaming pass per trace file, Arrow record batches -> cached Parquet.

Per table kind: plain tables (requests, outputs, gpu_samples) are copied with their identity columns
in front; a steps file's scalar columns are cached with per-step sums over its request lists (the
request lists themselves on first use, `cache_request_lists`); an experts file's counts are
summarised per step and totalled per (phase, layer, expert) (`expert_pass`), the raw counts cached
unless the caller needs none. The per-batch sums are `Reducers`, the metric layer's functions handed
in by `load_traces`: this module computes no metric itself. Rows with impossible values are left
out (`validity.RowFilter`), and what the scan found is kept beside the Parquet (`<key>.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moecap.schemas import PHASES, SCHEMA_VERSION, TABLES, RunMetadata, TraceError, scan_trace_file

from ..errors import SpecError
from ..parquet_writer import BackgroundParquetWriter
from ..validity import RowFilter
from .cache import STEP_SCALARS_OPTIONS, ParquetSink, cache_key, identity_of, identity_schema, with_identity
from .expert_pass import ExpertSummary, StepStatistics
from .runs import LoadedFile

SLICE_ROWS = 8192
"""Expert-count rows summarised at a time: bounds memory whatever the writer's batch size."""

SCALAR_ROWS = 1 << 16
"""Steps whose cached scalars are written together (one Parquet row group): a collector's batches
of a few hundred steps each cost a row group's fixed encoding work otherwise."""

RequestSums = Callable[[pa.RecordBatch, Iterable[int]], dict[str, pa.Array]]
"""(steps batch, attention windows) -> per-step sums over each step's request lists, by column name."""


@dataclass(frozen=True)
class Reducers:
    """The per-batch reductions the conversion runs (formulas of `moecap.analyze.metrics`)."""

    request_sums: RequestSums
    """Per-step sums over the request lists (`metrics.step_costs.request_sums`)."""
    step_statistics: StepStatistics
    """Per-step expert statistics (`metrics.experts.step_statistics`)."""


def _write_raw_counts(
    path: Path, identity: dict[str, Any], cache: Path, key: str, drop_steps: np.ndarray | None = None
) -> Path:
    """Cache a trace's raw expert counts (for the experts / expert_tokens views) in a second pass,
    leaving out the rows the first pass left out."""
    sink = ParquetSink(cache / f"{key}.experts.parquet")
    rows = RowFilter("experts", drop_steps)
    scan = scan_trace_file(path, lambda batch: sink.write(with_identity(rows.apply(batch), identity)))
    return sink.close(identity_schema(scan.schema))


def check_batch_nulls(path: Path, kind: str, batch: pa.RecordBatch) -> None:
    for c in TABLES[kind]:
        if not c.nullable and batch.column(c.name).null_count:
            raise TraceError(f"{path}: column {kind}.{c.name} holds nulls but is not nullable")


def _convert_plain(
    path: Path, kind: str, identity: dict[str, Any], cache: Path, key: str, rows: RowFilter | None = None
):
    sink = ParquetSink(cache / f"{key}.{kind}.parquet")
    rows = rows or RowFilter(kind)

    def on_batch(batch: pa.RecordBatch) -> None:
        check_batch_nulls(path, kind, batch)
        sink.write(with_identity(rows.apply(batch), identity))

    scan = scan_trace_file(path, on_batch)
    out = sink.close(identity_schema(scan.schema))
    return {kind: out}, scan


def _list_columns(kind: str) -> list[str]:
    return [c.name for c in TABLES[kind] if pa.types.is_list(c.type)]


def _sum_windows(run: RunMetadata) -> set[int]:
    """Attention windows of the trace's embedded model config (0 = full attention): the windows whose
    request sums are cached with the steps. A spec given later with other windows rescans the trace."""
    from ..specs import model_spec_from_config

    try:
        spec = model_spec_from_config(run.model.config) if run.model.config else None
    except (SpecError, KeyError, TypeError, ValueError):
        spec = None
    return {0} | ({int(w or 0) for w in spec.attention_windows} if spec else set())


def step_request_sums(path: Path, windows: Iterable[int], request_sums: RequestSums) -> pa.Table:
    """(step, `request_sums` per `windows`) of every row of a steps trace file, in file order: one
    streaming pass, for a spec whose windows the cache does not hold."""
    parts: list[pa.Table] = []
    rows = RowFilter("steps")  # the rows the cache holds

    def on_batch(batch: pa.RecordBatch) -> None:
        check_batch_nulls(path, "steps", batch)
        batch = rows.apply(batch)
        sums = request_sums(batch, windows)
        parts.append(pa.table({"step": batch.column("step"), **sums}))

    scan_trace_file(path, on_batch)
    if not parts:
        return pa.table({"step": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def _convert_steps(
    path: Path,
    run: RunMetadata,
    identity: dict[str, Any],
    cache: Path,
    key: str,
    rows: RowFilter,
    request_sums: RequestSums,
):
    """One pass: scalar columns + per-step request sums -> `<key>.step_scalars.parquet` (written on
    a second thread while the scan computes the next batch's sums); `rows` leaves rows out."""
    target = cache / f"{key}.step_scalars.parquet"
    sink = BackgroundParquetWriter(target.with_suffix(".tmp"), **STEP_SCALARS_OPTIONS)
    lists = set(_list_columns("steps"))
    windows = _sum_windows(run)
    held: list[pa.RecordBatch] = []
    held_rows = 0

    def flush() -> None:
        nonlocal held, held_rows
        if held:
            sink.write(with_identity(pa.Table.from_batches(held), identity))
        held, held_rows = [], 0

    def on_batch(batch: pa.RecordBatch) -> None:
        nonlocal held_rows
        check_batch_nulls(path, "steps", batch)
        try:
            batch = rows.apply(batch)
            sums = request_sums(batch, windows)
        except ValueError as exc:  # lists of one step that do not line up: the file is unusable
            raise TraceError(f"{path}: {exc}") from None
        keep = [i for i, name in enumerate(batch.schema.names) if name not in lists]
        scalars = pa.RecordBatch.from_arrays(
            [batch.column(i) for i in keep] + list(sums.values()),
            names=[batch.schema.names[i] for i in keep] + list(sums),
        )
        if held and not scalars.schema.equals(held[0].schema):
            flush()  # (a schema change mid-file: the writer reports it, as for one batch)
        held.append(scalars)
        held_rows += scalars.num_rows
        if held_rows >= SCALAR_ROWS:
            flush()

    try:
        scan = scan_trace_file(path, on_batch)
        flush()
    except BaseException:
        sink.abort()
        raise
    empty = pa.schema([f for f in scan.schema if f.name not in lists])
    empty_sums = request_sums(_empty_steps_batch(), windows)
    empty = pa.schema([*empty, *(pa.field(k, v.type) for k, v in empty_sums.items())])
    sink.close(identity_schema(empty))
    os.replace(sink.path, target)
    return {"step_scalars": target}, scan


def _empty_steps_batch() -> pa.RecordBatch:
    schema = pa.schema([pa.field(c.name, c.type) for c in TABLES["steps"]])
    return pa.RecordBatch.from_pylist([], schema=schema)


def cache_request_lists(f: LoadedFile, cache: Path) -> None:
    """Cache a steps file's full table (request lists included) as `<key>.steps.parquet`: a second
    streaming pass over the trace, on first use of the `steps` view."""
    expected = cache_key(f.path, SCHEMA_VERSION)
    if expected != f.cache_key:
        raise TraceError(f"{f.path}: changed since it was loaded; load it again")
    out, _ = _convert_plain(f.path, "steps", identity_of(f.run), cache, f.cache_key)
    f.parquet["steps"] = out["steps"]
    info_path = cache / f"{f.cache_key}.json"
    try:
        info = json.loads(info_path.read_text())
        info["parquet"]["steps"] = out["steps"].name
        info_path.write_text(json.dumps(info))
    except (OSError, ValueError, KeyError):
        pass  # the next load rebuilds the entry


def read_phase_map(steps_parquet: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted step keys, phase index into PHASES) of a cached steps file."""
    t = pq.read_table(steps_parquet, columns=["step", "phase"])
    steps = np.asarray(t.column("step"))
    encoded = t.column("phase").combine_chunks().dictionary_encode()
    lookup = np.array(
        [PHASES.index(p) if p in PHASES else 0 for p in encoded.dictionary.to_pylist()], dtype=np.int8
    )
    phases = lookup[np.asarray(encoded.indices)] if len(lookup) else np.zeros(len(steps), np.int8)
    order = np.argsort(steps, kind="stable")
    return steps[order], phases[order]


def load_file(
    path: Path,
    kind: str,
    run: RunMetadata,
    cache: Path,
    rank_steps: dict[tuple[str, str], LoadedFile],
    reducers: Reducers,
    expert_counts: bool = True,
) -> LoadedFile:
    """Convert one trace file into the cache (or find it there), running `reducers` on its batches. `rank_steps` maps a rank to its
    steps file (filled by steps files, read by experts files: the steps' phases split the expert
    totals, and the steps it left out take their expert counts with them)."""
    rank_key = (run.run_id, run.rank.tag())
    extra = ""
    drop_steps = None
    if kind == "experts":
        steps_file = rank_steps.get(rank_key)
        # The phases (and left-out steps) come from the rank's steps file: its cache entry is in the key.
        extra = f"with-phases-{steps_file.cache_key}" if steps_file is not None else "no-phases"
        if steps_file is not None and steps_file.excluded_steps:
            drop_steps = np.asarray(steps_file.excluded_steps, dtype=np.int64)
            extra += "|drop-" + hashlib.sha1(drop_steps.tobytes()).hexdigest()[:16]
    key = cache_key(path, SCHEMA_VERSION, extra)
    info_path = cache / f"{key}.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
            parquet = {k: cache / v for k, v in info["parquet"].items()}
            if all(p.exists() for p in parquet.values()):
                if kind == "experts" and expert_counts and "experts" not in parquet:
                    parquet["experts"] = _write_raw_counts(path, identity_of(run), cache, key, drop_steps)
                    info["parquet"]["experts"] = parquet["experts"].name
                    info_path.write_text(json.dumps(info))
                loaded = LoadedFile(
                    path=path,
                    table_kind=kind,
                    run=run,
                    rows=info["rows"],
                    complete=info["complete"],
                    lost_bytes=info["lost_bytes"],
                    rows_dropped=info["rows_dropped"],
                    parquet=parquet,
                    warnings=info["warnings"],
                    from_cache=True,
                    cache_key=key,
                    left_out=info["left_out"],
                    excluded_steps=info["excluded_steps"],
                    corrupt_batches=info.get("corrupt_batches", 0),
                )
                if kind == "steps":
                    _note_steps_file(loaded, rank_key, rank_steps)
                return loaded
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt
    identity = identity_of(run)
    rows = RowFilter(kind, drop_steps)
    if kind == "experts":
        steps_file = rank_steps.get(rank_key)
        phase_map = read_phase_map(steps_file.parquet["step_scalars"]) if steps_file is not None else None
        parquet, scan = _convert_experts(
            path,
            run,
            identity,
            cache,
            key,
            phase_map,
            reducers.step_statistics,
            write_raw=expert_counts,
            rows=rows,
        )
    elif kind == "steps":
        parquet, scan = _convert_steps(path, run, identity, cache, key, rows, reducers.request_sums)
    else:
        parquet, scan = _convert_plain(path, kind, identity, cache, key, rows)
    info = {
        "rows": scan.rows,
        "complete": scan.complete,
        "lost_bytes": scan.lost_bytes,
        "rows_dropped": scan.rows_dropped,
        "warnings": scan.warnings,
        "parquet": {k: v.name for k, v in parquet.items()},
        "left_out": rows.findings(str(path)),
        "excluded_steps": rows.excluded_steps,
        "corrupt_batches": scan.corrupt_batches,
    }
    info_path.write_text(json.dumps(info))
    loaded = LoadedFile(
        path=path,
        table_kind=kind,
        run=run,
        rows=scan.rows,
        complete=scan.complete,
        lost_bytes=scan.lost_bytes,
        rows_dropped=scan.rows_dropped,
        parquet=parquet,
        warnings=list(scan.warnings),
        cache_key=key,
        left_out=info["left_out"],
        excluded_steps=rows.excluded_steps,
        corrupt_batches=scan.corrupt_batches,
    )
    if kind == "steps":
        _note_steps_file(loaded, rank_key, rank_steps)
    return loaded


def _note_steps_file(
    f: LoadedFile, rank_key: tuple[str, str], rank_steps: dict[tuple[str, str], LoadedFile]
) -> None:
    """Make `f` its rank's steps file for the experts files converted after it (their phases and
    left-out steps), unless an earlier one of the rank is preferred: complete, then more rows, then
    first by path (`ranks.drop_duplicate_files` keeps the same one of several copies)."""
    best = rank_steps.get(rank_key)
    if best is None or (f.complete, f.rows) > (best.complete, best.rows):
        rank_steps[rank_key] = f


def _convert_experts(
    path: Path,
    run: RunMetadata,
    identity: dict[str, Any],
    cache: Path,
    key: str,
    phase_map: tuple[np.ndarray, np.ndarray] | None,
    step_statistics: StepStatistics,
    *,
    write_raw: bool = True,
    rows: RowFilter | None = None,
):
    rows = rows or RowFilter("experts")
    experts_sink = ParquetSink(cache / f"{key}.experts.parquet") if write_raw else None
    n_experts = max(1, int(run.moe.num_experts))
    layer_ids = np.asarray(file_layer_ids(run), dtype=np.int32)
    n_layers = len(layer_ids)
    summary = ExpertSummary(
        identity, layer_ids, n_experts, phase_map, cache / f"{key}.expert_step_stats.parquet", step_statistics
    )

    def on_batch(batch: pa.RecordBatch) -> None:
        check_batch_nulls(path, "experts", batch)
        batch = rows.apply(batch)
        counts_col = batch.column("counts")
        lengths = pc.list_value_length(counts_col).to_numpy(zero_copy_only=False)
        width = n_layers * n_experts
        if n_layers and np.any(lengths != width):
            bad = int(lengths[lengths != width][0])
            raise TraceError(
                f"{path}: experts.counts has {bad} values in a row, expected {n_layers} MoE layers x "
                f"{n_experts} experts = {width} (run.moe.layer_ids / num_experts)"
            )
        if experts_sink is not None:
            experts_sink.write(with_identity(batch, identity))
        if not n_layers or batch.num_rows == 0:
            return
        # Slices bound memory whatever the writer's batch size; counts stay int32 (no widening copy).
        for start in range(0, batch.num_rows, SLICE_ROWS):
            part = batch.slice(start, SLICE_ROWS)
            flat = np.asarray(pc.list_flatten(part.column("counts")))
            summary.add(np.asarray(part.column("step")), flat.reshape(part.num_rows, n_layers, n_experts))

    scan = scan_trace_file(path, on_batch)
    out = summary.close(cache / f"{key}.expert_totals.parquet")
    if experts_sink is not None:
        out["experts"] = experts_sink.close(identity_schema(scan.schema))
    return out, scan


def file_layer_ids(run: RunMetadata) -> list[int]:
    """Decoder-layer ids of the MoE layers this file counts (its rank's layer range)."""
    start = run.rank.layer_start
    end = run.rank.layer_end if run.rank.layer_end is not None else 1 << 30
    return [lid for lid in run.moe.layer_ids if start <= lid < end]
