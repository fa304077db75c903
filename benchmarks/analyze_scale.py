"""Analyzer scale: steps/s, peak RSS, and two side-by-side ratios, on synthetic Qwen1.5-MoE traces.

For each size (default 1e5 and 1e6 steps with expert counts; `--steps 10000000 --no-experts` for the
1e7 step-level case) this generates a steady-state decode trace with the project's own writer
(24 MoE layers x 60 experts, batch sizes 1-128), then measures in one run, each in a fresh
subprocess (so peak RSS is that of the measured work alone):

* `seconds`: the full moecap metric set from the raw trace files, as `moecap-analyze PATHS` computes it
  (cold: validation, expert-count summaries, Parquet cache, per-step costs, all aggregates; the raw
  per-step counts are not copied into the cache, no metric needs them), and `seconds_warm` (cache
  present);
* `x_of_duckdb_floor`: cold seconds / a bare scan that reads the same columns from the trace files
  (steps lists + expert counts) and only sums them (the floor);
* `x_vs_reference_loop`: the per-record Python loop that applies the reference formulas
  (benchmarks/reference_loop.py) / our vectorised reference mode, on the same records (capped at
  1e6 records; the loop's records/s is printed too); each side the best of 3 calls in its own
  process (reference_loop.py times the loop 3 times too, the vectorised call 15 times and prints its
  first 3 as well); `x_vs_reference_loop_first_call` compares the first
  calls (which also pay a fresh process's first-use costs: allocator, polars, numpy dispatch).

Prints one JSON line per size.  python benchmarks/analyze_scale.py [--steps N ...] [--no-experts]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    """This process's peak RSS, MB. Linux: VmHWM, the peak of this program's own memory map;
    getrusage's ru_maxrss also keeps the peak of the image before exec, i.e. of this benchmark's
    parent at fork time (the trace generator's ~1.5 GB), which no measured task used."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, trace_dir: str, cache_dir: str) -> dict:
    """Run one measured task in this process and return its timing."""
    t0 = time.perf_counter()
    out: dict = {}
    if kind == "full":
        from moecap.analyze.pipeline import Options, analyze_paths

        a = analyze_paths([trace_dir], Options(window="all"), cache_dir=cache_dir, expert_counts=False)
        out["s_mbu"] = a.document["runs"][0]["metrics"]["steps"]["all"]["s_mbu"]
        out["steps"] = a.document["runs"][0]["metrics"]["steps"]["all"]["steps"]
    elif kind == "floor":
        import numpy as np
        import pyarrow.compute as pc

        from moecap.schemas import scan_trace_file

        acc = {"t": 0}

        def on_batch(batch):
            for name in ("num_tokens", "num_reqs", "t_start_ns", "gpu_end_ns"):
                if name in batch.schema.names:
                    acc["t"] += int(pc.sum(batch.column(name)).as_py() or 0)
            for name in ("req_prefix_lens", "req_new_tokens", "req_num_logits", "counts"):
                if name in batch.schema.names:
                    acc["t"] += int(np.asarray(pc.list_flatten(batch.column(name))).sum())

        for p in sorted(Path(trace_dir).glob("*.arrow")):
            scan_trace_file(p, on_batch)
        out["checksum"] = acc["t"]
    elif kind in ("reference", "loop"):
        sys.path.insert(0, str(HERE))
        from moecap.analyze.load import load_traces
        from moecap.analyze.reference import reference_metrics
        from moecap.analyze.reference_bridge import records_from_trace

        # The records need the per-step expert summaries only, not a Parquet copy of the raw counts.
        db = load_traces([trace_dir], cache_dir=cache_dir, expert_counts=False)
        run_id = next(iter(db.runs))
        frame = records_from_trace(db, run_id, "NVIDIA-H100-HBM3-80GB", 1, max_records=1_000_000)
        cfg = db.runs[run_id].metadata.model.config
        kwargs = dict(
            model_config=cfg, model_name="Qwen/Qwen1.5-MoE-A2.7B", gpu="NVIDIA-H100-HBM3-80GB", num_gpus=1
        )
        if kind == "reference":
            run = lambda: reference_metrics(frame, **kwargs)  # noqa: E731
        else:
            from reference_loop import reference_loop_metrics

            records = frame.to_dicts()
            run = lambda: reference_loop_metrics(records, **kwargs)  # noqa: E731
        # The best of 3 calls for both sides (the first call, which
        # also pays this fresh process's first-use costs, is reported on its own).
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = run()
            times.append(time.perf_counter() - t0)
        out["first_seconds"] = times[0]
        out["records"] = frame.height
        out["decoding_smbu"] = r["decoding_smbu"]
        out["seconds"] = min(times)
        out["peak_rss_mb"] = _peak_rss_mb()
        return out
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _measure(kind: str, trace_dir: str, cache_dir: str) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--child", kind, trace_dir, cache_dir], capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--no-experts", action="store_true", help="step-level metrics only (no experts table)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    sys.path.insert(0, str(HERE))
    from synthetic_traces import bulk_decode_trace

    for n in args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            trace_dir, cache_dir = f"{tmp}/trace", f"{tmp}/cache"
            t0 = time.perf_counter()
            bulk_decode_trace(trace_dir, n, experts=not args.no_experts)
            gen_s = time.perf_counter() - t0
            size_mb = sum(p.stat().st_size for p in Path(trace_dir).glob("*.arrow")) / 1e6
            floor = _measure("floor", trace_dir, cache_dir)
            full = _measure("full", trace_dir, cache_dir)
            warm = _measure("full", trace_dir, cache_dir)
            ref = _measure("reference", trace_dir, cache_dir)
            loop = _measure("loop", trace_dir, cache_dir)
            print(
                json.dumps(
                    {
                        "steps": n,
                        "expert_counts": not args.no_experts,
                        "trace_mb": round(size_mb, 1),
                        "generate_s": round(gen_s, 1),
                        "seconds": round(full["seconds"], 2),
                        "seconds_warm": round(warm["seconds"], 2),
                        "steps_per_s": round(n / full["seconds"]),
                        "peak_rss_mb": round(
                            max(full["peak_rss_mb"], warm["peak_rss_mb"], ref["peak_rss_mb"])
                        ),
                        "floor_seconds": round(floor["seconds"], 2),
                        "x_of_duckdb_floor": round(full["seconds"] / floor["seconds"], 2),
                        "reference_records": ref["records"],
                        "reference_seconds": round(ref["seconds"], 3),
                        "loop_records_per_s": round(loop["records"] / loop["seconds"]),
                        "x_vs_reference_loop": round(loop["seconds"] / ref["seconds"], 1),
                        "x_vs_reference_loop_first_call": round(
                            loop["first_seconds"] / ref["first_seconds"], 1
                        ),
                        "same_decoding_smbu": abs(ref["decoding_smbu"] - loop["decoding_smbu"])
                        <= 1e-9 * abs(loop["decoding_smbu"]),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
