"""BackgroundParquetWriter: the same file as a plain ParquetWriter, errors reach the caller."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moecap.analyze.parquet_writer import BackgroundParquetWriter


def _tables(n: int = 5) -> list[pa.Table]:
    return [
        pa.table({"step": pa.array(range(i * 10, i * 10 + 10)), "x": pa.array([i / 3] * 10)})
        for i in range(n)
    ]


def test_same_rows_and_row_groups_as_a_plain_writer(tmp_path):
    w = BackgroundParquetWriter(tmp_path / "bg.parquet", compression="zstd")
    for t in _tables():
        w.write(t)
    w.write(_tables(1)[0].to_batches()[0])  # record batches too
    w.close()
    plain = pq.ParquetWriter(tmp_path / "plain.parquet", _tables(1)[0].schema, compression="zstd")
    for t in [*_tables(), _tables(1)[0]]:
        plain.write_table(t)
    plain.close()
    a, b = pq.ParquetFile(tmp_path / "bg.parquet"), pq.ParquetFile(tmp_path / "plain.parquet")
    assert a.metadata.num_row_groups == b.metadata.num_row_groups == 6
    assert a.read().equals(b.read())


def test_empty_schema_when_nothing_was_written(tmp_path):
    schema = pa.schema([("step", pa.int64())])
    w = BackgroundParquetWriter(tmp_path / "empty.parquet")
    w.close(schema)
    t = pq.read_table(tmp_path / "empty.parquet")
    assert t.num_rows == 0 and t.schema.names == ["step"]


def test_a_write_error_is_raised_in_the_caller(tmp_path):
    w = BackgroundParquetWriter(tmp_path / "bad.parquet")
    w.write(_tables(1)[0])
    w.write(pa.table({"other": pa.array([1])}))  # schema differs from the file's
    with pytest.raises(ValueError):
        for t in _tables(10):  # keeps writing: raises at a later write or at close, never hangs
            w.write(t)
        w.close()


def test_abort_stops_without_raising(tmp_path):
    w = BackgroundParquetWriter(tmp_path / "a.parquet")
    w.write(pa.table({"other": pa.array([1])}))
    w.write(pa.table({"step": pa.array([1.5])}))  # a schema error the writer thread hits
    w.abort()
    w.abort()  # idempotent
    assert not w._thread.is_alive(), "the writer thread is joined, not left running"
