"""Hand-derived cases for metrics/steps.py and metrics/window.py: the window's busy time, idle steps,
pipeline stages and data-parallel streams (real DuckDB, the layer's own SQL, numbers worked by hand)."""

from __future__ import annotations

from typing import Any

import duckdb
import pytest

from moecap.analyze.metrics.steps import STEP_SMBU_SQL, STEP_SMFU_SQL, WINDOW_STEPS_SQL, summary_rows
from moecap.analyze.metrics.window import RUN_WINDOWS_COLUMNS, Window, WindowSpec

BW = 2e12
PEAK = 1e15


def _con(steps: list[dict[str, Any]], window: Window, last_pp: int = 0) -> duckdb.DuckDBPyConnection:
    """A connection with `step_metrics` (the given steps + the layer's per-step S-MBU / S-MFU),
    `run_windows`, `run_settings` and the layer's `window_steps`."""
    con = duckdb.connect()
    base = {
        "run_id": "r",
        "dp": 0,
        "pp": 0,
        "phase": "decode",
        "is_draft": False,
        "num_reqs": 16,
        "gpus": 1,
        "active_experts": 10.0,
        "bytes_routed_experts": 0.0,
        "bytes_kv_read": 0.0,
        "flops_total": 1e9,
        "logit_rows": None,
        "host_gap_s": 0.0,
        "gpu_bandwidth": BW,
        "gpu_peak_flops": PEAK,
    }
    rows = []
    for i, s in enumerate(steps):
        r = {**base, "step": i, "t_start_ns": i * 10**7, **s}
        r["logit_rows"] = r["num_tokens"] if r["logit_rows"] is None else r["logit_rows"]
        r["wall_s"] = r["time_s"] + r["host_gap_s"]
        rows.append(r)
    import polars as pl

    con.register("raw", pl.DataFrame(rows))
    con.execute(
        f"CREATE TABLE step_metrics AS SELECT s.*, {STEP_SMBU_SQL} AS s_mbu, {STEP_SMFU_SQL} AS s_mfu FROM raw s"
    )
    con.execute("CREATE TABLE run_windows (" + ", ".join(f"{c} {t}" for c, t in RUN_WINDOWS_COLUMNS) + ")")
    con.execute(
        f"INSERT INTO run_windows VALUES ({', '.join('?' * len(RUN_WINDOWS_COLUMNS))})", window.row("r")
    )
    con.execute(
        "CREATE TABLE run_settings AS SELECT 'r' AS run_id, ? AS last_pp, 24 AS num_moe_layers", [last_pp]
    )
    con.execute(f"CREATE VIEW window_steps AS {WINDOW_STEPS_SQL}")
    return con


def test_a_window_of_separate_stretches_is_charged_its_busy_time() -> None:
    # 20 steps of 10 ms wall (8 ms GPU + 2 ms host gap), 100 tokens each, batch 16; between the two
    # stretches 100 steps of batch 4 (ramp-down and back), 1 s in all, outside the steady window.
    steady = {"num_reqs": 16, "num_tokens": 100, "bytes_total": 1e9, "time_s": 0.008, "host_gap_s": 0.002}
    dip = {"num_reqs": 4, "num_tokens": 4, "bytes_total": 1e9, "time_s": 0.008, "host_gap_s": 0.002}
    con = _con([steady] * 10 + [dip] * 100 + [steady] * 10, Window("steady", "", min_requests=15))
    (got,) = summary_rows(con, "window_steps").values()
    every = got["all"]
    # Busy time = 20 × 10 ms = 0.2 s; tokens 2,000 -> 10,000 tok/s. First-to-last would be
    # 119 steps × 10 ms + 10 ms = 1.2 s -> 1,667 tok/s.
    assert every["steps"] == 20 and every["tokens"] == 2000
    assert every["window_s"] == pytest.approx(0.2)
    assert every["window_total_token_throughput"] == pytest.approx(10_000)
    assert every["window_output_throughput"] == pytest.approx(10_000)
    assert every["gpu_busy_fraction"] == pytest.approx(0.8)
    # S-MBU: 20 GB / (2 TB/s × 0.16 s) = 0.0625.
    assert every["s_mbu"] == pytest.approx(0.0625)


def test_idle_steps_have_no_smbu_and_stay_out_of_the_ratio_but_keep_their_time() -> None:
    # Two decode steps: 1 GB in 1 ms each; one idle pass: 0 tokens, 4.9 µs, charged 2.47 GB of weights.
    work = {"num_tokens": 8, "bytes_total": 1e9, "time_s": 1e-3}
    idle = {"num_tokens": 0, "bytes_total": 2.47e9, "time_s": 4.9e-6, "phase": "idle"}
    con = _con([work, idle, work], Window("all", ""))
    per_step = con.execute("SELECT s_mbu FROM step_metrics ORDER BY step").fetchall()
    # 1 GB / (2 TB/s × 1 ms) = 0.5 each; the idle pass would be 2.47e9 / (2e12 × 4.9e-6) = 252 (25,200 %).
    assert [r[0] for r in per_step] == [pytest.approx(0.5), None, pytest.approx(0.5)]
    (got,) = summary_rows(con, "window_steps").values()
    # 2 GB / (2 TB/s × 2 ms) = 0.5; counting the idle pass would give 4.47 GB / (2e12 × 2.0049 ms) = 1.115.
    assert got["all"]["s_mbu"] == pytest.approx(0.5)
    assert got["all"]["s_mfu"] == pytest.approx(2e9 / (PEAK * 2e-3))
    assert got["idle"]["s_mbu"] is None and got["idle"]["s_mfu"] is None
    assert got["all"]["window_s"] == pytest.approx(2e-3 + 4.9e-6)  # busy time includes the idle pass


def test_pipeline_stages_count_tokens_once_and_streams_run_side_by_side() -> None:
    # One engine step on 2 PP stages (stage 1 samples), on each of 2 DP replicas: 4 rows.
    rows = [
        {
            "dp": dp,
            "pp": pp,
            "num_tokens": 50,
            "logit_rows": 0 if pp == 0 else 50,
            "bytes_total": 1e9,
            "time_s": 0.01,
        }
        for dp in (0, 1)
        for pp in (0, 1)
    ]
    con = _con(rows, Window("all", ""), last_pp=1)
    every = summary_rows(con, "window_steps")["r"]["all"]
    # steps and tokens on stage 0 (2 replicas × 50), output on the last stage; the replicas run at
    # the same time, so the busy time is one stream's 10 ms, not 20 or 40.
    assert every["steps"] == 2 and every["tokens"] == 100 and every["output_tokens"] == 100
    assert every["window_s"] == pytest.approx(0.01)
    assert every["window_output_throughput"] == pytest.approx(10_000)
    assert every["gpu_seconds"] == pytest.approx(0.04)
    assert every["s_mbu"] == pytest.approx(4e9 / (BW * 0.04))


def test_window_text_is_parsed_once_with_one_line_errors() -> None:
    assert WindowSpec.parse("steps:3-9") == WindowSpec("steps", first_step=3, last_step=9)
    assert WindowSpec.parse("time:1.5-2").start_s == 1.5
    from moecap.analyze.errors import InputError

    with pytest.raises(InputError, match=r"--window 'stedy': expected steady, all, steps:A-B or time:A-B"):
        WindowSpec.parse("stedy")


def test_step_time_is_the_gpu_span_else_the_host_span_and_wall_time_adds_the_gap() -> None:
    import numpy as np

    from moecap.analyze.metrics.steps import host_gap_and_wall_s, step_time_s

    # Step 1: GPU span 2 ms (host 3 ms); step 2: no GPU span, host 5 ms; step 3: GPU span 1 ms.
    g0 = np.array([1_000_000.0, np.nan, 9_000_000.0])
    g1 = np.array([3_000_000.0, np.nan, 10_000_000.0])
    t0 = np.array([0, 4_000_000, 8_500_000])
    t1 = np.array([3_000_000, 9_000_000, 10_500_000])
    time_s, has_gpu = step_time_s(g0, g1, t0, t1)
    assert has_gpu.tolist() == [True, False, True]
    assert time_s.tolist() == pytest.approx([0.002, 0.005, 0.001])
    # Spans on the GPU timeline: [1, 3], [4, 9], [9, 10] ms; the next starts 1 ms, 0 ms and (last) 0 ms later.
    gap, wall = host_gap_and_wall_s(time_s, np.array([3e6, 9e6, 10e6]), np.array([4e6, 8.9e6, 10e6]))
    assert gap.tolist() == pytest.approx([0.001, 0.0, 0.0])  # an overlap (8.9 < 9 ms) is no gap
    assert wall.tolist() == pytest.approx([0.003, 0.005, 0.001])
