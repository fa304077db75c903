"""The workload side of a run, engine-neutral: prompts built from a dataset's samples, the warm-up requests
sent before the recorded window, one client record per request, and the `requests` / `outputs` rows and
run-metadata `workload` built from them. Shared by `run` (every engine) and `drive`-style clients; no
engine is imported here.

Warm-up: a first batch through an engine pays one-off costs the workload should not carry (Triton kernels
compiled for the first shapes they meet — vLLM's `fused_moe_kernel`, ~1.3 s on an H100 — allocator growth,
lazy imports). genai-perf and the engines' own benchmarks warm up first; `run --warmup N` sends N requests
shaped like the workload's first N (same prompt and output lengths) with token ids of their own, so the
prefix cache the warm-up fills cannot serve the measured prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moecap.schemas import RunMetadata, TraceWriter, trace_file_name

from .datasets import Sample
from .errors import CollectError

DEFAULT_MAX_NEW_TOKENS = 256
"""Output budget of a sample that names none, when `--max-tokens` is not given."""

WARMUP_PREFIX = "moecap-warmup-"
"""Request ids of warm-up requests start with this; an engine tracer that cannot be paused from the
client (SGLang's schedulers) skips the passes whose first request carries it."""

WARMUP_SEED_OFFSET = 7919
"""Added to the run's seed for the warm-up ids (a prime, so the streams never coincide)."""


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One request to send: id, token ids, output budget, and the sample it came from."""

    req_id: str
    token_ids: list[int]
    max_new_tokens: int
    sample: Sample


def make_prompts(
    samples: Sequence[Sample], tokenizer: Any | None, max_new_tokens: int | None, vocab_size: int
) -> list[Prompt]:
    """Token-id prompts `r0, r1, …` of `samples` (text prompts need `tokenizer`); each one's output budget
    is `max_new_tokens`, else the sample's, else `DEFAULT_MAX_NEW_TOKENS`."""
    prompts = []
    for i, s in enumerate(samples):
        if s.prompt_token_ids is not None:
            ids = list(s.prompt_token_ids)
        elif s.prompt is not None:
            if tokenizer is None:
                raise CollectError(
                    f"dataset {s.dataset!r} has text prompts: pass --tokenizer (or a --model directory with tokenizer "
                    "files) to turn them into token ids"
                )
            ids = list(tokenizer(s.prompt, add_special_tokens=True)["input_ids"])
        else:
            raise CollectError(f"sample {s.sample_id!r} has neither a prompt nor prompt token ids")
        if ids and max(ids) >= vocab_size:
            raise CollectError(
                f"sample {s.sample_id!r}: token id {max(ids)} is outside the model's vocabulary"
            )
        budget = max_new_tokens or s.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        prompts.append(Prompt(f"r{i}", ids, int(budget), s))
    return prompts


def default_warmup(num_prompts: int, batch_size: int) -> int:
    """Requests a run warms up with unless told: one full batch (every concurrency level the workload's
    ramp-down meets is met once on the way), at most the workload's size."""
    return max(0, min(num_prompts, batch_size))


def warmup_prompts(prompts: Sequence[Prompt], n: int, *, vocab_size: int, seed: int) -> list[Prompt]:
    """`n` prompts with the lengths and output budgets of `prompts[:n]` (cycled when n is larger), ids
    drawn uniformly from [100, vocab_size) and request ids `WARMUP_PREFIX<i>`."""
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


def closed_loop_workload(
    prompts: Sequence[Prompt], *, dataset: str, batch_size: int, ignore_eos: bool, seed: int, driver: str
) -> dict[str, Any]:
    """The run metadata's `workload` of a run with `batch_size` requests in flight, greedy."""
    lens = [len(p.token_ids) for p in prompts]
    outs = sorted({p.max_new_tokens for p in prompts})
    return {
        "dataset": dataset,
        "num_prompts": len(prompts),
        "batch_size": batch_size,
        "concurrency": batch_size,
        "max_new_tokens": outs[0] if len(outs) == 1 else outs,
        "input_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)},
        "ignore_eos": ignore_eos,
        "seed": seed,
        "sampling": "greedy",
        "driver": driver,
    }


# ---------------------------------------------------------------------------------------------------
# One client record per request, and its rows
# ---------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What the client saw of one request (host monotonic ns); one `requests` row and one `outputs` row."""

    req_id: str
    engine_id: str | None
    """The engine's id for it where it differs (vLLM appends a suffix): `requests.engine_req_id`."""
    prompt_ids: list[int]
    sample: Sample
    max_new_tokens: int
    arrival_ns: int
    first_token_ns: int | None = None
    finish_ns: int | None = None
    output_ids: list[int] = field(default_factory=list)
    chunk_ns: list[int] = field(default_factory=list)
    """When each chunk of output tokens reached the client."""
    chunk_tokens: list[int] = field(default_factory=list)
    cached_tokens: int | None = None
    queue_ns: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    routed_experts: Any = None
    """The engine's own per-token routing ([tokens, layers, top_k]) where it returns one (vLLM's
    `enable_return_routed_experts`)."""

    @classmethod
    def of(cls, prompt: Prompt, arrival_ns: int, engine_id: str | None = None) -> RequestRecord:
        return cls(
            prompt.req_id, engine_id, list(prompt.token_ids), prompt.sample, prompt.max_new_tokens, arrival_ns
        )

    def add_tokens(self, now_ns: int, ids: Sequence[int]) -> None:
        """`ids` arrived at `now_ns` (one chunk)."""
        if not ids:
            return
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
        self.chunk_ns.append(now_ns)
        self.chunk_tokens.append(len(ids))
        self.output_ids.extend(ids)

    def requests_row(self) -> dict[str, Any]:
        return {
            "req_id": self.req_id,
            "engine_req_id": self.engine_id,
            "sample_id": self.sample.sample_id,
            "arrival_ns": self.arrival_ns,
            "first_token_ns": self.first_token_ns,
            "finish_ns": self.finish_ns,
            "prompt_tokens": len(self.prompt_ids),
            "output_tokens": len(self.output_ids),
            "cached_prompt_tokens": self.cached_tokens,
            "chunk_times_ns": self.chunk_ns or None,
            "chunk_tokens": self.chunk_tokens or None,
            "queue_ns": self.queue_ns,
            "preemptions": None,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "retries": 0,
        }

    def outputs_row(self, tokenizer: Any | None) -> dict[str, Any]:
        """The output as text (`tokenizer`), else as the JSON list of its token ids; None for a failure."""
        if self.error is not None:
            text = None
        elif tokenizer is not None:
            text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        else:
            text = json.dumps(self.output_ids, separators=(",", ":"))
        return {
            "req_id": self.req_id,
            "sample_id": self.sample.sample_id,
            "dataset": self.sample.dataset,
            "prompt": self.sample.prompt_text,
            "output": text,
            "reference": self.sample.reference,
        }


def write_client_tables(
    out: Path, meta: RunMetadata, records: Sequence[RequestRecord], tokenizer: Any
) -> list[Path]:
    """The run's `requests` and `outputs` files from `records` (in arrival order); their paths."""
    requests = TraceWriter(out / trace_file_name(meta, "requests"), "requests", meta)
    outputs = TraceWriter(out / trace_file_name(meta, "outputs"), "outputs", meta)
    for rec in sorted(records, key=lambda r: r.arrival_ns):
        requests.write(rec.requests_row())
        outputs.write(rec.outputs_row(tokenizer))
    for w in (requests, outputs):
        w.close()
    return [requests.path, outputs.path]
