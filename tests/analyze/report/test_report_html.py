"""`moecap-analyze report`: one self-contained report.html with the summary, charts, constants and
provenance, every user string escaped, and a PNG + SVG per chart."""

from __future__ import annotations

import html
import json
import re

import pytest
from conftest import EVIL_DATASET, EVIL_MODEL, RUNS, TRACE_DIR_NAME

from moecap.analyze.report.html import esc, script_json


@pytest.fixture(scope="module")
def page(report_run) -> str:
    proc, out = report_run
    assert proc.returncode == 0, proc.stderr
    return (out / "report.html").read_text(encoding="utf-8")


def _figures(page: str) -> list[str]:
    return re.findall(r'<figure class="chart" data-slug="([^"]+)">', page)


def test_report_writes_metrics_and_html_and_no_chart_files_by_default(report_run, page):
    proc, out = report_run
    assert f"wrote {out / 'report.html'}" in proc.stderr.replace("\n", "")
    assert (out / "metrics.json").exists()
    slugs = _figures(page)
    # 4 cross-run charts + 2 what-if + 7 per run with expert counts (x3) + 3 for the run without counts.
    assert len(slugs) == 4 + 2 + 7 * 3 + 3
    # Export is opt-in (--export png): the page holds every chart already.
    assert not (out / "charts").exists()
    assert 'href="charts/' not in page


def test_report_progress_goes_to_stderr_stage_by_stage(report_run):
    proc, _ = report_run
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("report: ")]
    stages = " | ".join(lines)
    for stage in (
        "analysing traces",
        "loading trace files",
        "writing metrics.json",
        "building charts",
        "done in",
    ):
        assert stage in stages, stages
    assert "building charts (sections) 6/6" in stages  # across runs, what-if, 4 runs
    assert "report:" not in proc.stdout


def test_export_opt_in_writes_a_png_and_svg_per_chart(analysis, tmp_path):
    from moecap.analyze.report.html import write_report

    page = write_report(analysis, tmp_path, export=("png", "svg"), whatif_gpus=()).read_text(encoding="utf-8")
    slugs = _figures(page)
    assert len(slugs) == 4 + 7 * 3 + 3
    for slug in slugs:
        png = tmp_path / "charts" / f"{slug}.png"
        svg = tmp_path / "charts" / f"{slug}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", slug
        assert svg.read_text(encoding="utf-8").lstrip().startswith("<svg"), slug
        assert f'href="charts/{slug}.png"' in page


def test_report_cli_refuses_an_unknown_export_format(cli, trace_dir, tmp_path):
    proc = cli("report", trace_dir, "--out", tmp_path, "--export", "gif")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "moecap-analyze: error: --export 'gif': expected png, svg, png,svg or none"
    ]


def test_the_page_loads_nothing_from_the_network(page):
    assert "<script src" not in page and "<link" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp and "default-src 'none'" in html.unescape(csp.group(1))
    # The Vega libraries are inline: one bundle defining vegaEmbed.
    assert "window.vegaEmbed=" in page.replace(" ", "")


def test_every_chart_spec_is_embedded_as_json_once(page):
    blob = re.search(r'<script type="application/json" id="moecap-specs">(.*?)</script>', page, re.S)
    assert blob
    specs = json.loads(blob.group(1))
    ids = re.findall(r'<div class="vega" id="(chart-\d+)"></div>', page)
    assert sorted(specs) == sorted(ids) and len(ids) == len(_figures(page))
    assert len(page) < 8_000_000  # bundle (~0.9 MB) + aggregated specs


def test_user_strings_are_escaped(page):
    assert EVIL_MODEL not in page
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert esc(EVIL_MODEL) in page  # shown as text in the summary and provenance
    assert esc(EVIL_DATASET) in page
    assert "/" not in TRACE_DIR_NAME and esc(TRACE_DIR_NAME) in page and "<i>x" not in page  # file paths
    # Exactly the three script elements the report itself writes.
    assert page.count("<script") == 3


def test_script_json_cannot_close_its_element():
    text = script_json({"m": "</script><script>alert(1)</script>", "amp": "a&b", "sep": "\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"m": "</script><script>alert(1)</script>", "amp": "a&b", "sep": "\u2028"}


def test_summary_constants_and_provenance(analysis, page):
    summary = page[page.index('id="summary"') : page.index('id="compare"')]
    assert summary.count("<tr><td>") == len(RUNS)
    # The synthetic engine runs at 60 % of peak bandwidth: decode "S-MBU / S-MFU %" cells start with 60.
    assert "<td>60.0 / " in summary or "<td>60.1 / " in summary
    constants = page[page.index('id="constants"') : page.index('id="provenance"')]
    assert "memory_bandwidth_bytes_per_s" in constants and "3.35e+12" in constants
    assert "cost constant" in constants  # the cost model's constants, with their sources
    provenance = page[page.index('id="provenance"') :]
    for run in analysis.document["runs"]:
        assert esc(run["run_id"]) in provenance
        for f in run["files"]:
            assert esc(f["path"]) in provenance
    assert "NVIDIA H100 80GB HBM3" in provenance and "synthetic" in provenance


def test_missing_charts_are_explained(page):
    section = page[page.index("nocounts") :]
    assert "no expert counts in this run: expert heatmap, load and imbalance left out" in section


def test_whatif_section_projects_every_run_with_counts_onto_the_other_gpus(page):
    section = page[page.index('id="whatif"') : page.index('id="run-1"')]
    assert 'data-slug="whatif-throughput"' in section and 'data-slug="whatif-tpot"' in section
    table = section[section.index("<table") :]
    rows = re.findall(r"<tr>(<td>.*?)</tr>", table)
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows]
    # Three runs with expert counts (measured on an H100): measured + 3 models on H200 and on B200.
    assert len(cells) == 3 * (1 + 3 * 2)
    assert {c[1] for c in cells if c[2] == "measured"} == {"H100-SXM-80GB"}
    assert {c[1] for c in cells if c[2] != "measured"} == {"H200-SXM-141GB", "B200-SXM-180GB"}
    # The simulated engine is GPU-bound: more bandwidth, more tokens/s, by the projection.
    by = {(c[0], c[1], c[2]): float(c[3]) for c in cells}
    for (run, gpu, model), tps in by.items():
        if model == "projection":
            assert tps > by[(run, "H100-SXM-80GB", "measured")], (run, gpu)
    assert "nocounts" in section and "not projected" in section
    assert "same batch composition" in section  # the assumptions are stated


def test_sections_built_on_two_threads_equal_those_built_on_one(analysis):
    """Threads (each on its own DuckDB cursor, views read from memory) change nothing but the time:
    the same sections, in the same order, with the same notes and byte-identical chart specs; and
    the views are the files' again afterwards."""
    import json

    from moecap.analyze.report.figures import report_sections

    def build(threads: int) -> list:
        return [
            (s.id, s.title, s.notes, [(f.slug, json.dumps(f.spec(), sort_keys=True)) for f in s.figures])
            for s in report_sections(analysis, threads=threads)
        ]

    one, two = build(1), build(2)
    assert len(one) == 2 + 4 and [s[0] for s in one] == [s[0] for s in two]
    assert one == two
    temp = analysis.db.con.execute(
        "SELECT view_name FROM duckdb_views() WHERE temporary AND NOT internal"
    ).fetchall()
    assert temp == []


def test_threads_find_the_facade_frames_computed_once_before_them(trace_dir, cache_dir, monkeypatch):
    """A report built on threads shares one set of façade frames (`run_metrics()` & co.). Computed
    lazily inside the threads, two of them (re)defined the run views at once, on two cursors: DuckDB's
    "Catalog write-write conflict on create … run_metrics" (seen in CI, 2026-12-08). Here defining the
    views is made slow, so threads that both miss the cache overlap; they must not both define them."""
    import threading
    import time

    from moecap.analyze.analysis import Options
    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.report.figures import report_sections
    from moecap.analyze.sql import views

    fresh = analyze_paths([trace_dir], Options(), cache_dir=cache_dir)
    real, calls = views.define_run_views, []

    def slow_define(con):  # type: ignore[no-untyped-def]
        calls.append(threading.current_thread().name)
        time.sleep(0.3)
        return real(con)

    monkeypatch.setattr(views, "define_run_views", slow_define)
    sections = report_sections(fresh, whatif_gpus=("H200",), threads=3)
    assert len(sections) == 2 + 4
    assert len(calls) == 1 and calls[0] == threading.main_thread().name
