"""The analyzer as a user runs it, side by side with its floor, on an engine-like trace.

`python benchmarks/cli_scale.py [STEPS] [--repeat N]` writes an engine-like trace
(`engine_like_trace.py`: prefill/mixed/decode steps, many requests, counts summing to tokens × top_k,
256-step record batches), then, alternating each round so every process sees the same machine load:

* floor: a bare pyarrow + numpy process that reads the same columns of the same files (steps'
  scalars and request lists, expert counts) and sums them;
* cold: `moecap-analyze DIR --out OUT` with an empty cache (every metric, metrics.json and tables);
* help: `moecap-analyze --help`, beside `python -c pass` (interpreter start-up).

With `--baseline DIR` (a folder holding another checkout as `DIR/moecap`, e.g. `git worktree add
DIR/moecap REV`), each round also runs that version's cold analysis (`PYTHONPATH=DIR`), right after
this one's, so before and after see the same machine load ("cold_baseline").

`--trace DIR` reuses a trace written before (`engine_like_trace.py DIR STEPS`: generating 1e5 steps
takes minutes on a small machine) instead of writing one.

Prints one JSON line: best-of-N wall seconds of each, and cold / floor; and the CPU seconds (user +
sys of the process and its threads) of each round, with best and median: on a shared machine the
wall time swings with the other processes' load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FLOOR = """
import sys
from pathlib import Path
import numpy as np
import pyarrow.compute as pc
from moecap.schemas import scan_trace_file
acc = [0]
def on_batch(batch):
    for name in ("num_tokens", "num_reqs", "t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns"):
        if name in batch.schema.names:
            acc[0] += int(pc.sum(batch.column(name)).as_py() or 0)
    for name in ("req_prefix_lens", "req_new_tokens", "req_num_logits", "counts"):
        if name in batch.schema.names:
            acc[0] += int(np.asarray(pc.list_flatten(batch.column(name))).sum())
for p in sorted(Path(sys.argv[1]).glob("*.arrow")):
    scan_trace_file(p, on_batch)
print(acc[0])
"""


def _run(cmd: list[str], pythonpath: str | None = None) -> tuple[float, float]:
    """(wall s, CPU s: user + sys) of one process."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", type=int, nargs="?", default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="folder holding another version as <DIR>/moecap, run alternately")
    ap.add_argument("--trace", help="an engine-like trace written before (its step count is taken as given)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from engine_like_trace import engine_like_trace

    cli = str(Path(sys.executable).with_name("moecap-analyze"))
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(args.trace) if args.trace else Path(tmp) / "trace"
        t0 = time.perf_counter()
        if not args.trace:
            engine_like_trace(trace, args.steps)
        gen_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in trace.glob("*.arrow")) / 1e6
        times: dict[str, list[float]] = {"floor": [], "cold": [], "help": [], "python": []}
        if args.baseline:
            times["cold_baseline"] = []
        cpu: dict[str, list[float]] = {k: [] for k in times}

        def run(name: str, cmd: list[str], pythonpath: str | None = None) -> None:
            wall, used = _run(cmd, pythonpath)
            times[name].append(wall)
            cpu[name].append(used)

        for i in range(args.repeat):
            cache, out = Path(tmp) / f"cache{i}", Path(tmp) / f"out{i}"
            run("floor", [sys.executable, "-c", FLOOR, str(trace)])
            sides = [("cold", None)] + ([("cold_baseline", args.baseline)] if args.baseline else [])
            for name, path in sides if i % 2 == 0 else sides[::-1]:  # alternate which goes first
                shutil.rmtree(cache, ignore_errors=True)
                cold = [cli, str(trace), "--out", f"{out}-{name}", "--cache-dir", str(cache)]
                run(name, cold, path)
            run("help", [cli, "--help"])
            run("python", [sys.executable, "-c", "pass"])
            shutil.rmtree(cache, ignore_errors=True)
        best = {k: min(v) for k, v in times.items()}
        cpu_best = {k: min(v) for k, v in cpu.items()}
        cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            json.dumps(
                {
                    "steps": args.steps,
                    "trace_mb": round(size_mb, 1),
                    "generate_s": round(gen_s, 1),
                    **{f"{k}_s": round(v, 2) for k, v in best.items()},
                    "cold_x_floor": round(best["cold"] / best["floor"], 2),
                    **(
                        {"cold_baseline_x_floor": round(best["cold_baseline"] / best["floor"], 2)}
                        if args.baseline
                        else {}
                    ),
                    "cpu_best_s": {k: round(v, 2) for k, v in cpu_best.items()},
                    "cpu_median_s": {k: round(v, 2) for k, v in cpu_median.items()},
                    "cpu_cold_x_floor": {
                        "best": round(cpu_best["cold"] / cpu_best["floor"], 2),
                        "median": round(cpu_median["cold"] / cpu_median["floor"], 2),
                        **(
                            {
                                "baseline_best": round(cpu_best["cold_baseline"] / cpu_best["floor"], 2),
                                "baseline_median": round(
                                    cpu_median["cold_baseline"] / cpu_median["floor"], 2
                                ),
                            }
                            if args.baseline
                            else {}
                        ),
                    },
                    "all": {k: [round(x, 2) for x in v] for k, v in times.items()},
                    "all_cpu": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
