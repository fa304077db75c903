"""On one GPU with vLLM installed: does the warm-up's residue ladder (`collect/workload.py` `residue_ladder`)
leave vLLM's fused-MoE Triton kernels nothing to compile at any step size?

Calls vLLM's own `fused_experts` (the kernel path an engine step runs) with Qwen1.5-MoE-A2.7B's expert
shapes (60 experts, top-4, hidden 2,048, expert intermediate 1,408, bf16, random weights and routing) on
M tokens, timing each call (CUDA-synchronized). A call that compiles takes 10-1,000× a warm one. Each phase
runs in its own process with its own empty Triton cache (TRITON_CACHE_DIR), so compiles are real:

  whole-waves: the steps a warm-up of whole 1,024-token prompts forms (1,024 … 16,384 and one 16,383-token
               tail: the earlier one-off-16 rule), then the sizes that compiled inside the H100 sweep's window
               (15,425 at c64, 569 at c128) and 48 other sizes drawn from 1-16,384
  ladder:      the ladder's step sizes for a 16,384-token budget, then the same test sizes

For each test size: the first call's time over the median of three more (≥ 3: it compiled).

  source benchmarks/gpu/env.sh && python benchmarks/gpu/ladder_fused_moe.py > $OUT/ladder-fused-moe.txt
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

E, TOP_K, HIDDEN, INTER = 60, 4, 2048, 1408
BUDGET = 16384


def _test_sizes() -> list[int]:
    rng = random.Random(0)
    return [15425, 569, *sorted(rng.sample(range(1, BUDGET + 1), 48))]


def _phase(name: str) -> dict:
    import torch
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    from moecap.collect.workload import residue_ladder

    torch.manual_seed(0)
    dev = torch.device("cuda")
    w1 = torch.randn(E, 2 * INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, HIDDEN, INTER, device=dev, dtype=torch.bfloat16) * 0.02

    def call(m: int) -> float:
        x = torch.randn(m, HIDDEN, device=dev, dtype=torch.bfloat16)
        logits = torch.randn(m, E, device=dev, dtype=torch.float32)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fused_experts(x, w1, w2, weights, ids.to(torch.int32))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    if name == "ladder":
        groups = residue_ladder(
            step_budget=BUDGET, max_prompt_tokens=1024, max_requests=128, vocab_size=1000, seed=0
        )
        warm = [sum(len(p.token_ids) for p in g) for g in groups]
    else:
        warm = [k * 1024 for k in range(1, 17)] + [BUDGET - 1]
    t0 = time.perf_counter()
    warm_ms = [call(m) for m in warm]
    warm_s = time.perf_counter() - t0
    rows = []
    for m in _test_sizes():
        first = call(m)
        again = statistics.median(call(m) for _ in range(3))
        rows.append(
            {
                "tokens": m,
                "first_ms": round(first, 2),
                "warm_ms": round(again, 3),
                "ratio": round(first / again, 1),
            }
        )
    return {
        "phase": name, "warm_steps": len(warm), "warm_s": round(warm_s, 1),
        "warm_calls_over_100ms": sum(t > 100 for t in warm_ms), "tests": rows,
        "compiled": [r["tokens"] for r in rows if r["ratio"] >= 3],
    }  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(_phase(sys.argv[1])))
        return
    for name in ("whole-waves", "ladder"):
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{name}-"))
        p = subprocess.run(
            [sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=500
        )
        line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
        if line is None:
            print(f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}")
            continue
        r = json.loads(line)
        print(
            f"{name}: {r['warm_steps']} warm-up calls in {r['warm_s']} s ({r['warm_calls_over_100ms']} over 100 ms); "
            f"test sizes that compiled: {len(r['compiled'])} of {len(r['tests'])} {r['compiled']}"
        )
        for row in r["tests"][:2]:
            print(f"  {row}")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
