"""Time and size of `moecap-analyze report` on the shipped traces, as a user runs it.

    .venv/bin/python benchmarks/report_scale.py [--traces traces/] [--repeat 3] [--export png]

Each repeat runs the CLI in a fresh process (`report TRACES --out TMP`, the default cache) after one
unmeasured run that fills the cache, and prints per repeat: wall seconds, CPU seconds of the process
and its children (user + sys, from getrusage), the load average (1 min) before and after, and what it
wrote (report.html, every file under --out, file count). The machine is shared: CPU time is the
comparable figure, wall time depends on the load beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "from moecap.analyze.cli import main; main()"]


def run_once(traces: str, out: Path, export: str) -> dict[str, float]:
    """One `report` run: wall s, CPU s (user + sys of the child), bytes written, files, load before/after."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*CLI, "report", traces, "--out", str(out), "--export", export],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"report failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "html_mb": (out / "report.html").stat().st_size / 1e6,
        "total_mb": sum(p.stat().st_size for p in files) / 1e6,
        "files": len(files),
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="traces/")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--export", default="none", help="none (default), png, svg or png,svg")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_once(args.traces, Path(tmp) / "warm", args.export)  # fills the cache; not measured
        print(f"report {args.traces} --export {args.export} ({os.cpu_count()} CPUs)")
        print("repeat | wall s | CPU s | load 1 min before/after | report.html MB | written MB | files")
        for i in range(args.repeat):
            r = run_once(args.traces, Path(tmp) / f"run{i}", args.export)
            print(
                f"{i} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_before']:.1f}/{r['load_after']:.1f} | "
                f"{r['html_mb']:.2f} | {r['total_mb']:.2f} | {r['files']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
