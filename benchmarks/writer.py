"""Trace-writer cost on the caller's thread and file size per step, Qwen1.5-MoE-shaped steps.

The caller is paced like an engine (one step per `--step-ms`, default 1 ms, sleeping between steps as an
engine waiting on its GPU would); the writer thread's own capacity is reported separately (rows it converted and
wrote per second of its busy time). A decode step of 64 requests: one `steps` row (64 request ids, prefix/new-token/logit lists) and one
`experts` row (24 MoE layers x 60 experts of int32 counts, 64 tokens x top-4 routed per layer).
Prints one JSON line: caller-thread microseconds per step (p50/p99/mean), end-to-end steps/s,
bytes per step on disk, and that size against a zstd floor (the same values as raw little-endian
arrays compressed by zstd at level 19) measured in the same run.

    python benchmarks/writer.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata, TraceWriter

LAYERS, EXPERTS, TOP_K, BATCH = 24, 60, 4, 64


def make_steps(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    ids = [f"req-{i:06d}" for i in range(BATCH)]
    steps, experts = [], []
    prefix = rng.integers(100, 2000, BATCH).astype(np.int32)
    for s in range(n):
        steps.append(
            {
                "step": s,
                "t_start_ns": 1_000_000 * s,
                "t_end_ns": 1_000_000 * s + 900_000,
                "gpu_start_ns": 1_000_000 * s + 10_000,
                "gpu_end_ns": 1_000_000 * s + 950_000,
                "phase": "decode",
                "is_draft": False,
                "num_reqs": BATCH,
                "num_tokens": BATCH,
                "req_ids": ids,
                "req_prefix_lens": prefix + s,
                "req_new_tokens": np.ones(BATCH, np.int32),
                "req_num_logits": np.ones(BATCH, np.int16),
            }
        )
        counts = np.stack(
            [rng.multinomial(BATCH * TOP_K, np.full(EXPERTS, 1 / EXPERTS)) for _ in range(LAYERS)]
        )
        experts.append({"step": s, "counts": counts.astype(np.int32).ravel()})
    return steps, experts


def zstd_floor(steps: list[dict], experts: list[dict]) -> int:
    codec = pa.Codec("zstd", compression_level=19)
    raw = [
        np.concatenate([e["counts"] for e in experts]).tobytes(),
        np.concatenate([s["req_prefix_lens"] for s in steps]).tobytes(),
        np.array(
            [[s["step"], s["t_start_ns"], s["t_end_ns"], s["gpu_start_ns"], s["gpu_end_ns"]] for s in steps]
        ).tobytes(),
        "".join("".join(s["req_ids"]) for s in steps).encode(),
    ]
    return sum(len(codec.compress(b, asbytes=True)) for b in raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--step-ms", type=float, default=1.0, help="pace of the simulated engine")
    args = ap.parse_args()
    steps, experts = make_steps(args.steps)
    run = RunMetadata(
        run_id="bench",
        engine=EngineInfo("bench"),
        model=ModelInfo("Qwen/Qwen1.5-MoE-A2.7B"),
        moe=MoEInfo(layer_ids=list(range(LAYERS)), num_experts=EXPERTS, top_k=TOP_K),
    )
    with tempfile.TemporaryDirectory() as tmp:
        sw = TraceWriter(Path(tmp) / "b.steps.arrow", "steps", run)
        ew = TraceWriter(Path(tmp) / "b.experts.arrow", "experts", run)
        per_step = []
        t_all = time.perf_counter()
        pace_ns = int(args.step_ms * 1e6)
        next_ns = time.perf_counter_ns()
        for s, e in zip(steps, experts):
            t0 = time.perf_counter_ns()
            sw.write(s)
            ew.write(e)
            t1 = time.perf_counter_ns()
            per_step.append(t1 - t0)
            next_ns += pace_ns
            time.sleep(max(0, next_ns - time.perf_counter_ns()) / 1e9)
        s_stats, e_stats = sw.close(), ew.close()
        elapsed = time.perf_counter() - t_all
        size = s_stats.bytes_written + e_stats.bytes_written
    floor = zstd_floor(steps, experts)
    us = sorted(x / 1000 for x in per_step)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "caller_us_per_step_p50": round(us[len(us) // 2], 2),
                "caller_us_per_step_p99": round(us[int(len(us) * 0.99)], 2),
                "caller_us_per_step_mean": round(statistics.fmean(us), 2),
                "simulated_step_ms": args.step_ms,
                "wall_s": round(elapsed, 2),
                "writer_thread_steps_per_s": round(
                    args.steps / max(sum(s_stats.flush_seconds), sum(e_stats.flush_seconds))
                ),
                "bytes_per_step": round(size / args.steps, 1),
                "zstd19_floor_bytes_per_step": round(floor / args.steps, 1),
                "x_of_zstd_floor": round(size / floor, 2),
                "rows_dropped": s_stats.rows_dropped + e_stats.rows_dropped,
            }
        )
    )


if __name__ == "__main__":
    main()
