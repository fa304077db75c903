"""Writing results: metrics.json, per-step / per-request tables, and the terminal summary."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .terminal import markup

if TYPE_CHECKING:
    from rich.console import Console


def write_outputs(
    analysis: Any, out: Path, table_format: str = "parquet", defer_request_lists: bool = False
) -> list[Path]:
    """metrics.json plus step_metrics / requests tables (Parquet or CSV) under `out`.
    `defer_request_lists`: no output reads the steps' request lists, so they are not cached here
    (caching re-reads every steps file)."""
    if defer_request_lists and analysis.db is not None:
        with analysis.db.defer_request_lists():
            return write_outputs(analysis, out, table_format)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "metrics.json"]
        (out / "metrics.json").write_text(document_json(analysis.document) + "\n")
        if analysis.db is not None:
            tables = [
                ("step_metrics", "SELECT * FROM step_metrics ORDER BY run_id, dp, pp, step"),
                (
                    "requests",
                    "SELECT * EXCLUDE (chunk_times_ns, chunk_tokens) FROM requests ORDER BY run_id, arrival_ns",
                ),
            ]
            if not has_step_metrics(analysis):
                tables = tables[1:]  # no run has steps (a driver-only trace): no per-step table
            for name, query in tables:
                target = out / f"{name}.{table_format}"
                fmt = "PARQUET" if table_format == "parquet" else "CSV, HEADER"
                path = str(target).replace("'", "''")
                analysis.db.con.execute(f"COPY ({query}) TO '{path}' (FORMAT {fmt})")
                written.append(target)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    return written


def has_step_metrics(analysis: Any) -> bool:
    """Whether some run of `analysis` has per-step metrics (a run of driver tables alone has none)."""
    return any(ctx.step_files for ctx in getattr(analysis, "contexts", []))


_NO_STEPS_WHY = (
    "(driver tables only): per-step metrics (S-MBU, S-MFU, step times, expert load), "
    "step_metrics tables and what-if need the engine's trace files"
)
NO_STEPS_NOTE = f"no run has a steps table {_NO_STEPS_WHY}"
RUN_WITHOUT_STEPS = f"the run has no steps table {_NO_STEPS_WHY}"


def print_document(document: dict[str, Any], fmt: str) -> None:
    """The document on stdout as `summary --format json` (ASCII-only JSON and a newline) or csv."""
    if fmt == "json":
        sys.stdout.write(document_json(document, ascii_only=True) + "\n")
        sys.stdout.flush()
    else:
        print_csv(document)


def print_csv(document: dict[str, Any]) -> None:
    """The document's metrics as CSV rows on stdout: run_id, section, phase, metric, value."""
    import csv

    writer = csv.writer(sys.stdout)
    writer.writerow(["run_id", "section", "phase", "metric", "value"])
    for run in document["runs"]:
        if "batch_metrics" in run:
            for k, v in {**run["batch_metrics"], **run["run_level"]}.items():
                writer.writerow([run["run_id"], "reference", "", k, v])
            continue
        for phase, values in run["metrics"]["steps"].items():
            for k, v in values.items():
                if not isinstance(v, list):
                    writer.writerow([run["run_id"], "steps", phase, k, v])
        for k, v in run["metrics"]["requests"].items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    writer.writerow([run["run_id"], "requests", "", f"{k}.{kk}", vv])
            elif not isinstance(v, list):
                writer.writerow([run["run_id"], "requests", "", k, v])


def document_json(document: Any, indent: int | None = 2, *, ascii_only: bool = False) -> str:
    """`document` as strict JSON (RFC 8259): NaN and ±Infinity, which strict parsers refuse, become
    null; numpy values become numbers or lists; anything else unknown becomes its string.
    `ascii_only` escapes every non-ASCII character (for a terminal: JSON leaves C1 controls raw)."""
    return json.dumps(_strict(document), indent=indent, allow_nan=False, ensure_ascii=ascii_only)


def _strict(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _strict(obj.tolist())
    return str(obj)


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        v = value * scale
        if unit == "%":
            return f"{v:.{max(1, digits - 2)}f} %"
        text = f"{v:,.0f}" if abs(v) >= 100 or (isinstance(value, int) and scale == 1) else f"{v:.{digits}g}"
        return f"{text} {unit}".strip()
    return str(value)


def print_summary(document: dict[str, Any], console: Console | None = None) -> None:
    """A compact table per run (moecap formula) or the reference batch metrics."""
    from rich.console import Console  # rich only for the tables: JSON and CSV print without it
    from rich.table import Table

    console = console or Console()
    for run in document.get("runs", []):
        if run.get("formula") == "reference" or document.get("formula") == "reference":
            table = Table(title=f"{markup(run['run_id'])} — reference formula (MoE-CAP)", show_header=True)
            table.add_column("metric")
            table.add_column("value", justify="right")
            for k, v in {**run.get("batch_metrics", {}), **run.get("run_level", {})}.items():
                table.add_row(markup(k), markup(_fmt(v, digits=6)))
            console.print(table)
            for w in run.get("warnings", []):
                console.print(f"[yellow]warning:[/] {markup(w)}")
            continue
        m = run["metrics"]
        steps = m.get("steps", {})
        gpu = run.get("constants", {}).get("gpu", {})
        from .report.terminal import gpu_text, window_text

        title = f"{run['model']} · {run['engine']['name']} {run['engine']['version']} · {gpu_text(run)}" + (
            " (re-targeted)" if gpu.get("retargeted") else ""
        )
        console.print(f"[bold]{markup(run['run_id'])}[/]  {markup(title)}")
        console.print(f"window: {window_text(run.get('window'))}", markup=False, highlight=False)
        table = Table(show_header=True)
        for col, justify in (
            ("phase", "left"),
            ("steps", "right"),
            ("tokens", "right"),
            ("S-MBU", "right"),
            ("S-MFU", "right"),
            ("step time p50", "right"),
            ("experts/layer", "right"),
            ("GPU busy", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for phase, s in steps.items():
            p50 = (s.get("step_time_s_p50_p90_p99") or [None])[0]
            table.add_row(
                markup(phase),
                _fmt(s["steps"]),
                _fmt(s["tokens"]),
                _fmt(s["s_mbu"], "%", 100),
                _fmt(s["s_mfu"], "%", 100),
                _fmt(p50, "ms", 1e3),
                _fmt(s.get("activated_experts_per_layer_mean")),
                _fmt(s.get("gpu_busy_fraction"), "%", 100),
            )
        console.print(table)
        r = m.get("requests", {})
        if r.get("requests"):
            console.print(
                f"requests: {r['succeeded']}/{r['requests']} ok · TTFT mean {_fmt(r['ttft_s']['mean'], 'ms', 1e3)}"
                f" p99 {_fmt(r['ttft_s']['p99'], 'ms', 1e3)} · TPOT mean {_fmt(r['tpot_s']['mean'], 'ms', 1e3)}"
                f" · ITL p50 {_fmt(r['itl_s']['p50'], 'ms', 1e3)}"
            )
            console.print(
                f"requests over {_fmt(r.get('makespan_s'), 's')}: output_throughput "
                f"{_fmt(r.get('output_throughput'), 'tok/s')} · total_token_throughput "
                f"{_fmt(r.get('total_token_throughput'), 'tok/s')} · request_throughput "
                f"{_fmt(r.get('request_throughput'), 'req/s')}"
            )
        all_steps = steps.get("all", {})
        if all_steps.get("window_total_token_throughput"):
            console.print(
                f"window (busy {_fmt(all_steps.get('window_s'), 's')}): window_output_throughput "
                f"{_fmt(all_steps['window_output_throughput'], 'tok/s')} · window_total_token_throughput "
                f"{_fmt(all_steps['window_total_token_throughput'], 'tok/s')}"
            )
        c = m.get("cost") or {}
        if c.get("usd_per_1m_output_tokens") is not None:
            band = c.get("band_usd_per_1m_output_tokens") or [None, None]
            energy = (c.get("energy") or {}).get("source", "?")
            console.print(
                f"cost ({c.get('model')}): ${c['usd_per_1m_output_tokens']:.3g} per 1M output tokens "
                f"(band ${_fmt(band[0])}–${_fmt(band[1])}) · ${_fmt(c.get('usd_per_1m_total_tokens'))} per 1M tokens"
                f" · energy from {energy}"
            )
        elif c.get("error"):
            console.print(f"cost: {markup(c['error'])}")
        acc = m.get("accuracy") or {}
        if acc.get("total"):
            console.print(f"accuracy: {acc['correct']}/{acc['total']} exact match ({acc['exact_match']:.1%})")
        e = m.get("experts", {}).get("summary")
        if e:
            console.print(
                f"experts: imbalance max/mean {_fmt(e['imbalance_max_over_mean_mean'])} · top-10% share "
                f"{_fmt(e['top10pct_token_share_mean'], '%', 100)} · dead {e['dead_experts_total']} · "
                f"entropy {_fmt(e['entropy_normalized_mean'])}"
            )
        for w in run.get("warnings", []):
            console.print(f"[yellow]warning:[/] {markup(w)}")
        console.print()
    for e in document.get("load_errors", []):
        console.print(f"[red]skipped:[/] {markup(e)}")
