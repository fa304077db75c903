"""For every shipped trace, each metric has the same value in every consumer that shows it.

Consumers: metrics.json (`--out`), the terminal summary, the `run_metrics` / `request_metrics` SQL
views, the report's frames and its HTML summary table, the leaderboard, `whatif`'s measured column,
the fleet dataset (each run analysed alone by the fleet task, read back through `open_dataset`), and
the collector's driver summary (over the same requests rebuilt as the driver's records). They all run the definitions of
`moecap.analyze.metrics` / `moecap.schemas.latency`; this test is what keeps it that way.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console

from moecap.analyze.cost import load_cost_settings
from moecap.analyze.fleet import open_dataset
from moecap.analyze.fleet.discover import discover
from moecap.analyze.fleet.task import analyze_group
from moecap.analyze.output import print_summary, write_outputs
from moecap.analyze.pipeline import Analysis, analyze_paths
from moecap.analyze.report.frames import run_labels, runs_frame, throughput_frame
from moecap.analyze.report.html import render_report
from moecap.analyze.report.leaderboard import leaderboard_frame
from moecap.analyze.sql.views import define_derived_views
from moecap.analyze.whatif import whatif
from moecap.collect.datasets.base import Sample
from moecap.collect.driver.summary import summarize
from moecap.collect.workload import RequestRecord

TRACES = Path(__file__).resolve().parents[3] / "traces"
REL = 1e-9

STEP_METRICS = (
    "steps",
    "tokens",
    "output_tokens",
    "s_mbu",
    "s_mfu",
    "step_time_s_mean",
    "gpu_seconds",
    "window_s",
    "gpu_busy_fraction",
    "window_total_token_throughput",
    "window_output_throughput",
    "activated_experts_per_layer_mean",
)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, rel=REL, abs=1e-12)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    folders = [TRACES, *sorted(d for d in TRACES.rglob("*") if d.is_dir())]  # e.g. a sweep's folder
    return analyze_paths([str(d) for d in folders], cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def document(analysis: Analysis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """metrics.json as `--out` writes it (what a user reads), not the in-memory document."""
    out = tmp_path_factory.mktemp("out")
    write_outputs(analysis, out)
    return json.loads((out / "metrics.json").read_text())


def _runs(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in document["runs"] if r["metrics"]["steps"]]


def test_every_shipped_trace_is_covered(document: dict[str, Any]) -> None:
    steps_files = list(TRACES.rglob("*.steps.arrow"))  # one recording process per shipped run
    assert len(_runs(document)) == len(steps_files) >= 20


def test_run_metrics_view_equals_metrics_json(analysis: Analysis, document: dict[str, Any]) -> None:
    define_derived_views(analysis.db.con)
    rel = analysis.db.con.sql("SELECT * FROM run_metrics")
    rows = {(r[0], r[1]): dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()}
    n = 0
    for run in _runs(document):
        for phase, values in run["metrics"]["steps"].items():
            row = rows[(run["run_id"], phase)]
            for name in STEP_METRICS:
                assert _same(row[name], values[name]), (run["run_id"], phase, name)
                n += 1
    assert n > 100


def test_request_metrics_view_equals_metrics_json(analysis: Analysis, document: dict[str, Any]) -> None:
    define_derived_views(analysis.db.con)
    for run in document["runs"]:
        req = run["metrics"]["requests"]
        if not req.get("succeeded"):
            continue
        ttft, tpot, e2e, out = analysis.db.con.execute(
            "SELECT avg(ttft_s), avg(tpot_s), avg(e2e_s), sum(output_tokens) FROM request_metrics "
            "WHERE run_id = ? AND ok",
            [run["run_id"]],
        ).fetchall()[0]
        assert _same(ttft, req["ttft_s"]["mean"]) and _same(e2e, req["e2e_s"]["mean"]), run["run_id"]
        assert _same(tpot, req["tpot_s"]["mean"]) and out == req["output_tokens"], run["run_id"]


def test_report_frames_and_leaderboard_show_metrics_json(
    analysis: Analysis, document: dict[str, Any]
) -> None:
    # The report's frames and the leaderboard read the analysis' views and frames, not metrics.json.
    frame = runs_frame(analysis)
    board = leaderboard_frame(analysis)
    labels = run_labels(analysis)
    tput = throughput_frame(analysis.db, labels, analysis).filter(pl.col("kind") == "run")
    for run in _runs(document):
        steps, req = run["metrics"]["steps"], run["metrics"]["requests"]
        row = frame.filter(pl.col("run_id") == run["run_id"]).row(0, named=True)
        assert _same(row["window_output_throughput"], steps["all"]["window_output_throughput"])
        assert _same(row["output_throughput"], req.get("output_throughput"))
        assert _same(row["ttft_ms"], None if req.get("ttft_s") is None else req["ttft_s"]["mean"] * 1e3)
        assert _same(row["prefill_smbu"], (steps.get("prefill") or {}).get("s_mbu"))
        assert _same(row["decode_smbu"], (steps.get("decode") or {}).get("s_mbu"))
        assert _same(
            row["cost_usd_per_m_output_tokens"], run["metrics"]["cost"].get("usd_per_1m_output_tokens")
        )
        if run["run_id"] in board["run_id"].to_list():
            b = board.filter(pl.col("run_id") == run["run_id"]).row(0, named=True)
            assert _same(b["window_output_throughput"], steps["all"]["window_output_throughput"])
        t = tput.filter(pl.col("run") == labels[run["run_id"]])
        if t.height:
            assert _same(t["window_output_throughput"][0], steps["all"]["window_output_throughput"])


def test_terminal_summary_prints_metrics_json(document: dict[str, Any]) -> None:
    buf = io.StringIO()
    print_summary(document, Console(file=buf, width=400))
    text = buf.getvalue()
    for run in _runs(document):
        w = run["metrics"]["steps"]["all"]["window_output_throughput"]
        shown = f"{w:,.0f}" if w >= 100 else f"{w:.3g}"  # the summary's 3 significant digits
        assert f"window_output_throughput {shown} tok/s" in text, run["run_id"]


def test_whatif_measured_column_is_metrics_json(analysis: Analysis, document: dict[str, Any]) -> None:
    doc = whatif(analysis, [], load_cost_settings())
    by_id = {r["run_id"]: r for r in document["runs"]}
    checked = 0
    for w in doc["runs"]:
        if "error" in w:
            continue
        run = by_id[w["run_id"]]
        for phase, values in run["metrics"]["steps"].items():
            got = w["measured"]["phases"][phase]
            for name in STEP_METRICS:
                assert _same(got[name], values[name]), (w["run_id"], phase, name)
        req = run["metrics"]["requests"]
        if req.get("succeeded"):
            got = w["measured"]["requests"]
            for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
                assert _same(got[key]["mean"], req[key]["mean"]), (w["run_id"], key)
            for key in ("output_throughput", "request_throughput", "total_token_throughput"):
                assert _same(got[key], req[key]), (w["run_id"], key)
        assert _same(
            w["measured"]["cost"]["usd_per_1m_output_tokens"],
            run["metrics"]["cost"]["usd_per_1m_output_tokens"],
        ), w["run_id"]
        checked += 1
    assert checked >= 15


def _records(analysis: Analysis, run_id: str) -> list[RequestRecord]:
    rows = analysis.db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[run_id]).pl()
    out = []
    for i, r in enumerate(rows.iter_rows(named=True)):
        rec = RequestRecord(
            r["req_id"], Sample(sample_id=str(i), dataset="trace", prompt=""), r["arrival_ns"], index=i
        )
        rec.first_token_ns, rec.finish_ns = r["first_token_ns"], r["finish_ns"]
        rec.prompt_tokens, rec.output_tokens = r["prompt_tokens"], r["output_tokens"]
        rec.chunk_times_ns, rec.chunk_tokens = r["chunk_times_ns"] or [], r["chunk_tokens"] or []
        rec.error = r["error"]
        out.append(rec)
    return out


def test_driver_summary_is_metrics_json(analysis: Analysis, document: dict[str, Any]) -> None:
    checked = 0
    for run in document["runs"]:
        req = run["metrics"]["requests"]
        if not req.get("succeeded"):
            continue
        s = summarize(_records(analysis, run["run_id"]))
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            for stat in ("mean", "p50", "p99", "n"):
                assert _same(s[key][stat], req[key][stat]), (run["run_id"], key, stat)
        for key in ("makespan_s", "output_throughput", "request_throughput", "total_token_throughput"):
            assert _same(s[key], req[key]), (run["run_id"], key)
        checked += 1
    assert checked >= 15


@pytest.fixture(scope="module")
def fleet_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every shipped trace run analysed by the fleet task (alone, as a Ray worker runs it; no Ray
    needed: the task is a plain function) into one local dataset."""
    dataset = str(tmp_path_factory.mktemp("fleet") / "dataset")
    folders = [str(d) for d in (TRACES, *sorted(TRACES.rglob("*"))) if d.is_dir() and any(d.glob("*.arrow"))]
    groups = discover(folders)
    assert groups
    for group in groups:
        result = analyze_group(group, dataset, scratch=str(tmp_path_factory.mktemp("scratch")))
        assert result.ok, (group.run_id, result.errors)
    return dataset


def _headline_rate(cost: dict[str, Any]) -> float | None:
    """USD per hour of the run's GPUs, by hand from the headline scope's total and duration."""
    scope = (cost.get("scopes") or {}).get(cost.get("headline_scope") or "") or {}
    total, duration = scope.get("total_usd"), scope.get("duration_s")
    return total / duration * 3600 if total is not None and duration else None


def test_fleet_dataset_shows_metrics_json(fleet_dataset: str, document: dict[str, Any]) -> None:
    with open_dataset(fleet_dataset) as t:
        rel = t.con.sql("SELECT * FROM run_metrics")
        rows = {(r[0], r[1]): dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()}
        rates = dict(t.con.sql("SELECT run_id, usd_per_hour FROM runs").fetchall())
        requests = {
            r[0]: r[1:]
            for r in t.con.sql(
                "SELECT run_id, avg(ttft_s), avg(tpot_s), avg(e2e_s), sum(output_tokens) FROM request_metrics "
                "WHERE ok GROUP BY run_id"
            ).fetchall()
        }
    n = 0
    for run in _runs(document):
        rid = run["run_id"]
        for phase, values in run["metrics"]["steps"].items():
            row = rows[(rid, phase)]
            for name in STEP_METRICS:
                assert _same(row[name], values[name]), (rid, phase, name)
                n += 1
        assert _same(rates[rid], _headline_rate(run["metrics"]["cost"])), rid
    for run in document["runs"]:
        req = run["metrics"]["requests"]
        if req.get("succeeded") and run["run_id"] in rates:
            ttft, tpot, e2e, out = requests[run["run_id"]]
            assert _same(ttft, req["ttft_s"]["mean"]) and _same(tpot, req["tpot_s"]["mean"]), run["run_id"]
            assert _same(e2e, req["e2e_s"]["mean"]) and out == req["output_tokens"], run["run_id"]
    assert n > 100
    assert sum(r is not None for r in rates.values()) >= 15  # the shipped runs are costed


def _cells(html: str) -> list[list[str]]:
    """The text of each row of the report's summary table (tags dropped, entities left)."""
    table = html.split('<table class="summary runs">', 1)[1].split("</table>", 1)[0]
    rows = table.split("<tr>")[2:]  # [0] before the head, [1] the head
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row)] for row in rows]


def test_report_summary_table_shows_metrics_json(analysis: Analysis, document: dict[str, Any]) -> None:
    rows = _cells(render_report(analysis, []))
    assert len(rows) == len(document["runs"])
    n = 0
    for run, cells in zip(document["runs"], rows, strict=True):
        steps, req = run["metrics"]["steps"], run["metrics"]["requests"]
        assert cells[1] == run["run_id"]
        if steps:
            w = steps["all"]["window_output_throughput"]
            assert cells[7] == str(steps["all"]["steps"]), run["run_id"]
            assert cells[10] == f"{steps['all']['gpu_busy_fraction'] * 100:.1f}", run["run_id"]
            assert cells[13] == (f"{w:,.1f}" if abs(w) < 1e5 else f"{w:,.0f}"), run["run_id"]
            n += 1
        if req.get("succeeded"):
            assert cells[11] == f"{req['ttft_s']['mean'] * 1e3:.2f}", run["run_id"]
            assert cells[12] == f"{req['tpot_s']['mean'] * 1e3:.2f}", run["run_id"]
        cost = run["metrics"]["cost"].get("usd_per_1m_output_tokens")
        assert cells[14] == ("n/a" if cost is None else f"{cost:,.3g}"), run["run_id"]
        assert cells[16] == str(len(run["warnings"])), run["run_id"]
    assert n >= 20


def test_metrics_json_lists_the_phases_in_one_order(document: dict[str, Any]) -> None:
    """`all` first, then prefill, decode, mixed, idle, verify: the same file for the same traces
    (DuckDB hands the groups back in no fixed order)."""
    order = ["all", "prefill", "decode", "mixed", "idle", "verify", "unknown"]
    for run in _runs(document):
        keys = list(run["metrics"]["steps"])
        assert keys == sorted(keys, key=order.index), (run["run_id"], keys)
