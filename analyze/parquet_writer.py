"""A Parquet file written on a second thread, for the caches built in one streaming pass.

pyarrow releases the GIL while it encodes and compresses a table, so the producer (a trace scan,
the per-step cost pass) computes the next batch while the previous one is written: on two cores a
pass costs about max(compute, write) instead of their sum. Values and file layout are those of a
plain `pq.ParquetWriter` fed the same tables in the same order.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class BackgroundParquetWriter:
    """`write(table)` queues (at most two tables wait, so memory stays bounded); `close()` waits for
    the writes and raises the first write error; `abort()` stops without raising (the caller's own
    error is the one to report). The writer is opened with the first table's schema, or with
    `empty_schema` at `close` when nothing was written."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.path = path
        self._options = options
        self._queue: queue.Queue[pa.Table | pa.RecordBatch | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._writer: pq.ParquetWriter | None = None
        self._thread = threading.Thread(target=self._run, name=f"parquet-writer:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure, so the producer never blocks
            try:
                if self._writer is None:
                    self._writer = pq.ParquetWriter(self.path, item.schema, **self._options)
                if isinstance(item, pa.RecordBatch):
                    self._writer.write_batch(item)
                else:
                    self._writer.write_table(item)
            except BaseException as exc:  # raised in the producer by write() / close()
                self._error = exc

    def write(self, item: pa.Table | pa.RecordBatch) -> None:
        if self._error is not None:
            self.close()
        self._queue.put(item)

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self, empty_schema: pa.Schema | None = None) -> None:
        self._finish()
        if self._error is None:
            try:
                if self._writer is None and empty_schema is not None:
                    self._writer = pq.ParquetWriter(self.path, empty_schema, **self._options)
                if self._writer is not None:
                    self._writer.close()
            except BaseException as exc:
                self._error = exc
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._finish()
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
