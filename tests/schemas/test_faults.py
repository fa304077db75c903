"""Crash safety and bad input: killed writers, truncation at every byte, foreign files, versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from moecap.schemas import (
    SCHEMA_VERSION,
    TraceError,
    TraceWriter,
    arrow_schema,
    open_traces,
    read_trace_file,
    trace_file_name,
)
from moecap.schemas.integrity import DEFAULT_ALGORITHM, format_checksum, header_checksum


def _step_row(i: int) -> dict:
    return {
        "step": i,
        "t_start_ns": 1000 * i,
        "t_end_ns": 1000 * i + 500,
        "phase": "decode" if i % 3 else "prefill",
        "is_draft": False,
        "num_reqs": 2,
        "num_tokens": 2,
        "req_ids": [f"r{i}", f"r{i + 1}"],
        "req_prefix_lens": [i, i + 1],
        "req_new_tokens": [1, 1],
    }


def _batch_ends(path) -> list[int]:
    """Byte offset where each record batch message ends, found independently of our reader by
    walking the stream with pyarrow's message reader."""
    data = path.read_bytes()
    src = pa.BufferReader(data)
    reader = ipc.MessageReader.open_stream(src)
    ends = []
    while True:
        try:
            msg = reader.read_next_message()
        except StopIteration:
            break
        if msg.type == "record batch":
            ends.append(src.tell())
    return ends


def test_truncation_at_every_byte_recovers_exactly_the_whole_batches(tmp_path, run_meta):
    path = tmp_path / "t.steps.arrow"
    rows = [_step_row(i) for i in range(9)]
    with TraceWriter(path, "steps", run_meta, rows_per_batch=3, flush_interval_s=60) as w:
        w.write_rows(rows)
    data = path.read_bytes()
    ends = _batch_ends(path)
    assert len(ends) == 4  # the empty batch written at open (schema on disk at once), then 3 of 3 rows
    cut_path = tmp_path / "cut.steps.arrow"
    for cut in range(len(data) + 1):
        cut_path.write_bytes(data[:cut])
        try:
            tf = read_trace_file(cut_path)
        except TraceError as exc:
            # Only acceptable before the schema is complete.
            assert (
                "empty file" in str(exc) or "before the schema" in str(exc) or "bad leading bytes" in str(exc)
            )
            assert cut < ends[0]
            continue
        whole = sum(1 for e in ends if e <= cut)
        assert tf.batches == whole, cut
        assert tf.table.to_pylist() == [{**_nulls(), **r} for r in rows[: 3 * max(0, whole - 1)]], cut
        assert tf.corrupt_batches == 0 and tf.integrity == "verified", cut
        if cut < len(data):
            assert not tf.complete
            assert tf.lost_bytes == cut - (ends[whole - 1] if whole else tf_schema_end(data, ends))
            assert any("truncated" in w for w in tf.warnings)
        else:
            assert tf.complete and tf.lost_bytes == 0


def tf_schema_end(data: bytes, ends: list[int]) -> int:
    src = pa.BufferReader(data)
    ipc.open_stream(src)
    return src.tell()


def _nulls() -> dict:
    return {"gpu_start_ns": None, "gpu_end_ns": None, "req_num_logits": None, "req_spec_tokens": None}


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from moecap.schemas import TraceWriter, RunMetadata
    run = RunMetadata.from_json(open(sys.argv[2]).read())
    w = TraceWriter(sys.argv[1], "experts", run, rows_per_batch=10, flush_interval_s=60)
    i = 0
    while True:
        w.write({"step": i, "counts": [i, i + 1, i + 2]})
        i += 1
        if i % 10 == 0:
            print(i, flush=True)
        time.sleep(0.001)
    """
)


def test_sigkill_mid_run_keeps_every_flushed_batch(tmp_path, run_meta):
    meta = tmp_path / "run.json"
    meta.write_text(run_meta.to_json())
    path = tmp_path / "k.experts.arrow"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(meta)], stdout=subprocess.PIPE, text=True
    )
    handed_over = 0
    deadline = time.monotonic() + 30
    while handed_over < 200 and time.monotonic() < deadline:
        handed_over = int(proc.stdout.readline())
    time.sleep(0.3)  # let the writer thread write what it was handed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    tf = read_trace_file(path)
    assert not tf.complete
    assert tf.num_rows >= 200 and tf.num_rows % 10 == 0
    steps = tf.table.column("step").to_pylist()
    assert steps == list(range(len(steps)))
    assert tf.table.column("counts").to_pylist()[-1] == [steps[-1], steps[-1] + 1, steps[-1] + 2]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file"),
        (b"\x00garbage bytes that are not arrow at all", "not an Arrow IPC stream"),
        (b"step,t_start_ns\n1,2\n", "not an Arrow IPC stream"),
    ],
)
def test_garbage_inputs_give_one_clear_line(tmp_path, content, expected):
    p = tmp_path / "bad.arrow"
    p.write_bytes(content)
    with pytest.raises(TraceError) as err:
        read_trace_file(p)
    msg = str(err.value)
    assert msg.startswith(str(p)) and expected in msg and "\n" not in msg


def test_parquet_and_arrow_file_format_are_named(tmp_path):
    t = pa.table({"a": [1, 2]})
    pq.write_table(t, tmp_path / "x.arrow")
    with pytest.raises(TraceError, match="is a Parquet file"):
        read_trace_file(tmp_path / "x.arrow")
    with ipc.new_file(tmp_path / "y.arrow", t.schema) as w:
        w.write_table(t)
    with pytest.raises(TraceError, match="IPC \\*file\\*"):
        read_trace_file(tmp_path / "y.arrow")


def test_foreign_arrow_stream_is_rejected(tmp_path):
    t = pa.table({"a": [1, 2]})
    with ipc.new_stream(tmp_path / "f.arrow", t.schema) as w:
        w.write_table(t)
    with pytest.raises(TraceError, match="not a moecap trace"):
        read_trace_file(tmp_path / "f.arrow")


def _write_with_metadata(
    path, table: str, meta: dict[str, str], schema: pa.Schema | None = None, checksum: bool = True
) -> None:
    """A stream with the given schema metadata and, unless `checksum=False`, the header checksum a
    format >= 1.1 file carries (so the other checks are what these tests reach)."""
    if checksum:
        value = header_checksum(
            *(meta.get(k, "").encode() for k in ("moecap.schema_version", "moecap.table", "moecap.run"))
        )
        meta = {**meta, "moecap.checksum": format_checksum(DEFAULT_ALGORITHM, value)}
    schema = (schema or arrow_schema(table)).with_metadata(meta)
    with ipc.new_stream(path, schema) as w:
        w.write_table(schema.empty_table())


def test_newer_major_version_is_rejected_and_newer_minor_warns(tmp_path, run_meta):
    base = {"moecap.table": "steps", "moecap.run": run_meta.to_json()}
    _write_with_metadata(tmp_path / "a.arrow", "steps", {**base, "moecap.schema_version": "2.0.0"})
    with pytest.raises(TraceError, match="newer than this moecap understands"):
        read_trace_file(tmp_path / "a.arrow")
    major = SCHEMA_VERSION.split(".")[0]
    _write_with_metadata(tmp_path / "b.arrow", "steps", {**base, "moecap.schema_version": f"{major}.99.0"})
    tf = read_trace_file(tmp_path / "b.arrow")
    assert any("newer format" in w for w in tf.warnings)


def test_missing_column_and_wrong_type_are_named(tmp_path, run_meta):
    meta = {
        "moecap.table": "experts",
        "moecap.run": run_meta.to_json(),
        "moecap.schema_version": SCHEMA_VERSION,
    }
    _write_with_metadata(tmp_path / "a.arrow", "experts", meta, pa.schema([("step", pa.int64())]))
    with pytest.raises(TraceError, match="lacks required column\\(s\\) counts"):
        read_trace_file(tmp_path / "a.arrow")
    _write_with_metadata(
        tmp_path / "b.arrow",
        "experts",
        meta,
        pa.schema([("step", pa.int64()), ("counts", pa.list_(pa.int64()))]),
    )
    with pytest.raises(TraceError, match=r"experts\.counts has type"):
        read_trace_file(tmp_path / "b.arrow")


def test_bad_run_metadata_is_named(tmp_path, run_meta):
    meta = {"moecap.table": "experts", "moecap.schema_version": SCHEMA_VERSION}
    _write_with_metadata(tmp_path / "a.arrow", "experts", {**meta, "moecap.run": "{not json"})
    with pytest.raises(TraceError, match="not valid JSON"):
        read_trace_file(tmp_path / "a.arrow")
    bad = json.loads(run_meta.to_json())
    del bad["engine"]
    _write_with_metadata(tmp_path / "b.arrow", "experts", {**meta, "moecap.run": json.dumps(bad)})
    with pytest.raises(TraceError, match="lacks required field\\(s\\) engine"):
        read_trace_file(tmp_path / "b.arrow")


def test_open_traces_keeps_good_files_and_lists_bad_ones(tmp_path, run_meta):
    good = tmp_path / trace_file_name(run_meta, "steps")
    with TraceWriter(good, "steps", run_meta) as w:
        w.write(_step_row(0))
    (tmp_path / "junk.arrow").write_bytes(b"junk")
    result = open_traces([tmp_path])
    assert list(result.runs) == [run_meta.run_id]
    assert len(result.errors) == 1 and "junk.arrow" in result.errors[0]
    with pytest.raises(TraceError, match=r"junk\.arrow"):
        open_traces([tmp_path], strict=True)


def test_mismatched_run_ids_across_files_of_one_run(tmp_path, run_meta):
    other = run_meta.__class__.from_json(run_meta.to_json())
    other.run_id = "20261124T000001Z-hf-other-0001"
    # A file of `other` renamed to carry run_meta's id in its name.
    path = tmp_path / trace_file_name(run_meta, "steps")
    with TraceWriter(path, "steps", other) as w:
        w.write(_step_row(0))
    result = open_traces([path])
    assert not result.runs
    assert "file name says run" in result.errors[0]
    # Two files claiming one run id but different models.
    mixed = run_meta.__class__.from_json(run_meta.to_json())
    mixed.model.id = "mistralai/Mixtral-8x7B-v0.1"
    with TraceWriter(tmp_path / "a.steps.arrow", "steps", run_meta) as w:
        w.write(_step_row(0))
    with TraceWriter(tmp_path / "b.experts.arrow", "experts", mixed) as w:
        w.write({"step": 0, "counts": [1]})
    result = open_traces([tmp_path / "a.steps.arrow", tmp_path / "b.experts.arrow"])
    assert "mixes files of different runs" in result.errors[0]


def test_unwritable_path_fails_at_construction(tmp_path, run_meta):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        TraceWriter(blocker / "sub" / "x.arrow", "steps", run_meta)


def test_missing_path_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        open_traces([tmp_path / "nope*.arrow"])


def _request_row(req_id: str) -> dict:
    return {"req_id": req_id, "engine_req_id": req_id, "sample_id": "s0", "arrival_ns": 0, "first_token_ns": 10,
            "finish_ns": 20, "prompt_tokens": 4, "output_tokens": 2, "cached_prompt_tokens": 0,
            "chunk_times_ns": [10, 20], "chunk_tokens": [1, 1], "queue_ns": None, "preemptions": 0,
            "finish_reason": "length", "error": None, "retries": 0}  # fmt: skip


def test_a_drivers_tables_join_the_servers_trace_whatever_name_the_server_serves(tmp_path, run_meta):
    """`moecap-collect drive` records the model as the server lists it (a --served-model-name, a local
    path) and `engine.name` "client": its files join the engine's by run id. Files of one side still
    must agree among themselves."""
    from moecap.schemas import DRIVER_ENGINE

    client = run_meta.__class__.from_json(run_meta.to_json())
    client.engine.name = DRIVER_ENGINE
    client.model.id = "/tmp/moecap-sglang-model-qqypsnta"
    steps = tmp_path / trace_file_name(run_meta, "steps")
    requests = tmp_path / trace_file_name(client, "requests")
    with TraceWriter(steps, "steps", run_meta) as w:
        w.write(_step_row(0))
    with TraceWriter(requests, "requests", client) as w:
        w.write(_request_row("r0"))
    result = open_traces([tmp_path])
    assert result.errors == []
    assert sorted(f.table_kind for f in result.runs[run_meta.run_id].files) == ["requests", "steps"]

    # An engine file of another model under the same run id: refused, even after a driver file.
    other_engine = run_meta.__class__.from_json(run_meta.to_json())
    other_engine.model.id = "mistralai/Mixtral-8x7B-v0.1"
    with TraceWriter(tmp_path / "x.experts.arrow", "experts", other_engine) as w:
        w.write({"step": 0, "counts": [1]})
    result = open_traces([requests, steps, tmp_path / "x.experts.arrow"])
    assert len(result.errors) == 1 and "mixes files of different runs" in result.errors[0]
    assert "x.experts.arrow" in result.errors[0]

    # Two drivers' files of one run id that disagree on the model: refused too.
    other_client = client.__class__.from_json(client.to_json())
    other_client.model.id = "another-model"
    with TraceWriter(tmp_path / "y.outputs.arrow", "outputs", other_client) as w:
        pass
    result = open_traces([requests, tmp_path / "y.outputs.arrow"])
    assert len(result.errors) == 1 and "y.outputs.arrow" in result.errors[0]
