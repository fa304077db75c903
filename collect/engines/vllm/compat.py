"""Everything the vLLM adapter touches inside vLLM, in one place, chosen by the installed version.

The adapter (`vllm.py`) never imports a vLLM module itself: it asks this module. Supported: vLLM
0.26.0 (validated on an H100 with CUDA graphs and torch.compile) through 0.33.0 (the newest, validated
against its real classes on CPU). Outside that range the adapter warns (or, with
`MOECAP_STRICT_ENGINE=1` / `--strict-engine`, refuses to start).

What differs between the supported releases, and which `Profile` field says so:

| release | difference | field |
|---|---|---|
| 0.33 | `NewRequestData.prompt_len` property (0.26 computes it from the prompt) | `new_request_prompt_len` |
| 0.33 | `dbo_current_ubatch_token_offset()` (dual-batch-overlap micro-batch rows) | `ubatch_token_offset` |
| 0.33 | monolithic kernels that support routing replay expose `routing_sink` | `monolithic_sink` |
| 0.33 | routers outside `MoERunner` implement `RoutedExpertsCaptureSource` (`layer_id`, `capture_fn`) | `capture_source_protocol` |
| 0.26 | `SchedulerOutput.num_common_prefix_blocks` is a required field | `scheduler_output_common_prefix_required` |

Releases between 0.26 and 0.33 get the 0.26 profile: every 0.33-only feature is looked up defensively,
so the older profile is the safe one.

Attributes of vLLM objects the adapter reads (the contract tests in `tests/engines_vllm/` fail loudly
when one of them changes):

- `vllm.v1.worker.gpu_worker.Worker`: `load_model(self, *, load_dummy_weights=False)`,
  `execute_model(self, scheduler_output)`, `sample_tokens(self, grammar_output)`,
  `execute_dummy_batch(self)`, `initialize_from_config(self, kv_cache_config)`, `shutdown(self)`;
  instance attributes `vllm_config`, `model_runner` (`get_model()`), `device`.
- `SchedulerOutput`: `scheduled_new_reqs`, `scheduled_cached_reqs`, `num_scheduled_tokens`,
  `total_num_scheduled_tokens`, `scheduled_spec_decode_tokens`, `finished_req_ids`, `preempted_req_ids`;
  `NewRequestData`: `req_id`, `prompt_token_ids`, `prompt_embeds`, `num_computed_tokens`,
  `prefill_token_ids`; `CachedRequestData`: `req_ids`, `resumed_req_ids`, `all_token_ids`,
  `num_computed_tokens`, `num_output_tokens`.
- MoE layers (`MoERunner`): `layer_id`, `router` (a `BaseRouter` with `set_capture_fn`), `is_monolithic`;
  `BaseRouter._select_experts` calls `capture_fn(topk_ids)` with logical ids before the EPLB mapping.
- Forward context (`vllm.forward_context.get_forward_context()`): `dp_metadata.num_tokens_across_dp_cpu`,
  `dp_metadata.local_sizes`, `batch_descriptor.num_tokens`.
- Ranks: `vllm.distributed.parallel_state.get_{tp,pp,ep}_group()` (`rank_in_group`, `world_size`,
  `ranks`, `all_gather`), `parallel_config.data_parallel_rank`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ... import runtime

log = logging.getLogger("moecap.collect.engines.vllm")

MIN_VERSION = (0, 26, 0)
MAX_VERSION = (0, 33, 0)
VALIDATED = {
    "0.26.0": "H100: CUDA graphs + torch.compile, Qwen1.5-MoE-A2.7B (random weights); real classes on CPU",
    "0.33.0": "real classes on CPU (scheduler output, Worker, routers, plugin loader)",
}

WORKER_MODULE = "vllm.v1.worker.gpu_worker"
WORKER_CLASS = "Worker"
PLUGIN_GROUP = "vllm.general_plugins"

_CONFIG_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_CONFIG_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_k")


# ---------------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------------
parse_version = runtime.parse_release
"""(major, minor, patch) of an engine release string (shared with the other engine adapters)."""


def installed_version() -> str | None:
    """The installed vLLM's version, without importing it; None when vLLM is not installed."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(version: str) -> str | None:
    """Why `version` is outside the supported range (one line), or None when it is inside."""
    return runtime.release_problem(
        "vLLM",
        version,
        MIN_VERSION,
        MAX_VERSION,
        "its internals may differ: steps or expert counts may be wrong or missing",
    )


@dataclass(frozen=True)
class Profile:
    """What the installed vLLM release offers the adapter (see the module docstring's table)."""

    name: str
    new_request_prompt_len: bool
    ubatch_token_offset: bool
    monolithic_sink: bool
    capture_source_protocol: bool
    scheduler_output_common_prefix_required: bool


PROFILES = {
    "0.26": Profile(
        name="0.26",
        new_request_prompt_len=False,
        ubatch_token_offset=False,
        monolithic_sink=False,
        capture_source_protocol=False,
        scheduler_output_common_prefix_required=True,
    ),
    "0.33": Profile(
        name="0.33",
        new_request_prompt_len=True,
        ubatch_token_offset=True,
        monolithic_sink=True,
        capture_source_protocol=True,
        scheduler_output_common_prefix_required=False,
    ),
}


def profile_for(version: str | None) -> Profile:
    """The profile of a vLLM version: 0.33 and newer get the 0.33 profile, everything else 0.26."""
    if version is None:
        return PROFILES["0.33"]
    try:
        v = parse_version(version)
    except ValueError:
        return PROFILES["0.26"]
    return PROFILES["0.33"] if v >= (0, 33, 0) else PROFILES["0.26"]


_PROFILE: Profile | None = None


def profile() -> Profile:
    """The installed vLLM's profile (cached)."""
    global _PROFILE
    if _PROFILE is None:
        _PROFILE = profile_for(installed_version())
    return _PROFILE


# ---------------------------------------------------------------------------------------------------
# Scheduler output
# ---------------------------------------------------------------------------------------------------
def new_request_prompt_len(req: Any) -> int:
    """Prompt tokens of a `NewRequestData` (token ids or prompt embeddings)."""
    if profile().new_request_prompt_len:
        try:
            return int(req.prompt_len)
        except AttributeError:
            pass
    ids = getattr(req, "prompt_token_ids", None)
    if ids is not None:
        return len(ids)
    embeds = getattr(req, "prompt_embeds", None)
    if embeds is not None:
        return int(embeds.shape[0])
    return 0


def new_request_target_len(req: Any) -> int:
    """Tokens a `NewRequestData` must have in the KV cache before it samples: its prompt, or — for a
    request resumed after preemption under model runner V2 — prompt plus the outputs it had
    (`prefill_token_ids`)."""
    prefill = getattr(req, "prefill_token_ids", None)
    if prefill is not None:
        return len(prefill)
    return new_request_prompt_len(req)


# ---------------------------------------------------------------------------------------------------
# Worker, model, ranks
# ---------------------------------------------------------------------------------------------------
def worker_class() -> Any:
    return getattr(importlib.import_module(WORKER_MODULE), WORKER_CLASS)


def worker_model(worker: Any) -> Any:
    """The target model of a worker (never the speculative-decoding drafter)."""
    runner = worker.model_runner
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


@dataclass
class RankInfo:
    """Where a worker sits in the parallel layout."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group_ranks: tuple[int, ...] = (0,)
    """Global ranks of this worker's TP group (for the GPUs its rows stand for)."""


def rank_info(vllm_config: Any) -> RankInfo:
    """This process's ranks (every group falls back to rank 0 of 1 when it is not initialised)."""
    from vllm.distributed import parallel_state as ps

    info = RankInfo()
    pc = vllm_config.parallel_config

    def group(name: str) -> Any:
        fn = getattr(ps, name, None)
        if fn is None:
            return None
        try:
            return fn()
        except (AssertionError, RuntimeError, AttributeError):
            return None

    tp = group("get_tp_group")
    if tp is not None:
        info.tp_rank, info.tp_size = int(tp.rank_in_group), int(tp.world_size)
        info.tp_group_ranks = tuple(int(r) for r in getattr(tp, "ranks", (0,)))
    else:
        info.tp_size = int(getattr(pc, "tensor_parallel_size", 1))
    pp = group("get_pp_group")
    if pp is not None:
        info.pp_rank, info.pp_size = int(pp.rank_in_group), int(pp.world_size)
    else:
        info.pp_size = int(getattr(pc, "pipeline_parallel_size", 1))
    ep = group("get_ep_group") if getattr(pc, "enable_expert_parallel", False) else None
    if ep is not None:
        info.ep_rank, info.ep_size = int(ep.rank_in_group), int(ep.world_size)
    info.dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
    info.dp_size = int(getattr(pc, "data_parallel_size", 1) or 1)
    return info


def tp_all_gather(t: Any) -> Any:
    """All-gather along dim 0 across the TP group (every TP rank must call it)."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().all_gather(t.contiguous(), dim=0)


def ubatch_token_offset() -> int:
    """Row offset of the current dual-batch-overlap micro-batch (0 when DBO is off or unknown)."""
    try:
        from vllm.v1.worker import ubatching
    except ImportError:
        return 0
    fn = getattr(ubatching, "dbo_current_ubatch_token_offset", None)
    if fn is None:
        return 0
    try:
        return int(fn())
    except Exception:
        return 0


def forward_layout() -> tuple[list[int] | None, list[int] | None, int | None]:
    """(tokens per DP rank, gathered shard sizes, this step's local token count) from the forward
    context, or Nones where the context does not say (eager call outside a forward, no DP)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None, None, None
    try:
        if not is_forward_context_available():
            return None, None, None
        ctx = get_forward_context()
    except Exception:
        return None, None, None
    dp = getattr(ctx, "dp_metadata", None)
    per_dp = shards = None
    if dp is not None:
        across = getattr(dp, "num_tokens_across_dp_cpu", None)
        if across is not None:
            per_dp = [int(x) for x in across.tolist()]
        sizes = getattr(dp, "local_sizes", None)
        shards = [int(x) for x in sizes] if sizes is not None else None
    desc = getattr(ctx, "batch_descriptor", None)
    local = (
        int(desc.num_tokens) if desc is not None and getattr(desc, "num_tokens", None) is not None else None
    )
    return per_dp, shards, local


# ---------------------------------------------------------------------------------------------------
# MoE layers
# ---------------------------------------------------------------------------------------------------
@dataclass
class MoELayer:
    """One MoE layer of the target model and how its routing is captured."""

    layer_id: int
    module: Any
    kind: str
    """router (BaseRouter.set_capture_fn) | source (RoutedExpertsCaptureSource.capture_fn) |
    sink (monolithic kernel's routing sink) | none (routing hidden: no capture)."""
    top_k: int | None = None
    num_experts: int | None = None
    reason: str | None = None
    """Why the routing of this layer cannot be captured (kind == 'none')."""


def _is_runner(module: Any) -> bool:
    router = getattr(module, "router", None)
    return (
        router is not None
        and callable(getattr(router, "set_capture_fn", None))
        and hasattr(module, "layer_id")
    )


def _layer_id(module: Any) -> int | None:
    try:
        return int(module.layer_id)
    except Exception:
        return None


def _monolithic_sink_class() -> tuple[Any, Any] | None:
    try:
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsMonolithic
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsSink
    except ImportError:
        return None
    return FusedMoEExpertsMonolithic, RoutedExpertsSink


def find_moe_layers(model: Any) -> Iterator[MoELayer]:
    """Every MoE layer of `model` (duck-typed: vLLM's `MoERunner` and anything with the same shape)."""
    prof = profile()
    for module in model.modules():
        if _is_runner(module):
            lid = _layer_id(module)
            if lid is None:
                continue
            router = module.router
            top_k = getattr(router, "top_k", None)
            n_exp = getattr(router, "global_num_experts", None)
            monolithic = bool(getattr(module, "is_monolithic", False))
            if not monolithic:
                yield MoELayer(lid, module, "router", top_k, n_exp)
                continue
            reason = "a monolithic MoE kernel routes inside the kernel and does not expose its routing"
            if prof.monolithic_sink:
                qm = getattr(module, "_quant_method", None)
                fused = getattr(getattr(getattr(qm, "moe_kernel", None), "impl", None), "fused_experts", None)
                classes = _monolithic_sink_class()
                supports = getattr(fused, "supports_routing_replay_capture", None)
                if (
                    classes is not None
                    and isinstance(fused, classes[0])
                    and callable(supports)
                    and supports()
                ):
                    yield MoELayer(lid, module, "sink", top_k, n_exp)
                    continue
                reason += f" ({type(fused).__name__} supports no routing replay capture)"
            yield MoELayer(lid, module, "none", top_k, n_exp, reason=reason)
        elif (
            prof.capture_source_protocol
            and hasattr(module, "capture_fn")
            and hasattr(module, "layer_id")
            and not hasattr(module, "router")
        ):
            lid = _layer_id(module)
            if lid is not None:
                yield MoELayer(
                    lid,
                    module,
                    "source",
                    getattr(module, "top_k", None),
                    getattr(module, "num_experts", None),
                )


def current_capture(layer: MoELayer) -> Callable[[Any], None] | None:
    """The capture callback the layer has now (vLLM's own, ours, or None)."""
    if layer.kind == "router":
        return getattr(layer.module.router, "capture_fn", None)
    if layer.kind == "source":
        return getattr(layer.module, "capture_fn", None)
    if layer.kind == "sink":
        sink = getattr(getattr(layer.module, "routed_experts", None), "routing_sink", None)
        return getattr(sink, "capture_fn", None)
    return None


def _chain(first: Callable[[Any], None], second: Callable[[Any], None]) -> Callable[[Any], None]:
    def both(topk_ids: Any) -> None:
        first(topk_ids)
        second(topk_ids)

    both.__moecap__ = True  # type: ignore[attr-defined]
    both.__moecap_chained__ = first  # type: ignore[attr-defined]
    return both


def bind_capture(layer: MoELayer, fn: Callable[[Any], None] | None) -> None:
    """Install `fn` (marked `__moecap__`) as the layer's routing capture callback, after any callback
    vLLM bound itself (`--enable-return-routed-experts`), which keeps running; `None` removes ours."""
    existing = current_capture(layer)
    if fn is None:
        fn = getattr(existing, "__moecap_chained__", None)
    elif existing is not None and not getattr(existing, "__moecap__", False):
        fn = _chain(existing, fn)
    if layer.kind == "router":
        layer.module.router.set_capture_fn(fn)
    elif layer.kind == "source":
        layer.module.capture_fn = fn
    elif layer.kind == "sink":
        if fn is None:
            layer.module.routed_experts.routing_sink = None
            return
        sink = getattr(layer.module.routed_experts, "routing_sink", None)
        if sink is not None:
            sink.capture_fn = fn
            return
        fused = layer.module._quant_method.moe_kernel.impl.fused_experts
        _, sink_cls = _monolithic_sink_class()  # type: ignore[misc]
        layer.module.routed_experts.routing_sink = sink_cls(fused.moe_config, fn)


# ---------------------------------------------------------------------------------------------------
# Config facts
# ---------------------------------------------------------------------------------------------------
def hf_text_config(vllm_config: Any) -> Any:
    mc = vllm_config.model_config
    return getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)


def config_num_experts(vllm_config: Any) -> int | None:
    """Logical routed experts per MoE layer from the model config (None when it does not say)."""
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:
        return None
    fn = getattr(mc, "get_num_experts", None)
    if callable(fn):
        try:
            n = int(fn())
            if n > 0:
                return n
        except Exception:
            pass
    cfg = hf_text_config(vllm_config)
    for key in _CONFIG_EXPERT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_top_k(vllm_config: Any) -> int | None:
    cfg = hf_text_config(vllm_config) if getattr(vllm_config, "model_config", None) is not None else None
    for key in _CONFIG_TOPK_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_hidden_layers(vllm_config: Any) -> int | None:
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:
        return None
    fn = getattr(mc, "get_total_num_hidden_layers", None)
    if callable(fn):
        try:
            return int(fn())
        except Exception:
            pass
    value = getattr(hf_text_config(vllm_config), "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def max_step_tokens(vllm_config: Any) -> int:
    """The most token rows one forward pass of this worker can route (scheduler budget, graph sizes)."""
    sizes = [int(getattr(vllm_config.scheduler_config, "max_num_batched_tokens", 0) or 0)]
    cc = getattr(vllm_config, "compilation_config", None)
    capture = getattr(cc, "cudagraph_capture_sizes", None) or []
    sizes.extend(int(s) for s in capture)
    sizes.append(int(getattr(cc, "max_cudagraph_capture_size", 0) or 0))
    return max(1, *sizes)


def model_config_dict(vllm_config: Any) -> dict[str, Any]:
    """The model's full config.json as vLLM loaded it."""
    cfg = getattr(vllm_config.model_config, "hf_config", None)
    if cfg is None:
        return {}
    to_dict = getattr(cfg, "to_dict", None)
    try:
        return dict(to_dict()) if callable(to_dict) else dict(vars(cfg))
    except Exception:
        return {}


def _name(value: Any) -> Any:
    return str(value).replace("torch.", "") if value is not None else None


def dtypes(vllm_config: Any) -> dict[str, str]:
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    weights = _name(getattr(mc, "dtype", None)) or ""
    kv = str(getattr(cc, "cache_dtype", "auto") or "auto")
    return {"weights": weights, "activations": weights, "kv_cache": weights if kv == "auto" else kv}


def quantization(vllm_config: Any) -> dict[str, Any] | None:
    mc = vllm_config.model_config
    method = getattr(mc, "quantization", None)
    hf_quant = getattr(getattr(mc, "hf_config", None), "quantization_config", None)
    if method is None and hf_quant is None:
        return None
    out: dict[str, Any] = {"method": _name(method)}
    if hf_quant is not None:
        out["config"] = hf_quant if isinstance(hf_quant, dict) else getattr(hf_quant, "to_dict", lambda: {})()
    return out


def engine_args(vllm_config: Any) -> dict[str, Any]:
    """The engine settings that shape a step (for `RunMetadata.engine.args`)."""
    mc, sc, cc, pc = (
        vllm_config.model_config,
        vllm_config.scheduler_config,
        vllm_config.cache_config,
        vllm_config.parallel_config,
    )
    comp = getattr(vllm_config, "compilation_config", None)
    spec = getattr(vllm_config, "speculative_config", None)
    args: dict[str, Any] = {
        "model": getattr(mc, "model", None),
        "served_model_name": getattr(mc, "served_model_name", None),
        "dtype": _name(getattr(mc, "dtype", None)),
        "max_model_len": getattr(mc, "max_model_len", None),
        "enforce_eager": getattr(mc, "enforce_eager", None),
        "load_format": _name(getattr(getattr(vllm_config, "load_config", None), "load_format", None)),
        "max_num_batched_tokens": getattr(sc, "max_num_batched_tokens", None),
        "max_num_seqs": getattr(sc, "max_num_seqs", None),
        "enable_chunked_prefill": getattr(sc, "enable_chunked_prefill", None),
        "async_scheduling": getattr(sc, "async_scheduling", None),
        "block_size": getattr(cc, "block_size", None),
        "enable_prefix_caching": getattr(cc, "enable_prefix_caching", None),
        "gpu_memory_utilization": getattr(cc, "gpu_memory_utilization", None),
        "kv_cache_dtype": str(getattr(cc, "cache_dtype", None)),
        "tensor_parallel_size": getattr(pc, "tensor_parallel_size", None),
        "pipeline_parallel_size": getattr(pc, "pipeline_parallel_size", None),
        "data_parallel_size": getattr(pc, "data_parallel_size", None),
        "enable_expert_parallel": getattr(pc, "enable_expert_parallel", None),
        "enable_eplb": getattr(pc, "enable_eplb", None),
        "use_v2_model_runner": getattr(vllm_config, "use_v2_model_runner", None),
    }
    if comp is not None:
        args["compilation_mode"] = _name(getattr(comp, "mode", None))
        args["cudagraph_mode"] = _name(getattr(comp, "cudagraph_mode", None))
        sizes = getattr(comp, "cudagraph_capture_sizes", None)
        args["cudagraph_capture_sizes"] = list(sizes) if sizes else sizes
    if spec is not None:
        args["speculative"] = {
            "method": getattr(spec, "method", None),
            "num_speculative_tokens": getattr(spec, "num_speculative_tokens", None),
        }
    return {
        k: (v if isinstance(v, (int, float, bool, str, list, dict)) or v is None else str(v))
        for k, v in args.items()
    }


def kv_bytes_per_token_by_layer(kv_cache_config: Any) -> dict[int, int]:
    """KV-cache bytes one token occupies on this worker, per decoder layer, from the cache vLLM
    allocated (`page_size_bytes / block_size` of each layer's spec)."""
    try:
        from vllm.model_executor.models.utils import extract_layer_index
    except ImportError:  # pragma: no cover - every supported release has it
        return {}
    out: dict[int, int] = {}
    for group in getattr(kv_cache_config, "kv_cache_groups", []) or []:
        spec = group.kv_cache_spec
        try:
            per_token = int(spec.page_size_bytes) // int(spec.block_size)
        except Exception:
            continue
        for name in group.layer_names:
            try:
                index = int(extract_layer_index(name))
            except Exception:
                continue
            out[index] = out.get(index, 0) + per_token
    return out


def layer_range(model: Any) -> tuple[int, int | None]:
    """[start, end) of the decoder layers this (pipeline-stage) model holds."""
    for module in model.modules():
        start, end = getattr(module, "start_layer", None), getattr(module, "end_layer", None)
        if isinstance(start, int) and isinstance(end, int):
            return start, end
    return 0, None
