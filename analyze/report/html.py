"""`report.html`: one self-contained page (summary, charts, constants, provenance) + chart exports.

The page embeds the Vega, Vega-Lite and Vega-Embed libraries (vl-convert's bundle) and every
chart spec, so it opens with no network; a Content-Security-Policy forbids any fetch. Every
user-provided string (model ids, run ids, paths, dataset names, warnings) is HTML-escaped, and the
specs travel as JSON inside a `<script type="application/json">` with `<`, `>` and `&` written
as \\u escapes, so no string from a trace can close the script element.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from .. import __version__
from ..document import at as _get
from ..errors import InputError
from .export import export_chart, vegalite_version
from .figures import DEFAULT_WHATIF_GPUS, FigureOptions, Section, report_sections
from .frames import runs_frame
from .groups import info_rows, run_labels, run_modes

CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)
"""Vega compiles expressions with the Function constructor ('unsafe-eval'); nothing is fetched."""


@functools.lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega + Vega-Lite + Vega-Embed as one classic script (from vl-convert), defining
    `vegaEmbed`, `vega` and `vegaLite` on window. Bundling takes seconds (vl-convert runs a JS
    bundler), so the result is kept in the analyzer's cache directory, keyed by the vl-convert and
    Vega-Lite versions; an unwritable cache only costs the bundling again."""
    import vl_convert as vlc

    from ..load import default_cache_dir

    version = vegalite_version()
    cached = default_cache_dir() / f"vega-bundle-{getattr(vlc, '__version__', 'x')}-{version or 'default'}.js"
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    # The type stub marks `snippet` required; None is its documented default (the global-assigning snippet).
    js = vlc.javascript_bundle(snippet=None, vl_version=version)  # type: ignore[arg-type]
    # A literal "</script" would end the element early; in JS source "<\/" means the same.
    js = js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(js, encoding="utf-8")
        tmp.replace(cached)
    except OSError:
        pass
    return js


def script_json(obj: Any) -> str:
    """JSON safe to place inside a <script> element (no <, >, & characters)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def esc(value: Any) -> str:
    """HTML-escaped text of any value (None → an em dash)."""
    if value is None:
        return "—"
    return html.escape(str(value), quote=True)


Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as the report is built ("charts", "export")."""


def write_report(
    analysis: Any,
    out_dir: str | Path,
    *,
    export: tuple[str, ...] | list[str] = (),
    options: FigureOptions | None = None,
    png_scale: float = 2.0,
    whatif_gpus: Sequence[str] = DEFAULT_WHATIF_GPUS,
    progress: Progress | None = None,
) -> Path:
    """Write `out_dir/report.html` (every chart rendered in the page) and, when `export` names
    formats (png, svg), each chart as `out_dir/charts/<slug>.<format>` too.

    Export is opt-in: vl-convert renders each chart again, about 0.1-0.7 s per chart and format, and
    27 runs make ~200 charts (minutes, ~100 MB). `whatif_gpus`: the GPUs the what-if section
    projects onto (empty: no section). Returns the report's path.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    sections = report_sections(analysis, options, whatif_gpus, progress=progress)
    exports: dict[str, list[Path]] = {}
    figures = [fig for sec in sections for fig in sec.figures]
    if export:
        for i, fig in enumerate(figures, 1):
            exports[fig.slug] = export_chart(fig.spec(), out / "charts" / fig.slug, export, scale=png_scale)
            if progress:
                progress("export", i, len(figures))
    page = render_report(
        analysis, sections, exports={k: [p.relative_to(out) for p in v] for k, v in exports.items()}
    )
    target = out / "report.html"
    target.write_text(page, encoding="utf-8")
    return target


# -- page -----------------------------------------------------------------------------------------
def render_report(
    analysis: Any, sections: list[Section], exports: dict[str, list[Path]] | None = None
) -> str:
    """The report page as a string."""
    document = analysis.document
    exports = exports or {}
    labels = run_labels(info_rows(analysis), run_modes(analysis))
    specs: dict[str, Any] = {}
    body = [
        "<header>",
        "<h1>moecap report</h1>",
        f"<p class=meta>{len(document.get('runs', []))} run(s) · formula <b>{esc(document.get('formula'))}</b> · "
        f"generated {esc(document.get('generated_at') or _now())} by moecap {esc(document.get('moecap_version') or __version__)}</p>",
        _toc(sections),
        "</header>",
        _summary(analysis, labels, run_modes(analysis)),
    ]
    n = 0
    for sec in sections:
        body.append(f'<section id="{esc(sec.id)}"><h2>{esc(sec.title)}</h2>')
        if sec.run_id is not None:
            run: dict[str, Any] = next((r for r in document.get("runs", []) if r["run_id"] == sec.run_id), {})
            window = run.get("window") or {}
            body.append(
                f"<p class=meta>run <code>{esc(sec.run_id)}</code> · window: "
                f"{esc(window.get('description') or window.get('kind'))}</p>"
            )
        for note in sec.notes:
            body.append(f"<p class=note>{esc(note)}</p>")
        body.append('<div class="charts">')
        for fig in sec.figures:
            n += 1
            cid = f"chart-{n}"
            specs[cid] = fig.spec()
            links = " · ".join(
                f'<a href="{esc(p.as_posix())}">{esc(p.suffix.lstrip(".").upper())}</a>'
                for p in exports.get(fig.slug, [])
            )
            body.append(
                f'<figure class="chart" data-slug="{esc(fig.slug)}"><div class="vega" id="{cid}"></div>'
                f"<figcaption>{esc(fig.title)}{' — ' + links if links else ''}</figcaption></figure>"
            )
        body.append("</div>")
        for caption, table in sec.tables:
            body.append(_frame_table(caption, table))
        body.append("</section>")
    body.append(_constants(document, labels))
    body.append(_provenance(analysis, labels))
    body.append(_load_report(document))
    return render_page("moecap report", "\n".join(body), specs)


def render_page(title: str, body: str, specs: dict[str, Any]) -> str:
    """A self-contained page: `body` (trusted HTML, already escaped) plus the Vega libraries and a
    script that embeds `specs[id]` into the element with that id."""
    return _PAGE.format(
        title=esc(title),
        csp=esc(CSP),
        style=_STYLE,
        body=body,
        specs=script_json(_clean(specs)),
        bundle=vega_bundle(),
        render=_RENDER_JS,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(obj: Any) -> Any:
    """NaN/inf → null so the spec is valid JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _toc(sections: list[Section]) -> str:
    # Runs appear as numbered links (their labels are long; the summary table names them).
    items = ['<a href="#summary">Summary</a>']
    items += [f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections if s.run_id is None]
    runs = [
        f'<a href="#{esc(s.id)}" title="{esc(s.title)}">{esc(s.id.split("-")[-1])}</a>'
        for s in sections
        if s.run_id
    ]
    if runs:
        items.append("runs " + " ".join(runs))
    items += ['<a href="#constants">Constants</a>', '<a href="#provenance">Provenance</a>']
    return "<nav>" + " · ".join(items) + "</nav>"


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "—"
    if kind == "pct":
        return f"{value * 100:.1f} %"
    if kind == "pct1":
        return f"{value * 100:.1f}"
    if kind == "ms":
        return f"{value * 1e3:.2f}"
    if kind == "ms_as_is":  # a value in ms already
        return f"{value:.2f}"
    if kind == "num":
        return f"{value:,.1f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if kind == "usd":
        return f"{value:,.3g}"
    return esc(value)


def breakable(text: Any, limit: int = 48) -> str:
    """Escaped `text` that a table cell may break only after - _ : / . , (a <wbr> there), never
    inside a word. Beyond `limit` characters the middle is elided ("…") and the whole text is the
    element's title (shown on hover)."""
    if text is None:
        return esc(None)
    full = str(text)
    shown = full if len(full) <= limit else full[: limit * 2 // 3] + "…" + full[-(limit // 3) :]
    inner = "<wbr>".join(esc(part) for part in re.split(r"(?<=[-_:/.,])", shown) if part)
    return inner if shown == full else f'<span title="{esc(full)}">{inner}</span>'


def _pair(a: Any, b: Any) -> str:
    """Two fractions as percentages in one cell: "12.3 / 4.56"."""
    if a is None and b is None:
        return "—"
    return f"{_fmt(a, 'pct1')} / {_fmt(b, 'pct1')}"


def _summary(analysis: Any, labels: dict[str, str], modes: dict[str, str] | None = None) -> str:
    """One row per run, narrow enough for a 1,280 px window with dozens of runs: run id, model and
    dataset break only after - _ : / . (never mid-word; a long name is elided with the whole of it in
    a title), each column carries one unit, S-MBU / S-MFU share a cell per phase. Every figure is the
    façade's (`frames.runs_frame`, the `run_metrics` view), as the leaderboard's."""
    modes = modes or {}
    head = (
        "<tr><th>#</th><th>run id</th><th>model</th><th>engine</th><th>GPU</th><th>dataset</th><th>bs</th>"
        "<th>window steps</th><th>prefill S-MBU / S-MFU %</th><th>decode S-MBU / S-MFU %</th>"
        "<th>GPU busy %</th><th>TTFT mean ms</th><th>TPOT mean ms</th><th>gen tok/s</th>"
        "<th>$ / 1M out tok</th><th>accuracy %</th><th>warn&shy;ings</th></tr>"
    )
    window = {
        r["run_id"]: r
        for r in analysis.run_metrics()
        .filter(pl.col("phase") == "all")
        .select("run_id", "steps", "gpu_busy_fraction")
        .iter_rows(named=True)
    }
    rows: list[str] = []
    for run in runs_frame(analysis, labels).iter_rows(named=True):
        w = window.get(run["run_id"], {})
        gpu, em, cost = run["gpu"], run["accuracy"], run["cost_usd_per_m_output_tokens"]
        mode = modes.get(run["run_id"])
        engine = f"{run['engine'] or ''} {run['engine_version'] or ''}".strip()
        i = len(rows) + 1
        cells = [
            f'<a href="#run-{i}">{i}</a>',
            f"<code>{breakable(run['run_id'], limit=80)}</code>",
            breakable(str(run["model"] or "").rstrip("/").split("/")[-1] or None),
            esc(engine) + (f"<br><span class=meta>{esc(mode)}</span>" if mode and mode != "?" else ""),
            esc(f"{gpu} ×{run['num_gpus'] or 1}" if gpu else "no GPU recorded"),
            breakable(run["dataset"]),
            esc(run["batch_size"]),
            _fmt(w.get("steps")),
            _pair(run["prefill_smbu"], run["prefill_smfu"]),
            _pair(run["decode_smbu"], run["decode_smfu"]),
            _fmt(w.get("gpu_busy_fraction"), "pct1"),
            _fmt(run["ttft_ms"], "ms_as_is"),
            _fmt(run["tpot_ms"], "ms_as_is"),
            _fmt(run["window_output_throughput"], "num"),
            _fmt(cost, "usd") if cost is not None else '<span class="na">n/a</span>',
            _fmt(em, "pct1") if em is not None else '<span class="na">n/a</span>',
            str(run["warnings"]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    warnings = [
        f"<li><code>{esc(rid)}</code>: {esc(w)}</li>"
        for rid in analysis.run_ids
        for w in analysis.warnings.get(rid, [])
    ]
    out = [
        '<section id="summary"><h2>Summary</h2>',
        "<p class=meta>S-MBU / S-MFU: ratio of sums over each run's metrics window (docs/metrics.md §6); "
        "latencies: client clock, successful requests; throughput: generated tokens over the window's busy "
        "time (docs/metrics.md §6). Cost and accuracy show n/a when the run was not costed or scored.</p>",
        f'<div class="scroll"><table class="summary runs">{head}{"".join(rows)}</table></div>',
    ]
    if warnings:
        out.append("<h3>Warnings</h3><ul class=warnings>" + "".join(warnings) + "</ul>")
    out.append("</section>")
    return "\n".join(out)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list):
        if obj and all(v == obj[0] for v in obj) and not isinstance(obj[0], (dict, list)):
            return [(prefix, f"{obj[0]} (× {len(obj)})")]
        text = json.dumps(obj, default=str)
        return [(prefix, text if len(text) <= 240 else text[:240] + " …")]
    return [(prefix, obj)]


def _frame_table(caption: str, frame: Any) -> str:
    """A display frame as an escaped HTML table (nulls as a dash)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return (
        f'<div class="scroll"><table class="summary"><caption>{esc(caption)}</caption>'
        f"<tr>{head}</tr>{rows}</table></div>"
    )


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_num_text(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _num_text(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _constants(document: dict[str, Any], labels: dict[str, str]) -> str:
    out = [
        '<section id="constants"><h2>Constants used</h2>',
        "<p class=meta>GPU and model constants each run's metrics (and the roofline lines) were computed "
        "with; cost constants where the run was costed.</p>",
    ]
    for run in document.get("runs", []):
        pairs = [
            ("formula", document.get("formula")),
            ("window", _get(run, "window", "description") or _get(run, "window", "kind")),
        ]
        pairs += _flatten(run.get("constants") or {})
        out.append(f"<h3>{esc(labels.get(run['run_id'], run['run_id']))}</h3>")
        out.append(_kv_table(pairs))
        cost = _get(run, "metrics", "cost")
        if isinstance(cost, dict):
            out.append(_cost_constants(cost))
    out.append(
        "<p class=meta>Chart scales: the CAP radar scales each axis to the best run shown (value / best when "
        "higher is better, best / value when lower is better); heatmaps show each expert's share of its "
        "layer's routed tokens.</p></section>"
    )
    return "\n".join(out)


def _cost_constants(cost: dict[str, Any]) -> str:
    """The cost model's headline and its constants (value, unit, source), as the cost doc states them."""
    head = [(f"cost.{k}", v) for k, v in cost.items() if not isinstance(v, (dict, list))]
    band = cost.get("band_usd_per_1m_output_tokens")
    if isinstance(band, list):
        head.append(("cost.band_usd_per_1m_output_tokens", " – ".join(f"{b:.4g}" for b in band)))
    out = [_kv_table(head)]
    constants = cost.get("constants")
    if isinstance(constants, dict) and constants:
        rows = []
        for name, c in constants.items():
            if isinstance(c, dict):
                band_text = f"{c.get('low')} – {c.get('high')}" if c.get("low") is not None else None
                cells = (name, _num_text(c.get("value")), c.get("unit"), band_text, c.get("source"))
            else:
                cells = (name, _num_text(c), None, None, None)
            rows.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")
        out.append(
            '<table class="kv cost"><tr><th>cost constant</th><th>value</th><th>unit</th><th>band</th>'
            f"<th>source</th></tr>{''.join(rows)}</table>"
        )
    notes = [*(cost.get("warnings") or []), *(cost.get("notes") or [])]
    if notes:
        out.append("<ul class=warnings>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out)


def _provenance(analysis: Any, labels: dict[str, str]) -> str:
    out = ['<section id="provenance"><h2>Trace provenance</h2>']
    contexts = {ctx.run.run_id: ctx for ctx in getattr(analysis, "contexts", [])}
    for run in analysis.document.get("runs", []):
        rid = run["run_id"]
        ctx = contexts.get(rid)
        pairs: list[tuple[str, Any]] = [("run id", rid), ("model", run.get("model"))]
        if ctx is not None:
            md = ctx.run.metadata
            pairs += [
                ("engine", f"{md.engine.name} {md.engine.version}".strip()),
                ("engine args", json.dumps(md.engine.args, default=str) if md.engine.args else None),
                ("model random weights", md.model.random_weights),
                ("dtypes", json.dumps(md.model.dtypes) if md.model.dtypes else None),
                (
                    "quantization",
                    json.dumps(md.model.quantization, default=str) if md.model.quantization else None,
                ),
                (
                    "GPUs",
                    "; ".join(
                        f"{g.name} ({g.uuid or 'no uuid'}, {g.memory_bytes / 2**30:.0f} GiB)" for g in md.gpus
                    )
                    or None,
                ),
                (
                    "parallelism",
                    f"tp {md.parallelism.tp} · pp {md.parallelism.pp} · dp {md.parallelism.dp} · ep {md.parallelism.ep}",
                ),
                ("workload", json.dumps(md.workload, default=str) if md.workload else None),
                (
                    "MoE",
                    f"{md.moe.num_experts} experts, top-{md.moe.top_k}, {len(md.moe.layer_ids)} MoE layers",
                ),
                ("created at", md.created_at),
                ("collector", md.collector_version or None),
                ("host", md.host),
            ]
        else:
            pairs += [("engine", _get(run, "engine", "name")), ("GPU", _get(run, "gpu", "name"))]
        out.append(f"<h3>{esc(labels.get(rid, rid))}</h3>")
        out.append(_kv_table(pairs))
        files = run.get("files") or []
        if files:
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td>{esc(v)}</td>"
                    for v in (
                        f.get("path"),
                        f.get("table"),
                        f.get("rank"),
                        f.get("rows"),
                        "yes" if f.get("complete") else "no (truncated)",
                        f.get("lost_bytes"),
                        f.get("rows_dropped"),
                    )
                )
                + "</tr>"
                for f in files
            )
            out.append(
                '<div class="scroll"><table class="files"><tr><th>file</th><th>table</th><th>rank</th>'
                "<th>rows</th><th>complete</th><th>lost bytes</th><th>rows dropped</th></tr>"
                f"{rows}</table></div>"
            )
    out.append("</section>")
    return "\n".join(out)


def _load_report(document: dict[str, Any]) -> str:
    errors = document.get("load_errors") or []
    warnings = document.get("load_warnings") or []
    if not errors and not warnings:
        return ""
    items = [f"<li>skipped: {esc(e)}</li>" for e in errors] + [f"<li>{esc(w)}</li>" for w in warnings]
    return '<section id="load"><h2>Loading</h2><ul class=warnings>' + "".join(items) + "</ul></section>"


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav { margin: 8px 0 0; } nav a { color: #1a5fb4; text-decoration: none; }
.meta { color: #555; } .note { color: #8a5a00; background: #fff7e0; padding: 4px 8px; border-radius: 4px; }
.na { color: #999; font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
table.summary td { white-space: nowrap; } table.summary th { background: #f4f4f4; font-weight: 600; }
table.summary td:nth-child(-n+2) { white-space: normal; min-width: 140px; max-width: 280px; overflow-wrap: anywhere; }
table.runs th { white-space: normal; min-width: 0; max-width: 90px; vertical-align: bottom; font-size: 12px; }
table.runs td { text-align: right; }
table.runs td:nth-child(-n+6) { text-align: left; white-space: normal; }
table.runs td:nth-child(1) { min-width: 0; white-space: nowrap; }
table.runs td:nth-child(2) { min-width: 120px; max-width: 220px; overflow-wrap: break-word; }
table.runs td:nth-child(3), table.runs td:nth-child(6) { min-width: 0; max-width: none; overflow-wrap: break-word; }
table.board td:first-child { min-width: 0; }
table.kv th { background: #f8f8f8; font-weight: 500; white-space: nowrap; }
table.kv td, table.files td { word-break: break-all; }
.charts { display: flex; flex-direction: column; gap: 20px; }
figure.chart { margin: 0; padding: 8px; border: 1px solid #eee; border-radius: 6px; overflow-x: auto; }
figcaption { color: #555; font-size: 12px; margin-top: 4px; }
ul.warnings li { color: #8a5a00; }
code { font-size: 12px; }
"""

_RENDER_JS = """
(function () {
  var specs = JSON.parse(document.getElementById('moecap-specs').textContent);
  window.moecapEmbeds = {};
  window.moecapErrors = [];
  var jobs = Object.keys(specs).map(function (id) {
    return vegaEmbed('#' + id, specs[id], {
      renderer: 'svg',
      actions: {export: true, source: false, compiled: false, editor: false}
    }).then(function (result) {
      window.moecapEmbeds[id] = result;
    }).catch(function (err) {
      window.moecapErrors.push(id + ': ' + err);
      var el = document.getElementById(id);
      el.className = 'note';
      el.textContent = 'this chart failed to render: ' + err;
    });
  });
  window.moecapReady = Promise.all(jobs).then(function () {
    document.body.setAttribute('data-charts-rendered', String(Object.keys(window.moecapEmbeds).length));
  });
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script type="application/json" id="moecap-specs">{specs}</script>
<script>{bundle}</script>
<script>{render}</script>
</body>
</html>
"""
