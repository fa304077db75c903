"""Which steps the per-step charts leave out: idle (0-token) steps and compile outliers, on a real
DuckDB table with hand-made steps (times, bytes and FLOPs chosen so the ratios are known)."""

from __future__ import annotations

from types import SimpleNamespace

import duckdb
import polars as pl

from moecap.analyze.report import charts as C
from moecap.analyze.report.steps import COMPILE_OUTLIER_FACTOR, excluded_steps, excluded_steps_all

BW = 1e12  # bytes/s: a step of B bytes has a memory bound of B / 1e12 s (FLOPs kept negligible)


def _db(rows: list[tuple]) -> SimpleNamespace:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE step_metrics (run_id VARCHAR, dp INT, pp INT, step INT, is_draft BOOLEAN, num_tokens INT, "
        "time_s DOUBLE, wall_s DOUBLE, bytes_total DOUBLE, flops_total DOUBLE, gpu_bandwidth DOUBLE, "
        "gpu_peak_flops DOUBLE, gpus INT)"
    )
    con.executemany(
        "INSERT INTO step_metrics VALUES (?, 0, 0, ?, false, ?, ?, ?, ?, 1.0, ?, 1e15, 1)",
        [(rid, step, tok, t, t, b, BW) for rid, step, tok, t, b in rows],
    )
    return SimpleNamespace(con=con)


def _run(rid: str) -> list[tuple]:
    # Decode steps: 8 ms against a 2 ms bound (ratio 4). A big prefill: 40 ms against a 10 ms bound
    # (ratio 4, slow in absolute terms but not an outlier). Step 1: 1.1 s against 2 ms (ratio 550).
    # Step 9: idle, no tokens.
    rows = [(rid, s, 16, 0.008, 2e9) for s in range(2, 9)]
    rows += [(rid, 0, 2048, 0.040, 1e10), (rid, 1, 16, 1.1, 2e9), (rid, 9, 0, 0.001, 1e8)]
    return rows


def test_compile_step_and_idle_step_are_left_out_a_slow_prefill_is_not():
    db = _db(_run("vllm"))
    ex = excluded_steps(db, "vllm")
    assert ex.idle == 1
    assert [(step, wall) for _, _, step, wall in ex.outliers] == [(1, 1.1)]
    kept = db.con.sql(f"SELECT step FROM step_metrics WHERE {ex.predicate()} ORDER BY step").fetchall()
    assert [s for (s,) in kept] == [0, 2, 3, 4, 5, 6, 7, 8]
    assert ex.note() == (
        "Left out: 1 idle (0-token) step; compile outlier step 1 (1.1 s) "
        f"(> {COMPILE_OUTLIER_FACTOR:g}× the run's median time / roofline bound)."
    )


def test_the_rule_is_per_run_and_a_run_without_outliers_loses_nothing():
    steady = [("hf", s, 16, 0.12, 2e9) for s in range(10)]  # host-bound (ratio 60) but even
    db = _db(_run("vllm") + steady)
    lost = excluded_steps_all(db, ["vllm", "hf"])
    assert lost["hf"].idle == 0 and lost["hf"].outliers == [] and lost["hf"].note() == ""
    assert [s for _, _, s, _ in lost["vllm"].outliers] == [1]


def test_activated_experts_chart_drops_zero_token_groups_and_says_so():
    steps = pl.DataFrame(
        {
            "phase": ["idle", "decode", "decode"],
            "tokens": [0.0, 8.0, 16.0],
            "active_experts_per_layer": [0.0, 20.0, 30.0],
            "steps": [1, 5, 5],
        }
    )
    spec = C.activated_experts_vs_tokens(steps).to_dict()
    values = [v for d in spec.get("datasets", {}).values() for v in d] or spec["layer"][0]["data"]["values"]
    assert all(v["tokens"] > 0 for v in values if "tokens" in v)
    assert "Left out: 1 idle (0-token) step." in spec["title"]["subtitle"]


def test_utilisation_line_breaks_at_a_gap():
    timeline = pl.DataFrame(
        {
            "t_start_s": [0.0, 0.1, 1.2, 1.3],
            "t_end_s": [0.1, 0.2, 1.3, 1.4],
            "s_mbu": [0.5] * 4,
            "s_mfu": [0.1] * 4,
        }
    )
    spec = C.utilisation_over_time(timeline).to_dict()
    rows = [v for d in spec.get("datasets", {}).values() for v in d]
    assert [r["segment"] for r in rows] == [0, 0, 1, 1]
    assert "breaks at 1 gap" in " ".join(spec["title"]["subtitle"])
