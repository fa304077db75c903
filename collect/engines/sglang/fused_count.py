"""One device op per MoE layer for SGLang's select-experts gatherer: count this layer's routed expert ids
into its row of the gatherer's `[num_layers, num_physical_experts]` int32 buffer, leaving out padded rows
(row >= the live-token scalar) and ids outside [0, num_physical_experts) (SGLang's −1 padding).

Why: SGLang's own method is 6 small kernels per layer (0.5.16: `!=`, `~`, `masked_fill`, `.long()`,
`.int()`, `scatter_add_`; 0.5.23: 8), and the plugin's padding mask added 3 more (`arange`, compare,
`masked_fill`); all of them replay inside every CUDA graph, 24 layers a pass for Qwen1.5-MoE. The Triton
kernel below does the same in one launch (one `atomic_add` per valid id). It is used only where it was
compiled and checked against SGLang's own method before the graphs are captured (`prepare`); elsewhere
the plugin keeps the old path (mask, then SGLang's method) — `compat.legacy_masked_count`.

Capture safety: the kernel writes in place into preallocated buffers (the gatherer's `_data`, the
live-token scalar), reads the live count on the device (no host sync), and its grid depends on shapes
only. Triton compiles on first launch; SGLang runs the gatherer only while recording or capturing, so
its warm-up passes before capture never reach it — hence `prepare` compiles it (for int32 and int64
ids) before `ModelRunner.init_cuda_graphs`. Integer arguments are not specialised (`do_not_specialize`),
and pointers not on alignment where Triton allows it, so every batch shape reuses the compiled kernel.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

log = logging.getLogger("moecap.collect.engines.sglang")

ENV_FUSED = "MOECAP_SGLANG_FUSED_COUNTS"
"""`0` keeps the old per-layer path (mask + SGLang's own method) even where the fused kernel works (A/B)."""
BLOCK = 1024
_KERNEL: Any = None
_READY: dict[str, bool] = {}
"""str(device) -> the fused kernel compiled and checked on it."""


def _build_kernel() -> Any:
    import triton
    import triton.language as tl

    ints = ["n_rows", "top_k", "stride_row", "stride_col", "row_offset", "num_experts"]
    extra: dict[str, Any] = {"do_not_specialize": ints}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        extra["do_not_specialize_on_alignment"] = ["ids_ptr", "counts_ptr", "live_ptr"]

    @triton.jit(**extra)
    def count_live_ids(ids_ptr, counts_ptr, live_ptr, n_rows, top_k, stride_row, stride_col, row_offset,
                       num_experts, BLOCK: tl.constexpr):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = offs // top_k
        col = offs % top_k
        inside = row < n_rows
        ids = tl.load(ids_ptr + row * stride_row + col * stride_col, mask=inside, other=-1).to(tl.int32)
        live = tl.load(live_ptr)
        ok = inside & (row < live) & (ids >= 0) & (ids < num_experts)
        tl.atomic_add(counts_ptr + row_offset + ids, 1, mask=ok)

    return count_live_ids


def id_dtypes() -> tuple[Any, ...]:
    """The id dtypes `prepare` compiles and checks the kernel for (any other takes the old path, so no
    compile ever happens inside a graph capture)."""
    import torch

    return (torch.int32, torch.int64)


def kernel() -> Any:
    """The Triton kernel (built on first use, so `TRITON_INTERPRET=1` set by a test takes effect)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def launch(counts: Any, layer_idx: int, topk_ids: Any, live: Any) -> None:
    """Add layer `layer_idx`'s valid ids of live rows of `topk_ids` ([tokens, top_k] or [tokens]) to
    `counts[layer_idx]` (int32 `[num_layers, num_experts]`, contiguous): one kernel, in place."""
    ids = topk_ids if topk_ids.dim() == 2 else topk_ids.reshape(topk_ids.shape[0], -1)
    n, k = int(ids.shape[0]), int(ids.shape[1])
    if n * k == 0:
        return
    e = int(counts.shape[1])
    grid = ((n * k + BLOCK - 1) // BLOCK,)
    kernel()[grid](ids, counts, live, n, k, ids.stride(0), ids.stride(1), int(layer_idx) * e, e, BLOCK=BLOCK)


def enabled() -> bool:
    return os.environ.get(ENV_FUSED, "1").strip().lower() not in ("0", "false", "no", "off")


def is_ready(device: Any) -> bool:
    """Whether `prepare` compiled and checked the kernel on `device`."""
    return _READY.get(str(device), False)


def prepare(device: Any, sglang_method: Any, live: Any) -> bool:
    """Compile the kernel on `device` (before graph capture) and check it against SGLang's own gatherer
    method (`sglang_method(gatherer, layer_idx, ids)`, behind the old path's padding mask) on random
    ids with −1 and padded rows, for int32 and int64 ids and a strided view. True when every count
    matched; False (logged) when Triton is missing, the device is not CUDA (unless `TRITON_INTERPRET=1`),
    the switch is off, or anything differs — the plugin then keeps the old path."""
    import torch

    key = str(torch.device(device))
    if key in _READY:
        return _READY[key]
    ok = False
    try:
        if not enabled():
            raise RuntimeError(f"{ENV_FUSED}=0")
        dev = torch.device(device)
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"no Triton on {dev.type}")
        ok = _check(dev, sglang_method, live)
        if not ok:
            log.warning("moecap: fused expert count differs from SGLang's on %s; keeping the old path", key)
    except Exception as exc:
        log.info("moecap: fused expert count not used on %s (%s: %s)", key, type(exc).__name__, exc)
        ok = False
    _READY[key] = ok
    return ok


def _check(dev: Any, sglang_method: Any, live: Any) -> bool:
    import types

    import torch

    from .compat import legacy_masked_count  # the path this kernel replaces: its reference

    gen = torch.Generator().manual_seed(20)
    layers, experts, tokens, top_k = 3, 37, 300, 6
    saved = live.clone()
    try:
        for dtype in id_dtypes():
            wide = torch.randint(-1, experts, (tokens, top_k + 2), generator=gen).to(dtype).to(dev)
            # contiguous with padded rows; a strided view (SGLang hands over routed columns only when it
            # fuses shared experts) with padded rows; an unaligned view, nothing padded.
            for ids, n_live in (
                (wide[:, :top_k].contiguous(), 250),
                (wide[:, :top_k], 299),
                (wide[:, 2:], None),
            ):
                live.fill_(2**31 - 1 if n_live is None else n_live)
                fused = torch.zeros((layers, experts), dtype=torch.int32, device=dev)
                launch(fused, 1, ids, live)
                theirs = types.SimpleNamespace(
                    _data=torch.zeros((layers, experts), dtype=torch.int32, device=dev),
                    _expert_location_metadata=types.SimpleNamespace(num_physical_experts=experts),
                )
                legacy_masked_count(theirs, 1, ids, live, sglang_method)
                if not torch.equal(fused, theirs._data):
                    return False
    finally:
        live.copy_(saved)
    return True


def reset_for_tests() -> None:
    global _KERNEL
    _KERNEL = None
    _READY.clear()
