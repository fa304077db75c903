"""TraceWriter: crash-safe Arrow IPC stream files, written off the caller's thread.

The caller (an engine's hot path) only appends a row to a list under an uncontended lock. A
background thread turns every `rows_per_batch` rows, or whatever arrived in `flush_interval_s`,
into a zstd-compressed record batch and writes it, so a killed process loses at most the rows not
yet flushed, and a reader recovers every complete batch. Nothing here raises into the caller:
failures are logged, counted and reported by `close()`.

The schema and run metadata are written (with an empty batch) when the file is opened, so a writer
killed before its first flush still leaves a described file. A row with a value its column cannot
hold (a token count >= 2**31 in an int32 column, a null in a required column) costs that row only:
the batch is rebuilt without it, and every dropped row is counted by field and reason in the next
batch's metadata (`moecap.batch` "drops"), or in a final empty batch at close.
Each batch carries a checksum of its logical content (`moecap.checksum`, see integrity.py).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from . import integrity
from .metadata import RunMetadata
from .tables import SCHEMA_VERSION, TABLES, arrow_schema

log = logging.getLogger("moecap.schemas.writer")

_STOP = object()


@dataclass
class WriterStats:
    """What a writer did; returned by `close()` and carried in each batch's metadata."""

    path: str
    rows_written: int = 0
    rows_dropped: int = 0
    batches_written: int = 0
    bytes_written: int = 0
    errors: int = 0
    last_error: str | None = None
    closed: bool = False
    flush_seconds: list[float] = field(default_factory=list, repr=False)
    drops: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    """Dropped rows by cause: "<field>: <reason>" -> {"field", "reason", "rows", "example"}."""


def trace_file_name(run: RunMetadata, table: str) -> str:
    """`<run_id>.<rank tag>.<table>.arrow`; client-side tables carry the tag `client`."""
    tag = "client" if table in ("requests", "outputs") else run.rank.tag()
    return f"{run.run_id}.{tag}.{table}.arrow"


def schema_metadata(run: RunMetadata, table: str) -> dict[str, str]:
    """The schema-level key/values every trace file carries (with a checksum over the others)."""
    run_json = run.to_json()
    value = integrity.header_checksum(SCHEMA_VERSION.encode(), table.encode(), run_json.encode())
    return {
        "moecap.schema_version": SCHEMA_VERSION,
        "moecap.table": table,
        "moecap.run": run_json,
        "moecap.checksum": integrity.format_checksum(integrity.DEFAULT_ALGORITHM, value),
    }


class TraceWriter:
    """Writes rows of one table of one run from one process to `path` (an Arrow IPC stream).

    `write(row)` takes a dict keyed by column name; list columns accept Python lists or numpy arrays.
    Use as a context manager or call `close()`; `close()` flushes, fsyncs and returns `WriterStats`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: str,
        run: RunMetadata,
        *,
        rows_per_batch: int = 256,
        flush_interval_s: float = 2.0,
        max_pending_batches: int = 64,
        compression_level: int = 3,
        blocking: bool = False,
    ) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
        self.path = Path(path)
        self.table = table
        self.schema = arrow_schema(table, schema_metadata(run, table))
        self._columns = TABLES[table]
        self.rows_per_batch = max(1, int(rows_per_batch))
        # Engines never wait on the disk (rows are dropped and counted instead); offline producers
        # (importers, generators) pass blocking=True and wait for the writer thread.
        self.blocking = blocking
        self.flush_interval_s = float(flush_interval_s)
        self.stats = WriterStats(path=str(self.path))
        self._pending: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(max_pending_batches)))
        self._closed = False
        # Open the file now so an unwritable path fails at construction (a user error, raised once,
        # before the engine's hot path), not silently later.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = open(self.path, "wb")  # noqa: SIM115 - closed by the writer thread
        # zstd level 3: ~1.1x larger files than level 9 but 2.5x less writer-thread CPU in the
        # engine's process (benchmarks/writer.py).
        options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=compression_level))
        self._writer = ipc.new_stream(self._sink, self.schema, options=options)
        # pyarrow writes the schema with the first batch: write an empty one now, so the schema and
        # run metadata are on disk even if the process dies before its first flush.
        self._drops_reported = 0
        self._emit(_empty_batch(self.schema))
        self._sink.flush()
        self._thread = threading.Thread(target=self._run, name=f"moecap-writer-{table}", daemon=True)
        self._thread.start()

    # -- caller side: cheap, never raises -------------------------------------------------------
    def write(self, row: Mapping[str, Any]) -> None:
        """Queue one row. Constant, small cost on the caller's thread."""
        try:
            with self._lock:
                if self._closed:
                    self.stats.rows_dropped += 1  # after close: nowhere left to record it
                    return
                self._pending.append(row)
                if len(self._pending) < self.rows_per_batch:
                    return
                rows, self._pending = self._pending, []
            self._hand_over(rows)
        except Exception as exc:  # pragma: no cover - defensive: never raise into the engine
            self._record_error(exc)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Queue a prebuilt record batch of this table's columns (bulk producers, importers)."""
        self.flush()
        self._hand_over(batch)

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue several rows."""
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        """Hand the pending rows to the writer thread now (does not wait for the write)."""
        with self._lock:
            rows, self._pending = self._pending, []
        if rows:
            self._hand_over(rows)

    def _hand_over(self, rows: list[Mapping[str, Any]] | pa.RecordBatch) -> None:
        try:
            if self.blocking:
                self._queue.put(rows)
                return
            self._queue.put_nowait(rows)
        except queue.Full:
            # The disk cannot keep up: drop rather than block the engine, and say so at close.
            if not self.stats.rows_dropped:
                log.warning(
                    "moecap trace writer %s: queue full, dropping rows (counted, reported at close)",
                    self.path,
                )
            self._drop(len(rows), "*", "writer queue full (disk slower than the engine)")

    # -- writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            timeout = max(0.0, self.flush_interval_s - (time.monotonic() - last_flush))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is None:
                with self._lock:
                    item, self._pending = self._pending, []
                last_flush = time.monotonic()
                if not item:
                    continue
            self._write_batch(item)
            last_flush = time.monotonic()
        self._finish()

    def _write_batch(self, rows: list[Mapping[str, Any]] | pa.RecordBatch) -> None:
        t0 = time.perf_counter()
        counted = 0
        try:
            if isinstance(rows, pa.RecordBatch):
                batch, drops = batch_to_table_batch(rows, self.table, self.schema)
            else:
                batch, drops = rows_to_batch_dropping(rows, self.table, self.schema)
            for name, reason, count, example in drops:
                self._drop(count, name, reason, example)
                counted += count
            self._emit(batch)
            self.stats.rows_written += batch.num_rows
        except Exception as exc:
            rest = len(rows) - counted
            self._drop(rest, "*", f"batch not written ({type(exc).__name__})", _short(exc))
            self._record_error(exc)
        self.stats.flush_seconds.append(time.perf_counter() - t0)

    def _emit(self, batch: pa.RecordBatch) -> None:
        """Write one batch with its `moecap.batch` info and checksum, and flush it to the OS."""
        with self._lock:
            dropped = self.stats.rows_dropped
            drops = [dict(d) for d in self.stats.drops.values()]
        info = {
            "seq": self.stats.batches_written,
            "rows": batch.num_rows,
            "rows_dropped_before": dropped,
            "monotonic_ns": time.monotonic_ns(),
            "unix_ns": time.time_ns(),
        }
        if drops:
            info["drops"] = drops
        raw = json.dumps(info, separators=(",", ":")).encode()
        algorithm = integrity.DEFAULT_ALGORITHM
        checksum = integrity.format_checksum(algorithm, integrity.batch_checksum(batch, raw, algorithm))
        self._writer.write_batch(
            batch, custom_metadata={b"moecap.batch": raw, integrity.CHECKSUM_KEY: checksum}
        )
        self._sink.flush()
        self._drops_reported = dropped
        self.stats.batches_written += 1
        self.stats.bytes_written = self._sink.tell()

    def _drop(self, rows: int, column: str, reason: str, example: str | None = None) -> None:
        """Count `rows` dropped rows under (column, reason); "*" = the whole row."""
        key = f"{column}: {reason}"
        with self._lock:
            self.stats.rows_dropped += rows
            entry = self.stats.drops.get(key)
            if entry is None:
                entry = {"field": column, "reason": reason, "rows": 0}
                if example is not None:
                    entry["example"] = example[:200]
                self.stats.drops[key] = entry
            entry["rows"] += rows

    def _finish(self) -> None:
        try:
            with self._lock:
                rows, self._pending = self._pending, []
            if rows:
                self._write_batch(rows)
            if self.stats.rows_dropped != self._drops_reported:
                # An empty batch carries the final drop counts, so a reader can report them.
                self._emit(_empty_batch(self.schema))
            self._writer.close()
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self.stats.bytes_written = self._sink.tell()
        except Exception as exc:
            self._record_error(exc)
        finally:
            self._sink.close()
            self.stats.closed = True

    def _record_error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        log.error("moecap trace writer %s: %s", self.path, self.stats.last_error)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self, timeout_s: float = 60.0) -> WriterStats:
        """Flush everything, fsync and close. Idempotent. Returns the writer's stats."""
        with self._lock:
            already = self._closed
            self._closed = True
            rows, self._pending = self._pending, []
        if not already:
            if rows:
                self._queue.put(rows)
            self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self.stats.rows_dropped or self.stats.errors:
            log.warning(
                "moecap trace writer %s closed: %d rows written, %d dropped (%s), %d errors (last: %s)",
                self.path,
                self.stats.rows_written,
                self.stats.rows_dropped,
                "; ".join(f"{d['rows']} x {key}" for key, d in self.stats.drops.items()) or "-",
                self.stats.errors,
                self.stats.last_error,
            )
        return self.stats

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


def _example(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def rows_to_batch(rows: list[Mapping[str, Any]], table: str, schema: pa.Schema) -> pa.RecordBatch:
    """Build one record batch from row dicts; list columns given as numpy arrays are concatenated
    without a Python loop over their elements. Raises on a value its column cannot hold."""
    arrays = []
    for column in TABLES[table]:
        values = [row.get(column.name) for row in rows]
        arrays.append(_column_array(values, column.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


Drop = tuple[str, str, int, str]
"""(column or "*", reason, rows, example) of rows left out of a batch."""


def rows_to_batch_dropping(
    rows: list[Mapping[str, Any]], table: str, schema: pa.Schema
) -> tuple[pa.RecordBatch, list[Drop]]:
    """`rows_to_batch`, leaving out (and returning as drops) each row with a value its column cannot
    hold or a null in a required column. The normal path is one conversion per column; only a
    failing column is searched for its bad rows (by halving, so a few bad rows cost O(log n)
    conversions each)."""
    columns = TABLES[table]
    try:
        batch = rows_to_batch(rows, table, schema)
    except Exception:
        batch = None
    if batch is not None and not _required_nulls(batch, table):
        return batch, []
    bad: dict[int, tuple[str, str, str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            bad[i] = ("*", "row is not a mapping of column name to value", type(row).__name__)
    keep = [i for i in range(len(rows)) if i not in bad]
    for column in columns:
        values = [rows[i].get(column.name) for i in keep]
        for j, _exc in _bad_values(values, column.type):
            bad.setdefault(keep[j], (column.name, f"value does not fit {column.type}", _example(values[j])))
        if not column.nullable:
            for j, v in enumerate(values):
                if v is None:
                    bad.setdefault(keep[j], (column.name, "null in a required column", "None"))
    kept_rows = [rows[i] for i in range(len(rows)) if i not in bad]
    return rows_to_batch(kept_rows, table, schema), _summarise(bad.values())


def _bad_values(values: list[Any], type_: pa.DataType) -> list[tuple[int, BaseException]]:
    """Indices (with the error) of the values `_column_array` cannot convert."""
    try:
        _column_array(values, type_)
        return []
    except Exception as exc:
        if len(values) == 1:
            return [(0, exc)]
    half = len(values) // 2
    return _bad_values(values[:half], type_) + [(half + j, e) for j, e in _bad_values(values[half:], type_)]


def _required_nulls(batch: pa.RecordBatch, table: str) -> bool:
    return any(not c.nullable and batch.column(i).null_count for i, c in enumerate(TABLES[table]))


def _summarise(bad: Iterable[tuple[str, str, str]]) -> list[Drop]:
    counts: dict[tuple[str, str], list[Any]] = {}
    for column, reason, example in bad:
        entry = counts.setdefault((column, reason), [0, example])
        entry[0] += 1
    return [(column, reason, n, example) for (column, reason), (n, example) in counts.items()]


def batch_to_table_batch(
    batch: pa.RecordBatch, table: str, schema: pa.Schema
) -> tuple[pa.RecordBatch, list[Drop]]:
    """A prebuilt batch cast to the table's schema; rows whose values do not fit (or that hold a null
    in a required column) are left out and returned as drops."""
    columns = TABLES[table]
    missing = [c.name for c in columns if c.name not in batch.schema.names]
    if missing:
        raise ValueError(f"batch lacks column(s) {', '.join(missing)} of table {table}")
    arrays = [batch.column(c.name) for c in columns]
    try:
        cast = [a.cast(c.type) for a, c in zip(arrays, columns)]
    except (pa.ArrowException, ValueError, TypeError):
        cast = None
    if cast is not None and not any(not c.nullable and a.null_count for a, c in zip(cast, columns)):
        return _fully_valid(pa.RecordBatch.from_arrays(cast, schema=schema)), []
    bad: dict[int, tuple[str, str, str]] = {}
    for a, c in zip(arrays, columns):
        for j, _exc in _bad_casts(a, c.type, 0):
            bad.setdefault(j, (c.name, f"value does not fit {c.type}", _example(a[j].as_py())))
        if not c.nullable and a.null_count:
            for j in np.flatnonzero(a.is_null().to_numpy(zero_copy_only=False)):
                bad.setdefault(int(j), (c.name, "null in a required column", "None"))
    mask = np.ones(batch.num_rows, dtype=bool)
    mask[list(bad)] = False
    kept = pa.array(mask)
    cast = [a.filter(kept).cast(c.type) for a, c in zip(arrays, columns)]
    return _fully_valid(pa.RecordBatch.from_arrays(cast, schema=schema)), _summarise(bad.values())


def _fully_valid(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A prebuilt batch could have been assembled from raw buffers: validate it fully (offline
    producers only; rows converted by pyarrow are valid by construction), so a batch whose checksum
    verifies on read needs no full validation there."""
    batch.validate(full=True)
    return batch


def _bad_casts(arr: pa.Array, type_: pa.DataType, base: int) -> list[tuple[int, BaseException]]:
    """Indices (from `base`) of the values of `arr` that do not cast to `type_`. A slice is compacted
    first: casting a sliced list array casts its whole child, values outside the slice included."""
    try:
        pa.concat_arrays([arr]).cast(type_)
        return []
    except (pa.ArrowException, ValueError, TypeError) as exc:
        if len(arr) == 1:
            return [(base, exc)]
    half = len(arr) // 2
    return _bad_casts(arr.slice(0, half), type_, base) + _bad_casts(arr.slice(half), type_, base + half)


def _column_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(type_):
        return pa.array(values, type=pa.string()).dictionary_encode().cast(type_)
    if pa.types.is_list(type_) and values and all(isinstance(v, np.ndarray) for v in values):
        value_type = type_.value_type
        lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(values)
        cast = flat.astype(value_type.to_pandas_dtype(), copy=False)
        if cast.dtype != flat.dtype and flat.size and not np.array_equal(cast, flat):
            raise pa.ArrowInvalid(f"numpy values do not fit {value_type} (e.g. {flat[cast != flat][0]!r})")
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cast, type=value_type))
    return pa.array(values, type=type_)
