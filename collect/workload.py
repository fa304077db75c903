"""The workload side of a run, engine-neutral: prompts built from a dataset's samples, the warm-up requests
sent before the recorded window, one client record per request, and the `requests` / `outputs` rows and
run-metadata `workload` built from them. Shared by `run` (every engine) and `drive`-style clients; no
engine is imported here.

Warm-up: a first batch through an engine pays one-off costs the workload should not carry (Triton kernels
compiled for the first shapes they meet — vLLM's `fused_moe_kernel`, ~1.3 s on an H100 — allocator growth,
lazy imports). genai-perf and the engines' own benchmarks warm up first; `run --warmup N` climbs the
residue ladder (`residue_ladder`: a step of every token-count class the run can form, so no Triton kernel
first meets a step size inside the window) and then sends N requests shaped like the workload's first N
(same prompt and output lengths) with token ids of their own, so the prefix cache the warm-up fills cannot
serve the measured prompts. `drive --warmup N` (which may not know the
vocabulary, and may send text) sends the first samples' prompts with their words or ids shuffled, for the
same reason.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from moecap.schemas import RunMetadata, TraceWriter, trace_file_name

from .datasets import Sample
from .errors import CollectError

DEFAULT_MAX_NEW_TOKENS = 256
"""Output budget of a sample that names none, when `--max-tokens` is not given."""

WARMUP_PREFIX = "moecap-warmup-"
"""Request ids of warm-up requests (`run`, `drive`) start with this; an engine tracer that cannot be paused
from the client (SGLang's schedulers) skips the passes whose first request carries it."""

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


LADDER_FIRST_TOKENS = 16
"""The smallest step size of the residue ladder (tokens)."""


def ladder_sizes(reach: int) -> list[int]:
    """The residue ladder's base sizes for steps of up to `reach` tokens: multiples of 16, each about √2 ×
    the one before (16, 32, 48, 64, 96, 128, 176, 256, …), the last the largest with room for 15 more
    tokens within `reach`."""
    top = (reach - 15) // 16 * 16
    sizes: list[int] = []
    k = 0
    while top >= LADDER_FIRST_TOKENS:
        size = 16 * round(2 ** (k / 2))
        k += 1
        if size >= top:
            return [*sizes, top]
        if size not in sizes:
            sizes.append(size)
    return sizes


STEP_BUDGET_ARGS = {
    "sglang": ("chunked_prefill_size", "max_prefill_tokens"),
    "vllm": ("max_num_batched_tokens",),
}
"""Per engine, its settings (SGLang `ServerArgs`, vLLM `SchedulerConfig` fields, as resolved) that bound
the prompt tokens of one step; `prefill_step_budget` takes their values."""


def positive_int(value: object) -> int | None:
    """`value` when it is an integer above 0 (a bool is not), else None: an engine setting read as told."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def prefill_step_budget(*limits: object) -> int | None:
    """The most prompt tokens an engine prefills in one step, from its limits on that (SGLang:
    `chunked_prefill_size`, -1 meaning chunking off, and `max_prefill_tokens`; vLLM:
    `max_num_batched_tokens`): the smallest positive integer among them; None when none is."""
    positive = [n for n in map(positive_int, limits) if n is not None]
    return min(positive) if positive else None


def prompt_room(length_limit: object) -> int | None:
    """The longest prompt an engine takes with one output token, from its length limit: vLLM's
    `max_model_len` (prompt + output) or SGLang's `max_req_input_len` (a prompt must be shorter), so
    limit − 1 either way; None when the limit is not an integer above 1."""
    limit = positive_int(length_limit)
    return limit - 1 if limit is not None and limit > 1 else None


def ladder_reach(*, step_budget: int, max_prompt_tokens: int, max_requests: int) -> int:
    """The largest step a run can form (tokens): the engine's prefill tokens per step, or
    `max_requests` × `max_prompt_tokens` when smaller."""
    return min(step_budget, max_requests * max_prompt_tokens)


def residue_ladder(
    *,
    step_budget: int,
    max_prompt_tokens: int,
    max_requests: int,
    vocab_size: int,
    seed: int,
    covered: int = 0,
    prompt_cap: int | None = None,
) -> list[list[Prompt]]:
    """Warm-up groups that make the engine run a step of every token count s + r, r = 0…15, for each
    ladder size s (`ladder_sizes`) up to the largest step the run can form (`ladder_reach`, from the run's
    `max_prompt_tokens`), leaving out the counts up to `covered` (climbed on this engine already: none are
    built).

    Hand each group over alone, after the one before has finished: its prompts (⌈count / cap⌉ of them,
    cap = the longest prompt the engine takes, `prompt_cap`, when it is longer than the run's; lengths
    within one token of each other, one output token each) are admitted together and prefilled in one step
    of exactly that count. As few prompts as possible: an engine that starts a step as soon as one request
    is in (vLLM's engine core, SGLang's scheduler) can split a group of several over two steps, never a
    group of one. Why the ladder: Triton compiles a kernel once
    per launch configuration, and vLLM and SGLang pick the fused-MoE tile configuration by the step's
    token count M (vLLM 0.26 bf16, 60 experts: seven ranges, edges at 32, 64, 96, 128, 512 and 7,740) and
    Triton specializes integer arguments on divisibility by 16 (above 512 tokens the expert-sorted length
    is 4·M + 7,620: divisible exactly when M mod 4 = 3); so the first step of each (range, M mod 16) class
    compiles — 0.1-1.2 s on an H100 (`benchmarks/gpu/triton_specialization.py`; docs/sweep.md). A warm-up
    of whole prompts meets only a few classes; the recorded window then met the others (H100 vLLM sweep:
    15,425 tokens at 64 in flight, 569 at 128, ~1.1 s each). Ids are drawn like `warmup_prompts`' (no
    prefix shared with anything), request ids `WARMUP_PREFIX` + `ladder-<count>-<i>`."""
    reach = ladder_reach(
        step_budget=step_budget, max_prompt_tokens=max_prompt_tokens, max_requests=max_requests
    )
    if reach < LADDER_FIRST_TOKENS + 15 or max_prompt_tokens < 1:
        return []
    rng = random.Random(seed + 2 * WARMUP_SEED_OFFSET)
    low = min(100, max(0, vocab_size - 1))
    cap = max(max_prompt_tokens, prompt_cap or 0)
    groups = []
    for size in ladder_sizes(reach):
        for count in range(max(size, covered + 1), size + 16):
            n = -(-count // cap)
            lengths = [count // n + (i < count % n) for i in range(n)]
            groups.append(
                [
                    Prompt(
                        f"{WARMUP_PREFIX}ladder-{count}-{i}",
                        [rng.randrange(low, vocab_size) for _ in range(length)],
                        1,
                        Sample(f"ladder-{count}-{i}", "warm-up"),
                    )
                    for i, length in enumerate(lengths)
                ]
            )
    return groups


T = TypeVar("T")


def warmup_sample(sample: Sample, rng: random.Random) -> Sample:
    """A warm-up request for `sample`'s shape: its prompt with the words (text, split at spaces) or token
    ids in an order drawn from `rng`, never starting as the prompt does. Same length (text: the same words),
    none of its prefix, so a prefix cache the warm-up fills cannot serve a measured request (sending the
    sample itself made vLLM prefill 16 of its 256 tokens: 17 ms TTFT instead of ~50 ms, H100 2026-12-07).
    A prompt of one word or id, or of one repeated, has no other order and is sent as it is."""
    if sample.prompt_token_ids is not None:
        return replace(sample, prompt_token_ids=_reordered(list(sample.prompt_token_ids), rng))
    if sample.prompt is not None:
        return replace(sample, prompt=" ".join(_reordered(sample.prompt.split(" "), rng)))
    return sample


def _reordered(items: list[T], rng: random.Random) -> list[T]:
    """`items` shuffled by `rng`, its first element swapped for another value when the shuffle kept it."""
    out = list(items)
    rng.shuffle(out)
    if out and out[0] == items[0]:
        other = next((k for k, x in enumerate(out) if x != items[0]), None)
        if other is not None:
            out[0], out[other] = out[other], out[0]
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
    """What the client saw of one request (host monotonic ns): one `requests` row and one `outputs` row.

    The one record of every client: the in-process engine runners (`run`) hold token ids (`prompt_ids`,
    `output_ids`); the HTTP driver (`drive`) holds what the server reported (`prompt_tokens` /
    `output_tokens` from its usage, the text it streamed). Field names are the `requests` columns'.
    """

    req_id: str
    sample: Sample
    arrival_ns: int = 0
    """When the request was handed over: to the engine (`run`), or to the HTTP client just before it
    sends (`drive`, as `vllm bench serve` times it)."""
    engine_req_id: str | None = None
    """The engine's id for it (vLLM appends a suffix); written only where it differs from `req_id`."""
    prompt_ids: list[int] | None = None
    """The prompt's token ids where the client holds them (engine runners); then it counts the tokens."""
    prompt_sent: str | None = None
    """The prompt as recorded in `outputs` (the templated text, chat messages as JSON); None: the sample's."""
    max_new_tokens: int | None = None
    first_token_ns: int | None = None
    finish_ns: int | None = None
    prompt_tokens: int | None = None
    """The server's count (usage); None: `len(prompt_ids)` where held."""
    output_tokens: int | None = None
    """The server's count (usage); None: the output ids held, else the tokens counted per chunk."""
    cached_prompt_tokens: int | None = None
    output_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    """Output text as it streamed (HTTP); `output_ids` are decoded instead where there is none."""
    reasoning: list[str] = field(default_factory=list)
    """Reasoning streamed apart from the answer (vLLM / SGLang reasoning parsers)."""
    chunk_times_ns: list[int] = field(default_factory=list)
    """When each chunk of output tokens reached the client."""
    chunk_tokens: list[int] = field(default_factory=list)
    queue_ns: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    retries: int = 0
    routed_experts: Any = None
    """The engine's own per-token routing ([tokens, layers, top_k]) where it returns one (vLLM's
    `enable_return_routed_experts`)."""
    index: int = -1
    """Position in the workload (the driver returns records in this order)."""
    http_status: int | None = None
    token_source: str | None = None
    """HTTP: usage | logprobs | token_ids | events | response: how tokens per chunk were known."""
    streamed: bool = True
    """False when an HTTP server answered with one body (every token arrived at once)."""

    @classmethod
    def of(cls, prompt: Prompt, arrival_ns: int, engine_req_id: str | None = None) -> RequestRecord:
        """The record of `prompt` handed to an engine at `arrival_ns`."""
        return cls(
            prompt.req_id, prompt.sample, arrival_ns, engine_req_id=engine_req_id,
            prompt_ids=list(prompt.token_ids), max_new_tokens=prompt.max_new_tokens,
        )  # fmt: skip

    def add_tokens(self, now_ns: int, ids: Sequence[int]) -> None:
        """`ids` arrived at `now_ns` (one chunk)."""
        if not ids:
            return
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
        self.chunk_times_ns.append(now_ns)
        self.chunk_tokens.append(len(ids))
        self.output_ids.extend(ids)

    def reset_attempt(self) -> None:
        """Forget a failed attempt before a retry (its timings do not describe the outcome)."""
        self.first_token_ns = self.finish_ns = None
        self.prompt_tokens = self.output_tokens = self.cached_prompt_tokens = None
        self.chunk_times_ns, self.chunk_tokens, self.output_ids = [], [], []
        self.finish_reason = self.error = self.engine_req_id = self.http_status = self.token_source = None
        self.text, self.reasoning = [], []

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_ns is not None

    @property
    def prompt_token_count(self) -> int | None:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return None if self.prompt_ids is None else len(self.prompt_ids)

    @property
    def output_token_count(self) -> int | None:
        if self.output_tokens is not None:
            return self.output_tokens
        if self.prompt_ids is not None or self.output_ids:
            return len(self.output_ids)
        return None

    def output_text(self, tokenizer: Any | None = None) -> str | None:
        """The output: streamed text (reasoning in front, in the `<think>` tags the scorers strip), else
        the output ids decoded (`tokenizer`) or as a JSON list; None when neither arrived."""
        if self.text or self.reasoning:
            content = "".join(self.text)
            return f"<think>{''.join(self.reasoning)}</think>{content}" if self.reasoning else content
        if self.output_ids:
            if tokenizer is not None:
                return tokenizer.decode(self.output_ids, skip_special_tokens=True)
            return json.dumps(self.output_ids, separators=(",", ":"))
        return None

    def requests_row(self) -> dict[str, Any]:
        """The `requests` row (docs/trace-format.md)."""
        engine_id = self.engine_req_id if self.engine_req_id not in (None, self.req_id) else None
        return {
            "req_id": self.req_id,
            "engine_req_id": engine_id,
            "sample_id": self.sample.sample_id,
            "arrival_ns": self.arrival_ns,
            "first_token_ns": self.first_token_ns,
            "finish_ns": self.finish_ns,
            "prompt_tokens": self.prompt_token_count,
            "output_tokens": self.output_token_count,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "chunk_times_ns": self.chunk_times_ns or None,
            "chunk_tokens": self.chunk_tokens or None,
            "queue_ns": self.queue_ns,
            "preemptions": None,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "retries": self.retries,
        }

    def outputs_row(self, tokenizer: Any | None = None) -> dict[str, Any]:
        """The `outputs` row; output ids are decoded with `tokenizer` (else written as a JSON list)."""
        return {
            "req_id": self.req_id,
            "sample_id": self.sample.sample_id,
            "dataset": self.sample.dataset,
            "prompt": self.sample.prompt_text if self.prompt_sent is None else self.prompt_sent,
            "output": self.output_text(tokenizer),
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
