"""The trace tables of format v1: the single source of truth for columns, types, units and nullability.

Each table is a list of `Column`s; `arrow_schema(table)` turns it into a `pyarrow.Schema` whose fields
carry their unit and description as field metadata, so every file documents itself. The docs page
`docs/trace-format.md` is generated from these objects (`python -m moecap.schemas.docs`).

Clock: every `*_ns` time column is the recording host's `time.monotonic_ns()`; the run metadata's
`clock` anchor and each record batch's `moecap.batch` metadata pair a monotonic reading with Unix
time, so the analyzer maps them to wall time (and client and engine rows of one host share a clock).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = "1.1.0"
"""Semver of the trace format. Readers accept any 1.x (newer minors with a warning) and reject 2.x."""

PHASES = ("prefill", "decode", "mixed", "idle", "verify")
"""Values of `steps.phase`: prefill = every request in the step is in its prompt phase; decode = none
is; mixed = both; idle = a dummy / zero-token pass (DP padding); verify = speculative-decode verification."""


@dataclass(frozen=True)
class Column:
    """One column of a trace table."""

    name: str
    type: pa.DataType
    nullable: bool
    unit: str
    description: str


def _c(name: str, type_: pa.DataType, nullable: bool, unit: str, description: str) -> Column:
    return Column(name, type_, nullable, unit, description)


_PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())

TABLES: dict[str, tuple[Column, ...]] = {
    "steps": (
        _c(
            "step",
            pa.int64(),
            False,
            "",
            "The engine's own step key (vLLM EngineCore step, SGLang forward_pass_id, "
            "HF batch-processor step), so ranks align and a lost batch shifts nothing.",
        ),
        _c("t_start_ns", pa.int64(), False, "ns (host monotonic)", "Host time when the step was launched."),
        _c(
            "t_end_ns",
            pa.int64(),
            False,
            "ns (host monotonic)",
            "Host time when the step's launch call returned "
            "(under asynchronous engines this bounds CPU dispatch, not GPU execution).",
        ),
        _c(
            "gpu_start_ns",
            pa.int64(),
            True,
            "ns (host monotonic)",
            "Start of the step's GPU span from CUDA events, "
            "mapped to the host clock. Metrics use the GPU span where present.",
        ),
        _c(
            "gpu_end_ns",
            pa.int64(),
            True,
            "ns (host monotonic)",
            "End of the step's GPU span from CUDA events.",
        ),
        _c("phase", _PHASE_TYPE, False, "", "prefill | decode | mixed | idle | verify (see PHASES)."),
        _c("is_draft", pa.bool_(), False, "", "True for a speculative-decoding draft-model pass."),
        _c("num_reqs", pa.int32(), False, "requests", "Requests in the batch."),
        _c(
            "num_tokens",
            pa.int32(),
            False,
            "tokens",
            "Tokens computed this step (sum of req_new_tokens; "
            "includes draft tokens being verified; excludes padding).",
        ),
        _c("req_ids", pa.list_(pa.string()), False, "", "Engine request ids in batch order."),
        _c(
            "req_prefix_lens",
            pa.list_(pa.int32()),
            False,
            "tokens",
            "Per request: tokens already in the KV cache "
            "before this step (prefix-cache hits and earlier chunks included).",
        ),
        _c(
            "req_new_tokens", pa.list_(pa.int32()), False, "tokens", "Per request: tokens computed this step."
        ),
        _c(
            "req_num_logits",
            pa.list_(pa.int16()),
            True,
            "rows",
            "Per request: logit rows sampled this step (0 for a "
            "non-final prefill chunk; >1 under speculative decoding). Null where the engine does not say.",
        ),
        _c(
            "req_spec_tokens",
            pa.list_(pa.int16()),
            True,
            "tokens",
            "Per request: draft tokens verified this step "
            "(included in req_new_tokens). Null without speculative decoding.",
        ),
    ),
    "experts": (
        _c("step", pa.int64(), False, "", "Joins steps.step of the same file rank."),
        _c(
            "counts",
            pa.list_(pa.int32()),
            False,
            "tokens",
            "Tokens routed to each expert, flat, layer-major: "
            "index = moe_layer_index * num_experts + expert (layers in run.moe.layer_ids order, restricted to this "
            "file's layer range). Real tokens only (no padding); one token counts once per top-k choice.",
        ),
    ),
    "requests": (
        _c(
            "req_id",
            pa.string(),
            False,
            "",
            "The driver's request id (sent to the engine: X-Request-Id / rid).",
        ),
        _c("engine_req_id", pa.string(), True, "", "The engine's id for the request, where it differs."),
        _c("sample_id", pa.string(), True, "", "Dataset sample id (joins outputs.sample_id)."),
        _c(
            "arrival_ns",
            pa.int64(),
            False,
            "ns (host monotonic)",
            "When the client sent the request (drive: just before its HTTP client sends it; run: handed to the engine).",
        ),
        _c("first_token_ns", pa.int64(), True, "ns (host monotonic)", "When the first output token arrived."),
        _c(
            "finish_ns",
            pa.int64(),
            True,
            "ns (host monotonic)",
            "When the last byte of the response arrived.",
        ),
        _c(
            "prompt_tokens",
            pa.int32(),
            True,
            "tokens",
            "Prompt length (from usage where the server reports it).",
        ),
        _c("output_tokens", pa.int32(), True, "tokens", "Generated tokens (from usage where reported)."),
        _c("cached_prompt_tokens", pa.int32(), True, "tokens", "Prompt tokens served from the prefix cache."),
        _c(
            "chunk_times_ns",
            pa.list_(pa.int64()),
            True,
            "ns (host monotonic)",
            "Arrival time of every streamed chunk that carried tokens.",
        ),
        _c(
            "chunk_tokens",
            pa.list_(pa.int32()),
            True,
            "tokens",
            "Tokens carried by each chunk (a chunk can carry several).",
        ),
        _c(
            "queue_ns",
            pa.int64(),
            True,
            "ns",
            "Time queued in the engine before the first scheduled step, where the engine says.",
        ),
        _c("preemptions", pa.int32(), True, "", "Times the engine preempted the request, where it says."),
        _c(
            "finish_reason",
            pa.string(),
            True,
            "",
            "stop | length | abort | error … as the engine reports it.",
        ),
        _c("error", pa.string(), True, "", "Error text for a failed request; null when it succeeded."),
        _c("retries", pa.int16(), False, "", "Retries the client made before this outcome."),
    ),
    "outputs": (
        _c("req_id", pa.string(), False, "", "Joins requests.req_id."),
        _c("sample_id", pa.string(), True, "", "Dataset sample id."),
        _c("dataset", pa.string(), True, "", "Dataset name (gsm8k, numinamath, …)."),
        _c("prompt", pa.string(), False, "", "Prompt text as sent (after any chat template)."),
        _c("output", pa.string(), True, "", "Generated text; null when the request failed."),
        _c("reference", pa.string(), True, "", "Reference answer for scoring."),
    ),
    "gpu_samples": (
        _c("t_ns", pa.int64(), False, "ns (host monotonic)", "Sample time."),
        _c("gpu_index", pa.int16(), False, "", "CUDA/NVML device index on the host."),
        _c("gpu_uuid", pa.string(), False, "", "GPU UUID (as NVML reports it)."),
        _c("power_w", pa.float32(), True, "W", "Instantaneous board power."),
        _c("energy_mj", pa.int64(), True, "mJ", "NVML total energy counter since driver load."),
        _c("sm_clock_mhz", pa.int32(), True, "MHz", "SM clock."),
        _c("mem_clock_mhz", pa.int32(), True, "MHz", "Memory clock."),
        _c("memory_used_bytes", pa.int64(), True, "bytes", "Device memory in use."),
        _c("gpu_util_pct", pa.float32(), True, "%", "NVML GPU utilisation (share of time a kernel ran)."),
        _c("mem_util_pct", pa.float32(), True, "%", "NVML memory-controller utilisation."),
    ),
}

TABLE_KINDS = tuple(TABLES)


def arrow_schema(table: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of `table`, each field carrying its unit and description as metadata."""
    columns = TABLES[table]
    fields = [
        pa.field(c.name, c.type, nullable=c.nullable, metadata={"unit": c.unit, "description": c.description})
        for c in columns
    ]
    return pa.schema(fields, metadata=metadata)


def required_columns(table: str) -> tuple[str, ...]:
    """Column names every file of `table` must have."""
    return tuple(c.name for c in TABLES[table])
