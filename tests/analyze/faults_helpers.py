"""Helpers of the fault-injection suite (tests/analyze/test_faults_*.py): a small real run written with
moecap's own writer, copies of it with one table edited, and `moecap-analyze` run as a user runs it
(a subprocess, so a traceback, a crash or a stray terminal byte would show).

Every case ends in one of three outcomes, which the suite counts (`OUTCOMES`):
- "one line": a user error printed as one line on stderr, exit 2, no traceback;
- "recovered": the result equals the one of the clean input, exactly;
- "warned exclusion": the bad rows are left out of the metrics and a warning says how many.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from moecap.schemas import TraceWriter, read_trace_file, trace_file_name

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

import synthetic_traces  # noqa: E402

SimConfig = synthetic_traces.SimConfig
simulate_run = synthetic_traces.simulate_run

ONE_LINE, RECOVERED, WARNED = "one line", "recovered", "warned exclusion"


def cli(
    *args: Any, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`moecap-analyze ARGS…` in a subprocess, as a user runs it."""
    import os

    code = "from moecap.analyze.cli import main; main()"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
    )


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 2 and exactly one non-empty stderr line holding every needle."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN / Infinity (as strict parsers do)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def trace_file(directory: Path, kind: str) -> Path:
    (path,) = sorted(directory.glob(f"*.{kind}.arrow"))
    return path


def rewrite(
    src: Path, dst: Path, kind: str, edit: Callable[[pa.Table], pa.Table], batch_rows: int | None = None
) -> Path:
    """Copy the trace directory `src` to `dst`, passing the table of its `kind` file through `edit`
    (written again with moecap's writer, in record batches of `batch_rows`, so the file itself is
    well formed)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    path = trace_file(dst, kind)
    trace = read_trace_file(path)
    table = edit(trace.table)
    path.unlink()
    with TraceWriter(path, kind, trace.run) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return dst


def set_value(table: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    """`table` with `column[row]` replaced by `value` (same Arrow type)."""
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def write_gpu_samples(directory: Path, rows: list[dict[str, Any]]) -> Path:
    """A gpu_samples file for the run in `directory` (its steps file's metadata)."""
    run = read_trace_file(trace_file(directory, "steps")).run
    path = directory / trace_file_name(run, "gpu_samples")
    with TraceWriter(path, "gpu_samples", run) as writer:
        writer.write_rows(rows)
    return path


def run_doc(out: Path) -> dict[str, Any]:
    (run,) = strict_json((out / "metrics.json").read_text())["runs"]
    return run


def rewrite_metadata(src: Path, dst: Path, edit: Callable[[Any], Any], rename: bool = True) -> Path:
    """Copy the trace directory `src` to `dst` with every file's run metadata passed through `edit`
    (a RunMetadata -> RunMetadata; `dataclasses.replace` suits); files renamed after the new run id."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.arrow")):
        trace = read_trace_file(path)
        run = edit(trace.run)
        target = dst / (path.name.replace(trace.run.run_id, run.run_id) if rename else path.name)
        with TraceWriter(target, trace.table_kind, run) as writer:
            for batch in trace.table.to_batches():
                writer.write_batch(batch)
    return dst


def base_run(directory: Path) -> Path:
    """The clean run every fault is injected into: a simulated run (steps, experts, requests,
    outputs) plus power samples of its GPU every 5 ms over its whole span (350 W)."""
    simulate_run(directory, SimConfig())
    steps = read_trace_file(trace_file(directory, "steps")).table
    t0, t1 = min(steps.column("t_start_ns").to_pylist()), max(steps.column("t_end_ns").to_pylist())
    write_gpu_samples(
        directory,
        [
            {"t_ns": t, "gpu_index": 0, "gpu_uuid": "GPU-synthetic-0", "power_w": 350.0}
            for t in range(t0 - 5_000_000, t1 + 10_000_000, 5_000_000)
        ],
    )
    return directory


def metrics_json(trace: Path, out: Path, cache: Path, *extra: Any) -> dict[str, Any]:
    """`moecap-analyze TRACE --out OUT --window all`: the single run of its metrics.json, parsed strictly."""
    r = cli(trace, "--out", out, "--window", "all", "--cache-dir", cache, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return run_doc(out)


def drop_rows(table: pa.Table, rows: list[int]) -> pa.Table:
    """`table` without `rows` (the oracle for a row the analyzer should leave out)."""
    keep = [i for i in range(table.num_rows) if i not in set(rows)]
    return table.take(pa.array(keep, pa.int64()))
