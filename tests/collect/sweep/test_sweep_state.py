"""sweep.json: a point counts as recorded only when its state says done and every file is closed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

from moecap.collect.errors import CollectError
from moecap.collect.sweep import SweepState, build_spec, expand, file_closed
from moecap.collect.writers import RunWriters

SPEC = {
    "engines": ["hf"],
    "models": ["m.json"],
    "tasks": ["synthetic:8x2"],
    "batch_sizes": [1, 2],
    "num_prompts": 2,
}


def _write_run(out: Path, run_id: str, *, close: bool = True) -> RunWriters:
    meta = run_metadata(SimConfig(run_id=run_id), QWEN15_MOE_CONFIG)
    writers = RunWriters(out, meta, experts=False, rows_per_batch=1, gpu_sample_interval_s=None)
    writers.request({"req_id": "r0", "arrival_ns": 1, "prompt_tokens": 8, "output_tokens": 2, "retries": 0})
    if close:
        writers.close()
    else:
        for w in writers.writers.values():
            w.flush()
    return writers


def test_closed_and_unclosed_files(tmp_path):
    _write_run(tmp_path, "20260101T000000Z-a-0001")
    open_writers = _write_run(tmp_path, "20260101T000000Z-b-0002", close=False)
    try:
        closed = sorted(tmp_path.glob("20260101T000000Z-a-0001.*.arrow"))
        unclosed = sorted(tmp_path.glob("20260101T000000Z-b-0002.*.arrow"))
        assert closed and unclosed
        assert all(file_closed(p) for p in closed)
        # still being written (or empty so far): no end-of-stream marker yet
        assert not any(file_closed(p) for p in unclosed)
        assert not file_closed(tmp_path / "missing.arrow")
        (tmp_path / "junk.arrow").write_bytes(b"not arrow")
        assert not file_closed(tmp_path / "junk.arrow")
    finally:
        open_writers.close()


def test_done_needs_every_file_closed_and_present(tmp_path):
    a, b = expand(build_spec(SPEC))
    state = SweepState.load(tmp_path)
    state.begin(a, "20260101T000000Z-a-0001")
    _write_run(tmp_path, "20260101T000000Z-a-0001")
    state.finish(a, "done", summary={"requests": 1})
    assert state.is_recorded(a) and not state.is_recorded(b)
    again = SweepState.load(tmp_path)  # from disk
    assert again.is_recorded(a)
    assert again.points[a.key].attempts[-1].files == sorted(
        p.name for p in tmp_path.glob("20260101T000000Z-a-0001.*.arrow")
    )
    next(tmp_path.glob("20260101T000000Z-a-0001.*requests.arrow")).unlink()
    assert not SweepState.load(tmp_path).is_recorded(a)


def test_an_unfinished_attempt_is_set_aside_not_deleted(tmp_path):
    a, _ = expand(build_spec(SPEC))
    state = SweepState.load(tmp_path)
    state.begin(a, "20260101T000000Z-a-0001")
    _write_run(tmp_path, "20260101T000000Z-a-0001")
    state.finish(a, "failed", reason="boom")
    entry = SweepState.load(tmp_path).points[a.key]
    assert (entry.status, entry.reason) == ("failed", "boom")
    assert entry.attempts[-1].files and all(f.startswith("incomplete/") for f in entry.attempts[-1].files)
    assert not list(tmp_path.glob("*.arrow"))
    assert all(file_closed(tmp_path / f) for f in entry.attempts[-1].files)
    # a killed attempt (still "running" in the state) is moved aside before the point runs again
    state.begin(a, "20260101T000000Z-a-0002")
    _write_run(tmp_path, "20260101T000000Z-a-0002")
    moved = SweepState.load(tmp_path).set_aside(a)
    assert [p.parent.name for p in moved] == ["incomplete"] * len(moved) and moved
    assert not list(tmp_path.glob("*.arrow"))


def test_a_corrupt_state_file_is_a_one_line_error(tmp_path):
    (tmp_path / "sweep.json").write_text("{not json")
    try:
        SweepState.load(tmp_path)
    except CollectError as exc:
        assert str(exc).startswith(str(tmp_path / "sweep.json")) and "\n" not in str(exc)
    else:
        raise AssertionError("expected a CollectError")
    (tmp_path / "sweep.json").write_text(json.dumps({"schema": "other/9", "points": {}}))
    try:
        SweepState.load(tmp_path)
    except CollectError as exc:
        assert "expected moecap.sweep/1" in str(exc)
    else:
        raise AssertionError("expected a CollectError")


def test_an_empty_file_of_an_unfinished_attempt_is_removed_not_kept(tmp_path):
    # a stop signal while a writer was being opened leaves a created, never-written file
    a, _ = expand(build_spec(SPEC))
    state = SweepState.load(tmp_path)
    state.begin(a, "20260101T000000Z-a-0001")
    (tmp_path / "20260101T000000Z-a-0001.dp0-pp0-tp0.steps.arrow").write_bytes(b"")
    state.finish(a, "interrupted", reason="stop")
    assert state.points[a.key].attempts[-1].files == []
    assert not list(tmp_path.rglob("*.arrow"))
