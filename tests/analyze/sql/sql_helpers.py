"""Helpers for the SQL tests: synthetic runs on disk, and the raw trace tables read straight from the
files with `moecap.schemas.read_trace_file` (the independent side of every comparison)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from moecap.schemas import read_trace_file

# The synthetic-trace generator lives with the benchmarks (benchmarks/ is not a package).
_BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

import synthetic_traces  # noqa: E402

SimConfig = synthetic_traces.SimConfig
simulate_run = synthetic_traces.simulate_run

BATCH_SIZES = (2, 4, 8)


def write_runs(out_dir: Path, batch_sizes: Sequence[int] = BATCH_SIZES) -> list[str]:
    """One synthetic run per batch size (same model and GPU, different seeds); returns the run ids."""
    ids = []
    for i, bs in enumerate(batch_sizes):
        run_id = f"20260101T000000Z-sqltest-bs{bs}"
        simulate_run(out_dir, SimConfig(num_requests=20, concurrency=bs, seed=10 + i, run_id=run_id))
        ids.append(run_id)
    return ids


@dataclass
class RawRun:
    """One run's tables as pyarrow reads them from the trace files (no moecap.analyze code involved)."""

    run_id: str
    steps: pl.DataFrame
    counts: np.ndarray
    """[steps, moe layers, experts], rows in the experts file's step order."""
    count_steps: np.ndarray
    requests: pl.DataFrame
    layer_ids: list[int]
    num_experts: int


def read_raw(paths: Sequence[Path]) -> dict[str, RawRun]:
    """Every run in `paths` read with read_trace_file."""
    by_run: dict[str, dict[str, object]] = {}
    for path in paths:
        f = read_trace_file(path)
        by_run.setdefault(f.run.run_id, {"run": f.run})[f.table_kind] = f.table
    out = {}
    for run_id, tables in by_run.items():
        run = tables["run"]
        experts = tables["experts"]
        n_layers, n_experts = len(run.moe.layer_ids), run.moe.num_experts  # type: ignore[attr-defined]
        flat = experts.column("counts").combine_chunks().flatten().to_numpy()  # type: ignore[attr-defined]
        out[run_id] = RawRun(
            run_id=run_id,
            steps=pl.from_arrow(tables["steps"]).with_columns(pl.col("phase").cast(pl.String)),  # type: ignore[union-attr]
            counts=flat.reshape(experts.num_rows, n_layers, n_experts),  # type: ignore[attr-defined]
            count_steps=experts.column("step").to_numpy(),  # type: ignore[attr-defined]
            requests=pl.from_arrow(tables["requests"]),  # type: ignore[arg-type]
            layer_ids=list(run.moe.layer_ids),  # type: ignore[attr-defined]
            num_experts=n_experts,
        )
    return out
