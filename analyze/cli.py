"""`moecap-analyze`: a thin typer layer over the analyzer library.

`moecap-analyze PATHS…` is `moecap-analyze summary PATHS…`. User errors print one line and exit 2.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from .cost.options import CostModelFlag, CostOverrides, GpuHour, GpuPrice
from .entry import COMMAND_MODULES, COMMANDS, fail_if_mistyped
from .entry import fail as _fail
from .errors import AnalyzeError

if TYPE_CHECKING:
    from collections.abc import Iterable


class _Group(TyperGroup):
    """typer's command group, with a `--help` flag that needs no pydantic when it is not given.

    typer (0.2x) builds a pydantic TypeAdapter for the group's `--help` the first time it parses the
    group's options, even when the flag is absent and its value None (which no adapter looks at), so
    every `moecap-analyze CMD --help` imported pydantic (~60 ms on an idle machine; benchmarks/startup.py).
    A bool flag coerced by type check is the same for None, True and False. A typer without this
    private hook keeps its own (a test notices the slower start-up)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None and getattr(option, "_runtime_param", False) is None:
            try:
                from typer._coercion import PassThroughRuntimeParam
            except ImportError:  # pragma: no cover - another typer
                return option
            descriptor = option.type_descriptor
            if descriptor.annotation is bool:
                option._runtime_param = PassThroughRuntimeParam(
                    annotation=bool, parameter_info=descriptor.parameter_info
                )
        return option


app = typer.Typer(
    cls=_Group,
    name="moecap-analyze",
    help="Derive Cost/Accuracy/Performance metrics (S-MBU, S-MFU, TTFT, TPOT, expert load, …) from moecap traces "
    "or MoE-CAP record files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

Paths = Annotated[
    list[str], typer.Argument(help="Trace files, directories or globs (or MoE-CAP batch_data.json files).")
]
Formula = Annotated[
    str,
    typer.Option(
        "--formula", help="moecap (default, fixes the reference's defects) or reference (MoE-CAP exactly)."
    ),
]
Gpu = Annotated[
    str | None, typer.Option("--gpu", help="Analyse as this GPU (H100, H200, NVIDIA-A100-SXM4-80GB, …).")
]
GpuYaml = Annotated[
    str | None, typer.Option("--gpu-overrides", help="YAML file adding or replacing GPU table entries.")
]
Window = Annotated[
    str, typer.Option("--window", help="steady (default), all, steps:A-B, time:A-B (seconds).")
]
Out = Annotated[
    Path | None, typer.Option("--out", help="Directory for metrics.json and per-step / per-request tables.")
]
Fmt = Annotated[str, typer.Option("--format", help="table (default), json or csv on stdout.")]
ModelConfig = Annotated[
    str | None,
    typer.Option("--model-config", help="config.json path or bundled name (needed for MoE-CAP records)."),
]
ModelName = Annotated[
    str | None,
    typer.Option(
        "--model-name", help="Model id the reference dispatches on (default: the config's _name_or_path)."
    ),
]
NumGpus = Annotated[
    int | None, typer.Option("--num-gpus", help="GPU count (default: from the trace / records).")
]
Precision = Annotated[
    str | None, typer.Option("--precision", help="Reference mode: the reference's --precision flag.")
]
Strict = Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable or truncated file.")]
CacheDir = Annotated[
    Path | None, typer.Option("--cache-dir", help="Parquet cache (default ~/.cache/moecap).")
]


Detail = Annotated[
    bool,
    typer.Option("--detail", help="With several runs: each run's own tables instead of one row per run."),
]


def _print_runs(document: dict, *, detail: bool) -> None:
    """One row per run (several runs) or each run's tables (`--detail`, one run, reference formula)."""
    from .report.terminal import print_runs

    print_runs(document, detail=detail)


def _progress_printer(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None

    def progress(done: int, total: int, path: str) -> None:
        if total >= 20 and (done % max(1, total // 20) == 0 or done == total):
            err.print(f"loading {done}/{total} files", end="\r")

    return progress


@app.command()
def summary(
    paths: Paths,
    formula: Formula = "moecap",
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    out: Out = None,
    format: Fmt = "table",
    model_config: ModelConfig = None,
    model_name: ModelName = None,
    num_gpus: NumGpus = None,
    precision: Precision = None,
    num_requests: Annotated[
        int | None,
        typer.Option(help="Reference mode, record files: client requests sent (e2e_s, request/s)."),
    ] = None,
    total_time_s: Annotated[
        float | None,
        typer.Option(help="Reference mode, record files: benchmark makespan, s (e2e_s, request/s, cost)."),
    ] = None,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="TTFT SLO for goodput, ms.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO for goodput, ms.")] = None,
    strict: Strict = False,
    cache_dir: CacheDir = None,
    cost_overrides: CostOverrides = None,
    cost_model: CostModelFlag = None,
    gpu_price_usd: GpuPrice = None,
    usd_per_gpu_hour: GpuHour = None,
    detail: Detail = False,
) -> None:
    """Compute every metric and print a summary (and write metrics.json with --out).

    Example: moecap-analyze traces/*.arrow --out results/
    """
    from .lean import is_record_file
    from .output import write_outputs
    from .settings import Settings as Options
    from .specs import load_model_config

    if formula not in ("moecap", "reference"):
        raise typer.BadParameter("expected moecap or reference", param_hint="--formula")
    if format not in ("table", "json", "csv"):
        raise typer.BadParameter("expected table, json or csv", param_hint="--format")
    options = Options(
        gpu=gpu,
        gpu_overrides=gpu_overrides,
        window=window,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        model_config=load_model_config(model_config) if model_config else None,
        num_gpus=num_gpus,
    )
    record_files = [p for p in paths if is_record_file(p)]
    trace_paths = [p for p in paths if not is_record_file(p)]
    if formula == "reference":
        from types import SimpleNamespace

        from .reference_bridge import reference_document_for_records, reference_document_for_run

        runs = [
            reference_document_for_records(
                Path(p),
                model_config=model_config,
                model_name=model_name,
                gpu=gpu,
                num_gpus=num_gpus,
                precision=precision,
                num_requests=num_requests,
                total_time_s=total_time_s,
            )
            for p in record_files
        ]
        if trace_paths:
            from .load import load_traces, require_runs

            db = load_traces(trace_paths, cache_dir=cache_dir, strict=strict)
            require_runs(db)
            runs += [reference_document_for_run(db, rid, options, precision) for rid in db.runs]
        from .settings import METRICS_SCHEMA

        document = {"schema": METRICS_SCHEMA, "formula": "reference", "runs": runs}
        analysis: Any = SimpleNamespace(db=None, contexts=[], document=document, windows={})
    else:
        if record_files:
            raise AnalyzeError(
                f"{record_files[0]}: MoE-CAP record files are analysed with --formula reference "
                "(their records lack what the moecap formulas need)"
            )
        from .cost.options import settings_from_flags
        from .pipeline import analyze_paths

        options.cost = settings_from_flags(
            gpu_overrides=gpu_overrides,
            cost_overrides=cost_overrides,
            cost_model=cost_model,
            gpu_price_usd=gpu_price_usd,
            usd_per_gpu_hour=usd_per_gpu_hour,
        )
        # The summary needs no raw per-step expert counts (summaries and totals suffice).
        analysis = analyze_paths(
            trace_paths,
            options,
            cache_dir=cache_dir,
            strict=strict,
            progress=_progress_printer(True),
            expert_counts=False,
        )
    if out is not None:
        write_outputs(analysis, out, "csv" if format == "csv" else "parquet", defer_request_lists=True)
    if format in ("json", "csv"):
        from .output import print_document

        print_document(analysis.document, format)
    else:
        _print_runs(analysis.document, detail=detail)
        if out is not None:
            err.print(f"wrote {out / 'metrics.json'}", markup=False, highlight=False)
            _note_missing_steps(analysis)


def _note_missing_steps(analysis) -> None:
    from .output import NO_STEPS_NOTE, has_step_metrics

    if analysis.db is not None and not has_step_metrics(analysis):
        err.print(f"note: {NO_STEPS_NOTE}", markup=False, highlight=False)


@app.command()
def report(
    paths: Paths,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for report.html, metrics.json and chart exports.")
    ] = Path("moecap-report"),
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    whatif_gpu: Annotated[
        list[str] | None,
        typer.Option(
            "--whatif-gpu",
            help="GPUs the what-if section projects every run onto (repeatable; default H100, H200, B200; "
            "'none' leaves the section out).",
        ),
    ] = None,
    export: Annotated[
        str,
        typer.Option(
            "--export",
            help="Also write each chart as a file under OUT/charts: png, svg or png,svg (default none: "
            "the page already holds every chart; exporting ~200 charts takes minutes).",
        ),
    ] = "none",
    strict: Strict = False,
    cache_dir: CacheDir = None,
) -> None:
    """Write metrics.json and an HTML report (progress on stderr).

    Example: moecap-analyze report traces/*.arrow --out report/ --whatif-gpu H200 --whatif-gpu B200
    """
    from .analysis import Options
    from .output import write_outputs
    from .pipeline import analyze_paths
    from .report.cli import parse_export
    from .report.progress import ReportProgress

    formats = parse_export(export)
    options = Options(gpu=gpu, gpu_overrides=gpu_overrides, window=window)
    if gpu_overrides is not None:
        from .specs.gpu import gpu_table

        gpu_table(gpu_overrides)  # a bad override file is the only line, before any progress line
    with ReportProgress(err) as progress:
        analysis = analyze_paths(
            paths, options, cache_dir=cache_dir, strict=strict, progress=progress.loading
        )
        progress.stage("writing metrics.json")
        write_outputs(analysis, out)
        from .report.figures import DEFAULT_WHATIF_GPUS
        from .report.html import write_report

        gpus = tuple(g for g in (whatif_gpu or DEFAULT_WHATIF_GPUS) if g.lower() != "none")
        path = write_report(analysis, out, whatif_gpus=gpus, export=formats, progress=progress.update)
    err.print(
        f"wrote {path}" + (f" and {out / 'charts'}/ ({', '.join(formats)})" if formats else ""),
        markup=False,
        highlight=False,
    )
    _note_missing_steps(analysis)
    _print_runs(analysis.document, detail=False)


@app.command()
def check(paths: Paths, strict: Strict = False, cache_dir: CacheDir = None, format: Fmt = "table") -> None:
    """Reconcile each run's tables: warnings (exit 1), notes on the measurement (exit 1 with --strict).

    Notes name steps that compiled kernels inside the measured window.

    --format json: {"runs": [{"run_id", "findings": [...], "notes": [...]}, ...], "skipped": [...]};
    --format csv: one row per finding or note ("note: ..."; run_id, finding; "ok" rows for clean runs).

    Example: moecap-analyze check traces/
    """
    from .checks import check_notes, check_run
    from .load import load_traces, require_runs

    if format not in ("table", "json", "csv"):
        raise typer.BadParameter("expected table, json or csv", param_hint="--format")
    db = load_traces(paths, cache_dir=cache_dir, strict=strict)
    require_runs(db)
    from .terminal import one_line, plain

    results = [
        (run.run_id, [one_line(f) for f in check_run(db, run)], [one_line(n) for n in check_notes(db, run)])
        for run in db.runs.values()
    ]
    skipped = [one_line(e) for e in db.errors]
    if format == "json":
        runs = [{"run_id": rid, "findings": f, "notes": n} for rid, f, n in results]
        typer.echo(json.dumps({"runs": runs, "skipped": skipped}, indent=2))
    elif format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["run_id", "finding"])
        for rid, findings, notes in results:
            for f in [*findings, *(f"note: {n}" for n in notes)] or ["ok"]:
                writer.writerow([rid, f])
        for e in skipped:
            writer.writerow(["", f"skipped: {e}"])
    else:
        for rid, findings, notes in results:
            status = f"{len(findings)} warning(s)" if findings else "ok"
            if notes:
                status += f", {len(notes)} note(s)"
            typer.echo(f"{plain(rid)}: {status}")
            for f in findings:
                typer.echo(f"  - {f}")
            for n in notes:
                typer.echo(f"  - note: {n}")
        for e in skipped:
            typer.echo(f"skipped: {e}")
    problems = sum(len(f) for _, f, _ in results)
    noted = sum(len(n) for _, _, n in results)
    raise typer.Exit(1 if problems or db.errors or (strict and noted) else 0)


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"moecap-analyze {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Derive Cost/Accuracy/Performance metrics (S-MBU, S-MFU, TTFT, TPOT, expert load, …) from moecap
    traces or MoE-CAP record files."""


# Sub-commands that live beside their library code register themselves here: each module defines
# `register(app)`; `entry.COMMAND_MODULES` says which module holds which command. A module that is not
# installed yet is skipped; an error inside one is not hidden.
_COMMAND_MODULES = COMMAND_MODULES
_registered: set[str] = set()


def _register_commands(commands: Iterable[str] | None = None) -> None:
    """Register the modules of `commands` (default: every command), each once, in `--help` order."""
    import importlib

    wanted = set(COMMAND_MODULES) if commands is None else set(commands)
    for name in dict.fromkeys(m for c, m in COMMAND_MODULES.items() if m is not None and c in wanted):
        if name in _registered:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
        module.register(app)
        _registered.add(name)
    # `--help` lists commands in registration order: keep the table's order whatever was registered first.
    order = {command: i for i, command in enumerate(COMMAND_MODULES)}
    app.registered_commands.sort(
        key=lambda info: order.get(str(info.name or getattr(info.callback, "__name__", "")), len(order))
    )


_BOOL_FLAGS = {"--strict", "--allow-writes", "--python"}
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _bool_flag_given_a_value(argv: list[str]) -> str | None:
    """`--strict true`: the flag takes no value, so `true` would be read as a path. The one-line error."""
    for flag, value in itertools.pairwise(argv):
        if flag in _BOOL_FLAGS and value.lower() in _BOOL_WORDS and not Path(value).exists():
            return f"{flag} takes no value: write {flag} alone to turn it on, leave it out to keep it off ({value!r} is not a path)"
    return None


def _trace_error() -> type[Exception]:
    """moecap.schemas' TraceError, imported when an error is being handled: `--help` and the light
    commands start without pyarrow."""
    from moecap.schemas import TraceError

    return TraceError


def main() -> None:
    """Console-script entry point: `moecap-analyze PATHS…` means `moecap-analyze summary PATHS…`.

    Every user error ends here as one line on stderr and exit status 2: the analyzer's typed errors,
    trace errors and the command line's own (unknown option, bad value) alike."""
    argv = sys.argv[1:]
    fail_if_mistyped(argv)
    if argv and argv[0] not in COMMANDS:
        sys.argv.insert(1, "summary")
    # Only the asked command's module (its options and help); every module for the command list.
    first = sys.argv[1] if len(sys.argv) > 1 else None
    _register_commands([first] if first in COMMAND_MODULES else None)
    flag_error = _bool_flag_given_a_value(sys.argv[1:])
    if flag_error:
        _fail(flag_error)
    try:
        code = app(standalone_mode=False)
    except (AnalyzeError, _trace_error()) as exc:
        _fail(exc)
    except typer.Abort:
        _fail("aborted", 1)
    except typer.TyperException as exc:  # the command line's own errors (click's ClickException)
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]
            sys.exit(2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(message, int(getattr(exc, "exit_code", 2) or 2))
    sys.exit(code if isinstance(code, int) else 0)
