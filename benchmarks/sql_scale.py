"""Peak memory of `moecap-analyze sql` over a glob of many runs: the views stream, nothing is loaded whole.

    python benchmarks/sql_scale.py                       # 64 runs x 10,000 decode steps (about 4 GB of counts)
    python benchmarks/sql_scale.py --runs 200 --steps 5000 --memory-limit 1GB

Writes N synthetic runs (steps, experts, requests; Qwen1.5-MoE shape: 24 MoE layers x 60 experts),
then runs each query in a fresh `moecap-analyze sql` process and reads that process's peak resident
set size from the kernel (`wait4` rusage), next to the size the same tables take as Arrow in memory.
The first query also converts every trace file into the Parquet cache (streamed batch by batch);
the others run on the warm cache: DuckDB scans the cached Parquet lazily (only the columns and row
groups a query needs) and aggregates while streaming.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

from moecap.schemas import TABLES, TraceWriter, scan_trace_file, trace_file_name

QUERIES = {
    "load + count(*) FROM steps (cold cache: converts every file)": "SELECT count(*) FROM steps",
    "count(*) FROM steps (warm cache)": "SELECT count(*) FROM steps",
    "Σ tokens per layer over expert_tokens (unnests every count)": (
        "SELECT layer, sum(tokens) FROM expert_tokens GROUP BY layer ORDER BY layer"
    ),
    "S-MBU per run and batch size from step_metrics": (
        "SELECT run_id, num_reqs, sum(bytes_total) / (any_value(gpu_bandwidth) * sum(time_s * gpus)) "
        "FROM step_metrics GROUP BY ALL"
    ),
    "TPOT by decode batch (request_metrics JOIN request_steps)": (
        "SELECT round(s.decode_batch_reqs_mean) AS b, avg(r.tpot_s) FROM request_metrics r "
        "JOIN request_steps s USING (run_id, engine_req_id) GROUP BY b"
    ),
    "export step_metrics to Parquet (--out)": "SELECT * FROM step_metrics",
    "run_metrics (computes metrics.json of every run)": "SELECT run_id, s_mbu FROM run_metrics WHERE phase = 'all'",
}


def write_run(out: Path, run_index: int, steps: int, *, seed: int = 0) -> None:
    """One steady-state decode run, written in vectorised batches: the batch size cycles through
    1, 8, 32, 64, 128 in blocks of 1,000 steps, and each block's requests decode for the whole block."""
    cfg = QWEN15_MOE_CONFIG
    run = run_metadata(SimConfig(run_id=f"20260101T000000Z-scale-{run_index:04d}", concurrency=128), cfg)
    rng = np.random.default_rng(seed + run_index)
    n_layers, n_experts, top_k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    batch_sizes = np.array([1, 8, 32, 64, 128], dtype=np.int32)
    step = np.arange(steps, dtype=np.int64)
    bs = batch_sizes[(step // 1000) % len(batch_sizes)]
    dur = (2_000_000 + 50_000 * bs).astype(np.int64)
    t_start = np.concatenate([[0], np.cumsum(dur)[:-1]]) + 1_000_000_000
    # request k of a block is "b<block>-r<k>", so ids repeat across the steps of a block (requests decode)
    block = step // 1000
    offsets = np.concatenate([[0], np.cumsum(bs)]).astype(np.int32)
    slot = np.concatenate([np.arange(b) for b in bs])
    owner = np.repeat(block, bs)
    ids = np.char.add(np.char.add("b", owner.astype(str)), np.char.add("-r", slot.astype(str)))
    total = int(offsets[-1])
    prefix = np.repeat(step % 1000, bs).astype(np.int32) + 100
    ones = np.ones(total, np.int32)
    with TraceWriter(out / trace_file_name(run, "steps"), "steps", run, rows_per_batch=4096) as sw:
        sw.write_batch(
            pa.record_batch(
                {
                    "step": step,
                    "t_start_ns": t_start,
                    "t_end_ns": t_start + dur,
                    "gpu_start_ns": t_start + 100_000,
                    "gpu_end_ns": t_start + dur - 100_000,
                    "phase": pa.array(["decode"] * steps).dictionary_encode(),
                    "is_draft": np.zeros(steps, bool),
                    "num_reqs": bs,
                    "num_tokens": bs,
                    "req_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                    "req_prefix_lens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(prefix)),
                    "req_new_tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ones)),
                    "req_num_logits": pa.ListArray.from_arrays(
                        pa.array(offsets), pa.array(ones.astype(np.int16))
                    ),
                    "req_spec_tokens": pa.nulls(steps, pa.list_(pa.int16())),
                }
            )
        )
    with TraceWriter(out / trace_file_name(run, "experts"), "experts", run, rows_per_batch=4096) as ew:
        for start in range(0, steps, 4096):
            n = min(4096, steps - start)
            b = bs[start : start + n].astype(np.int64)
            # each token picks top_k experts per layer: multinomial over a skewed distribution
            p = rng.dirichlet(np.full(n_experts, 0.7), size=n_layers)
            counts = np.stack([rng.multinomial(b * top_k, p[layer]) for layer in range(n_layers)], axis=1)
            flat = counts.astype(np.int32).reshape(-1)
            off = (np.arange(n + 1) * n_layers * n_experts).astype(np.int32)
            ew.write_batch(
                pa.record_batch(
                    {
                        "step": step[start : start + n],
                        "counts": pa.ListArray.from_arrays(pa.array(off), pa.array(flat)),
                    }
                )
            )
    # one request per (block, slot): arrives at its block's start, decodes until the block ends
    first_step = np.arange(0, steps, 1000)
    req_block = np.repeat(np.arange(len(first_step)), bs[first_step])
    req_slot = np.concatenate([np.arange(b) for b in bs[first_step]])
    last = np.minimum(first_step + 999, steps - 1)
    arrival = t_start[first_step][req_block] - 5_000_000
    first = t_start[first_step][req_block] + dur[first_step][req_block]
    finish = t_start[last][req_block] + dur[last][req_block]
    out_tokens = (last - first_step + 1)[req_block].astype(np.int32)
    with TraceWriter(out / trace_file_name(run, "requests"), "requests", run, rows_per_batch=4096) as rw:
        n_req = len(req_block)
        rw.write_batch(
            pa.record_batch(
                {
                    **{c.name: pa.nulls(n_req, c.type) for c in TABLES["requests"]},
                    "req_id": np.char.add(
                        np.char.add("b", req_block.astype(str)), np.char.add("-r", req_slot.astype(str))
                    ),
                    "arrival_ns": arrival,
                    "first_token_ns": first,
                    "finish_ns": finish,
                    "prompt_tokens": np.full(len(req_block), 100, np.int32),
                    "output_tokens": out_tokens,
                    "retries": np.zeros(len(req_block), np.int16),
                }
            )
        )


def arrow_bytes_in_memory(files: list[Path]) -> int:
    """Bytes the trace tables take as Arrow in memory (Σ record-batch sizes, streamed one at a time)."""
    total = 0

    def add(batch: pa.RecordBatch) -> None:
        nonlocal total
        total += batch.nbytes

    for path in files:
        scan_trace_file(path, add)
    return total


def run_measured(args: list[str]) -> tuple[int, float, int, str]:
    """(exit status, wall seconds, peak RSS bytes, stderr tail) of one command, via wait4."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024, err.strip()[-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10_000, help="decode steps per run")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--memory-limit", default=None, help="passed to moecap-analyze sql --memory-limit")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="moecap-sql-scale-"))
    traces, cache = work / "traces", work / "cache"
    traces.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for i in range(args.runs):
        if not list(traces.glob(f"*scale-{i:04d}.*steps.arrow")):
            write_run(traces, i, args.steps)
    files = sorted(traces.glob("*.arrow"))
    trace_bytes = sum(p.stat().st_size for p in files)
    print(
        f"{args.runs} runs x {args.steps:,} steps: {len(files)} trace files, {trace_bytes / 2**20:,.0f} MiB on disk "
        f"(written in {time.monotonic() - t0:.0f} s)"
    )
    cli = str(Path(sys.executable).parent / "moecap-analyze")
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for label, query in QUERIES.items():
        cmd = [cli, "sql", query, str(traces / "*.arrow"), "--cache-dir", str(cache), "--format", "csv"]
        if label.startswith("export"):
            cmd += ["--out", str(work / "step_metrics.parquet")]
        if args.memory_limit:
            cmd += ["--memory-limit", args.memory_limit]
        code, wall, rss, err = run_measured(cmd)
        if code != 0:
            raise SystemExit(f"{label}: exit {code}: {err}")
        rows.append((label, wall, rss))
        print(f"  {label:<66} {wall:7.1f} s   peak RSS {rss / 2**20:7,.0f} MiB", flush=True)
    in_memory = arrow_bytes_in_memory(files)
    cache_bytes = sum(p.stat().st_size for p in cache.glob("*.parquet"))
    print(
        f"Parquet cache {cache_bytes / 2**20:,.0f} MiB; the trace tables as Arrow in memory "
        f"{in_memory / 2**20:,.0f} MiB; largest peak RSS {max(r[2] for r in rows) / 2**20:,.0f} MiB"
    )
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
