"""`moecap-analyze whatif`: a thin command over `moecap.analyze.whatif` (and the cost flags).

Registered by `moecap.analyze.cli` (its `_COMMAND_MODULES`). User errors raise AnalyzeError, which
the entry point prints as one line (exit 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..cli import CacheDir, GpuYaml, Paths, Strict, Window
from ..cost.options import (
    CostModelFlag,
    CostOverrides,
    Electricity,
    GpuHour,
    GpuPrice,
    Lifetime,
    Pue,
    Utilization,
    settings_from_flags,
)
from ..document import at
from ..errors import InputError
from ..terminal import markup as safe  # trace text (run ids, model ids) inert under rich markup


def whatif(
    paths: Paths,
    gpu: Annotated[
        list[str] | None,
        typer.Option("--gpu", help="Target GPU(s) to project onto (repeat: --gpu H200 --gpu B200)."),
    ] = None,
    compare_to: Annotated[
        list[str] | None,
        typer.Option(
            "--compare-to",
            help="Traces of the same workloads measured on the target GPU: print the projection error per "
            "batch size against both baselines (repeatable; files, directories or globs).",
        ),
    ] = None,
    calibrate_on: Annotated[
        list[str] | None,
        typer.Option(
            "--calibrate-on",
            help="Fit the roofline jointly on these traces (runs of the same model and engine on the same GPU, "
            "e.g. a concurrency sweep: steps that move different bytes identify the per-step overhead and the "
            "bandwidth efficiency) instead of on each projected run itself (repeatable; files, directories or globs).",
        ),
    ] = None,
    calibrate_per_run: Annotated[
        bool,
        typer.Option(
            "--calibrate-per-run",
            help="Fit each run on its own steps only (default: jointly with the other runs given that share its "
            "model, GPU and engine configuration, e.g. the batch sizes of a sweep).",
        ),
    ] = False,
    calibrate_batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--calibrate-batch-sizes",
            help="Fit only on steps with these numbers of requests (comma list, e.g. 1,4,16,64): the other "
            "batch sizes are held out, and --compare-to reports their errors apart.",
        ),
    ] = None,
    source_gpu: Annotated[
        str | None,
        typer.Option(
            "--source-gpu", help="The GPU the measured traces ran on, if the trace's name is unknown."
        ),
    ] = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    out: Annotated[Path | None, typer.Option("--out", help="Directory to write whatif.json into.")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="table (default), json (the whole document) or csv (one row per run, target, model).",
        ),
    ] = "table",
    cost_overrides: CostOverrides = None,
    cost_model: CostModelFlag = None,
    gpu_price_usd: GpuPrice = None,
    usd_per_gpu_hour: GpuHour = None,
    electricity_usd_per_kwh: Electricity = None,
    lifetime_years: Lifetime = None,
    utilization: Utilization = None,
    pue: Pue = None,
    strict: Strict = False,
    cache_dir: CacheDir = None,
    detail: Annotated[
        bool,
        typer.Option("--detail", help="Each run's calibration and per-target tables (default with one run)."),
    ] = False,
) -> None:
    """Project measured runs onto other GPUs: step times, TTFT/TPOT, throughput, S-MBU/S-MFU, cost.

    Each step is re-timed from its bytes and FLOPs on the target's roofline, with efficiencies and a
    per-step overhead fitted per phase on the measured run; baselines "no change" and "bandwidth
    ratio" are shown beside it.

    With several runs: one row per run and target GPU (--detail: each run's fits and tables).

    Examples (the shipped traces):
      moecap-analyze whatif traces/ --gpu H200 --gpu B200
      moecap-analyze whatif 'traces/h100-Qwen1.5-MoE-A2.7B-cb-bs*-syn1024x128*' \
          --compare-to 'traces/h200-Qwen1.5-MoE-A2.7B-cb-bs*-syn1024x128*'   # projection error per batch size
      moecap-analyze whatif run.arrow --calibrate-on sweep/ --calibrate-batch-sizes 1,4,32 --compare-to twin/
    """
    from ..analysis import Options
    from ..pipeline import analyze_paths
    from ..specs import resolve_gpu
    from .compare import compare_runs
    from .project import CalibrationSpec
    from .project import whatif as whatif_doc

    if format not in ("table", "json", "csv"):
        raise typer.BadParameter("expected table, json or csv", param_hint="--format")
    if not gpu and not compare_to:
        raise InputError("whatif needs a target: --gpu NAME (repeatable) and/or --compare-to PATHS")
    settings = settings_from_flags(
        gpu_overrides=gpu_overrides,
        cost_overrides=cost_overrides,
        cost_model=cost_model,
        gpu_price_usd=gpu_price_usd,
        usd_per_gpu_hour=usd_per_gpu_hour,
        electricity_usd_per_kwh=electricity_usd_per_kwh,
        lifetime_years=lifetime_years,
        utilization=utilization,
        pue=pue,
    )
    targets = [resolve_gpu(g, overrides_yaml=gpu_overrides) for g in gpu or []]
    sizes = _batch_sizes(calibrate_batch_sizes)
    # The runs' own metrics.cost (and the measured power the projections reuse) follow the flags too.
    source = analyze_paths(
        paths,
        Options(gpu=source_gpu, gpu_overrides=gpu_overrides, window=window, cost=settings),
        cache_dir=cache_dir,
        strict=strict,
    )
    if calibrate_per_run and calibrate_on:
        raise typer.BadParameter(
            "--calibrate-per-run and --calibrate-on exclude each other", param_hint="--calibrate-per-run"
        )
    calibration = CalibrationSpec(per_run=True) if calibrate_per_run else None
    if calibrate_on or sizes:
        runs = (
            analyze_paths(
                calibrate_on,
                Options(gpu=source_gpu, gpu_overrides=gpu_overrides, window="all", cost=settings),
                cache_dir=cache_dir,
                strict=strict,
            )
            if calibrate_on
            else None
        )
        calibration = CalibrationSpec(runs=runs, batch_sizes=sizes, per_run=calibrate_per_run)
    if compare_to:
        other = analyze_paths(
            compare_to,
            Options(gpu_overrides=gpu_overrides, window=window, cost=settings),
            cache_dir=cache_dir,
            strict=strict,
        )
        document = compare_runs(source, other, settings, targets, calibration)
    else:
        document = whatif_doc(source, targets, settings, calibration)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "whatif.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
        except OSError as exc:
            raise InputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    if format == "json":
        typer.echo(json.dumps(document, indent=2, default=str))
    elif format == "csv":
        write_whatif_csv(document, sys.stdout)
    else:
        print_whatif(document, detail=detail)
        if out is not None:
            Console(stderr=True).print(f"wrote {out / 'whatif.json'}")


def _batch_sizes(text: str | None) -> frozenset[int] | None:
    if not text:
        return None
    try:
        sizes = frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected a comma list of request counts such as 1,4,16; got {text!r}",
            param_hint="--calibrate-batch-sizes",
        ) from None
    if not sizes or min(sizes) < 0:
        raise typer.BadParameter(
            f"expected request counts >= 0; got {text!r}", param_hint="--calibrate-batch-sizes"
        )
    return sizes


# -- terminal output -------------------------------------------------------------------------------
_ROWS = (
    # (label with its unit, path in a run's metrics, unit of the numbers)
    ("decode step (GPU), ms", ("phases", "decode", "step_time_s_mean"), "ms"),
    ("decode step (wall), ms", ("phases", "decode", "step_wall_s_mean"), "ms"),
    ("prefill step (GPU), ms", ("phases", "prefill", "step_time_s_mean"), "ms"),
    ("TTFT mean, ms", ("requests", "ttft_s", "mean"), "ms"),
    ("TPOT mean, ms", ("requests", "tpot_s", "mean"), "ms"),
    ("output tok/s (window)", ("phases", "all", "window_output_throughput"), ""),
    ("S-MBU (decode), %", ("phases", "decode", "s_mbu"), "%"),
    ("S-MFU (all), %", ("phases", "all", "s_mfu"), "%"),
    ("$ / 1M output tokens", ("cost", "usd_per_1m_output_tokens"), "$"),
)


def _fmt(value: Any, unit: str) -> str:
    """The number in `unit` (seconds shown as ms, fractions as %), without the unit: the row or
    column label carries it once."""
    if value is None:
        return "—"
    v = value * 1e3 if unit == "ms" else value * 100 if unit == "%" else value
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def unit_label(label: str) -> tuple[str, str]:
    """A comparison metric's label and unit: "TTFT mean (s)" -> ("TTFT mean, ms", "ms")."""
    if label.endswith("(s)"):
        return label[: -len("(s)")].rstrip() + ", ms", "ms"
    if "S-MBU" in label or "S-MFU" in label:
        return label + ", %", "%"
    return label, "$" if "$" in label else ""


def _err(value: Any) -> str:
    return "" if value is None else f" ({value * 100:+.1f}%)"


CSV_COLUMNS = (
    "run_id", "source_gpu", "target_gpu", "model", *(label for label, _, _ in _ROWS),
    "compile steps in measured", "compile s in measured",
)  # fmt: skip


def write_whatif_csv(document: dict[str, Any], stream: Any) -> None:
    """One CSV row per run, target GPU and model (measured, projection, no_change, bandwidth_ratio),
    the _ROWS metrics in their labelled units, then the run's compile / JIT steps (check's rule: count,
    seconds), which its measured row keeps and every other model leaves out; runs not projected are left
    out."""
    import csv

    writer = csv.writer(stream)
    writer.writerow(CSV_COLUMNS)
    for run in document["runs"]:
        if "error" in run:
            continue
        for target, t in run["targets"].items():
            models = {"measured": run["measured"], **t["models"]}
            for name, metrics in models.items():
                cells = [_raw(at(metrics, *path), unit) for _, path, unit in _ROWS]
                compiled = run.get("compile_steps") or {}
                extra = [compiled.get("steps", ""), _raw(compiled.get("seconds"), "")]
                writer.writerow([run["run_id"], run["source_gpu"], target, name, *cells, *extra])


def _raw(value: Any, unit: str) -> str:
    """A CSV cell: the value in the column's unit, 6 significant digits ("" when absent)."""
    if value is None:
        return ""
    return f"{value * 1e3 if unit == 'ms' else value * 100 if unit == '%' else value:.6g}"


def print_whatif_rows(document: dict[str, Any], console: Console) -> None:
    """One row per run and target GPU: measured and projected throughput, TPOT and cost."""
    table = Table(title="what-if: one row per run and target GPU (--detail: fits and every metric)")
    for heading, justify in (
        ("run id", "left"),
        ("measured on", "left"),
        ("target", "left"),
        ("tok/s measured", "right"),
        ("tok/s projected", "right"),
        ("TPOT ms measured", "right"),
        ("TPOT ms projected", "right"),
        ("$/1M out tok projected", "right"),
    ):
        table.add_column(heading, justify=justify, overflow="fold" if heading == "run id" else "ellipsis")  # type: ignore[arg-type]
    tps = ("phases", "all", "window_output_throughput")
    tpot = ("requests", "tpot_s", "mean")
    usd = ("cost", "usd_per_1m_output_tokens")
    errors = []
    for run in document["runs"]:
        if "error" in run:
            errors.append(f"{run['run_id']}: not projected ({run['error']})")
            continue
        for target, t in run["targets"].items():
            proj = t["models"]["projection"]
            table.add_row(
                run["run_id"],
                str(run["source_gpu"]),
                str(target),
                _fmt(at(run["measured"], *tps), ""),
                _fmt(at(proj, *tps), ""),
                _fmt(at(run["measured"], *tpot), "ms"),
                _fmt(at(proj, *tpot), "ms"),
                _fmt(at(proj, *usd), "$"),
            )
    console.print(table)
    for e in errors:
        console.print(f"[yellow]note:[/] {e}", highlight=False)
    for run in document["runs"]:  # the notes a reader of the rows must not miss
        for w in run.get("warnings", []):
            if w.startswith("host-bound:"):
                console.print(f"[yellow]note:[/] {safe(run['run_id'])}: {safe(w)}", highlight=False)
        compiled = run.get("compile_steps") or {}
        if compiled.get("steps"):
            console.print(
                f"[yellow]note:[/] {safe(run['run_id'])}: {compiled['steps']} compile / JIT step(s) "
                f"({compiled['seconds']:.3g} s) are in its measured columns and out of every projection, so "
                f"measured -> projected also takes them away (--gpu {safe(str(run['source_gpu']))}: that "
                "alone; moecap-analyze check names them)",
                highlight=False,
            )


def print_whatif(document: dict[str, Any], console: Console | None = None, *, detail: bool = False) -> None:
    """Per run: the calibration and a table of measured vs projected metrics per target GPU (several
    runs without `detail`: one row per run and target); with a comparison, the projection errors per
    pair, per batch size and their summary."""
    from ..report.terminal import console_for

    console = console or console_for()
    if len(document["runs"]) > 1 and not detail:
        print_whatif_rows(document, console)
        comparison = document.get("comparison")
        if comparison:
            _print_comparison(comparison, console)
        console.print("assumptions: " + "; ".join(document["assumptions"]), highlight=False)
        return
    for run in document["runs"]:
        if "error" in run:
            console.print(
                f"[bold]{safe(run['run_id'])}[/]  [red]not projected:[/] {safe(run['error'])}",
                highlight=False,
            )
            console.print()
            continue
        console.print(
            f"[bold]{safe(run['run_id'])}[/]  {safe(run['model'])} · {safe(run['engine'])} · batch {run['batch_size']} · "
            f"measured on {safe(run['source_gpu'])} ×{run['num_gpus']}"
        )
        cal = run["calibration"]
        on = cal.get("calibrated_on") or {}
        if on.get("runs") and (on["runs"] != [run["run_id"]] or on.get("batch_sizes")):
            sizes = f", batch sizes {','.join(map(str, on['batch_sizes']))}" if on.get("batch_sizes") else ""
            which = (
                f"jointly on {len(on['runs'])} runs"
                if len(on["runs"]) > 2
                else f"on {safe(', '.join(on['runs']))}"
            )
            console.print(f"  calibrated {which}{sizes} ({on['steps']} steps)", highlight=False)
        for phase, fit in cal["fits"].items():
            priors = [
                n for n, k in (("η_bw", "bandwidth_identified"), ("η_f", "flops_identified")) if not fit[k]
            ]
            ident = f" (prior: {', '.join(priors)}; see the notes)" if priors else ""
            console.print(
                f"  fit {phase:<8} η_bw {fit['eta_bw']:.3f}  η_f {fit['eta_flops']:.3f}  overhead "
                f"{fit['overhead_s'] * 1e3:.3g} ms  steps {fit['n_steps']}  MAPE {fit['mape'] * 100:.2g} %{ident}"
            )
        models = ("projection", "no_change", "bandwidth_ratio")
        for target, t in run["targets"].items():
            table = Table(title=f"on {target}", show_header=True)
            table.add_column("metric")
            table.add_column(f"measured\n{safe(run['source_gpu'])}", justify="right")
            for model in models:
                table.add_column(model.replace("_", " "), justify="right")
            for label, path, unit in _ROWS:
                cells = [_fmt(at(run["measured"], *path), unit)]
                cells += [_fmt(at(t["models"][m], *path), unit) for m in models]
                table.add_row(label, *cells)
            console.print(table)
        for w in run.get("warnings", []):
            console.print(f"[yellow]note:[/] {safe(w)}", markup=True, highlight=False)
        console.print()
    comparison = document.get("comparison")
    if comparison:
        _print_comparison(comparison, console)
    console.print("assumptions: " + "; ".join(document["assumptions"]), highlight=False)


def _print_comparison(comparison: dict[str, Any], console: Console) -> None:
    models = ("projection", "no_change", "bandwidth_ratio")
    for pair in comparison["pairs"]:
        console.print(
            f"[bold]batch {pair['batch_size']}[/]: {safe(pair['source_run'])} ({safe(pair['source_gpu'])}) projected vs "
            f"{safe(pair['compare_run'])} measured on {safe(pair['target_gpu'])}"
        )
        table = Table(show_header=True)
        table.add_column("metric")
        table.add_column("measured", justify="right")
        warm = "reference_target" in pair  # the target ran compile steps: errors are against its warm view
        if warm:
            table.add_column("warm reference", justify="right")
        for m in models:
            table.add_column(m.replace("_", " ") + " (error)", justify="right")
        table.add_column("closest")
        lost = []
        for raw, entry in pair["metrics"].items():
            label, unit = unit_label(raw)
            table.add_row(
                label,
                _fmt(entry["measured"], unit),
                *([_fmt(entry.get("reference"), unit)] if warm else []),
                *[_fmt(entry[m], unit) + _err(entry[f"{m}_error"]) for m in models],
                (entry.get("best") or "—").replace("_", " "),
            )
            if entry.get("baselines_beating_projection"):
                lost.append(_beaten_line(label, entry, entry["baselines_beating_projection"]))
        console.print(table)
        for line in lost:
            console.print(f"[yellow]baseline beats the projection:[/] {line}", highlight=False)
        rows = pair["decode_by_batch_size"]
        if rows:
            bt = Table(title="decode step time (GPU) per batch size, ms", show_header=True)
            bt.add_column("requests in step", justify="right")
            bt.add_column("measured", justify="right")
            for m in models:
                bt.add_column(m.replace("_", " ") + " (error)", justify="right")
            for r in rows:
                bt.add_row(
                    f"{r['num_reqs']}{' (held out)' if r.get('held_out') else ''}",
                    _fmt(r["measured_step_time_s"], "ms"),
                    *[
                        _fmt(r.get(f"{m}_step_time_s"), "ms") + _err(r.get(f"{m}_step_time_error"))
                        for m in models
                    ],
                )
            console.print(bt)
    summary = comparison["summary"]
    st = Table(title=f"mean |error| over {summary['pairs']} pair(s)", show_header=True)
    st.add_column("metric")
    for m in models:
        st.add_column(m.replace("_", " "), justify="right")
    for label, entry in summary["mean_abs_error"].items():
        st.add_row(label, *["—" if entry[m] is None else f"{entry[m] * 100:.1f}%" for m in models])
    console.print(st)
    beaten = summary.get("baselines_beating_projection") or {}
    for label, lost in beaten.items():
        entry = summary["mean_abs_error"][label]
        console.print(
            f"[yellow]baseline beats the projection[/] (mean |error|): {label}: "
            + ", ".join(f"{m.replace('_', ' ')} {entry[m] * 100:.1f}%" for m in lost)
            + f" vs projection {entry['projection'] * 100:.1f}%",
            highlight=False,
        )
    if not beaten:
        console.print("the projection has the smallest mean |error| on every metric", highlight=False)
    for n in comparison.get("notes", []):
        console.print(f"[yellow]note:[/] {n}", highlight=False)


def _beaten_line(label: str, entry: dict[str, Any], lost: list[str]) -> str:
    """'TTFT mean, ms: bandwidth ratio -10.9% vs projection +19.5%'."""

    def pct(m: str) -> str:
        return f"{entry[f'{m}_error'] * 100:+.1f}%"

    return (
        f"{label}: "
        + ", ".join(f"{m.replace('_', ' ')} {pct(m)}" for m in lost)
        + f" vs projection {pct('projection')}"
    )


def register(app: typer.Typer) -> None:
    """Add the `whatif` command to `moecap-analyze`."""
    app.command(name="whatif")(whatif)
