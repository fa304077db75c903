"""Terminal presentation of a metrics document: one row per run (the default with several runs),
the window as stated, and tables that fit the terminal (or do not wrap at all when piped).

`moecap-analyze summary` and `report` print through here; `--detail` gives each run's own tables
(moecap.analyze.output.print_summary).
"""

from __future__ import annotations

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


def print_runs_table(document: dict[str, Any], console: Console) -> None:
    """The one-row-per-run table, then each run's warnings counted (`--detail` lists them)."""
    table = Table(title=f"{len(document.get('runs', []))} runs · one row per run (--detail: per-run tables)")
    for key, heading, justify in COLUMNS:
        table.add_column(
            heading,
            justify=justify,  # type: ignore[arg-type]
            overflow="fold" if key == "run_id" else "ellipsis",
            no_wrap=key != "run_id",
            min_width=12 if key == "run_id" else None,
        )
    for row in compact_rows(document):
        table.add_row(*[row[k] for k, _, _ in COLUMNS])
    console.print(table)
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
