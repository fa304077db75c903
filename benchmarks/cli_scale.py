"""The analyzer as a user runs it, side by side with its floor, on an engine-like trace.

`python benchmarks/cli_scale.py [STEPS] [--repeat N]` writes an engine-like trace
(`engine_like_trace.py`: prefill/mixed/decode steps, many requests, counts summing to tokens × top_k,
256-step record batches), then, alternating each round so every process sees the same machine load:

* floor: a bare pyarrow + numpy process that reads the same columns of the same files (steps'
  scalars and request lists, expert counts) and sums them;
* cold: `moecap-analyze DIR --out OUT` with an empty cache (every metric, metrics.json and tables);
* help: `moecap-analyze --help`, beside `python -c pass` (interpreter start-up).

Prints one JSON line: best-of-N seconds of each, and cold / floor.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", type=int, nargs="?", default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from engine_like_trace import engine_like_trace

    cli = str(Path(sys.executable).with_name("moecap-analyze"))
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        t0 = time.perf_counter()
        engine_like_trace(trace, args.steps)
        gen_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in trace.glob("*.arrow")) / 1e6
        times: dict[str, list[float]] = {"floor": [], "cold": [], "help": [], "python": []}
        for i in range(args.repeat):
            cache, out = Path(tmp) / f"cache{i}", Path(tmp) / f"out{i}"
            times["floor"].append(_run([sys.executable, "-c", FLOOR, str(trace)]))
            times["cold"].append(_run([cli, str(trace), "--out", str(out), "--cache-dir", str(cache)]))
            times["help"].append(_run([cli, "--help"]))
            times["python"].append(_run([sys.executable, "-c", "pass"]))
            shutil.rmtree(cache, ignore_errors=True)
        best = {k: min(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "steps": args.steps,
                    "trace_mb": round(size_mb, 1),
                    "generate_s": round(gen_s, 1),
                    **{f"{k}_s": round(v, 2) for k, v in best.items()},
                    "cold_x_floor": round(best["cold"] / best["floor"], 2),
                    "all": {k: [round(x, 2) for x in v] for k, v in times.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
