"""Any valid set of rows round-trips bit-exactly through TraceWriter -> read_trace_file."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap.schemas import TABLES, TraceWriter, read_trace_file

from .strategies import rows


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or np.float32(a) == np.float32(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.sampled_from(list(TABLES)),
    data=st.data(),
    rows_per_batch=st.integers(1, 7),
)
def test_rows_round_trip_bit_exactly(tmp_path_factory, run_meta, table, data, rows_per_batch):
    written = data.draw(st.lists(rows(table), max_size=20))
    path = tmp_path_factory.mktemp("rt") / f"x.{table}.arrow"
    with TraceWriter(path, table, run_meta, rows_per_batch=rows_per_batch, flush_interval_s=60) as w:
        w.write_rows(written)
    tf = read_trace_file(path)
    assert tf.complete and tf.table_kind == table
    assert tf.corrupt_batches == 0 and tf.integrity == "verified" and tf.warnings == []
    assert tf.run == run_meta
    read = tf.table.to_pylist()
    assert len(read) == len(written)
    for got, want in zip(read, written):
        for name in want:
            assert _same(got[name], want[name]), (name, got[name], want[name])


def test_numpy_list_columns_round_trip(tmp_path, run_meta):
    counts = [np.arange(24 * 60, dtype=np.int32) * k for k in range(5)]
    path = tmp_path / "e.experts.arrow"
    with TraceWriter(path, "experts", run_meta, rows_per_batch=2) as w:
        for i, c in enumerate(counts):
            w.write({"step": i, "counts": c})
    table = read_trace_file(path).table
    assert table.column("step").to_pylist() == list(range(5))
    flat = table.column("counts").combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(flat, np.concatenate(counts))


def test_time_based_flush_writes_without_reaching_row_count(tmp_path, run_meta):
    import time

    path = tmp_path / "s.experts.arrow"
    w = TraceWriter(path, "experts", run_meta, rows_per_batch=10_000, flush_interval_s=0.05)
    w.write({"step": 1, "counts": [1, 2]})
    deadline = time.monotonic() + 5
    while w.stats.batches_written == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.stats.batches_written == 1  # flushed by time, before close
    w.close()
    assert read_trace_file(path).table.num_rows == 1


def test_blocking_writer_waits_instead_of_dropping(tmp_path, run_meta):
    """With a one-batch queue, a non-blocking writer flooded faster than it writes drops rows (and
    counts them); a blocking one (offline producers) keeps every row."""
    rows = [{"step": i, "counts": list(range(200))} for i in range(3000)]
    fast = TraceWriter(
        tmp_path / "a.experts.arrow", "experts", run_meta, rows_per_batch=1, max_pending_batches=1
    )
    fast.write_rows(rows)
    dropped = fast.close().rows_dropped
    assert dropped > 0
    assert read_trace_file(tmp_path / "a.experts.arrow").num_rows == 3000 - dropped
    slow = TraceWriter(
        tmp_path / "b.experts.arrow",
        "experts",
        run_meta,
        rows_per_batch=1,
        max_pending_batches=1,
        blocking=True,
    )
    slow.write_rows(rows)
    assert slow.close().rows_dropped == 0
    assert read_trace_file(tmp_path / "b.experts.arrow").num_rows == 3000


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(list(TABLES)), data=st.data())
def test_sliced_prebuilt_batches_verify_their_checksums(tmp_path_factory, run_meta, table, data):
    """write_batch of a slice (array offsets not 0, bitmaps starting mid-byte, list offsets not from 0):
    the checksum the writer computes over the slice equals the one the reader computes over what the
    IPC stream made of it."""
    from moecap.schemas import arrow_schema
    from moecap.schemas.writer import rows_to_batch

    written = data.draw(st.lists(rows(table), min_size=1, max_size=30))
    start = data.draw(st.integers(0, len(written) - 1))
    length = data.draw(st.integers(0, len(written) - start))
    whole = rows_to_batch(written, table, arrow_schema(table))
    path = tmp_path_factory.mktemp("slice") / f"x.{table}.arrow"
    with TraceWriter(path, table, run_meta) as w:
        w.write_batch(whole.slice(start, length))
    tf = read_trace_file(path)
    assert tf.corrupt_batches == 0 and tf.integrity == "verified" and tf.warnings == []
    assert tf.num_rows == length
    for got, want in zip(tf.table.to_pylist(), written[start : start + length]):
        for name in want:
            assert _same(got[name], want[name]), (name, got[name], want[name])
