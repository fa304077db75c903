"""Leaderboard: runs ranked, one row per run, or with `group` one row per (model, engine, GPU ×
count, batch size, dataset).

Like the MoE-CAP leaderboard's table: accuracy, cost, TTFT, TPOT, throughput and prefill/decode
S-MBU/S-MFU. Runs stay apart by default: two runs sharing that key may differ in what the key does
not hold (CUDA graphs on or off, engine version, prompt length), and folding one into the other
would hide a result. With `group`, the most recent run of a configuration (trace `created_at`,
then run id) stands for it and the others are listed in `other_runs`.
Written as CSV, JSON and a self-contained HTML page with the CAP radar and the Pareto front.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import InputError
from . import charts as C
from .export import FORMATS, chart_spec, export_chart
from .frames import run_labels, runs_frame
from .html import esc, render_page

KEY = ("model", "engine", "gpu", "num_gpus", "batch_size", "dataset")
"""A leaderboard row's identity (GPU count is part of the hardware)."""

SORT_KEYS: dict[str, tuple[str, bool]] = {
    "throughput": ("window_output_throughput", True),
    "cost": ("cost_usd_per_m_output_tokens", False),
    "accuracy": ("accuracy", True),
    "ttft": ("ttft_ms", False),
    "tpot": ("tpot_ms", False),
    "itl": ("itl_ms", False),
    "decode_smbu": ("decode_smbu", True),
    "decode_smfu": ("decode_smfu", True),
    "prefill_smbu": ("prefill_smbu", True),
    "prefill_smfu": ("prefill_smfu", True),
}
"""--sort name -> (column, higher is better)."""

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rank", "rank", ""),
    ("model", "model", ""),
    ("engine", "engine", ""),
    ("engine_version", "engine version", ""),
    ("gpu", "GPU", ""),
    ("num_gpus", "GPUs", ""),
    ("batch_size", "batch size", ""),
    ("dataset", "dataset", ""),
    ("accuracy", "accuracy (EM)", "pct"),
    ("cost_usd_per_m_output_tokens", "$ / 1M output tokens", "g4"),
    ("ttft_ms", "TTFT ms (mean)", "f2"),
    ("tpot_ms", "TPOT ms (mean)", "f2"),
    ("itl_ms", "ITL ms (p50)", "f2"),
    ("window_output_throughput", "throughput tok/s", "f1"),
    ("prefill_smbu", "prefill S-MBU", "pct"),
    ("prefill_smfu", "prefill S-MFU", "pct"),
    ("decode_smbu", "decode S-MBU", "pct"),
    ("decode_smfu", "decode S-MFU", "pct"),
    ("compile_steps", "compile / JIT steps", ""),
    ("compile_s", "compile / JIT s", "f2"),
    ("run_id", "run id", ""),
    ("other_runs", "other runs", ""),
)
"""(column, heading, number format) in display order."""


def leaderboard_frame(
    analysis: Any,
    *,
    sort: str = "throughput",
    created_at: dict[str, str] | None = None,
    group: bool = False,
) -> pl.DataFrame:
    """The ranked table of an `Analysis`: `rank_runs` over `frames.runs_frame` (the façade's views
    and frames, not metrics.json)."""
    if sort not in SORT_KEYS:
        raise InputError(f"--sort {sort!r}: expected one of {', '.join(SORT_KEYS)}")
    return rank_runs(
        runs_frame(analysis, run_labels(analysis)), sort=sort, created_at=created_at, group=group
    )


def rank_runs(
    runs: pl.DataFrame,
    *,
    sort: str = "throughput",
    created_at: dict[str, str] | None = None,
    group: bool = False,
) -> pl.DataFrame:
    """Rank a `runs_frame`: one row per run, or with `group` one per configuration (KEY); best first
    by `sort` (see SORT_KEYS); runs without the sort figure rank last. The most recent run of a
    configuration (latest `created_at`, the trace metadata's unless given as run_id -> ISO time,
    then run id) stands for it; the others are listed in `other_runs`."""
    if sort not in SORT_KEYS:
        raise InputError(f"--sort {sort!r}: expected one of {', '.join(SORT_KEYS)}")
    if created_at:
        runs = runs.with_columns(
            created_at=pl.col("run_id").replace_strict(
                created_at, default=pl.col("created_at"), return_dtype=pl.String
            )
        )
    runs = runs.sort(["created_at", "run_id"], nulls_last=False)
    key = list(KEY) if group else ["run_id"]
    grouped = runs.group_by(key, maintain_order=True).agg(
        pl.all().last(),
        other_runs=pl.col("run_id").head(pl.len() - 1).str.join(", "),
    )
    grouped = grouped.with_columns(
        other_runs=pl.when(pl.col("other_runs") != "").then(pl.col("other_runs")).otherwise(None)
    )
    col, higher = SORT_KEYS[sort]
    ranked = grouped.sort(col, descending=higher, nulls_last=True).with_columns(
        rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    )
    extra = [c for c in ranked.columns if c not in {c for c, _, _ in COLUMNS}]
    return ranked.select([c for c, _, _ in COLUMNS] + extra)


def format_cell(value: Any, fmt: str) -> str:
    """A table cell as text: "pct" / "pct2" a fraction as % with 1 / 2 decimals, "g4" 4 significant
    digits, "f2" / "f1" fixed decimals (f1 with thousands separators); empty for no figure."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return ""
    if fmt in ("pct", "pct2"):
        return f"{value * 100:.{1 if fmt == 'pct' else 2}f} %"
    if fmt == "g4":
        return f"{value:.4g}"
    if fmt == "f2":
        return f"{value:.2f}"
    if fmt == "f1":
        return f"{value:,.1f}"
    return str(value)


def display_rows(board: pl.DataFrame) -> list[list[str]]:
    """The board's rows as formatted text cells, in COLUMNS order (empty = no figure)."""
    return [[format_cell(row[c], fmt) for c, _, fmt in COLUMNS] for row in board.iter_rows(named=True)]


def write_leaderboard(
    analysis: Any,
    out_dir: str | Path,
    *,
    sort: str = "throughput",
    export: tuple[str, ...] | list[str] = FORMATS,
    group: bool = False,
) -> dict[str, Path]:
    """Write leaderboard.csv, leaderboard.json, leaderboard.html and the radar/Pareto chart
    exports under `out_dir`; returns name -> path."""
    board = leaderboard_frame(analysis, sort=sort, group=group)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    written: dict[str, Path] = {}
    csv_path = out / "leaderboard.csv"
    board.select([c for c, _, _ in COLUMNS]).write_csv(csv_path)
    written["csv"] = csv_path
    json_path = out / "leaderboard.json"
    json_path.write_text(
        json.dumps(
            {
                "schema": "moecap.leaderboard/1",
                "sort": {"by": sort, "column": SORT_KEYS[sort][0], "higher_is_better": SORT_KEYS[sort][1]},
                "key": list(KEY) if group else ["run_id"],
                "formula": "moecap",
                "rows": board.to_dicts(),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    written["json"] = json_path
    figures = _figures(board)
    links: dict[str, list[Path]] = {}
    figures = [(slug, title, chart_spec(chart)) for slug, title, chart in figures]
    for slug, _, spec in figures:
        files = export_chart(spec, out / "charts" / slug, export)
        links[slug] = [p.relative_to(out) for p in files]
        for p in files:
            written[f"{slug}.{p.suffix.lstrip('.')}"] = p
    html_path = out / "leaderboard.html"
    html_path.write_text(_page(board, sort, figures, links, group), encoding="utf-8")
    written["html"] = html_path
    return written


def _figures(board: pl.DataFrame) -> list[tuple[str, str, Any]]:
    """(slug, title, chart) of the radar and the Pareto front over the board's rows."""
    runs = board.with_columns(run=_row_label(board))
    out: list[tuple[str, str, Any]] = []
    geometry, _ = C.radar_frame(runs)
    if geometry.filter(pl.col("kind") == "run").height:
        out.append(("leaderboard-cap_radar", "CAP radar", C.cap_radar(runs)))
    y = "cost" if runs["cost_usd_per_m_output_tokens"].drop_nulls().len() else "tpot"
    pts, _, _, _ = C.pareto_points(runs, y)
    if pts.height:
        out.append(
            (
                f"leaderboard-pareto_{y}",
                f"{'Cost' if y == 'cost' else 'TPOT'}–throughput Pareto front",
                C.pareto_front(runs, y),
            )
        )
    return out


def _row_label(board: pl.DataFrame) -> pl.Series:
    labels = [
        f"#{r['rank']} {str(r['model'] or '?').rstrip('/').split('/')[-1]} · {r['engine']} · {r['gpu']}×{r['num_gpus'] or 1}"
        f" · bs {r['batch_size']}"
        for r in board.iter_rows(named=True)
    ]
    return pl.Series("run", labels, dtype=pl.String)


def grouping_note(board: pl.DataFrame, runs: int) -> str | None:
    """What grouping did ("27 runs grouped into 20 rows …"), None when every run has its row."""
    if board.height == runs:
        return None
    return (
        f"{runs} runs grouped into {board.height} rows, one per (model, engine, GPU × count, batch size, "
        "dataset): the most recent run stands for each, the others are listed under other runs"
    )


def _page(
    board: pl.DataFrame,
    sort: str,
    figures: list[tuple[str, str, Any]],
    links: dict[str, list[Path]],
    group: bool = False,
) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(v) if v else '<span class=na>n/a</span>'}</td>" for v in cells) + "</tr>"
        for cells in display_rows(board)
    )
    col, higher = SORT_KEYS[sort]
    body = [
        "<header><h1>moecap leaderboard</h1>",
        (
            f"<p class=meta>{board.height} configuration(s), one row per (model, engine, GPU × count, batch size, "
            "dataset); the most recent run of a configuration stands for it"
            if group
            else f"<p class=meta>{board.height} run(s), one row per run"
        )
        + f"; ranked by <b>{esc(sort)}</b> ({esc(col)}, {'higher' if higher else 'lower'} is better; "
        "missing figures rank last).</p></header>",
        f'<section id="table"><div class="scroll"><table class="summary board"><tr>{head}</tr>{rows}</table></div></section>',
        '<section id="charts"><div class="charts">',
    ]
    specs: dict[str, Any] = {}
    for i, (slug, title, chart) in enumerate(figures, start=1):
        cid = f"chart-{i}"
        specs[cid] = chart_spec(chart)
        link = " · ".join(
            f'<a href="{esc(p.as_posix())}">{esc(p.suffix.lstrip(".").upper())}</a>'
            for p in links.get(slug, [])
        )
        body.append(
            f'<figure class="chart" data-slug="{esc(slug)}"><div class="vega" id="{cid}"></div>'
            f"<figcaption>{esc(title)}{' — ' + link if link else ''}</figcaption></figure>"
        )
    body.append("</div></section>")
    return render_page("moecap leaderboard", "\n".join(body), specs)
