"""`moecap-analyze leaderboard`: a thin command over `moecap.analyze.report.leaderboard`.

Registered by `moecap.analyze.cli` (its `_COMMAND_MODULES`); `report` itself lives in that module
and calls `moecap.analyze.report.html.write_report`. Heavy imports happen inside the command so
registering it costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli import CacheDir, Gpu, GpuYaml, Paths, Strict, Window
from ..errors import InputError

Sort = Annotated[
    str,
    typer.Option(
        "--sort",
        help="Rank by throughput (default), cost, accuracy, ttft, tpot, itl, decode_smbu, decode_smfu, "
        "prefill_smbu or prefill_smfu; the better direction is implied.",
    ),
]
Export = Annotated[
    str,
    typer.Option("--export", help="Chart files to write with --out: png,svg (default), png, svg or none."),
]


TERMINAL_COLUMNS = (
    "rank",
    "run_id",
    "model",
    "engine",
    "gpu",
    "num_gpus",
    "batch_size",
    "dataset",
    "accuracy",
    "cost_usd_per_m_output_tokens",
    "ttft_ms",
    "tpot_ms",
    "window_output_throughput",
    "decode_smbu",
    "decode_smfu",
)
_SHORT = {
    "num_gpus": "×",
    "batch_size": "bs",
    "accuracy": "EM",
    "cost_usd_per_m_output_tokens": "$/1M out",
    "ttft_ms": "TTFT ms",
    "tpot_ms": "TPOT ms",
    "window_output_throughput": "tok/s",
    "decode_smbu": "dec S-MBU",
    "decode_smfu": "dec S-MFU",
}
_LEFT = {"model", "engine", "gpu", "dataset", "run_id"}


def parse_export(value: str) -> tuple[str, ...]:
    """'png,svg' -> ('png', 'svg'); 'none' or '' -> ()."""
    parts = tuple(p.strip().lower() for p in value.split(",") if p.strip() and p.strip().lower() != "none")
    bad = [p for p in parts if p not in ("png", "svg")]
    if bad:
        raise InputError(f"--export {value!r}: expected png, svg, png,svg or none")
    return parts


def leaderboard(
    paths: Paths,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for leaderboard.csv/.json/.html and the radar/Pareto charts."),
    ] = None,
    sort: Sort = "throughput",
    format: Annotated[
        str, typer.Option("--format", help="table (default), csv or json on stdout.")
    ] = "table",
    export: Export = "png,svg",
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    strict: Strict = False,
    cache_dir: CacheDir = None,
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="One row per (model, engine, GPU, batch size, dataset), the most recent run standing for "
            "each (default: one row per run; runs sharing that key may differ in what it does not hold, "
            "e.g. CUDA graphs on or off).",
        ),
    ] = False,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="ranked (default: one row per configuration, best first) or moecap (a sweep's matrix as "
            "MoE-CAP publishes it: one row per run, model x task x batch size; --out writes matrix.csv/.json/.md).",
        ),
    ] = "ranked",
) -> None:
    """Rank runs like the MoE-CAP leaderboard: one row per run (--group: per configuration).

    --group: one row per model, engine, GPU, batch size and dataset.

    Example: moecap-analyze leaderboard traces/*.arrow --sort cost --out board/

    A sweep's table (moecap-collect sweep): moecap-analyze leaderboard sweep-out/ --layout moecap
    """
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from ..analysis import Options
    from ..pipeline import analyze_paths
    from ..report.terminal import console_for
    from .leaderboard import (
        COLUMNS,
        SORT_KEYS,
        display_rows,
        grouping_note,
        leaderboard_frame,
        write_leaderboard,
    )

    if sort not in SORT_KEYS:
        raise typer.BadParameter(f"expected one of {', '.join(SORT_KEYS)}", param_hint="--sort")
    if format not in ("table", "csv", "json"):
        raise typer.BadParameter("expected table, csv or json", param_hint="--format")
    if layout not in ("ranked", "moecap"):
        raise typer.BadParameter("expected ranked or moecap", param_hint="--layout")
    formats = parse_export(export)
    analysis = analyze_paths(
        paths,
        Options(gpu=gpu, gpu_overrides=gpu_overrides, window=window),
        cache_dir=cache_dir,
        strict=strict,
    )
    if layout == "moecap":
        _print_matrix(analysis, format, out)
        return
    board = leaderboard_frame(analysis, sort=sort, group=group)
    err = Console(stderr=True)
    note = grouping_note(board, len(analysis.run_ids))
    if note:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if format == "csv":
        typer.echo(board.select([c for c, _, _ in COLUMNS]).write_csv(), nl=False)
    elif format == "json":
        typer.echo(json.dumps(board.to_dicts(), indent=2, default=str))
    else:
        # The terminal gets the headline columns; CSV/JSON/HTML carry all of them.
        table = Table(title=f"moecap leaderboard — ranked by {sort}", show_header=True)
        index = {c: i for i, (c, _, _) in enumerate(COLUMNS)}
        for c in TERMINAL_COLUMNS:
            table.add_column(
                _SHORT.get(c, COLUMNS[index[c]][1]),
                justify="left" if c in _LEFT else "right",
                overflow="fold" if c == "run_id" else "ellipsis",
            )
        tps = TERMINAL_COLUMNS.index("window_output_throughput")
        for cells, compiled in zip(display_rows(board), board["compile_steps"], strict=True):
            row = [cells[index[c]] or "n/a" for c in TERMINAL_COLUMNS]
            row[TERMINAL_COLUMNS.index("model")] = (
                row[TERMINAL_COLUMNS.index("model")].rstrip("/").split("/")[-1]
            )
            if compiled:
                row[tps] += " †"
            table.add_row(*row)
        console_for().print(table)
        marked = board.filter(pl.col("compile_steps") > 0)
        if marked.height:
            err.print(
                f"note: † {marked.height} run(s) hold compile / JIT or first-use warm-up steps "
                f"({int(marked['compile_steps'].sum())} in all, {marked['compile_s'].sum():.3g} s; "
                "moecap-analyze check names them): their figures include that one-off time where it falls in "
                "the window (`run --warmup` keeps it out; CSV/JSON: compile_steps, compile_s)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    if out is not None:
        written = write_leaderboard(analysis, out, sort=sort, export=formats, group=group)
        err.print(f"wrote {written['html']}, {written['csv'].name}, {written['json'].name}", markup=False)
    for e in analysis.document.get("load_errors", []):
        err.print(f"skipped: {e}", markup=False, highlight=False)


def _print_matrix(analysis: Any, format: str, out: Path | None) -> None:
    """`--layout moecap`: the matrix table (report/matrix.py) on stdout, and its files with --out."""
    from rich.console import Console
    from rich.table import Table

    from .matrix import COLUMNS, display_rows, matrix_frame, write_matrix

    frame = matrix_frame(analysis)
    err = Console(stderr=True)
    if format == "csv":
        typer.echo(frame.select([c for c, _, _ in COLUMNS]).write_csv(), nl=False)
    elif format == "json":
        typer.echo(json.dumps(frame.to_dicts(), indent=2, default=str))
    else:
        table = Table(title="moecap sweep — MoE-CAP layout", show_header=True)
        for c, heading, fmt in COLUMNS:
            table.add_column(heading, justify="right" if fmt or c in ("batch_size", "repeat") else "left")
        for cells in display_rows(frame):
            cells[0] = cells[0].rstrip("/").split("/")[-1]
            table.add_row(*[v or "n/a" for v in cells])
        Console(width=250).print(table)
    if out is not None:
        written = write_matrix(analysis, out)
        err.print(f"wrote {written['md']}, {written['csv'].name}, {written['json'].name}", markup=False)
    for e in analysis.db.errors:
        err.print(f"skipped: {e}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `leaderboard` command to `moecap-analyze`."""
    app.command(name="leaderboard")(leaderboard)
