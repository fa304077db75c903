"""Expert-token counting on the device, and the per-step readback that never blocks the engine.

`count_topk_into` is the only code that runs inside an engine's forward pass (and so inside a captured
CUDA graph or a `torch.compile` region): fixed-shape, in-place device ops on preallocated buffers, no
host synchronisation, no data-dependent shapes or Python branches on tensor values.

`StepReadback` owns those buffers and, per step, records CUDA events around the step on the engine's
stream, copies the step's counts into a pinned host slot with `non_blocking=True`, and hands the step
back only once its event says the GPU is done (`poll()`), so the collector never calls
`torch.cuda.synchronize()` and never waits for the engine's work. (The one wait it does make, about once
a second, is for a clock-anchor event on an idle side stream, which completes at once.) On a CPU device
everything is synchronous already and a step is ready as soon as it ends.

torch is imported by the callers (engine adapters) — this module needs it at call time only.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def count_topk_into(counts_row: torch.Tensor, topk_ids: torch.Tensor, token_weight: torch.Tensor) -> None:
    """Add one layer's routing decisions to `counts_row` (int32, [num_experts]), in place.

    `topk_ids` is the router's [num_tokens, top_k] choice of experts for every row the layer saw
    (padding rows included); `token_weight` is a preallocated int32 buffer of at least num_tokens
    entries holding 1 for a real token and 0 for a padding row. Each real token adds 1 per top-k choice.
    Graph-safe: the shapes depend only on `topk_ids.shape`, never on values.
    """
    n, k = topk_ids.shape
    weight = token_weight[:n].unsqueeze(1).expand(n, k).reshape(-1)
    counts_row.index_add_(0, topk_ids.reshape(-1), weight)


@dataclass
class PendingStep:
    """A step whose GPU work may still be running."""

    slot: int
    payload: Any
    """Whatever the adapter needs to finish the row (host facts, or device tensors to read back)."""
    aux_len: int = 0
    """Elements of the slot's auxiliary host row filled by `end` (see `StepReadback.end`)."""
    counts_len: int = 0
    """Elements of the slot's pinned counts row filled by `end` (0: no counts for this step)."""


@dataclass
class ReadyStep:
    """A step whose GPU work is done: its GPU span (host-clock ns, None on CPU), counts and payload."""

    payload: Any
    gpu_start_ns: int | None
    gpu_end_ns: int | None
    counts: Any | None
    """numpy int32: [num_moe_layers * num_experts] layer-major, or whatever flat int32 tensor `end` was
    given instead (raw routing rows the adapter counts on the host); None when the step has none."""
    aux: Any | None = None
    """numpy int64 copy of the auxiliary device tensor given to `end`, if any."""


class StepReadback:
    """Preallocated device buffers for one engine's expert counts, and asynchronous per-step readback.

    Buffers (`counts`, `token_weight`) are allocated once and keep their `data_ptr()` for the life of
    the object (CUDA graphs captured over `count_topk_into` point at them). `ring` pinned host slots let
    that many steps be in flight before `begin` has to wait for the oldest (an engine that syncs every
    step, as transformers' continuous batching does, never has more than two in flight).
    """

    def __init__(
        self,
        device: torch.device,
        num_layers: int,
        num_experts: int,
        *,
        max_tokens: int = 8192,
        ring: int = 32,
        with_counts: bool = True,
        anchor_interval_s: float = 1.0,
        counts_capacity: int = 0,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.with_counts = with_counts and num_layers > 0 and num_experts > 0
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.ring = max(2, int(ring))
        self.anchor_interval_ns = int(anchor_interval_s * 1e9)
        self.anchors = 0
        shape = (num_layers, num_experts) if self.with_counts else (0, 0)
        self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.rows = list(self.counts.unbind(0))
        self.token_weight = torch.zeros(max(1, int(max_tokens)), dtype=torch.int32, device=self.device)
        width = max(1, num_layers * num_experts, int(counts_capacity))
        self._pinned = torch.zeros((self.ring, width), dtype=torch.int32, pin_memory=self.is_cuda)
        # Per-slot views made once (tensor for the copy in, numpy for the copy out): slicing a tensor
        # costs a few µs of host time per step, a numpy slice a fraction of one.
        self._slot_rows = list(self._pinned.unbind(0))
        self._slot_np = [row.numpy() for row in self._slot_rows]
        self._aux = torch.zeros((self.ring, 1), dtype=torch.int64, pin_memory=self.is_cuda)
        self._free = deque(range(self.ring))
        self._pending: deque[PendingStep] = deque()
        self._ready_backlog: list[ReadyStep] = []
        self.waits = 0
        """Times `begin` had to wait for a step to finish because every slot was in flight."""
        if self.is_cuda:
            self._start = [torch.cuda.Event(enable_timing=True) for _ in range(self.ring)]
            self._end = [torch.cuda.Event(enable_timing=True) for _ in range(self.ring)]
            self._done = [torch.cuda.Event() for _ in range(self.ring)]
            self._slot_done: list[Any] = list(self._done)
            self._slot_anchor: list[Any] = [None] * self.ring
            # CUDA event times map onto the host monotonic clock through anchors: an event recorded on
            # an otherwise idle side stream completes at once, so waiting for it never waits for the
            # engine's work, and the host reads its clock right after. The GPU and host clocks drift
            # apart by ~20 ppm (measured on an H100), so a fresh anchor is taken every
            # `anchor_interval_s` (at a step boundary, ~10 µs of host time).
            self._side = torch.cuda.Stream(self.device)
            self._anchor = self._new_anchor()

    def _new_anchor(self) -> tuple[int, Any]:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record(self._side)
        event.synchronize()
        self.anchors += 1
        return time.monotonic_ns(), event

    # -- buffers --------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return int(self.token_weight.numel())

    def ensure_capacity(self, max_tokens: int) -> bool:
        """Grow `token_weight` to hold `max_tokens` rows; True if it had to be reallocated.

        Call before any CUDA graph is captured over the buffer (the adapter sizes it from the engine's
        maximum batch tokens when the engine is created)."""
        if max_tokens <= self.token_weight.numel():
            return False
        self.token_weight = self.torch.zeros(int(max_tokens), dtype=self.torch.int32, device=self.device)
        return True

    def ensure_aux_capacity(self, n: int) -> None:
        """Room for `n` int64 auxiliary values per step (call between steps, never inside one)."""
        if n > self._aux.shape[1]:
            self._stash(self.poll(wait=True))
            self._aux = self.torch.zeros((self.ring, int(n)), dtype=self.torch.int64, pin_memory=self.is_cuda)

    # -- per step --------------------------------------------------------------------------------------
    def begin(self, stream: Any = None, *, zero_counts: bool = True) -> int:
        """Claim a slot, zero the counts (unless the caller zeroes them itself before counting) and record
        the step's start event on `stream` (CUDA)."""
        if not self._free:
            # Every slot is in flight: wait for the oldest (counted; never happens under an engine that
            # syncs each step).
            self.waits += 1
            self._stash(self.poll(wait=True))
        slot = self._free.popleft()
        if self.with_counts and zero_counts:
            self.counts.zero_()
        if self.is_cuda:
            if time.monotonic_ns() - self._anchor[0] > self.anchor_interval_ns:
                self._anchor = self._new_anchor()
            self._slot_anchor[slot] = self._anchor
            self._start[slot].record(stream)
        return slot

    def set_real_tokens(self, n_real: int) -> None:
        """Mark rows [0, n_real) as real tokens and the rest as padding (contiguous-padding engines)."""
        if not self.with_counts:
            return
        self.token_weight.zero_()
        if n_real > 0:
            self.token_weight[:n_real].fill_(1)

    def set_token_mask(self, mask: torch.Tensor) -> None:
        """Per-row weights from a 0/1 mask flattened in the router's row order (left-padded batches)."""
        if not self.with_counts:
            return
        n = mask.numel()
        self.token_weight[:n].copy_(mask.reshape(-1))

    def end(
        self,
        slot: int,
        payload: Any,
        stream: Any = None,
        aux: torch.Tensor | None = None,
        counts: torch.Tensor | bool = True,
    ) -> None:
        """Record the step's end event, then queue non-blocking copies of the counts and of `aux`
        (a small 1-D integer device tensor of facts the host needs later) into the slot's pinned rows.

        `counts`: True copies `self.counts`; a flat int32 device tensor (at most `counts_capacity`
        elements) is copied instead (e.g. raw routing rows the caller counts on the host: one copy,
        no count kernels); False copies nothing (the step has no counts)."""
        if self.is_cuda:
            self._end[slot].record(stream)
        counts_len = 0
        if self.with_counts and counts is not False:
            flat = self.counts.view(-1) if counts is True else counts.reshape(-1)
            counts_len = int(flat.numel())
            row = self._slot_rows[slot]
            (row if counts_len == row.numel() else row[:counts_len]).copy_(flat, non_blocking=self.is_cuda)
        aux_len = 0
        if aux is not None:
            aux_len = int(aux.numel())
            if aux_len > self._aux.shape[1]:  # callers size this between steps; never lose a step's facts
                self.ensure_aux_capacity(aux_len)
            self._aux[slot, :aux_len].copy_(aux.reshape(-1), non_blocking=self.is_cuda)
        if self.is_cuda:
            if counts_len or aux_len:
                self._done[slot].record(stream)  # after the copies
                self._slot_done[slot] = self._done[slot]
            else:
                self._slot_done[slot] = self._end[slot]  # nothing queued after the end: one event less
        self._pending.append(PendingStep(slot, payload, aux_len, counts_len))

    def discard(self, slot: int) -> None:
        """Give back a slot claimed by `begin` for a step that did not run."""
        self._free.append(slot)

    def _stash(self, ready: list[ReadyStep]) -> None:
        # `poll` swaps the backlog list out, so append to whichever list is current after it ran.
        self._ready_backlog.extend(ready)

    def poll(self, *, wait: bool = False) -> list[ReadyStep]:
        """Steps whose GPU work is done, oldest first. `wait=True` (shutdown only) blocks until all are."""
        ready, self._ready_backlog = self._ready_backlog, []
        while self._pending:
            head = self._pending[0]
            if self.is_cuda:
                done = self._slot_done[head.slot]
                if wait:
                    done.synchronize()
                elif not done.query():
                    break
            self._pending.popleft()
            ready.append(self._resolve(head))
            self._free.append(head.slot)
        return ready

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _resolve(self, p: PendingStep) -> ReadyStep:
        gpu_start = gpu_end = None
        if self.is_cuda:
            host_ns, ref = self._slot_anchor[p.slot]
            gpu_start = host_ns + round(ref.elapsed_time(self._start[p.slot]) * 1e6)
            gpu_end = host_ns + round(ref.elapsed_time(self._end[p.slot]) * 1e6)
        counts = None
        if p.counts_len:
            counts = self._slot_np[p.slot][: p.counts_len].copy()
        aux = self._aux[p.slot, : p.aux_len].numpy().copy() if p.aux_len else None
        return ReadyStep(p.payload, gpu_start, gpu_end, counts, aux)
