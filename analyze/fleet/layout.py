"""The fleet dataset: its tables, partition layout and the columns the fleet path adds.

One source of truth for the writer (`task.py`), the reader (`dataset.py`) and the generated page
docs/fleet-dataset.md (`docs.py`). Every table is hive-partitioned Parquet:

    <dataset>/<table>/model=<m>/gpu=<g>/engine=<e>/date=<YYYY-MM-DD>/<run_id>.parquet

one file per (table, run), so a retried task rewrites the same files and nothing is counted twice.
`<dataset>/_manifest/<run_id>.json` is written last, once a run's files are all written: it is the
run's commit marker and records the input objects (URI, size, mtime) that produced it, which is what
an incremental re-run compares against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DATASET_VERSION = "2"
"""Bump when a table's layout or meaning changes (recorded in every manifest)."""

PARTITION_KEYS = ("model", "gpu", "engine", "date")
"""Directory levels under each table, in order (hive `key=value`)."""

MANIFEST_DIR = "_manifest"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    """DuckDB type."""
    unit: str
    description: str


@dataclass(frozen=True)
class Table:
    name: str
    grain: str
    """What one row is."""
    description: str
    view: str | None
    """The analyzer view whose columns (docs/sql.md) each row carries, or None."""
    added: tuple[Column, ...]
    """Columns the fleet path adds to the view's (partition keys excepted)."""


_WALL = Column(
    "hour",
    "TIMESTAMP WITH TIME ZONE",
    "UTC",
    "Hour (UTC, truncated) the step started, from its host-monotonic start and the run's clock anchor "
    "(`moecap.run.clock`).",
)

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "step_metrics",
            "one engine step of one recording process",
            "Per-step costs and utilisation, exactly the rows of the `step_metrics` view of the run's "
            "local analysis (TP duplicates dropped, S-MBU / S-MFU on the run's GPU).",
            "step_metrics",
            (_WALL,),
        ),
        Table(
            "requests",
            "one request",
            "The workload driver's requests (client clock), as the `requests` view.",
            "requests",
            (
                Column(
                    "hour",
                    "TIMESTAMP WITH TIME ZONE",
                    "UTC",
                    "Hour (UTC, truncated) the request arrived, from the driver file's clock anchor.",
                ),
            ),
        ),
        Table(
            "expert_totals",
            "one (rank, phase, MoE layer, expert) of a run",
            "Tokens routed to each expert over the run, as the `expert_totals` view.",
            "expert_totals",
            (),
        ),
        Table(
            "request_metrics",
            "one request",
            "Per-request latency, exactly the rows of the `request_metrics` table of the run's local "
            "analysis (`moecap.analyze.metrics.requests`).",
            "request_metrics",
            (),
        ),
        Table(
            "run_settings",
            "one run",
            "The constants the step views read for the run (GPU bandwidth and peak, last pipeline "
            "stage, MoE layers), as the local analysis' `run_settings`.",
            "run_settings",
            (),
        ),
        Table(
            "run_windows",
            "one run",
            "The run's resolved metrics window, as the local analysis' `run_windows`: `window_steps` "
            "and `run_metrics` over the dataset select the same steps.",
            "run_windows",
            (),
        ),
        Table(
            "runs",
            "one run",
            "The run (`runs` view row) with its whole metrics.json entry; the per-run numbers are "
            "those of the local analysis.",
            "runs",
            (
                Column("metrics_json", "VARCHAR", "JSON", "The run's entry of metrics.json (`runs[i]`)."),
                Column("host", "VARCHAR", "", "Host that recorded the run (`moecap.run.host`)."),
                Column("complete", "BOOLEAN", "", "Every input file ended with its end-of-stream marker."),
                Column("input_files", "INTEGER", "files", "Trace objects analysed for the run."),
                Column("input_bytes", "BIGINT", "bytes", "Their total size."),
                Column("analyzed_at", "VARCHAR", "ISO 8601", "When the fleet task wrote the run."),
                Column(
                    "usd_per_hour",
                    "DOUBLE",
                    "USD/h",
                    "The run's headline cost rate: the cost section's window scope (else run scope) "
                    "`total_usd / duration_s × 3600` for the run's GPUs (`Analysis.costs`); null where "
                    "the headline cost model has no price.",
                ),
            ),
        ),
    )
}

FLEET_HOURLY = Table(
    "fleet_hourly",
    "one (model, GPU, engine, hour)",
    "Fleet aggregates over every run's steps and requests in the hour (a view over the dataset, "
    "`moecap.analyze.fleet.aggregates`: the `run_metrics` SQL with the group in place of the run).",
    None,
    (
        Column("model", "VARCHAR", "", "Partition value of the model id."),
        Column("gpu", "VARCHAR", "", "Partition value of the GPU name."),
        Column("engine", "VARCHAR", "", "Partition value of the engine."),
        Column("hour", "TIMESTAMP WITH TIME ZONE", "UTC", "Hour the steps started."),
        Column("runs", "BIGINT", "runs", "Runs with steps in the hour."),
        Column(
            "steps",
            "BIGINT",
            "steps",
            "Steps (first pipeline stage, no draft passes, duration > 0), as `run_metrics.steps`.",
        ),
        Column("tokens", "BIGINT", "tokens", "Tokens computed by those steps."),
        Column("output_tokens", "DOUBLE", "tokens", "Logit rows sampled (each run's last pipeline stage)."),
        Column("gpu_seconds", "DOUBLE", "GPU·s", "Σ step time × GPUs the step stands for."),
        Column(
            "output_throughput",
            "DOUBLE",
            "tokens/s",
            "output_tokens / 3600: the fleet's output rate over the hour (partial hours at a fleet's "
            "start or end read low).",
        ),
        Column(
            "output_tokens_per_gpu_s",
            "DOUBLE",
            "tokens/(GPU·s)",
            "output_tokens / gpu_seconds: output per busy GPU-second.",
        ),
        Column(
            "s_mbu",
            "DOUBLE",
            "fraction",
            "`run_metrics.s_mbu` over every counted step of the group: Σ bytes / (bandwidth × Σ step "
            "time × GPUs) over the steps that computed tokens (null when some step lacks expert counts).",
        ),
        Column("s_mfu", "DOUBLE", "fraction", "`run_metrics.s_mfu` over the group, likewise."),
        Column("requests", "BIGINT", "requests", "Requests that arrived in the hour (client clock anchor)."),
        Column("tpot_s_p50", "DOUBLE", "s", "Median of `request_metrics.tpot_s` over those requests."),
        Column("tpot_s_p90", "DOUBLE", "s", "90th percentile, likewise."),
        Column("tpot_s_p99", "DOUBLE", "s", "99th percentile, likewise."),
        Column(
            "cost_usd",
            "DOUBLE",
            "USD",
            "Σ over runs of the run's `usd_per_hour` × the busy time of its steps in the hour "
            "(`run_metrics.window_s` over those steps) / 3600.",
        ),
        Column("usd_per_1m_output_tokens", "DOUBLE", "USD", "cost_usd / output_tokens × 10⁶."),
    ),
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def partition_value(value: object) -> str:
    """A partition directory value: characters other than letters, digits, `.`, `_`, `-` become `_`
    (model ids hold `/`); empty or missing values become `unknown`."""
    text = _UNSAFE.sub("_", str(value or "")).strip("_")
    return text or "unknown"


def run_file_name(run_id: str) -> str:
    """The Parquet file holding one run's rows of a table (run ids are file-name safe: the
    collector names trace files after them)."""
    return f"{partition_value(run_id)}.parquet"
