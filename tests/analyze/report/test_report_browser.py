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


def _open(browser, path: Path):  # type: ignore[no-untyped-def]
    """Open a page offline; returns (page, console messages, blocked requests)."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
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
