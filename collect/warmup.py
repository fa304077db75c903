"""Warm-up requests for an offline engine run: the workload's shapes, fresh token ids, never recorded.

A first batch through an engine pays one-off costs the workload should not carry: Triton kernels
compiled for the first shapes they meet (vLLM's `fused_moe_kernel`: ~1.3 s on an H100), allocator
growth, lazy imports. genai-perf and the engines' own benchmarks warm up first; `run --warmup N` does the
same with N requests shaped like the workload's first N (same prompt and output lengths) but with
token ids of their own, so the prefix cache the warm-up fills cannot serve the measured prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

WARMUP_PREFIX = "moecap-warmup-"
"""Request ids of warm-up requests start with this; an engine tracer that cannot be paused from the
client (SGLang's schedulers) skips the passes whose first request carries it."""

WARMUP_SEED_OFFSET = 7919
"""Added to the run's seed for the warm-up ids (a prime, so the streams never coincide)."""


def default_warmup(num_prompts: int, batch_size: int) -> int:
    """Requests a run warms up with unless told: one full batch (every concurrency level the workload's
    ramp-down meets is met once on the way), at most the workload's size."""
    return max(0, min(num_prompts, batch_size))


def warmup_prompts(prompts: Sequence[Any], n: int, *, vocab_size: int, seed: int) -> list[Any]:
    """`n` prompts with the lengths and output budgets of `prompts[:n]` (cycled when n is larger), ids
    drawn uniformly from [100, vocab_size) and request ids `WARMUP_PREFIX<i>`. `prompts` are
    `hf_runner.Prompt`-like dataclasses (req_id, token_ids, max_new_tokens, sample)."""
    if n <= 0 or not prompts:
        return []
    rng = random.Random(seed + WARMUP_SEED_OFFSET)
    low = min(100, max(0, vocab_size - 1))
    out = []
    for i in range(n):
        shape = prompts[i % len(prompts)]
        ids = [rng.randrange(low, vocab_size) for _ in range(len(shape.token_ids))]
        out.append(replace(shape, req_id=f"{WARMUP_PREFIX}{i}", token_ids=ids))
    return out
