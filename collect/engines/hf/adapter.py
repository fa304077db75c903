"""HF transformers engine adapter: per-step rows and expert counts from continuous batching and `generate`.

What it touches in transformers (5.17, the tested version; `TESTED_TRANSFORMERS`):

- **Expert counts**: a forward hook on the router module of every MoE block (`*TopKRouter`, the
  classes in `MOE_FAMILIES`); each returns `(router_logits, weights, top_k_index)` and the hook adds
  `top_k_index` into a preallocated device buffer through `count_topk_into` (graph-safe, no host sync).
  Padding rows are weighted 0 by a per-row device mask filled before each step.
- **Continuous batching** (`ContinuousBatchingManager`, `ContinuousBatchProcessor`, paged cache;
  `generate_batch`, `continuous_batching_context_manager`, `init_continuous_batching`): the model's
  `init_continuous_batching` is wrapped on the *instance*, so every manager it returns is instrumented
  on the instance too: `_create_batch_processor` (size the buffers from the paged cache's
  `max_batch_tokens` before any CUDA graph is captured) and `_generation_step` (one `steps` row per
  call, batch composition read from the batch processor's `FutureRequestState`s as the scheduler
  left them). Warm-up and graph-capture passes call the model runner directly and are not recorded.
- **Static `generate`**: `generate` is wrapped on the instance to mark the call, and forward
  pre/post hooks on the model make one row per forward pass; per-request new/prefix tokens come from
  the 2-D attention mask (left padding counts nowhere), read back asynchronously.

GPU spans come from CUDA events on the engine's stream resolved when they complete (`StepReadback`);
nothing here calls `torch.cuda.synchronize()` per step.

torch and transformers are imported lazily, so `import moecap.collect` works without them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...counting import ReadyStep, StepReadback, count_topk_into
from ...errors import CollectError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger("moecap.collect.engines.hf")

TESTED_TRANSFORMERS = ("5.17.0",)
"""transformers releases whose internals this adapter was written against and tested on."""

MOE_FAMILIES: dict[str, str] = {
    "mixtral": "MixtralTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "deepseek_v2": "DeepseekV2TopkRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "olmoe": "OlmoeTopKRouter",
    "gpt_oss": "GptOssTopKRouter",
    "phimoe": "PhimoeTopKRouter",
}
"""config.model_type -> the router class whose forward returns (logits, weights, top_k_index)."""

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
"""Model types transformers 5.17's continuous batching cannot run: its paged cache is sized from
`config.head_dim` (= qk_rope_head_dim for MLA) while the attention writes decompressed heads of
qk_nope_head_dim + qk_rope_head_dim. They run under static `generate` (which caches the latent)."""

_MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_MOE_CLASS_HINTS = ("Router", "TopKGating", "SparseMoe", "MoeBlock", "MoEBlock", "Experts")


# ---------------------------------------------------------------------------------------------------
# MoE layout
# ---------------------------------------------------------------------------------------------------
@dataclass
class MoELayout:
    """Where a model's routers are and how their counts are laid out in the `experts` table."""

    model_type: str
    layer_ids: list[int] = field(default_factory=list)
    """Decoder-layer index of each MoE layer, in counts order."""
    routers: list[Any] = field(default_factory=list, repr=False)
    num_experts: int = 0
    top_k: int = 0
    counts_available: bool = False
    reason: str | None = None
    """Why counts are unavailable (None when they are)."""


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers: the first `nn.ModuleList` named `layers` (model.model.layers)."""
    import torch

    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


def _looks_moe(model: Any) -> bool:
    config = model.config
    for key in _MOE_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return True
    return any(
        any(hint in type(m).__name__ for hint in _MOE_CLASS_HINTS) for m in model.modules() if m is not model
    )


def inspect_moe(model: Any) -> MoELayout:
    """Find the router of every MoE layer of `model`.

    A supported family gives its layout; a model with no experts gives a layout with
    `counts_available=False` and the reason; a Mixture-of-Experts family this adapter does not know
    raises `CollectError` naming its model type.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = str(getattr(config, "model_type", "") or getattr(model.config, "model_type", ""))
    router_class = MOE_FAMILIES.get(model_type)
    if router_class is None:
        if _looks_moe(model):
            raise CollectError(
                f"model type {model_type!r} is a Mixture-of-Experts model the hf collector does not support "
                f"(supported: {', '.join(sorted(MOE_FAMILIES))})"
            )
        return MoELayout(model_type=model_type, reason=f"model type {model_type!r} has no MoE layers")
    layout = MoELayout(model_type=model_type)
    for index, layer in enumerate(decoder_layers(model)):
        found = [m for m in layer.modules() if type(m).__name__ == router_class]
        if len(found) > 1:
            raise CollectError(f"{model_type}: decoder layer {index} has {len(found)} {router_class} modules")
        if found:
            layout.layer_ids.append(index)
            layout.routers.append(found[0])
    if not layout.routers:
        layout.reason = (
            f"model type {model_type!r}: no {router_class} in any decoder layer (all layers dense)"
        )
        return layout
    experts = {int(r.num_experts) for r in layout.routers}
    top_ks = {int(r.top_k) for r in layout.routers}
    if len(experts) != 1 or len(top_ks) != 1:
        raise CollectError(f"{model_type}: routers disagree on experts {experts} / top-k {top_ks}")
    layout.num_experts = experts.pop()
    layout.top_k = top_ks.pop()
    layout.counts_available = True
    return layout


# ---------------------------------------------------------------------------------------------------
# KV-cache bytes as transformers allocates them
# ---------------------------------------------------------------------------------------------------
def paged_kv_bytes_per_token_per_layer(model: Any, dtype: Any = None) -> list[int]:
    """KV bytes per token per decoder layer of transformers' continuous-batching paged cache.

    Uses the functions `PagedAttentionCache` sizes its tensors with (`find_num_kv_heads`,
    `find_head_dim`): key and value slots of [num_kv_heads, head_dim] in the model's dtype, for every
    decoder layer (sliding-window layers included: their per-token cost is the same, only capped)."""
    from transformers.generation.continuous_batching.cache import find_head_dim, find_num_kv_heads

    config = model.config.get_text_config()
    dtype = dtype if dtype is not None else model.dtype
    itemsize = dtype.itemsize
    per_layer = 2 * find_num_kv_heads(config) * find_head_dim(config) * itemsize
    return [int(per_layer)] * int(config.num_hidden_layers)


def dynamic_kv_bytes_per_token_per_layer(model: Any) -> list[int]:
    """KV bytes per token per decoder layer of the cache static `generate` builds (a `DynamicCache`),
    measured on a one-token forward: whatever each layer stores (MLA models store the compressed
    latent and the rope key in transformers 5.17, not decompressed heads)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.ones((1, 1), dtype=torch.long, device=device), use_cache=True)
    cache = out.past_key_values
    sizes = []
    for layer in getattr(cache, "layers", []):
        total = 0
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.dim() == 4:
                total += t.shape[1] * t.shape[3] * t.element_size()
        sizes.append(int(total))
    return sizes


# ---------------------------------------------------------------------------------------------------
# The collector
# ---------------------------------------------------------------------------------------------------
StepSink = Callable[[dict[str, Any], "np.ndarray | None"], None]
"""Receives each finished `steps` row and its flat int32 expert counts (None when counts are off)."""


@dataclass
class _StaticCall:
    """State of one instrumented `generate` call."""

    request_ids: list[str]
    batch: int
    input_len: int
    pending: list[tuple[int, int, Any, dict[str, Any], Any]] = field(default_factory=list)
    """(slot, t_start_ns, stream, partial row, aux tensor) of the forward pass in flight (pre → post hook)."""


class HFCollector:
    """Records one `steps` row (and one flat expert-count row) per forward pass of a transformers model.

        collector = HFCollector(model, sink=lambda row, counts: ...)
        with collector:                      # attach(); detach() + drain on exit
            model.generate_batch(prompts, ...)   # or model.generate(...), or the CB manager API

    `counts=False` records steps only (no router hooks). Rows reach `sink` in step order once the GPU
    has finished the step (`poll()` runs at every step start and `close()` drains the rest).
    """

    def __init__(
        self,
        model: Any,
        sink: StepSink,
        *,
        counts: bool = True,
        max_tokens: int = 8192,
        ring: int = 32,
    ) -> None:
        self.model = model
        self.sink = sink
        self.layout = inspect_moe(model)
        self.counts_enabled = bool(counts and self.layout.counts_available)
        if counts and not self.layout.counts_available:
            self.counts_reason = self.layout.reason
        elif not counts:
            self.counts_reason = "expert counting disabled by the caller"
        else:
            self.counts_reason = None
        device = next(model.parameters()).device
        self.device = device
        self.readback = StepReadback(
            device,
            len(self.layout.layer_ids) if self.counts_enabled else 0,
            self.layout.num_experts if self.counts_enabled else 0,
            max_tokens=max_tokens,
            ring=ring,
            with_counts=self.counts_enabled,
        )
        self.steps_recorded = 0
        self.steps_written = 0
        self._next_step = 0
        self._handles: list[Any] = []
        self._instance_patches: list[tuple[Any, str]] = []
        self._managers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._static: _StaticCall | None = None
        self._generate_calls = 0
        self.last_generate_request_ids: list[str] = []
        self._next_labels: list[str] | None = None
        self.graphs_may_hold_buffers = False
        self.attached = False

    # -- lifecycle ----------------------------------------------------------------------------------
    def attach(self) -> HFCollector:
        if self.attached:
            return self
        if self.counts_enabled:
            for slot, router in enumerate(self.layout.routers):
                self._handles.append(router.register_forward_hook(self._router_hook(slot)))
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post_hook))
        self._patch(self.model, "init_continuous_batching", self._wrap_init_cb)
        self._patch(self.model, "generate", self._wrap_generate)
        self.attached = True
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for obj, name in reversed(self._instance_patches):
            obj.__dict__.pop(name, None)
        self._instance_patches.clear()
        for manager in list(self._managers):
            for name in ("_create_batch_processor", "_generation_step"):
                manager.__dict__.pop(name, None)
            manager.__dict__.pop("_moecap_collector", None)
        self._managers = weakref.WeakSet()
        self.attached = False

    def close(self) -> None:
        """Detach and hand every outstanding step to the sink (waits for the GPU: shutdown only)."""
        self.detach()
        self.flush(wait=True)

    def __enter__(self) -> HFCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, *, wait: bool = False) -> int:
        """Emit the rows of finished steps; returns how many were emitted."""
        ready = self.readback.poll(wait=wait)
        for item in ready:
            self._emit(item)
        return len(ready)

    def label_next_generate(self, request_ids: list[str]) -> None:
        """Request ids for the rows of the next `generate` call (one per batch row); default gen<call>-<row>."""
        self._next_labels = list(request_ids)

    def _patch(
        self,
        obj: Any,
        name: str,
        make: Callable[[Callable[..., Any]], Callable[..., Any]],
        *,
        remember: bool = True,
    ) -> None:
        """Shadow a bound method with an instance attribute (undone by `detach`)."""
        original = getattr(obj, name)
        obj.__dict__[name] = make(original)
        if remember:
            self._instance_patches.append((obj, name))

    # -- device side --------------------------------------------------------------------------------
    def _router_hook(self, slot: int) -> Callable[..., None]:
        rows = self.readback.rows

        def hook(module: Any, args: Any, output: Any) -> None:
            # Every supported router returns (router_logits, routing_weights, top_k_index).
            count_topk_into(rows[slot], output[2], self.readback.token_weight)

        return hook

    def _stream_ctx(self, stream: Any) -> Any:
        if stream is None or not self.readback.is_cuda:
            return nullcontext()
        import torch

        return torch.cuda.stream(stream)

    # -- continuous batching ------------------------------------------------------------------------
    def _wrap_init_cb(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def init_continuous_batching(*args: Any, **kwargs: Any) -> Any:
            manager = original(*args, **kwargs)
            self.instrument_manager(manager)
            return manager

        return init_continuous_batching

    def instrument_manager(self, manager: Any) -> None:
        """Instrument a `ContinuousBatchingManager` (idempotent)."""
        if getattr(manager, "_moecap_collector", None) is self:
            return
        manager._moecap_collector = self
        # Managers are remembered weakly: a finished manager (and its paged cache) must be free to go.
        self._managers.add(manager)
        self._patch(manager, "_create_batch_processor", self._wrap_create_batch_processor, remember=False)
        ref = weakref.ref(manager)
        self._patch(
            manager,
            "_generation_step",
            lambda original: self._wrap_generation_step(ref, original),
            remember=False,
        )

    def _wrap_create_batch_processor(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def _create_batch_processor() -> Any:
            processor = original()
            # Size the padding mask for the largest padded batch before warm-up captures any graph.
            if (
                self.readback.ensure_capacity(int(processor.cache.max_batch_tokens))
                and self.graphs_may_hold_buffers
            ):
                log.warning("moecap: token-mask buffer regrown after CUDA graphs were captured")
            if getattr(processor.model_runner, "pad_inputs", False):
                self.graphs_may_hold_buffers = True
            return processor

        return _create_batch_processor

    def _wrap_generation_step(self, manager_ref: Any, original: Callable[[], None]) -> Callable[[], None]:
        def _generation_step() -> None:
            processor = manager_ref().batch_processor
            self.flush()
            row = cb_batch_row(processor)
            stream = processor.inputs_and_outputs.compute_stream
            row["step"] = self._next_step
            t0 = time.monotonic_ns()
            with self._stream_ctx(stream):
                slot = self.readback.begin(stream)
                self.readback.set_real_tokens(row["num_tokens"])
            try:
                original()
            except BaseException:
                self.readback.discard(slot)
                raise
            row["t_start_ns"] = t0
            row["t_end_ns"] = time.monotonic_ns()
            with self._stream_ctx(stream):
                self.readback.end(slot, row, stream)
            self._next_step += 1
            self.steps_recorded += 1

        return _generation_step

    # -- static generate ----------------------------------------------------------------------------
    def _wrap_generate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if self._static is not None or input_ids is None or getattr(input_ids, "dim", lambda: 0)() != 2:
                return original(*args, **kwargs)
            batch, input_len = (int(x) for x in input_ids.shape)
            call = self._generate_calls
            self._generate_calls += 1
            ids, self._next_labels = self._next_labels, None
            if ids is None or len(ids) != batch:
                ids = [f"gen{call}-{b}" for b in range(batch)]
            self.last_generate_request_ids = ids
            self.flush()
            self.readback.ensure_capacity(batch * input_len)
            self.readback.ensure_aux_capacity(2 * batch)
            self._static = _StaticCall(request_ids=ids, batch=batch, input_len=input_len)
            try:
                return original(*args, **kwargs)
            finally:
                self._static = None

        return generate

    def _model_pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        call = self._static
        if call is None:
            return
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            return
        batch, q_len = int(shaped.shape[0]), int(shaped.shape[1])
        mask = kwargs.get("attention_mask")
        stream = torch.cuda.current_stream(self.device) if self.readback.is_cuda else None
        self.flush()
        t0 = time.monotonic_ns()
        slot = self.readback.begin(stream)
        aux = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            total = int(mask.shape[1])
            new_part = mask[:, total - q_len :]
            self.readback.set_token_mask(new_part)
            # [new tokens per row, tokens before this pass per row], read back with the step.
            aux = torch.cat([new_part.sum(-1), mask[:, : total - q_len].sum(-1)]).to(torch.int64)
            past = total - q_len
        else:
            self.readback.set_real_tokens(batch * q_len)
            cache = kwargs.get("past_key_values")
            past = int(cache.get_seq_length()) if cache is not None else 0
            total = past + q_len
        row = {
            "step": self._next_step,
            "phase": "prefill" if total <= call.input_len else "decode",
            "is_draft": False,
            "num_reqs": batch,
            "req_ids": list(call.request_ids[:batch]),
            "req_num_logits": [1 if total >= call.input_len else 0] * batch,
            "req_spec_tokens": None,
            "_static": (batch, q_len, past),
        }
        call.pending.append((slot, t0, stream, row, aux))

    def _model_post_hook(self, module: Any, args: Any, output: Any) -> None:
        call = self._static
        if call is None or not call.pending:
            return
        slot, t0, stream, row, aux = call.pending.pop()
        row["t_start_ns"] = t0
        row["t_end_ns"] = time.monotonic_ns()
        self.readback.end(slot, row, stream, aux=aux)
        self._next_step += 1
        self.steps_recorded += 1

    # -- rows ---------------------------------------------------------------------------------------
    def _emit(self, item: ReadyStep) -> None:
        row = item.payload
        static = row.pop("_static", None)
        if static is not None:
            batch, q_len, past = static
            if item.aux is not None:
                new = [int(x) for x in item.aux[:batch]]
                prefix = [int(x) for x in item.aux[batch : 2 * batch]]
            else:
                new = [q_len] * batch
                prefix = [past] * batch
            row["req_new_tokens"] = new
            row["req_prefix_lens"] = prefix
            row["num_tokens"] = sum(new)
        row["gpu_start_ns"] = item.gpu_start_ns
        row["gpu_end_ns"] = item.gpu_end_ns
        self.steps_written += 1
        self.sink(row, item.counts)


def cb_batch_row(processor: Any) -> dict[str, Any]:
    """The batch composition of the continuous-batching step about to run, as a partial `steps` row.

    Read from the batch processor's `FutureRequestState`s after `prepare_next_batch` (which already
    advanced each request's `position_offset` by its `query_length`): tokens before the step =
    position_offset - query_length; a request is in its prompt phase while that is below its prompt
    length; it samples a logit row when `has_new_token` (its last prefill chunk, or a decode step)."""
    io = processor.inputs_and_outputs
    host_io = io.io_pairs[io.current_pair].host_io if hasattr(io, "io_pairs") else io
    ids: list[str] = []
    prefix: list[int] = []
    new: list[int] = []
    logits: list[int] = []
    prefilling = 0
    for future in host_io.requests_in_batch:
        state = future.state
        q = int(future.query_length)
        before = int(state.position_offset) - q
        ids.append(str(state.request_id))
        prefix.append(before)
        new.append(q)
        logits.append(1 if future.has_new_token else 0)
        if before < len(state.initial_tokens):
            prefilling += 1
    n = len(ids)
    phase = "prefill" if prefilling == n and n else ("decode" if prefilling == 0 else "mixed")
    if n == 0:
        phase = "idle"
    return {
        "phase": phase,
        "is_draft": False,
        "num_reqs": n,
        "num_tokens": sum(new),
        "req_ids": ids,
        "req_prefix_lens": prefix,
        "req_new_tokens": new,
        "req_num_logits": logits,
        "req_spec_tokens": None,
    }


@contextmanager
def collecting(model: Any, sink: StepSink, **kwargs: Any) -> Iterator[HFCollector]:
    """`with collecting(model, sink) as c:` — attach an `HFCollector`, close it on exit."""
    collector = HFCollector(model, sink, **kwargs)
    with collector:
        yield collector


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def check_transformers_version() -> str | None:
    """A warning line when the installed transformers is not one this adapter was tested on."""
    version = transformers_version()
    if version not in TESTED_TRANSFORMERS:
        return (
            f"transformers {version} is untested with the hf collector (tested: {', '.join(TESTED_TRANSFORMERS)}); "
            "its continuous-batching internals may differ"
        )
    return None


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "fp64": torch.float64,
        "float64": torch.float64,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise CollectError(f"--dtype {name!r}: expected one of bf16, fp16, fp32, fp64") from None
