"""Fleet scale: `moecap-analyze fleet` on Ray with 1 and 2 workers over a synthetic fleet.

Phases (each prints one JSON line; `--json FILE` also collects them):

1. generate (cached in --data): `--runs` runs of `--steps-per-run` steps each, a steps and an experts
   file per run (default 500 runs x 20,000 steps = 1e7 steps in 1,000 files). Each run mixes chunked
   prefill steps (1-2 requests, 512-2048 tokens) with decode steps (8-64 requests, one token each);
   per step and MoE layer the expert counts sum to exactly tokens x top_k, no expert above the step's
   tokens, spread by a per-run Dirichlet skew (`--layers` x `--experts`, `--top-k`; default 8 x 16, top 2,
   so 1e7 steps fit this VM's disk and time).
2. fleet, per worker count (`--workers 1 2`): a fresh local Ray with that many CPUs, every run a task
   (the real `analyze_group`, timed inside the task), dataset on local disk. Reports wall s, steps/s
   (total and per worker), the sum of in-task seconds, peak RSS per worker process, and the scaling
   (steps/s at 2 workers / at 1).
3. realistic shape: `--real-runs` runs of `--real-steps` steps with Qwen1.5-MoE's 24 x 60 counts (top 4) on
   1 worker: steps/s and bytes per step on disk for the capacity model (docs/scale.md).
4. small files: `--small-files` files (steps + experts of `--small-files / 2` runs of 20 steps) on the
   largest worker count: per-task wall and Ray's overhead per task = (wall x workers - in-task s) / tasks.
Also `local`: `--local-runs` runs of phase 2 analysed in-process without Ray (the baseline rate).
Every line carries the 1-minute load average: the VM is shared.

python benchmarks/fleet_scale.py [--data DIR] [--runs N] [--steps-per-run N] [--workers 1 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

from moecap.schemas import TraceWriter, trace_file_name


def _config(layers: int, experts: int, top_k: int) -> dict[str, Any]:
    return {
        **QWEN15_MOE_CONFIG,
        "num_hidden_layers": layers,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
    }


def write_run(out: Path, run_id: str, steps: int, cfg: dict[str, Any], seed: int, chunk: int = 20_000) -> int:
    """One run's steps + experts files; returns bytes written."""
    rng = np.random.default_rng(seed)
    L, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    sim = SimConfig(run_id=run_id, concurrency=32)
    run = run_metadata(sim, cfg)
    # Mixture weight keeping every expert's share <= 0.9 / top_k, so no count exceeds the step's tokens.
    w = max(0.0, min(0.9, (0.9 / k - 1 / E) / (1 - 1 / E)))
    skew = w * rng.dirichlet(np.full(E, 0.7), size=L) + (1 - w) / E  # [L, E]
    paths = [out / trace_file_name(run, "steps"), out / trace_file_name(run, "experts")]
    sw = TraceWriter(paths[0], "steps", run, max_pending_batches=4, blocking=True, rows_per_batch=4096)
    ew = TraceWriter(paths[1], "experts", run, max_pending_batches=4, blocking=True, rows_per_batch=4096)
    ids_pool = np.array([f"r{i}" for i in range(64)])
    t0 = 1_000_000_000
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        step = np.arange(start, start + n, dtype=np.int64)
        prefill = rng.random(n) < 1 / 16
        num_reqs = np.where(prefill, rng.integers(1, 3, n), rng.integers(8, 65, n)).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(num_reqs)]).astype(np.int32)
        total = int(offsets[-1])
        owner = np.repeat(np.arange(n), num_reqs)
        new = np.where(prefill[owner], rng.integers(256, 1025, total), 1).astype(np.int32)
        prefix = np.where(prefill[owner], 0, rng.integers(100, 4000, total)).astype(np.int32)
        tokens = np.add.reduceat(new, offsets[:-1]).astype(np.int32)
        dur = (2_000_000 + 40_000 * num_reqs + 3_000 * tokens).astype(np.int64)
        t_start = t0 + np.concatenate([[0], np.cumsum(dur + 200_000)[:-1]])
        t0 = int(t_start[-1] + dur[-1] + 200_000)
        within = np.arange(total) - offsets[owner]
        offs = pa.array(offsets)

        def lst(values: np.ndarray, offs: pa.Array = offs) -> pa.ListArray:
            return pa.ListArray.from_arrays(offs, pa.array(values))

        sw.write_batch(
            pa.record_batch(
                {
                    "step": step,
                    "t_start_ns": t_start,
                    "t_end_ns": t_start + dur,
                    "gpu_start_ns": t_start + 100_000,
                    "gpu_end_ns": t_start + dur,
                    "phase": pa.array(np.where(prefill, "prefill", "decode")).dictionary_encode(),
                    "is_draft": np.zeros(n, bool),
                    "num_reqs": num_reqs,
                    "num_tokens": tokens,
                    "req_ids": lst(ids_pool[within % len(ids_pool)]),
                    "req_prefix_lens": lst(prefix),
                    "req_new_tokens": lst(new),
                    "req_num_logits": lst(np.ones(total, np.int16)),
                    "req_spec_tokens": pa.nulls(n, pa.list_(pa.int16())),
                }
            )
        )
        # Counts: floor(tokens x top_k x share), the remainder (< E) one each to consecutive experts.
        routed = (tokens.astype(np.int64) * k)[:, None, None]  # [n, 1, 1]
        base = np.floor(routed * skew[None]).astype(np.int64)  # [n, L, E]
        rest = (routed[..., 0] - base.sum(axis=2))[..., None]  # [n, L, 1]
        rot = (np.arange(E)[None, None, :] - (step % E)[:, None, None]) % E
        counts = (base + (rot < rest)).astype(np.int32)
        off = (np.arange(n + 1) * L * E).astype(np.int32)
        ew.write_batch(
            pa.record_batch(
                {
                    "step": step,
                    "counts": pa.ListArray.from_arrays(pa.array(off), pa.array(counts.reshape(-1))),
                }
            )
        )
    sw.close()
    ew.close()
    return sum(p.stat().st_size for p in paths)


def _write_one(args: tuple[str, str, int, dict[str, Any], int]) -> int:
    out, run_id, steps, cfg, seed = args
    return write_run(Path(out), run_id, steps, cfg, seed)


def generate(
    out: Path, runs: int, steps: int, cfg: dict[str, Any], tag: str, procs: int = 2
) -> dict[str, Any]:
    """Write the runs unless `out` already holds them (`.done` marker); returns sizes."""
    marker = out / ".done"
    t = time.perf_counter()
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        jobs = [
            (
                str(out),
                f"20261206T{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}Z-{tag}-{i:05d}",
                steps,
                cfg,
                i,
            )
            for i in range(runs)
        ]
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_one, jobs, chunksize=4))
        marker.write_text("ok")
    size = sum(p.stat().st_size for p in out.glob("*.arrow"))
    return {
        "files": len(list(out.glob("*.arrow"))),
        "steps": runs * steps,
        "bytes": size,
        "bytes_per_step": size / (runs * steps),
        "generate_s": round(time.perf_counter() - t, 1),
    }


def timed_task(group, dataset, options=None, cost_settings=None):
    """`analyze_group` plus its own wall time, the worker's pid and its peak RSS so far."""
    from moecap.analyze.fleet.task import analyze_group

    t = time.perf_counter()
    result = analyze_group(group, dataset, options, cost_settings)
    result.warnings = [
        json.dumps(
            {
                "task_s": time.perf_counter() - t,
                "pid": os.getpid(),
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    ]
    return result


def run_on_ray(data: Path, dataset: Path, workers: int) -> dict[str, Any]:
    import ray

    from moecap.analyze.fleet import run_fleet

    shutil.rmtree(dataset, ignore_errors=True)
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t = time.perf_counter()
        report = run_fleet([str(data)], str(dataset), task=timed_task, incremental=False)
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    stats = [json.loads(r.warnings[0]) for r in report.analysed]
    steps = sum(r.rows.get("step_metrics", 0) for r in report.analysed)
    peak: dict[int, int] = {}
    for s in stats:
        peak[s["pid"]] = max(peak.get(s["pid"], 0), s["maxrss_kb"])
    in_task = sum(s["task_s"] for s in stats)
    return {
        "workers": workers,
        "tasks": len(report.analysed),
        "failed": len(report.failed),
        "steps": steps,
        "wall_s": round(wall, 1),
        "steps_per_s": round(steps / wall),
        "steps_per_s_per_worker": round(steps / wall / workers),
        "in_task_s": round(in_task, 1),
        "in_task_steps_per_s": round(steps / in_task) if in_task else None,
        "overhead_s_per_task": round((wall * workers - in_task) / max(1, len(stats)), 4),
        "task_s_mean": round(in_task / max(1, len(stats)), 4),
        "worker_processes": len(peak),
        "peak_rss_mb_per_worker": sorted(round(v / 1024) for v in peak.values()),
    }


def run_local(data: Path, dataset: Path, runs: int) -> dict[str, Any]:
    """The first `runs` runs through `analyze_group` in this process, one after the other (no Ray)."""
    from moecap.analyze.fleet.discover import discover
    from moecap.analyze.fleet.task import analyze_group

    shutil.rmtree(dataset, ignore_errors=True)
    groups = discover([str(data)])[:runs]
    t = time.perf_counter()
    steps = sum(analyze_group(g, str(dataset)).rows.get("step_metrics", 0) for g in groups)
    wall = time.perf_counter() - t
    return {"runs": len(groups), "steps": steps, "wall_s": round(wall, 1), "steps_per_s": round(steps / wall)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/moecap-fleet-bench"))
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--steps-per-run", type=int, default=20_000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--real-runs", type=int, default=20)
    ap.add_argument("--real-steps", type=int, default=10_000)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument(
        "--local-runs", type=int, default=10, help="runs analysed in-process (no Ray) as a baseline"
    )
    ap.add_argument("--skip", nargs="*", default=[], help="phases to skip: fleet real small")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    lines: list[dict[str, Any]] = []

    def emit(d: dict[str, Any]) -> None:
        d["loadavg_1m"] = round(os.getloadavg()[0], 1)  # the VM is shared: say how busy it was
        print(json.dumps(d), flush=True)
        lines.append(d)

    if "fleet" not in args.skip:
        cfg = _config(args.layers, args.experts, args.top_k)
        fleet = (
            args.data / f"fleet-{args.runs}x{args.steps_per_run}-{args.layers}x{args.experts}k{args.top_k}"
        )
        emit(
            {
                "phase": "generate",
                "shape": f"{args.layers}x{args.experts} top{args.top_k}",
                **generate(fleet, args.runs, args.steps_per_run, cfg, "fleet"),
            }
        )
        emit({"phase": "local", **run_local(fleet, args.data / "dataset-local", args.local_runs)})
        results = {}
        for w in args.workers:
            results[w] = run_on_ray(fleet, args.data / f"dataset-{w}", w)
            emit({"phase": "fleet", **results[w]})
        if len(results) > 1:
            lo, hi = min(results), max(results)
            emit(
                {
                    "phase": "scaling",
                    "workers": [lo, hi],
                    "speedup": round(results[hi]["steps_per_s"] / results[lo]["steps_per_s"], 2),
                }
            )
    if "real" not in args.skip:
        cfg = _config(24, 60, 4)
        real = args.data / f"real-{args.real_runs}x{args.real_steps}"
        emit(
            {
                "phase": "generate",
                "shape": "24x60 top4 (Qwen1.5-MoE)",
                **generate(real, args.real_runs, args.real_steps, cfg, "real"),
            }
        )
        emit({"phase": "real", **run_on_ray(real, args.data / "dataset-real", 1)})
    if "small" not in args.skip:
        cfg = _config(args.layers, args.experts, args.top_k)
        small = args.data / f"small-{args.small_files}"
        emit(
            {
                "phase": "generate",
                "shape": "small",
                **generate(small, args.small_files // 2, 20, cfg, "small"),
            }
        )
        emit({"phase": "small", **run_on_ray(small, args.data / "dataset-small", max(args.workers))})
    if args.json:
        args.json.write_text(json.dumps(lines, indent=1) + "\n")


if __name__ == "__main__":
    main()
