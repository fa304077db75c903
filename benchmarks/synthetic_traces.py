"""Synthetic traces written with moecap's own writer, for tests and benchmarks.

`simulate_run` drives a toy continuous-batching scheduler (token budget, chunked prefill, closed-loop
concurrency) whose step times come from a *known* model: a roofline over the step's weight + KV
bytes and FLOPs on a stated GPU, plus a fixed host overhead. Routing is a per-layer skewed
multinomial, so counts sum to tokens x top_k exactly. Its formulas are written here independently
of the analyzer (a hand roofline), so tests can check the analyzer and the what-if projection
against them.

`bulk_decode_trace` writes large steady-state decode traces in vectorised batches (benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moecap.schemas import (
    EngineInfo,
    GpuInfo,
    ModelInfo,
    MoEInfo,
    RunMetadata,
    TraceWriter,
    trace_file_name,
)

# Qwen1.5-MoE-A2.7B config.json (the fields the analyzer reads); hand-checked against the hub file.
QWEN15_MOE_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 151936,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "mlp_only_layers": [],
    "qkv_bias": True,
}


@dataclass
class TimeModel:
    """Known step-time model: t = max(bytes / (bw * eff_bw), flops / (peak * eff_flops)) + launch_s + host_s.

    The GPU span of a step is the roofline time + launch_s (a fixed per-step GPU-side overhead:
    launches, small kernels); host_s is spent on the host around it (half before, half after).
    """

    bandwidth: float = 3.35e12  # bytes/s (H100 SXM)
    peak_flops: float = 989.4e12  # dense bf16 FLOP/s
    eff_bw: float = 0.6
    eff_flops: float = 0.5
    host_s: float = 0.002
    launch_s: float = 0.0

    def step_time(self, nbytes: float, flops: float) -> float:
        return (
            max(nbytes / (self.bandwidth * self.eff_bw), flops / (self.peak_flops * self.eff_flops))
            + self.launch_s
            + self.host_s
        )


@dataclass
class SimConfig:
    num_requests: int = 16
    concurrency: int = 4
    prompt_len: tuple[int, int] = (32, 96)
    output_len: int = 12
    token_budget: int = 128
    seed: int = 0
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    time_model: TimeModel = field(default_factory=TimeModel)
    write_experts: bool = True
    run_id: str = "20260101T000000Z-synthetic-qwen15moe-0000"
    step_cost: Callable[[dict[str, Any]], tuple[float, float]] | None = None
    """(bytes, FLOPs) of a step from the caller's formulas instead of the hand formula below; gets the
    step's row (num_reqs, num_tokens, req_prefix_lens, req_new_tokens, req_num_logits) plus
    active_experts (experts with >= 1 token, summed over layers). Lets a test of something downstream
    of the byte/FLOP formulas (the what-if projection) see times that follow them exactly."""


def _hand_step_cost(
    cfg: dict[str, Any], tokens: int, active_experts: int, kv_tokens_read: int
) -> tuple[float, float]:
    """Bytes and FLOPs of one step by a deliberately simple hand formula (bf16)."""
    d, f, L = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
    attn = 4 * d * d
    shared = 3 * d * cfg["shared_expert_intermediate_size"]
    expert = 3 * d * f
    weights = L * (attn + shared) + active_experts * expert + cfg["vocab_size"] * d
    kv = kv_tokens_read * L * 2 * d
    nbytes = 2 * (weights + kv)
    flops = (
        2 * tokens * (L * (attn + shared + cfg["num_experts_per_tok"] * expert))
        + 2 * tokens * cfg["vocab_size"] * d
    )
    return float(nbytes), float(flops)


def run_metadata(sim: SimConfig, cfg: dict[str, Any]) -> RunMetadata:
    layers = list(range(cfg["num_hidden_layers"]))
    return RunMetadata(
        run_id=sim.run_id,
        engine=EngineInfo(name="synthetic", version="0"),
        model=ModelInfo(
            id="Qwen/Qwen1.5-MoE-A2.7B",
            config=cfg,
            dtypes={"weights": "bfloat16", "activations": "bfloat16", "kv_cache": "bfloat16"},
            kv_bytes_per_token_per_layer=[
                2 * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
            ]
            * len(layers),
            random_weights=True,
        ),
        moe=MoEInfo(layer_ids=layers, num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"]),
        gpus=[GpuInfo(index=0, name=sim.gpu_name, uuid="GPU-synthetic-0", memory_bytes=80 * 2**30)],
        workload={"dataset": "synthetic", "batch_size": sim.concurrency, "num_prompts": sim.num_requests},
    )


def simulate_run(
    out_dir: str | Path, sim: SimConfig | None = None, cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write steps (+experts) and requests/outputs files of one simulated run; return the ground truth."""
    sim = sim or SimConfig()
    cfg = cfg or QWEN15_MOE_CONFIG
    out = Path(out_dir)
    rng = np.random.default_rng(sim.seed)
    run = run_metadata(sim, cfg)
    L, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    skew = rng.dirichlet(np.full(E, 0.7), size=L)
    prompts = rng.integers(sim.prompt_len[0], sim.prompt_len[1] + 1, sim.num_requests)
    waiting = list(range(sim.num_requests))
    running: dict[int, dict[str, int]] = {}
    req_times: dict[int, dict[str, Any]] = {}
    t = 1_000_000_000  # ns, monotonic
    step_truth = []
    steps_w = TraceWriter(out / trace_file_name(run, "steps"), "steps", run, rows_per_batch=64)
    experts_w = (
        TraceWriter(out / trace_file_name(run, "experts"), "experts", run, rows_per_batch=64)
        if sim.write_experts
        else None
    )
    step = 0
    while waiting or running:
        while waiting and len(running) < sim.concurrency:
            r = waiting.pop(0)
            running[r] = {"done": 0, "out": 0}
            req_times[r] = {"arrival": t, "chunks": []}
        budget = sim.token_budget
        ids, prefix, new, logits, prompt_phase = [], [], [], [], []
        for r, st in running.items():
            if budget <= 0:
                break
            if st["done"] < prompts[r]:
                n = int(min(prompts[r] - st["done"], budget))
                ids.append(r)
                prefix.append(st["done"])
                new.append(n)
                logits.append(1 if st["done"] + n == prompts[r] else 0)
                prompt_phase.append(True)
            else:
                n = 1
                ids.append(r)
                prefix.append(int(prompts[r]) + st["out"] - 1)
                new.append(1)
                logits.append(1)
                prompt_phase.append(False)
            budget -= n
        tokens = int(sum(new))
        counts = np.stack([rng.multinomial(tokens * k, skew[layer]) for layer in range(L)]).astype(np.int32)
        active = int((counts > 0).sum())
        if sim.step_cost is None:
            nbytes, flops = _hand_step_cost(cfg, tokens, active, int(sum(prefix)))
        else:
            nbytes, flops = sim.step_cost(
                {
                    "num_reqs": len(ids),
                    "num_tokens": tokens,
                    "req_prefix_lens": prefix,
                    "req_new_tokens": new,
                    "req_num_logits": logits,
                    "active_experts": active,
                }
            )
        dt = sim.time_model.step_time(nbytes, flops)
        host_ns = int(sim.time_model.host_s * 1e9)
        t_start = t
        gpu_start = t_start + host_ns // 2
        gpu_end = t_start + int(dt * 1e9) - host_ns // 2
        t_end = t_start + int(dt * 1e9)
        phase = "prefill" if all(prompt_phase) else "decode" if not any(prompt_phase) else "mixed"
        steps_w.write(
            {
                "step": step,
                "t_start_ns": t_start,
                "t_end_ns": t_end,
                "gpu_start_ns": gpu_start,
                "gpu_end_ns": gpu_end,
                "phase": phase,
                "is_draft": False,
                "num_reqs": len(ids),
                "num_tokens": tokens,
                "req_ids": [f"req-{r}" for r in ids],
                "req_prefix_lens": prefix,
                "req_new_tokens": new,
                "req_num_logits": logits,
            }
        )
        if experts_w:
            experts_w.write({"step": step, "counts": counts.ravel()})
        step_truth.append(
            {
                "step": step,
                "bytes": nbytes,
                "flops": flops,
                "time_s": dt,
                "gpu_time_s": (gpu_end - gpu_start) / 1e9,
                "tokens": tokens,
                "phase": phase,
                "num_reqs": len(ids),
            }
        )
        for r, pp, lg in zip(ids, prompt_phase, logits):
            st = running[r]
            if pp:
                st["done"] += new[ids.index(r)]
                if lg:
                    st["out"] = 1
                    req_times[r]["first"] = t_end
                    req_times[r]["chunks"].append(t_end)
            else:
                st["out"] += 1
                req_times[r]["chunks"].append(t_end)
            if st["out"] >= sim.output_len:
                req_times[r]["finish"] = t_end
                del running[r]
        t = t_end
        step += 1
    steps_w.close()
    if experts_w:
        experts_w.close()
    with TraceWriter(out / trace_file_name(run, "requests"), "requests", run) as w:
        for r in range(sim.num_requests):
            rt = req_times[r]
            w.write(
                {
                    "req_id": f"req-{r}",
                    "arrival_ns": rt["arrival"],
                    "first_token_ns": rt["first"],
                    "finish_ns": rt["finish"],
                    "prompt_tokens": int(prompts[r]),
                    "output_tokens": sim.output_len,
                    "chunk_times_ns": rt["chunks"],
                    "chunk_tokens": [1] * len(rt["chunks"]),
                    "finish_reason": "length",
                    "retries": 0,
                }
            )
    with TraceWriter(out / trace_file_name(run, "outputs"), "outputs", run) as w:
        for r in range(sim.num_requests):
            w.write(
                {
                    "req_id": f"req-{r}",
                    "dataset": "synthetic",
                    "prompt": f"<{prompts[r]} tokens>",
                    "output": "x",
                }
            )
    return {"run": run, "steps": step_truth, "requests": req_times, "prompts": prompts, "skew": skew}


def bulk_decode_trace(
    out_dir: str | Path,
    steps: int,
    *,
    batch_sizes=(1, 8, 32, 64, 128),
    experts: bool = True,
    seed: int = 0,
    chunk: int = 50_000,
) -> RunMetadata:
    """A steady-state decode trace of `steps` steps (batch sizes cycling in blocks), written fast."""
    cfg = QWEN15_MOE_CONFIG
    sim = SimConfig(run_id=f"20260101T000000Z-bulk-{steps}-{int(experts)}")
    run = run_metadata(sim, cfg)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    L, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    sw = TraceWriter(out / trace_file_name(run, "steps"), "steps", run, max_pending_batches=4, blocking=True)
    ew = (
        TraceWriter(
            out / trace_file_name(run, "experts"), "experts", run, max_pending_batches=4, blocking=True
        )
        if experts
        else None
    )
    ids_pool = np.array([f"r{i}" for i in range(max(batch_sizes))])
    t0 = 0
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        step = np.arange(start, start + n, dtype=np.int64)
        bs = np.asarray(batch_sizes)[(step // 1000) % len(batch_sizes)].astype(np.int32)
        dur = (2_000_000 + 50_000 * bs).astype(np.int64)
        t_start = t0 + np.concatenate([[0], np.cumsum(dur)[:-1]])
        t0 = int(t_start[-1] + dur[-1])
        offsets = np.concatenate([[0], np.cumsum(bs)]).astype(np.int32)
        total = int(offsets[-1])
        prefix = rng.integers(100, 4000, total).astype(np.int32)
        ones32 = np.ones(total, np.int32)
        req_ids = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(ids_pool[np.concatenate([np.arange(b) for b in bs])])
        )
        batch = pa.record_batch(
            {
                "step": step,
                "t_start_ns": t_start,
                "t_end_ns": t_start + dur,
                "gpu_start_ns": t_start + 100_000,
                "gpu_end_ns": t_start + dur - 100_000,
                "phase": pa.array(["decode"] * n).dictionary_encode(),
                "is_draft": np.zeros(n, bool),
                "num_reqs": bs,
                "num_tokens": bs,
                "req_ids": req_ids,
                "req_prefix_lens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(prefix)),
                "req_new_tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ones32)),
                "req_num_logits": pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(ones32.astype(np.int16))
                ),
                "req_spec_tokens": pa.nulls(n, pa.list_(pa.int16())),
            }
        )
        sw.write_batch(batch)
        if ew:
            # Counts: each step routes bs * k token-choices per layer, spread over the experts.
            draws = rng.integers(0, E, size=(n, L, 4 * k)).astype(np.int64)
            counts = np.zeros((n, L, E), np.int32)
            np.add.at(counts, (np.arange(n)[:, None, None], np.arange(L)[None, :, None], draws), 1)
            counts = (counts * (bs[:, None, None] // 4 + 1)).astype(np.int32)
            flat = counts.reshape(-1)
            off = (np.arange(n + 1) * L * E).astype(np.int32)
            ew.write_batch(
                pa.record_batch(
                    {"step": step, "counts": pa.ListArray.from_arrays(pa.array(off), pa.array(flat))}
                )
            )
    sw.close()
    if ew:
        ew.close()
    return run
