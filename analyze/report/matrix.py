"""A sweep's matrix in the layout of MoE-CAP's published tables: one row per run, keyed by
model × hardware × task × batch size (× repeat), with TTFT, TPOT, throughput, S-MBU / S-MFU
(prefill and decode) and cost per million output tokens.

Every figure is `runs_frame`'s (frames.py), which reads the analysis' views and frames: nothing is
computed here, so a cell equals what `moecap-analyze` prints for that run alone. The task and repeat
come from the run metadata's `workload.sweep` entry (written by `moecap-collect sweep`), else the
dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import InputError
from .frames import runs_frame
from .leaderboard import format_cell

SCHEMA = "moecap.matrix/1"

KEY = ("model", "hardware", "engine", "task", "batch_size", "repeat")
"""A row's identity; rows are sorted by it."""

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", ""),
    ("hardware", "hardware", ""),
    ("engine", "engine", ""),
    ("task", "task", ""),
    ("batch_size", "batch size", ""),
    ("repeat", "repeat", ""),
    ("ttft_ms", "TTFT ms", "f2"),
    ("tpot_ms", "TPOT ms", "f2"),
    ("window_output_throughput", "throughput tok/s", "f1"),
    ("prefill_smbu", "prefill S-MBU", "pct2"),
    ("prefill_smfu", "prefill S-MFU", "pct2"),
    ("decode_smbu", "decode S-MBU", "pct2"),
    ("decode_smfu", "decode S-MFU", "pct2"),
    ("cost_usd_per_m_output_tokens", "$ / 1M output tokens", "g4"),
    ("run_id", "run id", ""),
)
"""(column, heading, number format) in display order. TTFT / TPOT are request means (ms), throughput
the window's output tokens per second, S-MBU / S-MFU fractions of peak, cost in USD."""


def matrix_frame(analysis: Any) -> pl.DataFrame:
    """One row per run of an `Analysis`, COLUMNS in order, sorted by KEY."""
    runs = runs_frame(analysis)
    extra = pl.DataFrame(
        [_sweep_fields(ctx.run.run_id, ctx.run.metadata.workload) for ctx in analysis.contexts],
        schema={"run_id": pl.String, "task": pl.String, "repeat": pl.Int64, "sweep": pl.String},
    )
    frame = runs.join(extra, on="run_id", how="left").with_columns(
        task=pl.coalesce(pl.col("task"), pl.col("dataset")),
        repeat=pl.col("repeat").fill_null(0),
        hardware=pl.format("{}x{}", pl.col("num_gpus").fill_null(1), pl.col("gpu").fill_null("?")),
    )
    frame = frame.sort(list(KEY), nulls_last=True)
    return frame.select([c for c, _, _ in COLUMNS] + ["sweep"])


def _sweep_fields(run_id: str, workload: dict[str, Any] | None) -> dict[str, Any]:
    wl = workload or {}
    found = wl.get("sweep")
    sweep: dict[str, Any] = found if isinstance(found, dict) else {}
    repeat = sweep.get("repeat")
    return {
        "run_id": run_id,
        "task": sweep.get("task"),
        "repeat": int(repeat) if isinstance(repeat, int) else None,
        "sweep": sweep.get("name"),
    }


def display_rows(frame: pl.DataFrame) -> list[list[str]]:
    """The rows as text cells in COLUMNS order (empty: no figure)."""
    return [[format_cell(row[c], fmt) for c, _, fmt in COLUMNS] for row in frame.iter_rows(named=True)]


def to_markdown(frame: pl.DataFrame) -> str:
    """The table as GitHub Markdown (MoE-CAP publishes its tables this way)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cells) + " |" for cells in display_rows(frame)]
    return "\n".join([head, rule, *rows]) + "\n"


def write_matrix(analysis: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write matrix.csv, matrix.json and matrix.md under `out_dir`; returns format -> path."""
    frame = matrix_frame(analysis)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    written = {"csv": out / "matrix.csv", "json": out / "matrix.json", "md": out / "matrix.md"}
    frame.select([c for c, _, _ in COLUMNS]).write_csv(written["csv"])
    written["json"].write_text(
        json.dumps(
            {
                "schema": SCHEMA,
                "key": list(KEY),
                "formula": "moecap",
                "columns": {c: h for c, h, _ in COLUMNS},
                "rows": frame.to_dicts(),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    written["md"].write_text(to_markdown(frame))
    return written
