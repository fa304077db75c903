"""`moecap-analyze sql` and `moecap-analyze shell`: thin commands over `moecap.analyze.sql`.

Registered by `moecap.analyze.cli` (its `_COMMAND_MODULES`). Errors print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..cli import CacheDir, Gpu, GpuYaml, Paths, Strict, Window
from ..errors import AnalyzeError
from ..terminal import for_terminal, one_line

if TYPE_CHECKING:
    from .tables import Tables

Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="table (default), csv, json, jsonl or parquet; default: from --out's suffix, else table.",
    ),
]
OutFile = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write the result to this file instead of stdout.")
]
MaxRows = Annotated[
    int,
    typer.Option("--max-rows", help="Rows shown in table format (0 = all). Other formats write every row."),
]
AllowWrites = Annotated[
    bool,
    typer.Option(
        "--allow-writes",
        help="Let queries write files, attach databases and install or load extensions "
        "(COPY … TO, ATTACH, INSTALL); off by default: queries read the trace views only (docs/sql.md).",
    ),
]
MemoryLimit = Annotated[
    str | None, typer.Option("--memory-limit", help="DuckDB memory limit, e.g. 2GB (it spills beyond it).")
]


def _fail(message: str) -> typer.Exit:
    sys.stderr.write(f"moecap-analyze: error: {one_line(message)}\n")
    return typer.Exit(2)


def _load(
    paths: list[str],
    gpu: str | None,
    gpu_overrides: str | None,
    window: str,
    strict: bool,
    cache_dir: Path | None,
    memory_limit: str | None,
    read_only: bool = False,
    out: Path | None = None,
) -> Tables:
    from ..analysis import Options
    from ..fleet.dataset import is_dataset, open_dataset
    from .tables import tables

    if len(paths) == 1 and is_dataset(paths[0]):  # a fleet dataset (docs/fleet-dataset.md)
        return open_dataset(paths[0], memory_limit)  # type: ignore[return-value]

    def progress(done: int, total: int, path: str) -> None:
        if total >= 20 and (done % max(1, total // 20) == 0 or done == total):
            end = "\n" if done == total else "\r"
            sys.stderr.write(f"loading {done}/{total} files{end}")

    # Run-level metrics (metrics.json) only when a query names window_steps or run_metrics: over
    # many runs they cost far more than most queries.
    t = tables(
        paths,
        Options(gpu=gpu, gpu_overrides=gpu_overrides, window=window),
        metrics=False,
        cache_dir=cache_dir,
        strict=strict,
        memory_limit=memory_limit,
        progress=progress if sys.stderr.isatty() else None,  # keep piped stderr to result lines
    )
    for e in t.errors:
        sys.stderr.write(f"skipped: {one_line(e)}\n")
    if read_only:
        from ..load import prepare_cache_dir
        from .readonly import lock_down

        lock_down(t.con, [prepare_cache_dir(cache_dir)], [out] if out is not None else [])
    return t


def sql(
    query: Annotated[
        str, typer.Argument(help='SQL (several statements: ";"-separated), @FILE, or - for stdin.')
    ],
    paths: Paths,
    format: Format = None,
    out: OutFile = None,
    max_rows: MaxRows = 100,
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    memory_limit: MemoryLimit = None,
    strict: Strict = False,
    cache_dir: CacheDir = None,
    allow_writes: AllowWrites = False,
) -> None:
    """Run a SQL query over the trace views and print the result (views and columns: docs/sql.md).

    Example: moecap-analyze sql "SELECT phase, count(*) AS steps, avg(time_s) FROM step_metrics GROUP BY phase" traces/*.arrow

    Example: moecap-analyze sql "SELECT * FROM request_metrics" traces/ --out requests.parquet
    """
    from .query import QueryError, infer_format, read_query, result_statements, run, run_each, write_result
    from .tables import needs_run_metrics

    try:
        text = read_query(query)
        fmt = infer_format(format, out)
        if fmt == "parquet" and out is None:
            raise QueryError("--format parquet needs --out FILE")
        t = _load(paths, gpu, gpu_overrides, window, strict, cache_dir, memory_limit, not allow_writes, out)
        with t:
            if needs_run_metrics(text):
                sys.stderr.write(
                    f"computing the run-level metrics of {len(t.runs)} run(s) for run_metrics…\n"
                )
                t.ensure_run_metrics()
            if out is not None:
                n = result_statements(t.con, text)
                if n > 1:
                    raise QueryError(
                        f"--out {out} holds one result; the query has {n} statements that return rows"
                    )
                rel = run(t.con, text, read_only=not allow_writes)
                if rel is None:
                    return
                sys.stderr.write(write_result(rel, fmt, out=out, max_rows=max_rows) + "\n")
                return
            # Every statement's result, in order (not only the last one's).
            for i, rel in enumerate(run_each(t.con, text, read_only=not allow_writes)):
                if i and fmt in ("table", "csv"):
                    sys.stdout.write("\n")
                note = write_result(rel, fmt, out=None, stdout=for_terminal(sys.stdout), max_rows=max_rows)
                if fmt == "table":
                    sys.stderr.write(note + "\n")
    except (AnalyzeError, _trace_error()) as exc:
        raise _fail(str(exc)) from None


def shell(
    paths: Paths,
    python: Annotated[
        bool, typer.Option("--python", help="A Python REPL with t (Tables), con, sql, lazy and pl bound.")
    ] = False,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Write a DuckDB database file with the views (for the duckdb CLI or any client) and exit.",
        ),
    ] = None,
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    memory_limit: MemoryLimit = None,
    strict: Strict = False,
    cache_dir: CacheDir = None,
    allow_writes: AllowWrites = False,
) -> None:
    """An interactive SQL prompt with the trace views defined (.help for commands; statements end with ;).

    Example: moecap-analyze shell traces/

    Example: echo "SELECT count(*) FROM steps;" | moecap-analyze shell traces/
    """
    from .shell import SqlShell, python_repl, save_database

    try:
        # --save writes the database it names and runs no query; --python is a full Python REPL
        # (not a sandbox): neither is locked down. The SQL prompt is, unless --allow-writes.
        read_only = not allow_writes and save is None and not python
        t = _load(paths, gpu, gpu_overrides, window, strict, cache_dir, memory_limit, read_only)
        with t:
            if save is not None:
                names, left_out = save_database(t, save)
                sys.stderr.write(
                    f"wrote {save} ({len(names)} views and tables); open it with: duckdb {save}\n"
                )
                if left_out:
                    sys.stderr.write(
                        f"not saved (they read data registered from Python): {', '.join(left_out)}\n"
                    )
                return
            if python:
                python_repl(t)
                return
            code = SqlShell(t, read_only=read_only, stdout=for_terminal(sys.stdout)).loop()
    except (AnalyzeError, _trace_error()) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


def _trace_error() -> type[Exception]:
    """moecap.schemas' TraceError, imported when an error is being handled (not for `--help`)."""
    from moecap.schemas import TraceError

    return TraceError


def register(app: typer.Typer) -> None:
    """Add the `sql` and `shell` commands to `moecap-analyze`."""
    app.command(name="sql")(sql)
    app.command(name="shell")(shell)
