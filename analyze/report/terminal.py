"""Terminal presentation of a metrics document: one row per run (the default with several runs),
the window as stated, and tables that fit the terminal (or do not wrap at all when piped).

`moecap-analyze summary` and `report` print through here; `--detail` gives each run's own tables
(moecap.analyze.output.print_summary).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 400
"""Columns a table may use when stdout is not a terminal: a pipe or file gets whole lines, not
rows wrapped at rich's default 80 columns."""

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, heading with its one unit, justify)
    ("index", "#", "right"),
    ("run_id", "run id", "left"),
    ("model", "model", "left"),
    ("engine", "engine", "left"),
    ("gpu", "GPU", "left"),
    ("batch", "bs", "right"),
    ("window_steps", "window steps", "right"),
    ("decode_smbu", "decode S-MBU %", "right"),
    ("decode_smfu", "decode S-MFU %", "right"),
    ("ttft_ms", "TTFT mean ms", "right"),
    ("tpot_ms", "TPOT mean ms", "right"),
    ("tok_s", "gen tok/s", "right"),
    ("usd", "$/1M out tok", "right"),
    ("warnings", "warnings", "right"),
)


def console_for(stream: Any = None) -> Console:
    """A console for stdout: the terminal's width on a terminal; PIPED_WIDTH when piped (a
    $COLUMNS inherited from the shell is ignored there), so rows stay whole for grep and files."""
    stream = stream or sys.stdout
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=PIPED_WIDTH)


def window_text(window: dict[str, Any] | None) -> str:
    """The window as the user asked for it, with its range: "steps 50–10", "time 1.5–3 s"."""
    w = window or {}
    kind = w.get("kind")
    if kind == "steps" and "first_step" in w:
        return f"steps {w['first_step']}–{w.get('last_step')}"
    if kind == "time" and "start_s" in w:
        return f"time {w['start_s']:g}–{w.get('end_s', 0):g} s from the first step"
    return str(w.get("description") or kind or "?")


def gpu_text(run: dict[str, Any]) -> str:
    """GPU and count ("H100-SXM-80GB ×1"), or "no GPU recorded (CPU trace)" instead of "None ×1"."""
    name = ((run.get("constants") or {}).get("gpu") or {}).get("name") or (run.get("gpu") or {}).get("name")
    count = (run.get("gpu") or {}).get("count") or 1
    return f"{name} ×{count}" if name else "no GPU recorded (CPU trace)"


def window_steps(run: dict[str, Any]) -> int | None:
    """Steps inside the run's metrics window (None when the document does not say)."""
    steps = ((run.get("metrics") or {}).get("steps")) or {}
    if not steps:
        return 0
    value = (steps.get("all") or {}).get("steps")
    return int(value) if value is not None else None


def empty_window_warning(run: dict[str, Any]) -> str | None:
    """Why the run's step table is empty, when it is: no GPU spec (a CPU trace: the step metrics need
    one), or a window that holds no step (e.g. --window steps:50-10)."""
    if window_steps(run) != 0 or "batch_metrics" in run:
        return None
    gpu = next((w for w in run.get("warnings") or [] if str(w).startswith("gpu spec:")), None)
    if gpu is not None:
        return f"the step table of {run['run_id']} is empty: step metrics need a GPU spec (see the gpu spec warning)"
    return (
        f"the window ({window_text(run.get('window'))}) holds no step of {run['run_id']}: its step "
        "metrics are empty; try --window all or a range inside the run"
    )


def _num(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or isinstance(value, str):
        return "—" if value is None else value
    v = float(value) * scale
    if v != v:  # NaN
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"


def compact_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run (moecap formula): the COLUMNS keys, values as printed."""
    rows = []
    for i, run in enumerate(document.get("runs", []), 1):
        m = run.get("metrics") or {}
        steps = m.get("steps") or {}
        req = m.get("requests") or {}
        dec = steps.get("decode") or {}
        wl = run.get("workload") or {}
        cost = (m.get("cost") or {}).get("usd_per_1m_output_tokens")
        eng = run.get("engine") or {}
        rows.append(
            {
                "index": str(i),
                "run_id": run["run_id"],
                "model": str(run.get("model") or "?").rstrip("/").split("/")[-1],
                "engine": f"{eng.get('name') or '?'} {eng.get('version') or ''}".strip(),
                "gpu": gpu_text(run),
                "batch": _num(wl.get("batch_size") or wl.get("concurrency")),
                "window_steps": _num(window_steps(run)),
                "decode_smbu": _num(dec.get("s_mbu"), 100),
                "decode_smfu": _num(dec.get("s_mfu"), 100),
                "ttft_ms": _num((req.get("ttft_s") or {}).get("mean"), 1e3),
                "tpot_ms": _num((req.get("tpot_s") or {}).get("mean"), 1e3),
                "tok_s": _num((steps.get("all") or {}).get("window_output_throughput")),
                "usd": _num(cost),
                "warnings": str(len(run.get("warnings") or [])),
            }
        )
    return rows


PRIORITY = (
    "index",
    "run_id",
    "model",
    "tok_s",
    "decode_smbu",
    "tpot_ms",
    "ttft_ms",
    "gpu",
    "engine",
    "batch",
    "usd",
    "decode_smfu",
    "window_steps",
    "warnings",
)
"""Which columns a narrow terminal keeps first; the table shows them in COLUMNS order."""
RUN_ID_MIN = 16
"""Characters the run id column gets at least (its lines break after - _ : / only)."""


def _segments(text: str) -> list[str]:
    """`text` cut after each - _ : / (the places a name may break; not after a dot: "1.5", "0.26.0")."""
    return [p for p in re.split(r"(?<=[-_:/])", text) if p]


def wrap_name(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters, broken only after - _ : / (a segment
    longer than `width` stays whole on its line)."""
    lines: list[str] = []
    line = ""
    for seg in _segments(text):
        if line and len(line) + len(seg) > width:
            lines.append(line)
            line = ""
        line += seg
    return "\n".join([*lines, line])


def fit_columns(rows: list[dict[str, str]], width: int) -> tuple[list[str], dict[str, int]]:
    """The columns that fit `width` terminal columns whole (by PRIORITY; shown in COLUMNS order) and
    each one's width: a column is as wide as its longest cell and its heading's longest word; the
    run id may take fewer (down to RUN_ID_MIN or its longest segment) and wraps between segments.
    Width to spare goes to the run id, then to headings (whole on one line)."""

    def longest_word(text: str) -> int:
        return max(len(w) for w in text.split())

    need = {key: max([longest_word(heading)] + [len(r[key]) for r in rows]) for key, heading, _ in COLUMNS}
    natural_id = need["run_id"]
    longest_seg = max((len(s) for r in rows for s in _segments(r["run_id"])), default=1)
    need["run_id"] = max(longest_seg, min(natural_id, RUN_ID_MIN))
    used = 1  # the table's left border; each column adds its cell, 2 padding and 1 border
    chosen = []
    for key in PRIORITY:
        if used + need[key] + 3 <= width:
            chosen.append(key)
            used += need[key] + 3
    if "run_id" in chosen:  # spare width goes to the run id, up to its whole length
        grow = max(0, min(width - used, natural_id - need["run_id"]))
        need["run_id"] += grow
        used += grow
    heading = {k: h for k, h, _ in COLUMNS}
    for key in chosen:  # then to headings, so they need not wrap
        grow = max(0, min(width - used, len(heading[key]) - need[key]))
        need[key] += grow
        used += grow
    return [k for k, _, _ in COLUMNS if k in chosen], need


def print_runs_table(document: dict[str, Any], console: Console) -> None:
    """The one-row-per-run table, as many columns as fit the console whole (no cell cut or wrapped
    mid-word; the run id wraps between its parts), naming the columns left out."""
    rows = compact_rows(document)
    keys, widths = fit_columns(rows, console.width)
    table = Table(title=f"{len(rows)} runs · one row per run (--detail: per-run tables)")
    heading = {k: h for k, h, _ in COLUMNS}
    for key, _, justify in COLUMNS:
        if key in keys:
            table.add_column(
                heading[key],
                justify=justify,  # type: ignore[arg-type]
                width=widths[key],  # >= every cell: only a heading wraps, between its words
                overflow="fold",
            )
    for row in rows:
        table.add_row(*[wrap_name(row[k], widths[k]) if k == "run_id" else row[k] for k in keys])
    console.print(table)
    left_out = [heading[k] for k, _, _ in COLUMNS if k not in keys]
    if left_out:
        console.print(
            f"left out to fit {console.width} columns: {', '.join(left_out)} (a wider terminal shows them; "
            "--format csv or json has every figure)",
            markup=False,
            highlight=False,
        )
    windows = {window_text(r.get("window")) for r in document.get("runs", [])}
    if len(windows) == 1:
        console.print(f"window: {windows.pop()}", markup=False, highlight=False)
    for run in document.get("runs", []):
        msg = empty_window_warning(run)
        if msg:
            console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def print_runs(document: dict[str, Any], *, detail: bool = False, console: Console | None = None) -> None:
    """Several moecap-formula runs: one row per run unless `detail`; otherwise (or for one run, or
    the reference formula) each run's own tables."""
    from ..output import print_summary

    console = console or console_for()
    runs = document.get("runs", [])
    reference = document.get("formula") == "reference" or any("batch_metrics" in r for r in runs)
    if len(runs) > 1 and not detail and not reference:
        print_runs_table(document, console)
        for e in document.get("load_errors", []):
            console.print(f"[red]skipped:[/] {e}", highlight=False)
        return
    print_summary(document, console)
    for run in runs:
        msg = empty_window_warning(run)
        if msg:
            console.print(f"[yellow]warning:[/] {msg}", highlight=False)
