"""TraceWriter: crash-safe Arrow IPC stream files, written off the caller's thread.

The caller (an engine's hot path) only appends a row to a list under an uncontended lock. A
background thread turns every `rows_per_batch` rows, or whatever arrived in `flush_interval_s`,
into a zstd-compressed record batch and writes it, so a killed process loses at most the rows not
yet flushed, and a reader recovers every complete batch. Nothing here raises into the caller:
failures are logged, counted and reported by `close()`.
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


def trace_file_name(run: RunMetadata, table: str) -> str:
    """`<run_id>.<rank tag>.<table>.arrow`; client-side tables carry the tag `client`."""
    tag = "client" if table in ("requests", "outputs") else run.rank.tag()
    return f"{run.run_id}.{tag}.{table}.arrow"


def schema_metadata(run: RunMetadata, table: str) -> dict[str, str]:
    """The schema-level key/values every trace file carries."""
    return {"moecap.schema_version": SCHEMA_VERSION, "moecap.table": table, "moecap.run": run.to_json()}


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
        self._sink.flush()
        self._thread = threading.Thread(target=self._run, name=f"moecap-writer-{table}", daemon=True)
        self._thread.start()

    # -- caller side: cheap, never raises -------------------------------------------------------
    def write(self, row: Mapping[str, Any]) -> None:
        """Queue one row. Constant, small cost on the caller's thread."""
        try:
            with self._lock:
                if self._closed:
                    self.stats.rows_dropped += 1
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
            self.stats.rows_dropped += len(rows)

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
        try:
            if isinstance(rows, pa.RecordBatch):
                batch = pa.RecordBatch.from_arrays(
                    [rows.column(c.name).cast(c.type) for c in self._columns], schema=self.schema
                )
            else:
                batch = rows_to_batch(rows, self.table, self.schema)
            self._writer.write_batch(batch, custom_metadata=self._batch_metadata(len(batch)))
            self._sink.flush()
            self.stats.rows_written += batch.num_rows
            self.stats.batches_written += 1
            self.stats.bytes_written = self._sink.tell()
        except Exception as exc:
            self.stats.rows_dropped += len(rows)
            self._record_error(exc)
        self.stats.flush_seconds.append(time.perf_counter() - t0)

    def _batch_metadata(self, rows: int) -> dict[str, str]:
        info = {
            "seq": self.stats.batches_written,
            "rows": rows,
            "rows_dropped_before": self.stats.rows_dropped,
            "monotonic_ns": time.monotonic_ns(),
            "unix_ns": time.time_ns(),
        }
        return {"moecap.batch": json.dumps(info, separators=(",", ":"))}

    def _finish(self) -> None:
        try:
            with self._lock:
                rows, self._pending = self._pending, []
            if rows:
                self._write_batch(rows)
            if self.stats.rows_dropped and self.stats.errors == 0:
                # An empty batch carries the final drop count, so a reader can report it.
                self._writer.write_batch(
                    _empty_batch(self.schema),
                    custom_metadata=self._batch_metadata(0),
                )
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
                "moecap trace writer %s closed: %d rows written, %d dropped, %d errors (last: %s)",
                self.path,
                self.stats.rows_written,
                self.stats.rows_dropped,
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


def rows_to_batch(rows: list[Mapping[str, Any]], table: str, schema: pa.Schema) -> pa.RecordBatch:
    """Build one record batch from row dicts; list columns given as numpy arrays are concatenated
    without a Python loop over their elements."""
    arrays = []
    for column in TABLES[table]:
        values = [row.get(column.name) for row in rows]
        arrays.append(_column_array(values, column.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _column_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(type_):
        return pa.array(values, type=pa.string()).dictionary_encode().cast(type_)
    if pa.types.is_list(type_) and values and all(isinstance(v, np.ndarray) for v in values):
        value_type = type_.value_type
        lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(values).astype(value_type.to_pandas_dtype(), copy=False)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))
    return pa.array(values, type=type_)
