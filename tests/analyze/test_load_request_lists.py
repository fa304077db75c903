"""The request lists of steps files are cached on first use, not at load (metrics need only their sums)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from moecap.analyze.analysis import Options
from moecap.analyze.load import load_traces
from moecap.analyze.metrics.step_costs import cost_model, step_costs
from moecap.analyze.pipeline import analyze_paths
from moecap.analyze.specs import model_spec_from_config
from moecap.schemas import read_trace_file

LISTS = ("req_ids", "req_prefix_lens", "req_new_tokens", "req_num_logits", "req_spec_tokens")


def _steps_parquet(cache):
    return sorted(cache.glob("*.steps.parquet"))


def test_lists_are_cached_on_first_use_of_con_and_equal_the_trace(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    cache = tmp_path / "cache"
    db = load_traces([trace], cache_dir=cache)
    assert db.request_lists_pending and not _steps_parquet(cache)
    with db.defer_request_lists():
        # Scalar columns work without the lists; a list column fails loudly instead of reading NULLs.
        assert db.con.execute("SELECT count(*) FROM steps").fetchall()[0][0] > 0
        assert not _steps_parquet(cache)
        with pytest.raises(Exception, match="req_ids"):
            db.con.execute("SELECT req_ids FROM steps").fetchall()
    raw = read_trace_file(next(trace.glob("*.steps.arrow"))).table
    got = db.con.sql(f"SELECT {', '.join(LISTS)}, num_tokens FROM steps ORDER BY step").to_arrow_table()
    assert len(_steps_parquet(cache)) == 1 and not db.request_lists_pending
    order = pc.sort_indices(raw, [("step", "ascending")])
    for name in (*LISTS, "num_tokens"):
        assert got.column(name).to_pylist() == raw.take(order).column(name).to_pylist(), name


def test_a_second_load_reuses_the_cached_lists_and_a_touched_trace_drops_them(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    cache = tmp_path / "cache"
    load_traces([trace], cache_dir=cache).con.execute("SELECT count(*) FROM steps")
    (built,) = _steps_parquet(cache)
    mtime = built.stat().st_mtime_ns
    again = load_traces([trace], cache_dir=cache)
    assert not again.request_lists_pending
    assert again.con.execute("SELECT sum(len(req_ids)) FROM steps").fetchall()[0][0] > 0
    assert built.stat().st_mtime_ns == mtime  # read, not rebuilt
    steps_file = next(trace.glob("*.steps.arrow"))
    data = steps_file.read_bytes()
    steps_file.write_bytes(data[: len(data) - 20])  # size and mtime change: a new cache entry
    touched = load_traces([trace], cache_dir=cache)
    assert touched.request_lists_pending
    touched.con.execute("SELECT count(*) FROM steps").fetchall()
    assert len(_steps_parquet(cache)) == 2


def test_a_trace_changed_after_loading_is_an_error_not_mixed_rows(synthetic_run, tmp_path):
    from moecap.schemas import TraceError

    trace, _ = synthetic_run
    db = load_traces([trace], cache_dir=tmp_path / "cache")
    steps_file = next(trace.glob("*.steps.arrow"))
    steps_file.write_bytes(steps_file.read_bytes()[:-20])
    with pytest.raises(TraceError, match="changed since it was loaded"):
        db.ensure_request_lists()


def test_analyze_paths_without_client_tables_builds_no_list_cache(tmp_path):
    from synthetic_traces import bulk_decode_trace

    bulk_decode_trace(tmp_path / "trace", 3000, experts=False, chunk=1000)
    cache = tmp_path / "cache"
    a = analyze_paths([tmp_path / "trace"], Options(window="all"), cache_dir=cache, expert_counts=False)
    assert a.document["runs"][0]["metrics"]["steps"]["all"]["steps"] == 3000
    assert not _steps_parquet(cache)
    # The lists are still there for SQL, cached on first use.
    assert a.db.con.execute("SELECT sum(len(req_prefix_lens)) FROM steps").fetchall()[0][0] > 0
    assert _steps_parquet(cache)


def test_step_metrics_from_cached_sums_equal_step_costs_over_the_lists(synthetic_run, tmp_path):
    trace, _ = synthetic_run
    a = analyze_paths([trace], Options(window="all"), cache_dir=tmp_path / "cache")
    ctx = a.contexts[0]
    raw = read_trace_file(next(trace.glob("*.steps.arrow"))).table
    active = a.db.con.execute("SELECT active_experts FROM expert_step_stats ORDER BY step").fetchnumpy()
    want = step_costs(raw.sort_by("step"), cost_model(ctx.spec), active["active_experts"].astype(float))
    got = a.db.con.execute("SELECT * FROM step_metrics ORDER BY step").fetchnumpy()
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_a_model_config_with_other_attention_windows_rescans_for_their_sums(synthetic_run, tmp_path):
    """The cache holds sums for the trace's own windows (full attention here); a sliding window from
    --model-config gets its sums from one more pass over the trace, equal to the list formula."""
    from synthetic_traces import QWEN15_MOE_CONFIG

    trace, _ = synthetic_run
    cfg = {**QWEN15_MOE_CONFIG, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 12}
    spec = model_spec_from_config(cfg)
    assert set(spec.attention_windows) - {None}  # some layers do have a window
    a = analyze_paths([trace], Options(window="all", model_config=cfg), cache_dir=tmp_path / "cache")
    raw = read_trace_file(next(trace.glob("*.steps.arrow"))).table.sort_by("step")
    active = a.db.con.execute("SELECT active_experts FROM expert_step_stats ORDER BY step").fetchnumpy()
    want = step_costs(raw, cost_model(spec), active["active_experts"].astype(float))
    got = a.db.con.execute("SELECT * FROM step_metrics ORDER BY step").fetchnumpy()
    for name in ("bytes_kv_read", "flops_attention", "bytes_total", "flops_total", "context_tokens"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_request_lists_that_do_not_line_up_make_the_file_an_error_line(tmp_path):
    import pyarrow as pa
    from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

    from moecap.schemas import TraceWriter, trace_file_name

    run = run_metadata(SimConfig(run_id="20260101T000000Z-bad-lists"), QWEN15_MOE_CONFIG)
    out = tmp_path / "trace"
    w = TraceWriter(out / trace_file_name(run, "steps"), "steps", run, blocking=True)
    w.write_batch(
        pa.record_batch(
            {
                "step": [0],
                "t_start_ns": [0],
                "t_end_ns": [10],
                "gpu_start_ns": [1],
                "gpu_end_ns": [9],
                "phase": pa.array(["decode"]).dictionary_encode(),
                "is_draft": [False],
                "num_reqs": pa.array([2], pa.int32()),
                "num_tokens": pa.array([2], pa.int32()),
                "req_ids": [["a", "b"]],
                "req_prefix_lens": pa.array([[5, 6]], pa.list_(pa.int32())),
                "req_new_tokens": pa.array([[1]], pa.list_(pa.int32())),
                "req_num_logits": pa.array([[1, 1]], pa.list_(pa.int16())),
                "req_spec_tokens": pa.nulls(1, pa.list_(pa.int16())),
            }
        )
    )
    w.close()
    db = load_traces([out], cache_dir=tmp_path / "cache")
    assert not db.runs and len(db.errors) == 1 and "differ in length" in db.errors[0]
