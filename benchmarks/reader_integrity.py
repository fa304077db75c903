"""Reader cost of full validation + per-batch checksums, before/after, on synthetic Qwen1.5-MoE traces.

Writes a steady-state decode trace (benchmarks/synthetic_traces.py `bulk_decode_trace`: 24 MoE layers x
60 experts, batch sizes 1-128) and re-writes it in the collector's layout (256-row record batches, as
`TraceWriter.write` flushes them), then times, each best of `--repeat`, a scan of every file with a
no-op consumer:

* `before`: the reader as it was before checksums (git revision `--before`, loaded from git);
* `after`: this checkout's reader (validate(full=True) + checksum on every batch);
* `validate` / `checksum`: the two added costs alone, over the batches already in memory.

CPU seconds (process_time) are reported beside wall seconds: on a shared machine CPU time is the
steadier number. Prints one JSON line per (layout, table).

    python benchmarks/reader_integrity.py [--steps 1000000] [--experts-steps 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic_traces import bulk_decode_trace  # noqa: E402

from moecap.schemas import TraceWriter, integrity, read_trace_header, scan_trace_file  # noqa: E402


def _old_reader(rev: str, tmp: Path):
    """The reader module of git revision `rev`, imported as a sibling of moecap.schemas.reader."""
    src = subprocess.run(
        ["git", "show", f"{rev}:schemas/reader.py"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / "reader_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("moecap.schemas.reader_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _time(fn, repeat: int) -> tuple[float, float]:
    """(best wall s, best CPU s) of `repeat` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def _relayout(src: Path, dst_dir: Path, rows_per_batch: int) -> Path:
    """`src` re-written in `rows_per_batch`-row record batches (the collector's flush size)."""
    header = read_trace_header(src)
    dst = dst_dir / src.name
    w = TraceWriter(dst, header.table_kind, header.run, max_pending_batches=8, blocking=True)

    def write(batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, rows_per_batch):
            w.write_batch(batch.slice(start, rows_per_batch))

    scan_trace_file(src, write)
    w.close()
    return dst


def _measure(path: Path, layout: str, before, repeat: int) -> dict:
    batches: list[pa.RecordBatch] = []
    scan_trace_file(path, batches.append)
    infos = [b"{}"] * len(batches)
    row = {
        "layout": layout,
        "table": read_trace_header(path).table_kind,
        "rows": sum(b.num_rows for b in batches),
    }
    row["batches"] = len(batches)
    row["file_mb"] = round(path.stat().st_size / 1e6, 1)
    row["raw_mb"] = round(sum(b.nbytes for b in batches) / 1e6, 1)
    for name, fn in (
        ("before", lambda: before.scan_trace_file(path, lambda b: None)),
        ("after", lambda: scan_trace_file(path, lambda b: None)),
        ("validate", lambda: [b.validate(full=True) for b in batches]),
        ("checksum", lambda: [integrity.batch_checksum(b, i) for b, i in zip(batches, infos)]),
    ):
        wall, cpu = _time(fn, repeat)
        row[f"{name}_s"] = round(wall, 3)
        row[f"{name}_cpu_s"] = round(cpu, 3)
    row["after_over_before_cpu"] = round(row["after_cpu_s"] / row["before_cpu_s"], 2)
    row["checksum_algorithm"] = integrity.DEFAULT_ALGORITHM
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000, help="steps of the steps-only trace")
    ap.add_argument(
        "--experts-steps", type=int, default=200_000, help="steps of the trace with expert counts"
    )
    ap.add_argument("--rows-per-batch", type=int, default=256, help="the collector layout's batch size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default="21ab0a6", help="git revision of the reader before checksums")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moecap-reader-bench-") as tmp:
        tmp = Path(tmp)
        before = _old_reader(args.before, tmp)
        bulk, collector = tmp / "bulk", tmp / "collector"
        collector.mkdir()
        bulk_decode_trace(bulk / "s", args.steps, experts=False)
        bulk_decode_trace(bulk / "e", args.experts_steps, experts=True)
        for path in sorted(bulk.glob("*/*.arrow")):
            if path.name.endswith(".steps.arrow") and path.parent.name == "e":
                continue  # the steps-only trace covers the steps table
            print(json.dumps(_measure(path, "bulk (50k-row batches)", before, args.repeat)), flush=True)
            small = _relayout(path, collector, args.rows_per_batch)
            layout = f"collector ({args.rows_per_batch}-row batches)"
            print(json.dumps(_measure(small, layout, before, args.repeat)), flush=True)
            small.unlink()


if __name__ == "__main__":
    main()
