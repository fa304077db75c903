"""The engine-side writers every in-engine tracer opens: never overwrite a run, never raise."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

from moecap.collect.writers import open_engine_writers
from moecap.schemas import read_trace_file, trace_file_name


def _meta():
    return run_metadata(SimConfig(run_id="20260101T000000Z-writers-0001"), QWEN15_MOE_CONFIG)


def test_an_existing_run_is_not_overwritten(tmp_path):
    first = _meta()
    w = open_engine_writers(str(tmp_path), first, experts=False, rows_per_batch=4, flush_interval_s=1.0)
    assert w is not None and first.run_id == "20260101T000000Z-writers-0001"
    w.close()
    before = (tmp_path / trace_file_name(first, "steps")).read_bytes()
    again = _meta()
    w2 = open_engine_writers(str(tmp_path), again, experts=True, rows_per_batch=4, flush_interval_s=1.0)
    assert w2 is not None
    w2.close()
    assert again.run_id.startswith(first.run_id + "-pid") and again.run_id != first.run_id
    assert (tmp_path / trace_file_name(first, "steps")).read_bytes() == before
    assert read_trace_file(tmp_path / trace_file_name(again, "experts")).run.run_id == again.run_id


def test_an_unwritable_directory_gives_none_not_an_exception(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert (
        open_engine_writers(str(blocker), _meta(), experts=True, rows_per_batch=4, flush_interval_s=1.0)
        is None
    )


def test_drop_lines_name_each_table_and_cause(tmp_path):
    from moecap.collect.writers import RunWriters, drop_lines

    writers = RunWriters(tmp_path, _meta(), experts=False, client_tables=True, gpu_sample_interval_s=None)
    writers.request({"req_id": "r0", "arrival_ns": 0, "retries": 0, "output_tokens": 3_000_000_000})
    writers.request({"req_id": "r1", "arrival_ns": 1, "retries": 0, "output_tokens": 7})
    stats = writers.close()
    (line,) = drop_lines(stats)
    assert line.startswith(str(writers.paths["requests"]))
    assert (
        "1 requests row(s) dropped" in line
        and "output_tokens: value does not fit int32 (e.g. 3000000000)" in line
    )
    assert read_trace_file(writers.paths["requests"]).table.column("req_id").to_pylist() == ["r1"]


def test_ctrl_c_while_opening_closes_the_files_already_open(tmp_path, monkeypatch):
    # A stop signal can land between two files of a run being opened (seen in a sweep stopped by
    # SIGTERM): the files opened so far must end closed (end-of-stream marker), not unfinished.
    import moecap.collect.writers as writers_module
    from moecap.collect.sweep.state import file_closed
    from moecap.collect.writers import RunWriters
    from moecap.schemas import TraceWriter

    opened = []

    def interrupted_on_third(*args, **kwargs):
        if len(opened) == 2:
            raise KeyboardInterrupt
        w = TraceWriter(*args, **kwargs)
        opened.append(w.path)
        return w

    monkeypatch.setattr(writers_module, "TraceWriter", interrupted_on_third)
    try:
        RunWriters(tmp_path, _meta(), experts=True, gpu_sample_interval_s=None)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("expected the KeyboardInterrupt to propagate")
    assert len(opened) == 2 and all(file_closed(p) for p in opened)
