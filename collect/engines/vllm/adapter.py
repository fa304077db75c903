"""vLLM engine adapter: a `vllm.general_plugins` plugin recording one `steps` row (and one `experts` row)
per forward pass in every worker process.

    MOECAP_TRACE_DIR=traces/ vllm serve Qwen/Qwen1.5-MoE-A2.7B      # or: moecap-collect serve --engine vllm …

`register()` (the entry point `moecap = "moecap.collect.engines.vllm:register"`) runs in every vLLM
process; it does nothing unless `MOECAP_TRACE_DIR` is set, and patches the real
`vllm.v1.worker.gpu_worker.Worker` class once per process (when vLLM imports it), so every worker —
in-process, one per TP/PP rank, one per DP rank — records:

- AFTER `load_model` (before graphs are captured): find the MoE layers of the target model, allocate
  a `[max_tokens, n_moe_layers, top_k]` int32 device buffer, and bind a capture callback to every
  router (`BaseRouter.set_capture_fn`): it copies the layer's logical `topk_ids` into the buffer, a
  fixed-shape in-place copy that CUDA graphs record and replay.
- AROUND `execute_model(scheduler_output)`: a pure function (`snapshot_batch`) turns the real
  `SchedulerOutput` into the batch composition (request ids, new tokens, tokens already cached,
  per-request phase, spec tokens, logit rows); a CUDA event marks the start on the engine's stream.
- AROUND `sample_tokens` (or right after `execute_model` when it returned its output itself): rows
  `[:num_real_tokens]` of the buffer are counted into `[layers, experts]` (padding rows never count):
  a small step's rows (≤ HOST_COUNT_MAX_IDS ids) are copied as they are to pinned host memory with
  `non_blocking=True` and counted there once ready (no count kernels on the engine's stream); a large
  step's are counted with `index_add_` outside any graph and the counts copied. A CUDA event marks
  the end. Rows are emitted once their event has completed (checked at the next
  step, drained at shutdown): the plugin never synchronises the device on the hot path.
- `execute_dummy_batch` (idle data-parallel ranks) makes an `idle` row.

TP rank 0 of every pipeline stage and every data-parallel rank writes its own files
(`<run_id>.dp{d}-pp{p}-tp0.steps.arrow`, `….experts.arrow`) with its rank in the run metadata; the
other TP ranks bind the capture (sequence-parallel MoE gathers rows across them) but write nothing.
A monolithic MoE kernel that hides its routing, or a capture that fails, never stops the engine:
steps are still recorded and the metadata says why counts are missing.

Environment (set by `moecap-collect run|serve`, or by hand):
`MOECAP_TRACE_DIR` (on/off and where), `MOECAP_RUN_ID` (shared by all processes of a run; set by the
first process that registers when absent), `MOECAP_COUNTS=0` (steps only), `MOECAP_STRICT_ENGINE=1`
(refuse an untested vLLM), `MOECAP_MODEL_ID`, `MOECAP_WORKLOAD` (JSON for the run metadata).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from moecap.schemas import (
    EngineInfo,
    ModelInfo,
    MoEInfo,
    Parallelism,
    RankIdentity,
    RunMetadata,
    new_run_id,
)

from ... import runtime
from ...counting import ReadyStep, StepReadback
from ...errors import CollectError
from ...workload import WARMUP_PREFIX
from ...writers import EngineTraceFiles

# The environment contract shared by the engine adapters (re-exported: `adapter.ENV_*`).
from ..tracing_env import (
    ENV_COUNTS,  # noqa: F401
    ENV_MODEL_ID,
    ENV_RUN_ID,
    ENV_STRICT,
    ENV_TRACE_DIR,
    ENV_WORKLOAD,  # noqa: F401
    TracerSettings,
)
from . import compat

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("moecap.collect.engines.vllm")


_PATCH_MARK = "_moecap_patched"
_WRAPPED_MARK = "__moecap_wrapped__"
_PATCHED_METHODS = (
    "load_model",
    "initialize_from_config",
    "compile_or_warm_up_model",
    "execute_model",
    "sample_tokens",
    "execute_dummy_batch",
    "shutdown",
)


# ---------------------------------------------------------------------------------------------------
# Batch composition: a pure function of the real SchedulerOutput (+ what earlier steps told us)
# ---------------------------------------------------------------------------------------------------
@dataclass
class RequestTracker:
    """What the worker remembers about requests between steps.

    `targets[rid]` = tokens the request must have in the KV cache before it samples: its prompt, or,
    after a preemption, its prompt plus the outputs it had (the recomputation is a prefill). vLLM sends
    a request's prompt only in the step that schedules it first (`NewRequestData`); later steps carry
    only `CachedRequestData`. Finished ids arrive one step late and are forgotten then.
    """

    targets: dict[str, int] = field(default_factory=dict)
    prompt_lens: dict[str, int] = field(default_factory=dict)

    def observe(self, so: Any) -> None:
        """Update from one `SchedulerOutput` (call before `snapshot_batch` reads it)."""
        for rid in so.finished_req_ids or ():
            self.targets.pop(rid, None)
            self.prompt_lens.pop(rid, None)
        for new in so.scheduled_new_reqs:
            self.prompt_lens[new.req_id] = compat.new_request_prompt_len(new)
            self.targets[new.req_id] = compat.new_request_target_len(new)
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        if resumed:
            all_tokens = getattr(cached, "all_token_ids", None) or {}
            for i, rid in enumerate(cached.req_ids):
                if rid not in resumed:
                    continue
                if rid in all_tokens:
                    self.targets[rid] = len(all_tokens[rid])
                elif rid in self.prompt_lens:
                    self.targets[rid] = self.prompt_lens[rid] + int(cached.num_output_tokens[i])


def snapshot_batch(so: Any, tracker: RequestTracker) -> dict[str, Any]:
    """The batch composition of one step as a partial `steps` row (no step key, no times).

    Per request, in the scheduler's order (`num_scheduled_tokens`): tokens computed this step (draft
    tokens included), tokens already in the KV cache (`num_computed_tokens`, which vLLM reports before
    the step: prefix-cache hits and earlier chunks), draft tokens verified, and logit rows sampled (0
    for a non-final prefill chunk, 1 + drafts otherwise). A request is prefilling while its cache holds
    fewer tokens than its target (`RequestTracker`). Phase: `idle` (nothing scheduled), `prefill` /
    `decode` when every request is in that phase, `verify` for a decode step that verifies drafts,
    `mixed` otherwise. Call `tracker.observe(so)` first.
    """
    counts: dict[str, int] = so.num_scheduled_tokens
    req_ids = list(counts)
    new_tokens = list(map(int, counts.values()))
    before: dict[str, int] = {}
    news = so.scheduled_new_reqs
    for new in news:
        before[new.req_id] = int(new.num_computed_tokens)
    cached = so.scheduled_cached_reqs
    if cached.req_ids:
        before.update(zip(cached.req_ids, map(int, cached.num_computed_tokens)))
    get_before = before.get
    prefix = [get_before(r, 0) for r in req_ids]
    spec_map = so.scheduled_spec_decode_tokens or {}
    spec = [len(spec_map.get(r, ())) for r in req_ids] if spec_map else [0] * len(req_ids)
    targets = tracker.targets
    logits: list[int] | None = []
    prefilling = 0
    context: dict[str, bool] | None = None
    for rid, n, p, sp in zip(req_ids, new_tokens, prefix, spec):
        target = targets.get(rid)
        if target is None:
            if context is None:  # vLLM's own rule (CachedRequestData.is_context_phase): no output yet
                context = {new.req_id: True for new in news}
                context.update(zip(cached.req_ids, (int(x) == 0 for x in cached.num_output_tokens)))
            is_prefill = context.get(rid, True)
            logits = None
        else:
            is_prefill = p < target
            if logits is not None:
                logits.append(1 + sp if p + n >= target else 0)
        prefilling += is_prefill
    n_reqs = len(req_ids)
    total = int(so.total_num_scheduled_tokens)
    if n_reqs == 0 or total == 0:
        phase = "idle"
    elif prefilling == n_reqs:
        phase = "prefill"
    elif prefilling == 0:
        phase = "verify" if any(spec) else "decode"
    else:
        phase = "mixed"
    return {
        "phase": phase,
        "is_draft": False,
        "num_reqs": n_reqs,
        "num_tokens": total,
        "req_ids": req_ids,
        "req_prefix_lens": prefix,
        "req_new_tokens": new_tokens,
        "req_num_logits": logits,
        "req_spec_tokens": spec if spec_map else None,
    }


def idle_row() -> dict[str, Any]:
    """The row of a dummy forward pass (an idle data-parallel rank keeping its peers company)."""
    return {
        "phase": "idle",
        "is_draft": False,
        "num_reqs": 0,
        "num_tokens": 0,
        "req_ids": [],
        "req_prefix_lens": [],
        "req_new_tokens": [],
        "req_num_logits": [],
        "req_spec_tokens": None,
    }


# ---------------------------------------------------------------------------------------------------
# Device side: capture in-graph, count outside
# ---------------------------------------------------------------------------------------------------
def copy_topk_rows(buffer: torch.Tensor, slot: int, topk_ids: torch.Tensor, offset: int = 0) -> None:
    """Copy one layer's routing (`topk_ids`, [rows, top_k]) into `buffer[offset:, slot]`, in place.

    Runs inside the forward pass, so inside CUDA graphs and compiled regions: shapes come from
    `topk_ids.shape` and the buffer's fixed size only, never from tensor values. Rows beyond the
    buffer are dropped (they can only be padding)."""
    cap = buffer.shape[0] - offset
    n = min(int(topk_ids.shape[0]), cap)
    k = min(int(topk_ids.shape[1]), int(buffer.shape[2]))
    if n > 0:
        buffer[offset : offset + n, slot, :k].copy_(topk_ids[:n, :k])


@dataclass
class CountPlan:
    """Preallocated tensors for `count_topk_rows` over a `[max_tokens, L, K]` routing buffer into
    `[L, E + 2]` counts: per layer, column 0 takes ids below 0 (an unused top-k column, padding), columns
    1..E the experts, column E + 1 ids of E and above (a zero-expert id). Flat index of id `x` in layer `l`:
    clamp(x + l(E+2) + 1, l(E+2), l(E+2) + E + 1)."""

    base: Any
    lo: Any
    hi: Any
    scratch: Any
    ones: Any

    @classmethod
    def make(cls, num_layers: int, num_experts: int, top_k: int, max_tokens: int, device: Any) -> CountPlan:
        import torch

        width = num_experts + 2
        start = torch.arange(num_layers, dtype=torch.int32, device=device).mul_(width).view(1, num_layers, 1)
        return cls(
            base=start + 1,
            lo=start.clone(),
            hi=start + (num_experts + 1),
            scratch=torch.empty((max_tokens, num_layers, top_k), dtype=torch.int32, device=device),
            ones=torch.ones(max_tokens * num_layers * top_k, dtype=torch.int32, device=device),
        )


def count_topk_rows(counts: torch.Tensor, buffer: torch.Tensor, n: int, plan: CountPlan) -> None:
    """Add the first `n` token rows of `buffer` ([max_tokens, L, K] expert ids) to `counts`
    ([L, E + 2] int32, contiguous; layout in `CountPlan`), in place: three device ops into preallocated
    memory. Each row adds 1 per top-k choice (a duplicated id counts twice); readers keep columns 1..E.
    Runs after the forward, outside any graph; `n` is a host integer, so no device sync."""
    if n <= 0:
        return
    import torch

    idx = plan.scratch[:n]
    torch.add(buffer[:n], plan.base, out=idx)
    idx.clamp_(plan.lo, plan.hi)
    counts.view(-1).index_add_(0, idx.view(-1), plan.ones[: idx.numel()])


HOST_COUNT_MAX_IDS = 16384
"""Steps whose real routing rows hold at most this many ids (tokens x layers x top_k; 64 KiB of int32)
are counted on the host (`count_rows_on_host`): one device-to-host copy and no count kernels on the
engine's stream, which matters where a step is short (batch 1 decode: ~3 ms); larger steps are
counted on the device (`count_topk_rows`), where one copy of every row would cost more than the count."""

COUNT_ON = ("auto", "device", "host")
"""Where a step's routing rows are counted: `auto` (host up to HOST_COUNT_MAX_IDS, else device)."""


def count_rows_on_host(raw: np.ndarray, n: int, num_layers: int, num_experts: int, top_k: int) -> np.ndarray:
    """`count_topk_rows` on the host: the first `n` token rows of a flat copy of the routing buffer
    (`[n, L, K]` int32, row-major) counted into the same `[L, E + 2]` int32 layout (column 0: ids
    below 0, 1..E the experts, E + 1: ids of E and above), so both paths give identical counts."""
    width = num_experts + 2
    ids = raw[: n * num_layers * top_k].reshape(n, num_layers, top_k).astype(np.int64)
    np.clip(ids, -1, num_experts, out=ids)
    ids += (np.arange(num_layers, dtype=np.int64) * width + 1).reshape(1, num_layers, 1)
    counts = np.bincount(ids.ravel(), minlength=num_layers * width)
    return counts.astype(np.int32).reshape(num_layers, width)


def restore_local_rows(
    topk_ids: Any,
    *,
    tokens_per_dp: list[int] | None,
    shard_sizes: list[int] | None,
    local_tokens: int | None,
    dp_rank: int,
    tp_size: int,
    gather: Callable[[Any], Any] | None,
) -> tuple[Any, str]:
    """This DP rank's token rows of a layer's `topk_ids`, whatever layout the MoE layer saw.

    Layouts (as vLLM's `RoutedExpertsCapturer` restores them): every DP rank's tokens concatenated
    (naive dispatch) → slice ours; gathered DP×TP shards → slice ours; ours only → as is; a
    sequence-parallel TP shard → all-gather across the TP group (every TP rank binds, so the
    collective is matched). Returns (rows, layout name); an unknown layout passes through as 'unknown'.
    """
    n = int(topk_ids.shape[0])
    if tokens_per_dp is not None and len(tokens_per_dp) > 1:
        mine = tokens_per_dp[dp_rank]
        if n == sum(tokens_per_dp):
            end = sum(tokens_per_dp[: dp_rank + 1])
            return topk_ids[end - mine : end], "dp-concatenated"
        if n == mine:
            return topk_ids, "local"
        if shard_sizes and n == sum(shard_sizes) and len(shard_sizes) % len(tokens_per_dp) == 0:
            per = len(shard_sizes) // len(tokens_per_dp)
            start = sum(shard_sizes[: dp_rank * per])
            return topk_ids[start : start + mine], "dp-gathered-shards"
        local_tokens = mine
    if local_tokens is None or n == local_tokens:
        return topk_ids, "local"
    if tp_size > 1 and gather is not None and n == -(-local_tokens // tp_size):
        return gather(topk_ids)[:local_tokens], "sp-gathered"
    if n > local_tokens:
        return topk_ids[:local_tokens], "local-padded"
    return topk_ids, "unknown"


# ---------------------------------------------------------------------------------------------------
# The per-worker tracer
# ---------------------------------------------------------------------------------------------------
@dataclass
class _OpenStep:
    slot: int
    row: dict[str, Any]
    n_real: int
    stream: Any


class VllmTracer(EngineTraceFiles):
    """Records the steps of one vLLM worker. Created by the patched `Worker.load_model`."""

    def __init__(self, worker: Any, settings: TracerSettings) -> None:
        import torch

        self._torch = torch
        self.worker = worker
        self.settings = settings
        self.vllm_config = worker.vllm_config
        self.ranks = compat.rank_info(self.vllm_config)
        self.is_recorder = self.ranks.tp_rank == 0
        self.active = self.is_recorder
        """Records steps (TP rank 0); the other TP ranks only bind the capture (matched collectives)."""
        self.warming = False
        """True while vLLM warms up / captures graphs (made-up requests, not recorded)."""
        self.paused = False
        """True while the client warms the engine up (`moecap_control("pause")`): steps not recorded."""
        self.device = torch.device(getattr(worker, "device", None) or "cpu")
        self.tracker = RequestTracker()
        self.kv_by_layer: dict[int, int] = {}
        self.capture_layouts: set[str] = set()
        self.capture_errors: list[str] = []
        self.invalid_ids = 0
        self.step_key = 0
        self.steps_recorded = 0
        self.steps_written = 0
        self.warmup_steps_skipped = 0
        """Steps of a client's warm-up (`is_client_warmup`), not recorded."""
        self.writers: Any = None
        self.metadata: RunMetadata | None = None
        self._open: _OpenStep | None = None
        self._host: tuple[list[Any], dict[str, Any]] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._layers: list[compat.MoELayer] = []
        self._capture_fns: list[Callable[[Any], None]] = []
        self.buffer: torch.Tensor | None = None
        self.plan: CountPlan | None = None
        self.counts_reason: str | None = None
        self._setup_moe(torch)
        self.counting = self.buffer is not None
        self.readback = StepReadback(
            self.device,
            len(self.layer_ids) if self.counting else 0,
            self.num_experts + 2 if self.counting else 0,
            max_tokens=1,
            ring=settings.ring,
            with_counts=self.counting and self.active,
            counts_capacity=HOST_COUNT_MAX_IDS if self.counting else 0,
        )
        self.count_on = settings.count_on if settings.count_on in COUNT_ON else "auto"
        self.steps_counted_on_host = 0
        _LIVE.add(self)

    # -- MoE layout and buffers --------------------------------------------------------------------
    def _setup_moe(self, torch: Any) -> None:
        self.layer_ids: list[int] = []
        self.num_experts = 0
        self.top_k = 0
        model = compat.worker_model(self.worker)
        self.layer_start, self.layer_end = compat.layer_range(model)
        limit = compat.num_hidden_layers(self.vllm_config)
        found: dict[int, compat.MoELayer] = {}
        hidden: list[str] = []
        for layer in compat.find_moe_layers(model):
            if limit is not None and layer.layer_id >= limit:
                continue  # MTP / draft layers appended after the decoder stack
            if layer.layer_id in found:
                log.warning(
                    "moecap: two MoE layers claim decoder layer %d; counting the first", layer.layer_id
                )
                continue
            found[layer.layer_id] = layer
            if layer.kind == "none":
                hidden.append(f"layer {layer.layer_id}: {layer.reason}")
        layers = [found[k] for k in sorted(found)]
        self.layer_ids = [layer.layer_id for layer in layers]
        self._layers = layers
        self.num_experts = compat.config_num_experts(self.vllm_config) or max(
            (int(layer.num_experts or 0) for layer in layers), default=0
        )
        self.top_k = max((int(layer.top_k or 0) for layer in layers), default=0) or (
            compat.config_top_k(self.vllm_config) or 0
        )
        if not self.settings.counts:
            self.counts_reason = "expert counting disabled (MOECAP_COUNTS=0)"
        elif not layers:
            self.counts_reason = "the model has no MoE layers vLLM routes through a router this adapter knows"
        elif hidden:
            self.counts_reason = "routing not capturable: " + "; ".join(hidden[:3])
        elif self.num_experts <= 0 or self.top_k <= 0:
            self.counts_reason = f"unknown expert count ({self.num_experts}) or top-k ({self.top_k})"
        if self.counts_reason is not None:
            return
        max_tokens = compat.max_step_tokens(self.vllm_config)
        self.buffer = torch.full(
            (max_tokens, len(layers), self.top_k), -1, dtype=torch.int32, device=self.device
        )
        self.plan = CountPlan.make(len(layers), self.num_experts, self.top_k, max_tokens, self.device)
        self._capture_fns = [self._capture_fn(slot) for slot in range(len(layers))]
        self.bind()

    def bind(self) -> None:
        """Bind (again) the capture callbacks, after any vLLM bound since (vLLM 0.26 binds its own
        routed-experts capturer in `initialize_from_config`, replacing ours): both keep running."""
        for layer, fn in zip(self._layers, self._capture_fns):
            if layer.kind != "none" and not getattr(compat.current_capture(layer), "__moecap__", False):
                compat.bind_capture(layer, fn)

    def _capture_fn(self, slot: int) -> Callable[[Any], None]:
        buffer = self.buffer
        ranks = self.ranks
        tracer_ref = weakref.ref(self)

        def capture(topk_ids: Any) -> None:
            # Runs inside vLLM's forward (eagerly, or once while a CUDA graph records it). It must
            # never raise into the engine: a failure disables counts for the run, with the reason.
            tracer = tracer_ref()
            if tracer is None or buffer is None:
                return
            try:
                per_dp, shards, local = compat.forward_layout()
                rows, layout = restore_local_rows(
                    topk_ids,
                    tokens_per_dp=per_dp,
                    shard_sizes=shards,
                    local_tokens=local,
                    dp_rank=ranks.dp_rank,
                    tp_size=ranks.tp_size,
                    gather=compat.tp_all_gather if ranks.tp_size > 1 else None,
                )
                tracer.capture_layouts.add(layout)
                copy_topk_rows(buffer, slot, rows, compat.ubatch_token_offset())
            except Exception as exc:  # pragma: no cover - defensive
                if len(tracer.capture_errors) < 8:
                    tracer.capture_errors.append(f"{type(exc).__name__}: {exc}")

        capture.__moecap__ = True  # type: ignore[attr-defined]
        return capture

    def unbind(self) -> None:
        for layer in self._layers:
            if layer.kind != "none":
                with contextlib.suppress(Exception):
                    compat.bind_capture(layer, None)

    # -- steps --------------------------------------------------------------------------------------
    def _stream(self) -> Any:
        if self.device.type != "cuda":
            return None
        import torch

        return torch.cuda.current_stream(self.device)

    def begin_step(self, row: dict[str, Any], n_real: int) -> None:
        """Open a step (closing one left open) and record its start on the engine's stream."""
        if self._open is not None:
            self.end_step()
        self.drain()
        stream = self._stream()
        slot = self.readback.begin(stream, zero_counts=False)  # zeroed in end_step, next to the count
        row["step"] = self.step_key
        row["t_start_ns"] = time.monotonic_ns()
        self.step_key += 1
        self._open = _OpenStep(slot, row, n_real, stream)

    def begin_batch(self, so: Any) -> None:
        self.tracker.observe(so)
        row = snapshot_batch(so, self.tracker)
        self.begin_step(row, int(so.total_num_scheduled_tokens))

    def end_step(self) -> None:
        """Count the step's real rows and queue its readback (no host synchronisation)."""
        step, self._open = self._open, None
        if step is None:
            return
        if self.readback.with_counts and self.buffer is not None:
            n = max(0, min(step.n_real, int(self.buffer.shape[0])))
            ids = n * int(self.buffer.shape[1]) * int(self.buffer.shape[2])
            if self.count_on == "host" or (self.count_on == "auto" and ids <= HOST_COUNT_MAX_IDS):
                if ids > HOST_COUNT_MAX_IDS:  # forced host mode: never copy past the pinned slot
                    n = HOST_COUNT_MAX_IDS // (int(self.buffer.shape[1]) * int(self.buffer.shape[2]))
                    ids = n * int(self.buffer.shape[1]) * int(self.buffer.shape[2])
                # One device-to-host copy of the real rows; `_emit` counts them (count_rows_on_host).
                step.row["_moecap_host_rows"] = n
                step.row["t_end_ns"] = time.monotonic_ns()
                self.readback.end(step.slot, step.row, step.stream, counts=self.buffer.view(-1)[:ids])
            else:
                # The buffers may be inference tensors (vLLM's own context): in-place ops need the mode.
                with self._torch.inference_mode():
                    self.readback.counts.zero_()
                    if n > 0:
                        count_topk_rows(self.readback.counts, self.buffer, n, self.plan)
                    step.row["t_end_ns"] = time.monotonic_ns()
                    self.readback.end(step.slot, step.row, step.stream)
        else:
            step.row["t_end_ns"] = time.monotonic_ns()
            self.readback.end(step.slot, step.row, step.stream)
        self.steps_recorded += 1

    def abort_step(self) -> None:
        step, self._open = self._open, None
        if step is not None:
            self.readback.discard(step.slot)

    def drain(self, *, wait: bool = False) -> None:
        for item in self.readback.poll(wait=wait):
            self._emit(item)

    # -- rows ---------------------------------------------------------------------------------------
    def _emit(self, item: ReadyStep) -> None:
        row = item.payload
        row["gpu_start_ns"] = item.gpu_start_ns
        row["gpu_end_ns"] = item.gpu_end_ns
        host_rows = row.pop("_moecap_host_rows", None)
        counts = None
        if host_rows is not None and self.num_experts > 0 and not self.capture_errors:
            raw = item.counts if item.counts is not None else np.zeros(0, dtype=np.int32)  # 0-token step
            full = count_rows_on_host(raw, host_rows, len(self.layer_ids), self.num_experts, self.top_k)
            self.steps_counted_on_host += 1
        elif item.counts is not None and self.num_experts > 0 and not self.capture_errors:
            full = item.counts.reshape(len(self.layer_ids), self.num_experts + 2)
        else:
            full = None
        if full is not None:
            self.invalid_ids += int(full[:, 0].sum() + full[:, -1].sum())
            counts = full[:, 1:-1].reshape(-1)  # a copy (not contiguous): the slot is reused
        writers = self.open_writers()
        if writers is None:
            return
        writers.step(row, counts)
        self.steps_written += 1

    def host_facts(self) -> tuple[list[Any], dict[str, Any]]:
        """(GPUs this worker's rows stand for, host facts), read once."""
        if self._host is None:
            gpus = runtime.gpu_infos() if self.device.type == "cuda" else []
            used = []
            if gpus:
                stage = {rank % len(gpus) for rank in self.ranks.tp_group_ranks}
                used = [g for g in gpus if g.index in stage] or gpus[:1]
            self._host = (used, runtime.host_facts())
        return self._host

    def build_metadata(self) -> RunMetadata:
        vc = self.vllm_config
        r = self.ranks
        version = compat.installed_version() or ""
        used, facts = self.host_facts()
        extra: dict[str, Any] = dict(facts)
        extra["vllm"] = {
            "profile": compat.profile().name,
            "capture": "BaseRouter.set_capture_fn -> [max_tokens, L, top_k] buffer, counted outside the graph",
            "count_on": self.count_on,
            "worker_rank": {"tp": r.tp_rank, "tp_size": r.tp_size},
        }
        problem = compat.version_problem(version) if version else None
        if problem:
            extra["warnings"] = [problem]
        kv = self._kv_list()
        counts_reason = self.counts_reason
        if self.counting and self.capture_errors:
            counts_reason = "capture failed: " + self.capture_errors[0]
        model_id = self.settings.model_id or str(
            getattr(vc.model_config, "served_model_name", None) or vc.model_config.model
        )
        load_format = str(getattr(getattr(vc, "load_config", None), "load_format", "")).lower()
        return RunMetadata(
            run_id=self.settings.run_id,
            engine=EngineInfo(name="vllm", version=version, args=compat.engine_args(vc)),
            model=ModelInfo(
                id=model_id,
                config=compat.model_config_dict(vc),
                dtypes=compat.dtypes(vc),
                quantization=compat.quantization(vc),
                kv_bytes_per_token_per_layer=kv,
                random_weights="dummy" in load_format,
            ),
            moe=MoEInfo(
                layer_ids=list(self.layer_ids),
                num_experts=self.num_experts,
                top_k=self.top_k,
                id_space="logical",
                counts_available=self.counting and not self.capture_errors,
                counts_unavailable_reason=counts_reason,
            ),
            gpus=used,
            parallelism=Parallelism(
                tp=r.tp_size, pp=r.pp_size, dp=r.dp_size, ep=r.ep_size, attention_dp=r.dp_size > 1
            ),
            rank=RankIdentity(
                dp=r.dp_rank,
                pp=r.pp_rank,
                tp=r.tp_rank,
                ep=r.ep_rank,
                layer_start=self.layer_start,
                layer_end=self.layer_end,
                gpu_uuids=[g.uuid for g in used if g.uuid],
            ),
            workload=dict(self.settings.workload),
            collector_version=runtime.collector_version(),
            extra=extra,
        )

    def _kv_list(self) -> list[int] | None:
        """KV bytes per token per decoder layer for the whole model (all TP ranks of a stage together:
        each rank holds its share of the heads, or a replica, which it reads all the same)."""
        layers = compat.num_hidden_layers(self.vllm_config)
        if not self.kv_by_layer or not layers:
            return None
        scale = max(1, self.ranks.tp_size)
        values = {k: v * scale for k, v in self.kv_by_layer.items()}
        if all(i in values for i in range(layers)):
            return [values[i] for i in range(layers)]
        distinct = set(values.values())
        if len(distinct) == 1:  # another pipeline stage's layers: same attention, same bytes
            return [distinct.pop()] * layers
        return None

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the open step, wait for the GPU (shutdown only) and close the files. Idempotent."""
        with self._lock:
            if self._closed and self.writers is None:
                return
            try:
                if self._open is not None:
                    self.end_step()
                self.drain(wait=True)
            except Exception as exc:  # pragma: no cover - shutting down
                log.warning("moecap: could not drain the last steps (%s)", exc)
            self._closed = True
            writers, self.writers = self.writers, None
        if writers is not None:
            writers.close()
            if self.invalid_ids:
                log.warning(
                    "moecap: %d routed ids were outside [0, %d) and not counted",
                    self.invalid_ids,
                    self.num_experts,
                )

    def stats(self) -> dict[str, Any]:
        return {
            "rank": {"dp": self.ranks.dp_rank, "pp": self.ranks.pp_rank, "tp": self.ranks.tp_rank},
            "recorder": self.is_recorder,
            "steps_recorded": self.steps_recorded,
            "steps_written": self.steps_written,
            "warmup_steps_skipped": self.warmup_steps_skipped,
            "in_flight": self.readback.in_flight,
            "readback_waits": self.readback.waits,
            "counting": self.counting,
            "count_on": self.count_on,
            "steps_counted_on_host": self.steps_counted_on_host,
            "counts_reason": self.counts_reason,
            "capture_layouts": sorted(self.capture_layouts),
            "capture_errors": list(self.capture_errors),
            "invalid_ids": self.invalid_ids,
            "files": {k: str(v) for k, v in (self.writers.paths.items() if self.writers is not None else [])},
        }


_LIVE: weakref.WeakSet[VllmTracer] = weakref.WeakSet()


def _close_all() -> None:
    for tracer in list(_LIVE):
        with contextlib.suppress(Exception):
            tracer.close()


# ---------------------------------------------------------------------------------------------------
# Worker patches
# ---------------------------------------------------------------------------------------------------
def _tracer(worker: Any) -> VllmTracer | None:
    return worker.__dict__.get("_moecap_tracer")


def _wrap(original: Callable[..., Any], around: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return around(original, self, *args, **kwargs)

    setattr(wrapper, _WRAPPED_MARK, original)
    return wrapper


def _around_load_model(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(self, *args, **kwargs)
    settings = TracerSettings.from_env("vllm")
    if settings is not None and _tracer(self) is None:
        try:
            # After the weights, before profiling and graph capture: buffers exist before any graph
            # records the capture copies.
            self.__dict__["_moecap_tracer"] = VllmTracer(self, settings)
        except Exception as exc:
            log.error("moecap: tracing disabled in this worker (%s: %s)", type(exc).__name__, exc)
    return result


def _around_initialize_from_config(
    original: Callable[..., Any], self: Any, kv_cache_config: Any, *a: Any, **k: Any
) -> Any:
    result = original(self, kv_cache_config, *a, **k)
    tracer = _tracer(self)
    if tracer is not None:
        with contextlib.suppress(Exception):
            tracer.kv_by_layer = compat.kv_bytes_per_token_by_layer(kv_cache_config)
        if tracer.buffer is not None:
            tracer.bind()
        if tracer.active:
            # Off the hot path: GPU and package facts for the metadata (NVML, git) are read here,
            # the files open at the first step (after graph capture, whose capture errors they report).
            tracer.host_facts()
    return result


def _around_compile_or_warm_up_model(original: Callable[..., Any], self: Any, *a: Any, **k: Any) -> Any:
    # Model runner V2 warms up through the worker's own execute_model / sample_tokens with made-up
    # `_warmup_<i>_` requests: those passes serve nobody and are not recorded (nor counted as steps).
    tracer = _tracer(self)
    if tracer is not None:
        tracer.warming = True
    try:
        return original(self, *a, **k)
    finally:
        if tracer is not None:
            tracer.warming = False


def _recording(worker: Any) -> VllmTracer | None:
    tracer = _tracer(worker)
    if tracer is None or not tracer.active or tracer._closed or tracer.warming or tracer.paused:
        return None
    return tracer


def is_client_warmup(so: Any) -> bool:
    """Whether a step serves a client's warm-up: its first request's id holds `WARMUP_PREFIX` (drive's
    warm-up and residue ladder send it as X-Request-Id, which vLLM's server wraps as `cmpl-<id>-<i>`).
    A warm-up finishes before the workload starts, so the first request says it all (as SGLang's tracer
    judges a pass); one dict lookup per step."""
    first = next(iter(so.num_scheduled_tokens), None)
    return first is not None and WARMUP_PREFIX in first


def _around_execute_model(
    original: Callable[..., Any], self: Any, scheduler_output: Any, *a: Any, **k: Any
) -> Any:
    tracer = _recording(self)
    if tracer is None:
        return original(self, scheduler_output, *a, **k)
    if is_client_warmup(scheduler_output) and not tracer.settings.record_warmup:
        # Not recorded (as `run` pauses the tracer for its warm-up); the tracker still learns the step's
        # new and finished requests.
        tracer.tracker.observe(scheduler_output)
        tracer.warmup_steps_skipped += 1
        return original(self, scheduler_output, *a, **k)
    tracer.begin_batch(scheduler_output)
    try:
        result = original(self, scheduler_output, *a, **k)
    except BaseException:
        tracer.abort_step()
        raise
    if result is not None:
        # The output came back without sampling (nothing scheduled, pooling, a PP relay): the step
        # ends here; otherwise `sample_tokens` ends it.
        tracer.end_step()
    return result


def _around_sample_tokens(original: Callable[..., Any], self: Any, *a: Any, **k: Any) -> Any:
    result = original(self, *a, **k)
    tracer = _recording(self)
    if tracer is not None and tracer._open is not None:
        tracer.end_step()
    return result


def _around_execute_dummy_batch(original: Callable[..., Any], self: Any, *a: Any, **k: Any) -> Any:
    tracer = _recording(self)
    if tracer is None:
        return original(self, *a, **k)
    tracer.begin_step(idle_row(), 0)
    try:
        result = original(self, *a, **k)
    except BaseException:
        tracer.abort_step()
        raise
    tracer.end_step()
    return result


def _around_shutdown(original: Callable[..., Any], self: Any, *a: Any, **k: Any) -> Any:
    tracer = _tracer(self)
    if tracer is not None:
        try:
            tracer.close()
        except Exception as exc:  # pragma: no cover
            log.warning("moecap: closing the trace failed (%s)", exc)
    return original(self, *a, **k)


def moecap_control(self: Any, command: str = "stats", *args: Any) -> Any:
    """Worker RPC (`llm.collective_rpc("moecap_control", args=("stats",))`): stats | flush | close |
    pause | resume (pause: the steps until resume are not recorded, e.g. a client's warm-up) |
    count-on auto|device|host (where the routing rows are counted; same counts either way)."""
    tracer = _tracer(self)
    if tracer is None:
        return None
    if command == "pause":
        if tracer._open is not None:
            tracer.end_step()
        tracer.paused = True
    elif command == "resume":
        tracer.paused = False
    elif command == "count-on":
        if not args or args[0] not in COUNT_ON:
            raise ValueError(f"moecap_control('count-on', MODE): MODE must be one of {', '.join(COUNT_ON)}")
        tracer.count_on = args[0]
    elif command == "flush":
        tracer.drain()
        if tracer.writers is not None:
            for w in tracer.writers.writers.values():
                w.flush()
    elif command == "close":
        tracer.close()
    return tracer.stats()


_AROUND = {
    "load_model": _around_load_model,
    "initialize_from_config": _around_initialize_from_config,
    "compile_or_warm_up_model": _around_compile_or_warm_up_model,
    "execute_model": _around_execute_model,
    "sample_tokens": _around_sample_tokens,
    "execute_dummy_batch": _around_execute_dummy_batch,
    "shutdown": _around_shutdown,
}


def patch_worker_class(cls: Any) -> bool:
    """Wrap the Worker methods (idempotent: a class, or a method, is never wrapped twice).
    Returns True when this call patched the class."""
    if cls.__dict__.get(_PATCH_MARK):
        return False
    for name in _PATCHED_METHODS:
        original = cls.__dict__.get(name)
        if original is None:
            original = getattr(cls, name, None)
        if original is None:
            log.warning("moecap: %s.%s is missing; that hook is off", cls.__name__, name)
            continue
        if getattr(original, _WRAPPED_MARK, None) is not None:
            continue
        setattr(cls, name, _wrap(original, _AROUND[name]))
    cls.moecap_control = moecap_control
    setattr(cls, _PATCH_MARK, True)
    return True


def unpatch_worker_class(cls: Any) -> None:
    """Undo `patch_worker_class` (tests)."""
    for name in _PATCHED_METHODS:
        current = cls.__dict__.get(name)
        original = getattr(current, _WRAPPED_MARK, None)
        if original is not None:
            setattr(cls, name, original)
    if "moecap_control" in cls.__dict__:
        delattr(cls, "moecap_control")
    if _PATCH_MARK in cls.__dict__:
        delattr(cls, _PATCH_MARK)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then `on_import(module)`."""

    def __init__(self, loader: Any, on_import: Callable[[Any], None]) -> None:
        self.loader = loader
        self.on_import = on_import

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.on_import(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the Worker class the moment vLLM imports its module, so `register()` never imports the
    worker stack itself (the API server process, which loads plugins too, never needs it)."""

    def __init__(self, module: str, on_import: Callable[[Any], None]) -> None:
        self.module = module
        self.on_import = on_import

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, self.on_import)
                return spec
        return None


_REGISTER_LOCK = threading.Lock()
_REGISTERED = False


def _patch_module(module: Any) -> None:
    cls = getattr(module, compat.WORKER_CLASS, None)
    if cls is None:
        log.error(
            "moecap: %s has no %s; vLLM steps are not recorded", compat.WORKER_MODULE, compat.WORKER_CLASS
        )
        return
    patch_worker_class(cls)


def check_version(strict: bool | None = None) -> str | None:
    """A warning line when the installed vLLM is outside the supported range; raises `CollectError`
    instead when `strict` (default: `MOECAP_STRICT_ENGINE`)."""
    version = compat.installed_version()
    if version is None:
        raise CollectError("vLLM is not installed (pip install 'moecap[vllm]')")
    problem = compat.version_problem(version)
    if strict is None:
        strict = os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on")
    if problem and strict:
        raise CollectError(problem + " (--strict-engine)")
    return problem


def register() -> None:
    """The `vllm.general_plugins` entry point: inert unless `MOECAP_TRACE_DIR` is set; idempotent."""
    global _REGISTERED
    if not os.environ.get(ENV_TRACE_DIR):
        return
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        problem = check_version()
        if problem:
            log.warning("moecap: %s", problem)
        # Children (engine core, workers) inherit the environment: one run id for every process.
        if not os.environ.get(ENV_RUN_ID):
            os.environ[ENV_RUN_ID] = new_run_id("vllm", os.environ.get(ENV_MODEL_ID) or "model")
        module = sys.modules.get(compat.WORKER_MODULE)
        if module is not None:
            _patch_module(module)
        elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(compat.WORKER_MODULE, _patch_module))
        atexit.register(_close_all)
        try:  # spawned processes leave through multiprocessing, which skips atexit
            from multiprocessing import util

            util.Finalize(None, _close_all, exitpriority=100)
        except Exception:  # pragma: no cover
            pass
        _REGISTERED = True


def _reset_for_tests() -> None:
    """Forget that `register()` ran (tests)."""
    global _REGISTERED
    _REGISTERED = False
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]


def live_tracers() -> Iterable[VllmTracer]:
    return list(_LIVE)
