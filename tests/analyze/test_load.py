"""Loading traces into the DuckDB views: cache, truncation, rank rules, bad files (ranks whose counts
are summed: test_load_rank_sum.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from moecap.analyze.load import load_traces
from moecap.schemas import read_trace_file


def test_views_hold_exactly_the_trace_rows(synthetic_run, tmp_path):
    trace, truth = synthetic_run
    db = load_traces([trace], cache_dir=tmp_path / "cache")
    steps_file = next(trace.glob("*.steps.arrow"))
    raw = read_trace_file(steps_file).table
    assert db.con.execute("SELECT count(*), sum(num_tokens) FROM steps").fetchall()[0] == (
        raw.num_rows,
        pc.sum(raw.column("num_tokens")).as_py(),
    )
    experts = read_trace_file(next(trace.glob("*.experts.arrow"))).table
    counts = np.asarray(pc.list_flatten(experts.column("counts"))).reshape(experts.num_rows, 24, 60)
    per_layer = db.con.execute(
        "SELECT layer, sum(tokens) FROM expert_tokens GROUP BY layer ORDER BY layer"
    ).fetchall()
    assert [int(v) for _, v in per_layer] == counts.sum(axis=(0, 2)).tolist()
    # Every layer routes tokens x top_k (the simulator's multinomial guarantees it).
    assert {int(v) for _, v in per_layer} == {sum(s["tokens"] for s in truth["steps"]) * 4}
    totals = db.con.execute("SELECT sum(tokens) FROM expert_totals").fetchall()[0][0]
    assert totals == counts.sum()
    active = db.con.execute("SELECT active_experts FROM expert_step_stats ORDER BY step").fetchall()
    assert [a for (a,) in active] == (counts > 0).sum(axis=(1, 2)).tolist()


def test_second_load_uses_the_cache_and_a_touched_file_is_reconverted(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    first = load_traces([trace], cache_dir=tmp_path / "cache")
    assert not any(f.from_cache for r in first.runs.values() for f in r.files)
    second = load_traces([trace], cache_dir=tmp_path / "cache")
    assert all(f.from_cache for r in second.runs.values() for f in r.files)
    steps_file = next(trace.glob("*.steps.arrow"))
    data = steps_file.read_bytes()
    steps_file.write_bytes(data[: len(data) - 20])  # truncate: size and mtime change
    third = load_traces([trace], cache_dir=tmp_path / "cache")
    steps = next(f for r in third.runs.values() for f in r.files if f.table_kind == "steps")
    assert not steps.from_cache and not steps.complete
    assert any("truncated" in w for w in third.warnings)


def test_bad_files_are_listed_and_the_rest_load(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    (trace / "garbage.arrow").write_bytes(b"not arrow")
    db = load_traces([trace], cache_dir=tmp_path / "cache")
    assert len(db.runs) == 1
    assert len(db.errors) == 1 and "garbage.arrow" in db.errors[0]


def test_two_runs_in_one_glob_stay_apart(tmp_path):
    from synthetic_traces import SimConfig, simulate_run

    simulate_run(tmp_path / "t", SimConfig(run_id="20260101T000000Z-synthetic-a-0001"))
    simulate_run(tmp_path / "t", SimConfig(run_id="20260101T000000Z-synthetic-b-0002", concurrency=8, seed=3))
    db = load_traces([str(tmp_path / "t" / "*.arrow")], cache_dir=tmp_path / "cache")
    assert set(db.runs) == {"20260101T000000Z-synthetic-a-0001", "20260101T000000Z-synthetic-b-0002"}
    rows = db.con.execute("SELECT run_id, batch_size FROM runs ORDER BY run_id").fetchall()
    assert rows == [("20260101T000000Z-synthetic-a-0001", 4), ("20260101T000000Z-synthetic-b-0002", 8)]


def test_non_recording_tp_rank_is_not_double_counted(tmp_path):
    """Two TP ranks' files of one run: the views keep the lowest TP rank's rows only."""
    from synthetic_traces import SimConfig, simulate_run

    from moecap.schemas import TraceWriter, read_trace_file, trace_file_name

    simulate_run(tmp_path / "t", SimConfig())
    src = next((tmp_path / "t").glob("*.steps.arrow"))
    tf = read_trace_file(src)
    twin = tf.run.with_rank(tp=1)
    with TraceWriter(tmp_path / "t" / trace_file_name(twin, "steps"), "steps", twin) as w:
        w.write_rows(tf.table.to_pylist())
    db = load_traces([tmp_path / "t"], cache_dir=tmp_path / "cache")
    assert db.con.execute("SELECT count(*), count(DISTINCT tp) FROM steps").fetchall()[0] == (tf.num_rows, 1)


def test_pipeline_stages_join_by_layer_range_without_double_counting(tmp_path):
    """A run split into two PP stages (layers 0-11 and 12-23, each stage its own files) gives the same
    steps, tokens and bytes as the single-stage run; GPU time counts both stages' GPUs."""
    import dataclasses

    import pyarrow as pa
    from synthetic_traces import SimConfig, simulate_run

    from moecap.analyze.pipeline import Options, analyze_paths
    from moecap.schemas import TraceWriter, read_trace_file, trace_file_name

    simulate_run(tmp_path / "one", SimConfig())
    steps = read_trace_file(next((tmp_path / "one").glob("*.steps.arrow")))
    experts = read_trace_file(next((tmp_path / "one").glob("*.experts.arrow")))
    base = dataclasses.replace(steps.run, parallelism=dataclasses.replace(steps.run.parallelism, pp=2))
    counts = np.asarray(pc.list_flatten(experts.table.column("counts"))).reshape(experts.num_rows, 24, 60)
    out = tmp_path / "pp"
    for pp, (lo, hi) in enumerate(((0, 12), (12, 24))):
        run = base.with_rank(pp=pp, layer_start=lo, layer_end=hi)
        with TraceWriter(out / trace_file_name(run, "steps"), "steps", run) as w:
            w.write_rows(steps.table.to_pylist())
        with TraceWriter(out / trace_file_name(run, "experts"), "experts", run) as w:
            part = counts[:, lo:hi, :].reshape(experts.num_rows, -1)
            w.write_batch(
                pa.record_batch({"step": experts.table.column("step").combine_chunks(), "counts": list(part)})
            )
    for f in (tmp_path / "one").glob("*.client.*"):
        (out / f.name.replace(steps.run.run_id, base.run_id)).write_bytes(f.read_bytes())
    one = analyze_paths([tmp_path / "one"], Options(window="all"), cache_dir=tmp_path / "c").document["runs"][
        0
    ]
    two = analyze_paths([out], Options(window="all"), cache_dir=tmp_path / "c").document["runs"][0]
    a, b = one["metrics"]["steps"]["all"], two["metrics"]["steps"]["all"]
    assert (b["steps"], b["tokens"], b["output_tokens"]) == (a["steps"], a["tokens"], a["output_tokens"])
    assert b["bytes_total"] == pytest.approx(a["bytes_total"], rel=1e-12)
    assert b["activated_experts_per_step_mean"] == pytest.approx(a["activated_experts_per_step_mean"])
    # Each stage's GPU is busy for the whole recorded span: twice the GPU-seconds, half the S-MBU.
    assert b["gpu_seconds"] == pytest.approx(2 * a["gpu_seconds"])
    assert b["s_mbu"] == pytest.approx(a["s_mbu"] / 2, rel=1e-9)


def test_a_file_renamed_to_another_runs_id_is_one_clear_line_and_the_rest_loads(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    outputs = next(trace.glob("*.outputs.arrow"))
    renamed = trace / outputs.name.replace(
        "20260101T000000Z-synthetic-qwen15moe-0000", "20260102T000000Z-other-run-0001"
    )
    outputs.rename(renamed)
    db = load_traces([trace], cache_dir=tmp_path / "cache")
    assert len(db.runs) == 1
    (error,) = db.errors
    assert error.startswith(str(renamed)) and "file name says run '20260102T000000Z-other-run-0001'" in error
