"""Which steps the per-step charts leave out: idle (0-token) steps and the slow (compile) steps that
`check` names, on real DuckDB tables with hand-made steps (durations chosen so the verdicts of
analyze/slow_steps.py's rule follow by the arithmetic in the comments), and on the shipped vLLM run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import duckdb
import polars as pl
import pytest

from moecap.analyze.report import charts as C
from moecap.analyze.report.steps import excluded_steps, excluded_steps_all
from moecap.analyze.slow_steps import slow_steps

MS = 1_000_000
TRACES = Path(__file__).resolve().parents[3] / "traces"


def _db(rows: list[tuple]) -> SimpleNamespace:
    """rows: (run_id, step, phase, tokens, ms). `steps` holds the spans slow_steps reads, `step_metrics`
    the duration and tokens the idle count reads."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE steps (run_id VARCHAR, dp INT, pp INT, tp INT, step INT, phase VARCHAR, num_tokens INT, "
        "is_draft BOOLEAN, gpu_start_ns BIGINT, gpu_end_ns BIGINT, t_start_ns BIGINT, t_end_ns BIGINT)"
    )
    con.execute(
        "CREATE TABLE step_metrics (run_id VARCHAR, dp INT, pp INT, step INT, is_draft BOOLEAN, num_tokens INT, "
        "time_s DOUBLE)"
    )
    for rid, step, phase, tokens, ms in rows:
        start = step * 10_000 * MS
        end = start + int(ms * MS)
        con.execute(
            "INSERT INTO steps VALUES (?, 0, 0, 0, ?, ?, ?, false, ?, ?, ?, ?)",
            [rid, step, phase, tokens, start, end, start, end],
        )
        con.execute(
            "INSERT INTO step_metrics VALUES (?, 0, 0, ?, false, ?, ?)", [rid, step, tokens, ms / 1e3]
        )
    return SimpleNamespace(con=con)


def _run(rid: str) -> list[tuple]:
    # Decodes 2-9: 16 tokens, 8 ms (their phase median). Prefills 0, 10, 13: 0.0195 ms a token (40 ms for
    # 2048 tokens: big but proportional). Only 3 prefills and 2 mixed steps: both phases are judged against
    # the pooled cost per token, median 0.0195 ms (costs 0.0195 x3, 9/23 = 0.39, 1100/1162 = 0.95).
    # Mixed step 1 (vLLM's compile step): typical max(1162 x 0.0195 = 22.7, 8) ms; 1100 >= 227 and 1077
    # over: named. Mixed step 12, 23 tokens in 9 ms: typical max(0.45, 8) = 8 ms; 9 < 80: kept.
    # Step 11: idle (no tokens).
    rows = [(rid, s, "decode", 16, 8.0) for s in range(2, 10)]
    rows += [
        (rid, 0, "prefill", 2048, 40.0),
        (rid, 10, "prefill", 1024, 20.0),
        (rid, 13, "prefill", 512, 10.0),
    ]
    rows += [(rid, 1, "mixed", 1162, 1100.0), (rid, 12, "mixed", 23, 9.0), (rid, 11, "idle", 0, 1.0)]
    return rows


def test_compile_step_and_idle_step_are_left_out_a_slow_prefill_is_not():
    db = _db(_run("vllm"))
    ex = excluded_steps(db, "vllm")
    assert ex.idle == 1
    assert ex.outliers == [(0, 0, 1, 1.1)]
    kept = db.con.sql(f"SELECT step FROM step_metrics WHERE {ex.predicate()} ORDER BY step").fetchall()
    assert [s for (s,) in kept] == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]
    # Over time the idle step stays (its time was spent); the compile step goes.
    kept = db.con.sql(
        f"SELECT step FROM step_metrics WHERE {ex.predicate(idle=False)} ORDER BY step"
    ).fetchall()
    assert [s for (s,) in kept] == [0, *range(2, 14)]
    assert ex.note() == (
        "Left out: 1 idle (0-token) step; compile outlier step 1 (1.1 s) "
        "(≥ 10× a typical step of its phase and ≥ 100 ms over it, as `check` names them)."
    )
    assert ex.note(idle=False).startswith("Left out: compile outlier step 1 (1.1 s)")


def test_the_report_leaves_out_exactly_the_steps_check_names():
    # One rule, one definition: the report's exclusions are slow_steps' verdict on the same rows.
    db = _db(_run("vllm"))
    rows = db.con.sql("SELECT * EXCLUDE (run_id) FROM steps").pl()
    named = [(s.dp, s.pp, s.step) for s in slow_steps(rows)]
    assert named == [(0, 0, 1)]
    assert [(dp, pp, step) for dp, pp, step, _ in excluded_steps(db, "vllm").outliers] == named


def test_the_rule_is_per_run_and_a_run_without_outliers_loses_nothing():
    steady = [("hf", s, "decode", 16, 120.0) for s in range(10)]  # host-bound but even
    db = _db(_run("vllm") + steady)
    lost = excluded_steps_all(db, ["vllm", "hf"])
    assert lost["hf"].idle == 0 and lost["hf"].outliers == [] and lost["hf"].note() == ""
    assert [s for _, _, s, _ in lost["vllm"].outliers] == [1]


@pytest.mark.skipif(
    not (TRACES / "vllm-0.26.0-qwen15moe-graphs.dp0-pp0-tp0.steps.arrow").exists(),
    reason="no shipped vLLM trace",
)
def test_shipped_vllm_run_time_charts_leave_out_its_compile_step(tmp_path):
    # The shipped vLLM run's step 1 compiles the MoE kernel: 1.13 s of GPU time against ~8 ms decodes. Binned
    # over time it was a 1,129 ms bar beside 8 ms ones; left out, no bin's mean busy time reaches 200 ms (its
    # prefills take ~120-150 ms), and both charts over time say what was left out.
    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.report import figures as Fg
    from moecap.analyze.report import frames as F

    analysis = analyze_paths(
        sorted(str(p) for p in TRACES.glob("vllm-0.26.0-qwen15moe-graphs.*.arrow")), cache_dir=tmp_path
    )
    (ctx,) = analysis.contexts
    rid = ctx.run.run_id
    ex = excluded_steps(analysis.db, rid)
    assert [step for _, _, step, _ in ex.outliers] == [1]
    everything = F.timeline_frame(analysis.db, rid)
    assert everything["busy_ms_per_step"].max() > 1000  # what the chart drew before: the test can fail
    sec = Fg.run_section(analysis, ctx, "vllm", 1, Fg.FigureOptions(), ex)
    by_slug = {f.slug.rsplit("-", 1)[-1]: f.spec() for f in sec.figures}
    for slug in ("time_accounting", "utilisation"):
        spec = by_slug[slug]
        assert any("compile outlier step 1" in line for line in spec["title"]["subtitle"]), slug
    rows = [r for d in by_slug["time_accounting"]["datasets"].values() for r in d if r["part"] == "GPU busy"]
    assert rows and max(r["ms"] for r in rows) < 200
    assert any("Charts over time" in n and "compile outlier step 1" in n for n in sec.notes)


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


def test_note_names_warm_up_steps_by_their_own_rule():
    """A step named by the first-use rule is called a warm-up step with that rule's bounds, not a
    compile outlier with the 10x rule's (hand-built exclusion)."""
    from moecap.analyze.report.steps import Excluded

    ex = Excluded(idle=0, outliers=[(0, 0, 0, 0.1395), (0, 0, 40, 1.258)], warmups={(0, 0, 0)})
    note = ex.note()
    assert "compile outlier step 40 (1.3 s) (≥ 10× a typical step" in note
    assert "warm-up step 0 (0.14 s) (the first of its shape, ≥ 1.5× and ≥ 20 ms over" in note
    assert Excluded(outliers=[(0, 0, 1, 1.1)]).note().startswith("Left out: compile outlier step 1 (1.1 s)")
