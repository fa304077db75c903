"""`moecap-analyze fleet`: analyse a fleet's traces on Ray into a Parquet dataset (thin layer over `run_fleet`).

Registered by `moecap.analyze.cli` (its `_COMMAND_MODULES`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..cli import Gpu, GpuYaml, Window
from ..cost.options import CostModelFlag, CostOverrides, GpuHour, GpuPrice
from ..errors import AnalyzeError


def fleet(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Trace prefixes, directories, globs or files: s3://bucket/prefix, /data/traces, …"
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset", "-d", help="Where to write the dataset: s3://bucket/fleet or a local path."
        ),
    ],
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Ray cluster to run on: auto (the running one), ray://HOST:10001, HOST:6379; "
            "default: start a local one.",
        ),
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option("--num-cpus", help="CPUs of a local Ray (default: all).")
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Retries of a run's task when its worker dies.")
    ] = 3,
    full: Annotated[
        bool, typer.Option("--full", help="Analyse every run again, also those already in the dataset.")
    ] = False,
    gpu: Gpu = None,
    gpu_overrides: GpuYaml = None,
    window: Window = "steady",
    cost_overrides: CostOverrides = None,
    cost_model: CostModelFlag = None,
    gpu_price_usd: GpuPrice = None,
    usd_per_gpu_hour: GpuHour = None,
    show: Annotated[int, typer.Option("--show", help="fleet_hourly rows to print (0: none).")] = 20,
) -> None:
    """Analyse every run under INPUTS on Ray into a Parquet dataset; print the fleet's hourly aggregates.

    Writes step metrics, requests, expert totals and per-run metrics.json entries as a hive-partitioned
    Parquet dataset (docs/fleet-dataset.md). Runs already analysed from the same objects are skipped.
    Exit 1 when some file or run could not be analysed (each is named; the others are written).

    Example: moecap-analyze fleet s3://traces/2026-12-06/ --dataset s3://traces-analysed/fleet --ray auto

    Example: moecap-analyze sql "SELECT * FROM fleet_hourly" s3://traces-analysed/fleet
    """
    from moecap.schemas import TraceError  # not at module level: `--help` imports no data library

    from ..analysis import Options
    from ..cost.options import settings_from_flags
    from .dataset import open_dataset
    from .run import run_fleet

    try:
        options = Options(gpu=gpu, gpu_overrides=gpu_overrides, window=window)
        cost = settings_from_flags(
            gpu_overrides=gpu_overrides,
            cost_overrides=cost_overrides,
            cost_model=cost_model,
            gpu_price_usd=gpu_price_usd,
            usd_per_gpu_hour=usd_per_gpu_hour,
        )

        def progress(result) -> None:
            status = "ok" if result.ok else "FAILED"
            sys.stderr.write(f"{result.run_id}: {status} {sum(result.rows.values())} rows\n")

        report = run_fleet(
            inputs,
            dataset,
            options,
            cost_settings=cost,
            address=ray_address,
            num_cpus=num_cpus,
            max_retries=max_retries,
            incremental=not full,
            progress=progress,
        )
        typer.echo(
            f"{len(report.analysed)} run(s) analysed, {len(report.skipped)} unchanged and skipped, "
            f"{len(report.failed)} failed; dataset: {dataset}"
        )
        for e in report.errors:
            typer.echo(f"skipped: {e}")
        if show and (report.analysed or report.skipped):
            with open_dataset(dataset) as t:
                t.con.sql(
                    "SELECT model, gpu, engine, hour, runs, steps, output_throughput, s_mbu, "
                    f"tpot_s_p50, tpot_s_p99, usd_per_1m_output_tokens FROM fleet_hourly LIMIT {int(show)}"
                ).show(max_width=250)
    except (AnalyzeError, TraceError) as exc:
        sys.stderr.write(f"moecap-analyze: error: {exc}\n")
        raise typer.Exit(2) from None
    raise typer.Exit(1 if report.errors else 0)


def register(app: typer.Typer) -> None:
    """Add the `fleet` command to `moecap-analyze`."""
    app.command(name="fleet")(fleet)
