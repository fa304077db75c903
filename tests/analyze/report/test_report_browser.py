"""The report in a real headless Chromium with the network cut: every chart renders (an SVG per
chart, no console errors), every Vega view holds non-empty data, user strings stay text.

Needs Debian's `chromium` (apt-get install -y chromium) or MOECAP_CHROMIUM=/path/to/chrome;
playwright drives it and never downloads a browser. The screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import ARTIFACTS, EVIL_DATASET, EVIL_MODEL

pytestmark = pytest.mark.browser

ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
]

# Per chart: its Vega view's inline data sets (the compiled spec's `values`) and their row counts,
# and whether Vega drew an SVG with marks.
_INSPECT = """() => Object.entries(window.moecapEmbeds).map(([id, r]) => {
  const sets = (r.vgSpec.data || []).filter(d => d.values !== undefined).map(d => [d.name, r.view.data(d.name).length]);
  const svg = document.querySelector('#' + id + ' svg.marks');
  return {id, sets, svg: !!svg, marks: svg ? svg.querySelectorAll('path, rect, line, text').length : 0};
})"""


# Where the summary table's name cells (run id, model, dataset) break a line: [cell text, the character
# before the break, the one after] for each break, from the rendered glyphs' positions.
_LINE_BREAKS = """() => {
  const out = [];
  for (const td of document.querySelectorAll('table.runs td:nth-child(2), table.runs td:nth-child(3), table.runs td:nth-child(6)')) {
    const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
    let prev = null, prevTop = null;
    while (walker.nextNode()) {
      const node = walker.currentNode;
      for (let i = 0; i < node.length; i++) {
        const range = document.createRange();
        range.setStart(node, i); range.setEnd(node, i + 1);
        const rect = range.getClientRects()[0];
        if (!rect) continue;
        if (prevTop !== null && rect.top > prevTop + 2) out.push([td.innerText, prev, node.data[i]]);
        prevTop = rect.top; prev = node.data[i];
      }
    }
  }
  return out;
}"""


def _mid_word(breaks: list[list[str]]) -> list[list[str]]:
    """The breaks not after a separator (- _ : / . , or a space) nor before a space."""
    return [b for b in breaks if b[1] not in "-_:/., " and b[2] != " "]


def _chromium() -> str:
    path = os.environ.get("MOECAP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the report test needs Chromium: apt-get install -y chromium (or set MOECAP_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=ARGS)
        yield b
        b.close()


def _open(browser, path: Path, width: int = 1300):  # type: ignore[no-untyped-def]
    """Open a page offline; returns (page, console messages, blocked requests)."""
    page = browser.new_page(viewport={"width": width, "height": 1000})
    messages: list[tuple[str, str]] = []
    blocked: list[str] = []
    page.on("console", lambda m: messages.append((m.type, m.text)))
    page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))

    def route(r):  # type: ignore[no-untyped-def]
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(path.as_uri())
    page.wait_for_function("window.moecapReady !== undefined", timeout=30_000)
    page.evaluate("window.moecapReady")
    return page, messages, blocked


def test_report_renders_every_chart_offline_with_data(browser, report_run):
    proc, out = report_run
    assert proc.returncode == 0, proc.stderr
    page, messages, blocked = _open(browser, out / "report.html")
    figures = page.locator("figure.chart").count()
    charts = page.evaluate(_INSPECT)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "report-top.png"))
    assert blocked == []
    assert page.evaluate("window.moecapErrors") == []
    assert [m for m in messages if m[0] in ("error", "pageerror", "warning")] == []
    assert figures == 30 and len(charts) == figures  # 4 across runs + 2 what-if + 7 x 3 + 3
    for chart in charts:
        assert chart["svg"] and chart["marks"] > 10, chart
        assert chart["sets"] and all(rows > 0 for _, rows in chart["sets"]), chart
    assert page.get_attribute("body", "data-charts-rendered") == str(figures)


def test_user_strings_render_as_text_not_markup(browser, report_run):
    _, out = report_run
    page, _, _ = _open(browser, out / "report.html")
    assert page.evaluate("window.__pwned") is None
    text = page.inner_text("body")
    assert EVIL_MODEL in text and EVIL_DATASET in text
    assert page.locator("#summary img, #provenance img, #provenance i, #summary b").count() == 0


def test_leaderboard_page_renders_offline(browser, leaderboard_run):
    proc, out = leaderboard_run
    assert proc.returncode == 0, proc.stderr
    page, messages, blocked = _open(browser, out / "leaderboard.html")
    charts = page.evaluate(_INSPECT)
    page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)
    assert blocked == [] and page.evaluate("window.moecapErrors") == []
    assert [m for m in messages if m[0] in ("error", "pageerror", "warning")] == []
    assert len(charts) == 2 and all(c["svg"] and all(n > 0 for _, n in c["sets"]) for c in charts)
    assert page.locator("table.summary tr").count() == 1 + 4


def test_every_chart_has_distinct_colours_sane_axes_and_marks_that_vary(browser, report_run):
    """Per chart, from the live Vega views: no colour repeats within a colour scale, no axis below 0
    for non-negative data (nor a log axis beyond its data's decades), marks not all on one value."""
    from chart_checks import CHART_FACTS, problems

    _, out = report_run
    page, _, _ = _open(browser, out / "report.html")
    facts = page.evaluate(CHART_FACTS)
    assert len(facts) == 30
    assert sum(len(f["scales"]) for f in facts) > 30 and sum(len(f["colours"]) for f in facts) > 10
    assert [p for f in facts for p in problems(f)] == []


def _bad_page(tmp_path: Path) -> Path:
    """Charts with the defects the checks exist for: 12 series over a 10-colour scheme, a padded
    axis running below 0, every point at one value."""
    import altair as alt

    from moecap.analyze.report.html import render_page

    many = alt.Chart(alt.InlineData(values=[{"s": f"run {i}", "x": i, "y": i} for i in range(12)]))
    padded = alt.Chart(alt.InlineData(values=[{"x": 1.0, "y": 0.1}, {"x": 9.0, "y": 1.0}]))
    flat = alt.Chart(alt.InlineData(values=[{"x": 0, "y": 3}, {"x": 0, "y": 3}, {"x": 0, "y": 3}]))
    specs = {
        "chart-1": many.mark_point()
        .encode(x="x:Q", y="y:Q", color=alt.Color("s:N", scale=alt.Scale(scheme="category10")))
        .to_dict(),
        "chart-2": padded.mark_point()
        .encode(x="x:Q", y=alt.Y("y:Q", scale=alt.Scale(zero=False, padding=30, nice=False)))
        .properties(height=100)
        .to_dict(),
        "chart-3": flat.mark_point().encode(x="x:Q", y="y:Q").to_dict(),
    }
    body = "".join(
        f'<figure class="chart" data-slug="bad-{i}"><div class="vega" id="chart-{i}"></div></figure>'
        for i in (1, 2, 3)
    )
    path = tmp_path / "bad.html"
    path.write_text(render_page("bad", body, specs), encoding="utf-8")
    return path


def test_the_chart_checks_catch_repeated_colours_negative_axes_and_flat_marks(browser, tmp_path):
    from chart_checks import CHART_FACTS, problems

    page, _, _ = _open(browser, _bad_page(tmp_path))
    found = {f["slug"]: problems(f) for f in page.evaluate(CHART_FACTS)}
    assert any("repeats colours over 12 series" in p for p in found["bad-1"]), found
    assert any("below 0 for non-negative data" in p for p in found["bad-2"]), found
    assert any("every mark sits on one value" in p for p in found["bad-3"]), found


SHIPPED = Path(__file__).resolve().parents[3] / "traces"
SHIPPED_RUNS = (
    "h200-vllm-0.26.0-qwen15moe-graphs",  # a 1.1 s compile step and an idle step
    "h100-Qwen1.5-MoE-A2.7B-cb-bs16-syn1024x128-n16",  # HF eager, ~110 tok/s
    "h100-Qwen1.5-MoE-A2.7B-cb-graphson-bs16-syn1024x128-n16",  # the same with CUDA graphs
    "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9",  # SGLang, thousands of tok/s
)


@pytest.fixture(scope="module")
def shipped_report(tmp_path_factory: pytest.TempPathFactory, cli):  # type: ignore[no-untyped-def]
    files = [f for rid in SHIPPED_RUNS for f in sorted(SHIPPED.glob(f"{rid}.*.arrow"))]
    out = tmp_path_factory.mktemp("shipped-report")
    cache = tmp_path_factory.mktemp("shipped-cache")
    proc = cli("report", *files, "--out", out, "--cache-dir", cache, "--whatif-gpu", "H100")
    assert proc.returncode == 0, proc.stderr
    return out


def test_shipped_runs_report_names_modes_leaves_out_compile_and_idle_steps(browser, shipped_report):
    """Real traces: graphs and eager runs are told apart, the vLLM compile step and its idle step are
    left out of the per-step charts (and named), and every chart passes the checks."""
    from chart_checks import CHART_FACTS, problems

    page, messages, _ = _open(browser, shipped_report / "report.html", width=1280)
    assert page.evaluate("window.moecapErrors") == []
    assert [m for m in messages if m[0] in ("error", "pageerror")] == []
    facts = page.evaluate(CHART_FACTS)
    assert [p for f in facts for p in problems(f)] == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#summary").screenshot(path=str(ARTIFACTS / "shipped-summary.png"))
    page.locator("#compare").screenshot(path=str(ARTIFACTS / "shipped-compare.png"))
    text = page.inner_text("body")
    assert "CUDA graphs" in text and "eager" in text
    vllm = page.locator(
        "section[id^=run-]", has=page.locator("p.meta code", has_text="h200-vllm-0.26.0-qwen15moe-graphs")
    )
    notes = vllm.locator("p.note").all_inner_texts()
    assert any("1 idle (0-token) step" in n and "compile outlier step 1 (0.95 s)" in n for n in notes), notes
    # The throughput-vs-batch note names the runs whose compile steps were left out.
    compare = page.inner_text("#compare")
    assert "leaves out compile-outlier and warm-up steps" in compare
    # The one-row-per-run table fits a 1,280 px window without horizontal scrolling, and its run ids,
    # models and datasets break lines only between words ("synthetic:" | "1024x128", not "synth" | "etic").
    width = page.evaluate(
        "(() => { const t = document.querySelector('table.runs'); return [t.scrollWidth, t.parentElement.clientWidth]; })()"
    )
    assert width[0] <= width[1], width
    breaks = page.evaluate(_LINE_BREAKS)
    assert breaks, "no name wraps at all: the check below would pass vacuously"
    assert _mid_word(breaks) == [], breaks


def test_the_line_break_check_catches_a_mid_word_break(browser, tmp_path):
    # The same cells with the old CSS (break anywhere) in a narrow column: the check must see it.
    from moecap.analyze.report.html import render_page

    body = (
        '<table class="summary runs" style="width:300px"><tr><td>1</td><td><code>r</code></td><td>m</td>'
        '<td>e</td><td>g</td><td style="max-width:60px;overflow-wrap:anywhere">synthetic:1024x128</td></tr></table>'
    )
    path = tmp_path / "wrap.html"
    path.write_text(render_page("wrap", body, {}), encoding="utf-8")
    page, _, _ = _open(browser, path, width=1280)
    assert _mid_word(page.evaluate(_LINE_BREAKS)) != []
