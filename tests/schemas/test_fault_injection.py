"""Fault injection over every table kind: bit flips in the header, message metadata and bodies,
truncations, values that do not fit their column, a writer killed before its first batch.

Every damaged file must give one clear line (a TraceError for a damaged header), exactly the
written rows, or the written batches less the damaged ones with a one-line corrupt-batch warning:
never a traceback, a crash (the reads run in a subprocess, so a SIGSEGV is a counted failure), a
silently different value or a silently lost batch. Expected rows are the rows the test wrote.

Seeded and bounded (MOECAP_FAULT_FLIPS=N flips per region per table for a larger sweep). The counts
by outcome are printed (`pytest -s`).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap.schemas import (
    TABLES,
    ClockAnchor,
    EngineInfo,
    ModelInfo,
    MoEInfo,
    RunMetadata,
    TraceWriter,
    arrow_schema,
    read_trace_file,
    scan_trace_file,
)

from . import faults

SEED = 20261206
FLIPS = int(os.environ.get("MOECAP_FAULT_FLIPS", "12"))
"""Bit flips per region (schema message, message metadata, message bodies) per table kind."""


def _run() -> RunMetadata:
    return RunMetadata(
        run_id="20261206T000000Z-hf-faults-0000",
        engine=EngineInfo(name="hf", version="5.17.0"),
        model=ModelInfo(
            id="Qwen/Qwen1.5-MoE-A2.7B",
            config={
                "model_type": "qwen2_moe",
                "hidden_size": 2048,
                "num_experts": 60,
                "num_hidden_layers": 24,
            },
        ),
        moe=MoEInfo(layer_ids=list(range(24)), num_experts=60, top_k=4),
        clock=ClockAnchor(monotonic_ns=123_456_789, unix_ns=1_796_563_865_000_000_000),
        created_at="2026-12-06T00:00:00+00:00",
        host="faults",
    )


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Per table kind: (path, bytes, message map) of an intact sample file."""
    root = tmp_path_factory.mktemp("faults")
    out = {}
    for table in TABLES:
        path = root / f"sample.{table}.arrow"
        faults.write_sample(path, table, _run())
        data = path.read_bytes()
        messages = faults.message_map(data)
        faults.annotate_rows(messages, table)
        out[table] = (path, data, messages)
    return root, out


def _flip_cases(root, samples_: dict) -> list[dict]:
    rng = random.Random(SEED)
    cases = []
    for table, (path, _data, messages) in samples_.items():
        schema = messages[0]
        assert schema.kind == "schema"
        regions = {
            "schema": [(schema.start, schema.end, schema)],
            "metadata": [(m.start, m.meta_end, m) for m in messages[1:] if m.kind != "eos"],
            "body": [(m.meta_end, m.end, m) for m in messages[1:] if m.end > m.meta_end and m.kind != "eos"],
            "eos": [(m.start, m.end, m) for m in messages if m.kind == "eos"],
        }
        for region, spans in regions.items():
            byte_list = [(b, m) for lo, hi, m in spans for b in range(lo, hi)]
            n = 2 if region == "eos" else FLIPS
            for byte, m in rng.sample(byte_list, min(n, len(byte_list))):
                cases.append(
                    {
                        "table": table,
                        "region": region,
                        "message": messages.index(m),
                        "src": str(path),
                        "dst": str(root / f"flip-{len(cases)}.{table}.arrow"),
                        "flip": [byte, rng.randrange(8)],
                    }
                )
    return cases


def _cut_cases(root, samples_: dict) -> list[dict]:
    rng = random.Random(SEED + 1)
    cases = []
    for table, (path, data, messages) in samples_.items():
        cuts = {0, 1, 7, len(data)}
        for m in messages:
            cuts |= {c for d in (-9, -8, -1, 0, 1, 4, 8, 9) if 0 <= (c := m.end + d) <= len(data)}
        cuts |= {rng.randrange(len(data)) for _ in range(15)}
        for cut in sorted(cuts):
            cases.append(
                {
                    "table": table,
                    "src": str(path),
                    "dst": str(root / f"cut-{len(cases)}.{table}.arrow"),
                    "cut": cut,
                }
            )
    return cases


@pytest.fixture(scope="module")
def results(samples):
    """Every flip and cut case, read in one worker subprocess (restarted after a crash)."""
    root, samples_ = samples
    flips, cuts = _flip_cases(root, samples_), _cut_cases(root, samples_)
    out = faults.run_cases(flips + cuts, root)
    return list(zip(flips, out[: len(flips)])), list(zip(cuts, out[len(flips) :]))


def test_bit_flips_over_every_table_give_one_line_or_exact_recovery(samples, results):
    _, samples_ = samples
    flips, _ = results
    counts: collections.Counter = collections.Counter()
    failures = []
    for case, result in flips:
        _path, _data, messages = samples_[case["table"]]
        outcome = faults.classify(result, case["table"], _run(), messages[case["message"]], messages)
        counts[(case["table"], case["region"], outcome.kind)] += 1
        if outcome.kind.startswith("FAIL"):
            failures.append((case, outcome))
    _print_counts("bit flips", counts)
    assert {t for t, _, _ in counts} == set(TABLES)
    assert not failures, failures[:5]
    # The checksums at work: damage in message bodies is detected, not read as other values.
    assert sum(n for (_, region, kind), n in counts.items() if region == "body" and kind == "recovered") > 0


def test_truncation_at_many_offsets_recovers_exactly_the_whole_batches(samples, results):
    _, samples_ = samples
    _, cuts = results
    counts: collections.Counter = collections.Counter()
    for case, result in cuts:
        table, cut = case["table"], case["cut"]
        _path, data, messages = samples_[table]
        assert "traceback" not in result and "crash" not in result, (case, result)
        if cut < messages[0].end:  # the schema is incomplete: the file cannot be described
            assert "\n" not in result["error"] and result["error"].startswith(result["path"]), result
            counts[(table, "error-line")] += 1
            continue
        assert "error" not in result, (case, result)
        batches = [m for m in messages if m.kind == "record batch"]
        whole = [m for m in batches if m.end <= cut]
        want = [r for b in faults.expected_batches(table)[: max(0, len(whole) - 1)] for r in b]
        assert result["rows"] == want, cut
        assert result["corrupt_batches"] == 0, (cut, result["warnings"])
        if cut == len(data):
            assert result["complete"] and result["warnings"] == []
            counts[(table, "exact")] += 1
        else:
            last_end = whole[-1].end if whole else messages[0].end
            assert not result["complete"] and result["lost_bytes"] == cut - last_end, cut
            assert len(result["warnings"]) == 1 and "truncated" in result["warnings"][0]
            counts[(table, "recovered")] += 1
    _print_counts("truncations", counts)


def _print_counts(title: str, counts: collections.Counter) -> None:
    by_kind: collections.Counter = collections.Counter()
    for key, n in counts.items():
        by_kind[key[-1]] += n
    print(f"\n{title}: {sum(counts.values())} cases; by outcome: {dict(sorted(by_kind.items()))}")
    for key in sorted(counts):
        print(f"  {' / '.join(key)}: {counts[key]}")


# -- values that do not fit their column ----------------------------------------------------------
_INT_LIMITS = {pa.int16(): 2**15, pa.int32(): 2**31, pa.int64(): 2**63}


def _bad_value(type_: pa.DataType, nullable: bool) -> st.SearchStrategy:
    options: list[st.SearchStrategy] = [] if nullable else [st.none()]
    if type_ in _INT_LIMITS:
        lim = _INT_LIMITS[type_]
        options += [
            st.integers(lim, 4 * lim),
            st.integers(-4 * lim, -lim - 1),
            st.just("12"),
            st.just(float("nan")),
        ]
    elif pa.types.is_list(type_) and type_.value_type in _INT_LIMITS:
        lim = _INT_LIMITS[type_.value_type]
        options += [
            st.integers(lim, 4 * lim).map(lambda v: [1, v]),
            st.integers(lim, 4 * lim).map(lambda v: np.array([1, v], dtype=np.int64))
            if lim < 2**63
            else st.nothing(),
            st.just([1, "x"]),
            st.just(5),
        ]
    elif pa.types.is_list(type_):
        options += [st.just([1, 2]), st.just(5)]
    elif pa.types.is_string(type_) or pa.types.is_dictionary(type_):
        options += [st.just(5), st.just(["a"]), st.just("\ud800"), st.just(b"\xff")]
    elif pa.types.is_floating(type_):
        options += [st.just("hot"), st.just([1.0])]
    elif pa.types.is_boolean(type_):
        options += [st.just([True]), st.just({"a": 1})]
    return st.one_of(options) if options else st.nothing()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), table=st.sampled_from(list(TABLES)), bad_row=st.integers(0, faults.ROWS - 1))
def test_a_value_that_does_not_fit_costs_its_row_only_and_is_recorded_in_the_file(
    tmp_path_factory, data, table, bad_row
):
    column = data.draw(st.sampled_from([c for c in TABLES[table]]), label="column")
    value = data.draw(_bad_value(column.type, column.nullable), label="value")
    rows = faults.rows(table)
    rows[bad_row] = {**rows[bad_row], column.name: value}
    path = tmp_path_factory.mktemp("fit") / f"x.{table}.arrow"
    with TraceWriter(path, table, _run(), rows_per_batch=faults.ROWS_PER_BATCH, flush_interval_s=600) as w:
        w.write_rows(rows)
    stats = w.stats
    assert stats.rows_dropped == 1 and stats.rows_written == faults.ROWS - 1 and stats.errors == 0
    tf = read_trace_file(path)
    want = [faults.expected_row(r, table) for i, r in enumerate(faults.rows(table)) if i != bad_row]
    assert tf.table.to_pylist() == want
    assert tf.complete and tf.corrupt_batches == 0 and tf.integrity == "verified"
    assert tf.rows_dropped == 1
    assert [(d["field"], d["rows"]) for d in tf.drops] == [(column.name, 1)]
    (line,) = tf.warnings
    assert line.startswith(str(path)) and f"{table}.{column.name}" in line and "dropped 1 row" in line


def test_a_bad_value_in_the_last_batch_is_recorded_and_check_would_see_it(tmp_path):
    """The issue's case: `completion_tokens: 3000000000` in the only (last) batch of a requests file."""
    rows = [faults.rows("requests")[0] | {"output_tokens": 3_000_000_000}]
    path = tmp_path / "r.requests.arrow"
    with TraceWriter(path, "requests", _run()) as w:
        w.write_rows(rows)
    tf = read_trace_file(path)
    assert tf.num_rows == 0 and tf.complete and tf.rows_dropped == 1
    assert tf.drops == [
        {"field": "output_tokens", "reason": "value does not fit int32", "rows": 1, "example": "3000000000"}
    ]
    assert "requests.output_tokens: value does not fit int32 (e.g. 3000000000)" in tf.warnings[0]


def test_prebuilt_batches_lose_only_the_rows_that_do_not_fit(tmp_path):
    """write_batch (bulk producers): an int64 value past int32 and a null step cost their rows only."""
    path = tmp_path / "e.experts.arrow"
    batch = pa.record_batch(
        {
            "step": pa.array([0, 1, None, 3], pa.int64()),
            "counts": pa.array([[1], [2**40], [3], [4]], pa.list_(pa.int64())),
        }
    )
    with TraceWriter(path, "experts", _run()) as w:
        w.write_batch(batch)
    tf = read_trace_file(path)
    assert tf.table.to_pylist() == [{"step": 0, "counts": [1]}, {"step": 3, "counts": [4]}]
    assert sorted((d["field"], d["rows"]) for d in tf.drops) == [("counts", 1), ("step", 1)]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from moecap.schemas import RunMetadata, TraceWriter, TABLES
    run = RunMetadata.from_json(sys.argv[2])
    writers = [TraceWriter(f"{sys.argv[1]}/k.{t}.arrow", t, run, flush_interval_s=600) for t in TABLES]
    for w in writers:
        w.write({})  # queued, never flushed
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_writer_killed_before_its_first_batch_leaves_a_described_empty_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), _run().to_json()], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for table in TABLES:
        path = tmp_path / f"k.{table}.arrow"
        assert path.stat().st_size > 0
        tf = read_trace_file(path)
        assert tf.table_kind == table and tf.run == _run() and tf.num_rows == 0
        assert not tf.complete and tf.corrupt_batches == 0
        (line,) = tf.warnings
        assert line.startswith(str(path)) and "truncated" in line


# -- format 1.0 files and validation before any consumer ------------------------------------------
def _legacy_file(path, table: str, batches: list[pa.RecordBatch]) -> None:
    """A file as format 1.0 wrote it: no checksums anywhere."""
    schema = arrow_schema(table).with_metadata(
        {"moecap.schema_version": "1.0.0", "moecap.table": table, "moecap.run": _run().to_json()}
    )
    with ipc.new_stream(path, schema) as w:
        for i, b in enumerate(batches):
            w.write_batch(b, custom_metadata={"moecap.batch": f'{{"seq":{i},"rows":{b.num_rows}}}'})


def test_files_written_before_checksums_still_read_as_unchecked(tmp_path):
    path = tmp_path / "old.experts.arrow"
    schema = arrow_schema("experts")
    batch = pa.record_batch({"step": pa.array([1, 2], pa.int64()), "counts": [[1, 2], [3]]}, schema=schema)
    _legacy_file(path, "experts", [batch, batch])
    tf = read_trace_file(path)
    assert tf.table.to_pylist() == [{"step": 1, "counts": [1, 2]}, {"step": 2, "counts": [3]}] * 2
    assert tf.integrity == "unchecked" and tf.warnings == [] and tf.complete


def test_an_invalid_batch_never_reaches_the_consumer_and_later_batches_are_kept(tmp_path):
    """A batch whose list offsets run backwards (a negative list length: what crashed the Parquet
    writer); without a checksum (format 1.0) full validation is what stops it, and the batch after it
    is still delivered."""
    path = tmp_path / "bad.experts.arrow"
    schema = arrow_schema("experts")
    good = pa.record_batch({"step": pa.array([1], pa.int64()), "counts": [[7, 8]]}, schema=schema)
    offsets = pa.array([0, 2, 1], pa.int32())
    bad_counts = pa.ListArray.from_buffers(
        pa.list_(pa.int32()), 2, [None, offsets.buffers()[1]], children=[pa.array([1, 2], pa.int32())]
    )
    bad = pa.RecordBatch.from_arrays([pa.array([2, 3], pa.int64()), bad_counts], schema=schema)
    with pytest.raises(pa.ArrowInvalid):
        bad.validate(full=True)
    _legacy_file(path, "experts", [good, bad, good])
    seen = []

    def consumer(batch: pa.RecordBatch) -> None:
        batch.validate(full=True)  # a consumer that would crash on an invalid batch
        seen.append(batch.to_pylist())

    scan = scan_trace_file(path, consumer)
    assert seen == [[{"step": 1, "counts": [7, 8]}]] * 2
    assert scan.corrupt_batches == 1 and scan.complete
    (line,) = scan.warnings
    assert line.startswith(str(path)) and "invalid arrays" in line and "bytes " in line


def _flip_batch_info_digit(data: bytes, victim: faults.Message) -> bytearray:
    """The file with one bit of the first digit of `victim`'s `"seq":` in its batch metadata flipped:
    still valid JSON and a valid batch, only a different number (what the checksum is for)."""
    at = data.index(b'"seq":', victim.start, victim.meta_end) + len(b'"seq":')
    damaged = bytearray(data)
    damaged[at] ^= 0x02  # "1" <-> "3", "2" <-> "0"
    return damaged


def test_a_corrupt_batch_in_the_middle_is_named_and_the_batches_after_it_are_kept(samples, tmp_path):
    _, samples_ = samples
    _path, data, messages = samples_["requests"]
    batches = [m for m in messages if m.kind == "record batch" and m.rows]
    victim = batches[1]
    damaged = _flip_batch_info_digit(data, victim)
    bad = tmp_path / "mid.requests.arrow"
    bad.write_bytes(bytes(damaged))
    tf = read_trace_file(bad)
    want = faults.expected_batches("requests")
    assert tf.table.to_pylist() == want[0] + want[2] + want[3]
    assert tf.corrupt_batches == 1 and tf.complete
    (line,) = tf.warnings
    assert line.startswith(str(bad)) and f"bytes {victim.start}-{victim.end}" in line


def test_strict_open_refuses_a_file_with_a_corrupt_batch(samples, tmp_path):
    from moecap.schemas import TraceError, open_traces

    _, samples_ = samples
    _path, data, messages = samples_["outputs"]
    victim = next(m for m in messages if m.kind == "record batch" and m.rows)
    damaged = _flip_batch_info_digit(data, victim)
    bad = tmp_path / "x.outputs.arrow"
    bad.write_bytes(bytes(damaged))
    loose = open_traces([bad])
    assert loose.errors == [] and len(loose.warnings) == 1 and "corrupt record batch" in loose.warnings[0]
    with pytest.raises(TraceError, match="corrupt record batch"):
        open_traces([bad], strict=True)


def test_the_writer_never_writes_an_invalid_prebuilt_batch(tmp_path):
    """A batch assembled from raw buffers with backwards offsets is refused (its rows counted as
    dropped), so every batch that verifies its checksum on read was valid when written."""
    offsets = pa.array([0, 2, 1], pa.int32())
    counts = pa.ListArray.from_buffers(
        pa.list_(pa.int32()), 2, [None, offsets.buffers()[1]], children=[pa.array([1, 2], pa.int32())]
    )
    bad = pa.RecordBatch.from_arrays([pa.array([2, 3], pa.int64()), counts], names=["step", "counts"])
    good = pa.record_batch({"step": pa.array([1], pa.int64()), "counts": [[7, 8]]})
    path = tmp_path / "w.experts.arrow"
    with TraceWriter(path, "experts", _run()) as w:
        w.write_batch(good)
        w.write_batch(bad)
    assert w.stats.rows_dropped == 2 and w.stats.rows_written == 1
    tf = read_trace_file(path)
    assert tf.table.to_pylist() == [{"step": 1, "counts": [7, 8]}]
    assert tf.drops == [
        {
            "field": "*",
            "reason": "batch not written (ArrowInvalid)",
            "rows": 2,
            "example": tf.drops[0]["example"],
        }
    ]
