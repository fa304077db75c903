"""Engine-like synthetic traces for the analyzer benchmarks (Qwen1.5-MoE shapes, moecap's own writer).

Unlike `synthetic_traces.bulk_decode_trace` (decode only, 128 request ids recycled, 50,000-row
batches, counts that do not add up), this writes what an engine's collector writes:

* a closed-loop continuous-batching schedule: `concurrency` requests in flight, each with a prompt
  of 128–2,048 tokens and an output of 32–512; a token budget per step; prompts chunked across
  steps; so there are prefill, mixed and decode steps and a new request id whenever one finishes
  (hundreds of thousands of distinct requests over 1e6 steps);
* routing counts that sum to tokens × top_k in every MoE layer of every step (a skewed
  per-layer distribution, multinomial per step);
* record batches of `rows_per_batch` steps (the collector flushes a batch every few hundred
  steps, not 50,000 at once).

    python benchmarks/engine_like_trace.py OUT_DIR STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_traces import QWEN15_MOE_CONFIG, SimConfig, run_metadata

from moecap.schemas import RunMetadata, TraceWriter, trace_file_name


def engine_like_trace(
    out_dir: str | Path,
    steps: int,
    *,
    concurrency: int = 64,
    token_budget: int = 2048,
    rows_per_batch: int = 256,
    experts: bool = True,
    seed: int = 0,
) -> RunMetadata:
    """Write `steps` steps (and their expert counts) of one engine-like run under `out_dir`."""
    cfg = QWEN15_MOE_CONFIG
    sim = SimConfig(run_id=f"20260101T000000Z-engine-like-{steps}", concurrency=concurrency)
    run = run_metadata(sim, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    routing = rng.dirichlet(np.full(E, 0.6), size=L)  # skewed, fixed per layer
    sw = TraceWriter(out / trace_file_name(run, "steps"), "steps", run, blocking=True)
    ew = (
        TraceWriter(out / trace_file_name(run, "experts"), "experts", run, blocking=True) if experts else None
    )

    next_id = 0
    # Per slot: request id, prompt length, prompt tokens computed, output length, tokens generated.
    ids = np.arange(concurrency)
    prompt = rng.integers(128, 2049, concurrency)
    done_prompt = np.zeros(concurrency, np.int64)
    out_len = rng.integers(32, 513, concurrency)
    generated = np.zeros(concurrency, np.int64)
    next_id = concurrency
    t_ns = 0
    cols: dict[str, list] = {
        c: []
        for c in [
            "step",
            "t_start_ns",
            "t_end_ns",
            "gpu_start_ns",
            "gpu_end_ns",
            "phase",
            "num_reqs",
            "num_tokens",
            "req_ids",
            "req_prefix_lens",
            "req_new_tokens",
            "req_num_logits",
        ]
    }

    def flush() -> None:
        n = len(cols["step"])
        if not n:
            return
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in cols["req_ids"]])]).astype(np.int32)
        flat = {
            c: np.concatenate(cols[c])
            for c in ("req_ids", "req_prefix_lens", "req_new_tokens", "req_num_logits")
        }
        off = pa.array(offsets)
        sw.write_batch(
            pa.record_batch(
                {
                    "step": np.asarray(cols["step"], np.int64),
                    "t_start_ns": np.asarray(cols["t_start_ns"], np.int64),
                    "t_end_ns": np.asarray(cols["t_end_ns"], np.int64),
                    "gpu_start_ns": np.asarray(cols["gpu_start_ns"], np.int64),
                    "gpu_end_ns": np.asarray(cols["gpu_end_ns"], np.int64),
                    "phase": pa.array(cols["phase"]).dictionary_encode(),
                    "is_draft": np.zeros(n, bool),
                    "num_reqs": np.asarray(cols["num_reqs"], np.int32),
                    "num_tokens": np.asarray(cols["num_tokens"], np.int32),
                    "req_ids": pa.ListArray.from_arrays(off, pa.array(flat["req_ids"].astype(str))),
                    "req_prefix_lens": pa.ListArray.from_arrays(
                        off, pa.array(flat["req_prefix_lens"].astype(np.int32))
                    ),
                    "req_new_tokens": pa.ListArray.from_arrays(
                        off, pa.array(flat["req_new_tokens"].astype(np.int32))
                    ),
                    "req_num_logits": pa.ListArray.from_arrays(
                        off, pa.array(flat["req_num_logits"].astype(np.int16))
                    ),
                    "req_spec_tokens": pa.nulls(n, pa.list_(pa.int16())),
                }
            )
        )
        if ew is not None:
            tokens = np.asarray(cols["num_tokens"], np.int64)
            counts = rng.multinomial(np.repeat(tokens[:, None] * k, L, axis=1), routing).astype(np.int32)
            ew.write_batch(
                pa.record_batch(
                    {
                        "step": np.asarray(cols["step"], np.int64),
                        "counts": pa.ListArray.from_arrays(
                            pa.array((np.arange(n + 1) * L * E).astype(np.int32)),
                            pa.array(counts.reshape(-1)),
                        ),
                    }
                )
            )
        for c in cols.values():
            c.clear()

    for step in range(steps):
        decoding = done_prompt >= prompt
        new = np.where(decoding, 1, 0)
        budget = token_budget - int(decoding.sum())
        for i in np.flatnonzero(~decoding):  # prompts chunked in slot order within the budget
            if budget <= 0:
                break
            take = min(int(prompt[i] - done_prompt[i]), budget)
            new[i] = take
            budget -= take
        active = new > 0
        prefix = np.where(decoding, prompt + generated, done_prompt)
        logits = (decoding | (done_prompt + new >= prompt)) & active
        n_tok = int(new.sum())
        has_dec, has_pre = bool((decoding & active).any()), bool((~decoding & active).any())
        phase = "mixed" if has_dec and has_pre else ("decode" if has_dec else "prefill")
        gpu_ns = 9_000_000 + 20_000 * n_tok  # ~ reading 28.6 GB of weights at 3.35 TB/s, plus per-token work
        cols["step"].append(step)
        cols["t_start_ns"].append(t_ns)
        cols["gpu_start_ns"].append(t_ns + 100_000)
        cols["gpu_end_ns"].append(t_ns + 100_000 + gpu_ns)
        cols["t_end_ns"].append(t_ns + 200_000 + gpu_ns)
        t_ns += 300_000 + gpu_ns
        cols["phase"].append(phase)
        cols["num_reqs"].append(int(active.sum()))
        cols["num_tokens"].append(n_tok)
        cols["req_ids"].append(ids[active])
        cols["req_prefix_lens"].append(prefix[active])
        cols["req_new_tokens"].append(new[active])
        cols["req_num_logits"].append(logits[active].astype(np.int64))
        done_prompt = np.where(decoding, done_prompt, done_prompt + new)
        generated = generated + logits.astype(np.int64)
        finished = generated >= out_len
        for i in np.flatnonzero(finished):  # closed loop: a new request takes the slot
            ids[i], prompt[i], out_len[i] = next_id, rng.integers(128, 2049), rng.integers(32, 513)
            done_prompt[i] = generated[i] = 0
            next_id += 1
        if len(cols["step"]) >= rows_per_batch:
            flush()
    flush()
    sw.close()
    if ew is not None:
        ew.close()
    return run


if __name__ == "__main__":
    engine_like_trace(sys.argv[1], int(sys.argv[2]))
