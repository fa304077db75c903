"""Everything the SGLang adapter touches inside SGLang, in one place.

The adapter (`sglang.py`) never imports an SGLang module itself: it asks this module. Supported:
SGLang 0.5.16 (the release matching the GPU machines' torch 2.11) through 0.5.23 (the newest; both
checked against their real classes on CPU, see `tests/engines_sglang/`). Outside that range the
adapter warns (or, with `MOECAP_STRICT_ENGINE=1`, refuses to start).

The two releases agree on every hook point the adapter uses (read in the wheels):

| what | where (0.5.16 and 0.5.23) |
|---|---|
| plugin loading | entry-point group `sglang.srt.plugins`, allow-list `SGLANG_PLUGINS`, `load_plugins()` at the top of `run_scheduler_process` |
| hooks | `sglang.srt.plugins.hook_registry.HookRegistry.register(target, fn, HookType.AROUND)` |
| the pass | `ModelRunner.forward(self, forward_batch, skip_attn_backend_init=None, pp_proxy_tensors=None, reinit_attn_backend=False, split_forward_count=1)`; increments `self.forward_pass_id`; `self.is_draft_worker` |
| the batch | `ForwardBatch`: `forward_mode`, `batch_size`, `rids`, `seq_lens_cpu`, `extend_seq_lens_cpu`, `extend_prefix_lens_cpu`, `extend_num_tokens`, `spec_info`, `global_num_tokens_cpu` |
| modes | `ForwardMode`: EXTEND=1 DECODE=2 MIXED=3 IDLE=4 TARGET_VERIFY=5 DRAFT_EXTEND_V2=6 PREBUILT=7 SPLIT_PREFILL=8 DLLM_EXTEND=9 |
| counts | `get_global_expert_distribution_recorder()`: `recording`, `start_record()`, `_single_pass_gatherers["primary"]._data` (int32 `[num_layers, num_physical_experts]`, zeroed at pass start) |
| EPLB | `sglang.srt.eplb.expert_location.get_global_expert_location_metadata()`: `physical_to_logical_map` `[L, E_phys]`, `num_logical_experts`, `num_local_physical_experts` |
| ranks | `sglang.srt.runtime_context.get_parallel()`: `tp_rank/size`, `attn_tp_rank`, `attn_dp_rank/size`, `pp_rank/size`, `moe_ep_rank/size` |

What differs, none of it on the adapter's path: 0.5.23 reads server arguments through
`runtime_context.get_exec()`/`get_schedule()` and its `ServerArgs` is a msgspec struct (0.5.16: a dataclass
read directly; `server_arg_names` handles both); 0.5.23's gatherer masks ids outside [0, E_phys), 0.5.16's
only −1 (SGLang hands it routed ids only, so both count routed experts); 0.5.23 no longer has
`--enable-expert-distribution-metrics`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from typing import Any

from ... import runtime

log = logging.getLogger("moecap.collect.engines.sglang")

MIN_VERSION = (0, 5, 16)
MAX_VERSION = (0, 5, 23)
VALIDATED = {
    "0.5.16": "real classes on CPU; GPU run by benchmarks/gpu/sglang_validate.py",
    "0.5.23": "real classes on CPU (ForwardBatch, ModelRunner.forward, HookRegistry, recorder)",
}

PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "moecap"
FORWARD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
FORWARD_PARAMS = ("self", "forward_batch", "skip_attn_backend_init", "pp_proxy_tensors",
                  "reinit_attn_backend", "split_forward_count")  # fmt: skip
FORWARD_BATCH_FIELDS = (
    "forward_mode", "batch_size", "rids", "seq_lens_cpu", "extend_seq_lens_cpu",
    "extend_prefix_lens_cpu", "extend_num_tokens", "spec_info", "global_num_tokens_cpu",
)  # fmt: skip
FORWARD_MODES = ("EXTEND", "DECODE", "MIXED", "IDLE", "TARGET_VERIFY", "DRAFT_EXTEND_V2",
                 "PREBUILT", "SPLIT_PREFILL", "DLLM_EXTEND")  # fmt: skip
RECORDER_MODE = "stat"
"""The SGLang recorder mode whose select-experts gatherer the adapter reads (see sglang.py)."""

_PHASE_OF_MODE = {
    "EXTEND": "prefill",
    "SPLIT_PREFILL": "prefill",
    "DLLM_EXTEND": "prefill",
    "DRAFT_EXTEND": "prefill",
    "DRAFT_EXTEND_V2": "prefill",
    "DECODE": "decode",
    "MIXED": "mixed",
    "IDLE": "idle",
    "PREBUILT": "idle",
    "TARGET_VERIFY": "verify",
}


# ---------------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------------
parse_version = runtime.parse_release
"""(major, minor, patch) of an engine release string (shared with the other engine adapters)."""


def installed_version() -> str | None:
    """The SGLang release importable here (the module's `__version__` first: a --target install on
    PYTHONPATH shadows the venv's, and its dist-info may not be the one `importlib.metadata` finds)."""
    try:
        import sglang

        version = getattr(sglang, "__version__", None)
        if version:
            return str(version)
    except Exception:
        pass
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(version: str) -> str | None:
    """A one-line warning when `version` is outside the supported range, else None."""
    return runtime.release_problem("SGLang", version, MIN_VERSION, MAX_VERSION, "the adapter may miss fields")


# ---------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------
def mode_name(forward_mode: Any) -> str:
    """`ForwardMode.DECODE` -> 'DECODE' (an int or unknown value -> its str)."""
    name = getattr(forward_mode, "name", None)
    return str(name) if name else str(forward_mode)


def phase_of_mode(forward_mode: Any) -> str:
    """The `steps.phase` of a pass's `ForwardMode` (unknown modes -> 'mixed', the least specific)."""
    return _PHASE_OF_MODE.get(mode_name(forward_mode), "mixed")


def _ints(value: Any) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(x) for x in value]


def draft_tokens_per_request(forward_batch: Any) -> int | None:
    """Tokens each request verifies in a TARGET_VERIFY pass (`spec_info.draft_token_num`)."""
    spec = getattr(forward_batch, "spec_info", None)
    n = getattr(spec, "draft_token_num", None)
    return int(n) if n is not None else None


def batch_fields(forward_batch: Any) -> dict[str, Any]:
    """The host-side facts of a `ForwardBatch` the snapshot needs, read before the forward runs
    (SGLang pads `batch_size` / `extend_seq_lens_cpu` for DP attention and CUDA graphs later)."""
    fb = forward_batch
    return {
        "mode": mode_name(fb.forward_mode),
        "batch_size": int(getattr(fb, "batch_size", 0) or 0),
        "rids": list(getattr(fb, "rids", None) or []),
        "seq_lens": _ints(getattr(fb, "seq_lens_cpu", None)),
        "extend_seq_lens": _ints(getattr(fb, "extend_seq_lens_cpu", None)),
        "extend_prefix_lens": _ints(getattr(fb, "extend_prefix_lens_cpu", None)),
        "extend_num_tokens": getattr(fb, "extend_num_tokens", None),
        "draft_tokens": draft_tokens_per_request(fb)
        if mode_name(fb.forward_mode) == "TARGET_VERIFY"
        else None,
    }


# ---------------------------------------------------------------------------------------------------
# Ranks, config, recorder
# ---------------------------------------------------------------------------------------------------
@dataclass
class RankInfo:
    tp_rank: int = 0
    tp_size: int = 1
    attn_tp_rank: int = 0
    attn_tp_size: int = 1
    attn_dp_rank: int = 0
    attn_dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    a2a_backend: str = "none"
    """SGLang's `moe_a2a_backend`: 'none' (all-reduce MoE) or 'deepep', 'mooncake', …"""


def _get(obj: Any, name: str, default: Any) -> Any:
    try:
        value = getattr(obj, name)
    except Exception:
        return default
    return default if value is None else value


def rank_info(model_runner: Any) -> RankInfo:
    """This scheduler process's ranks (from `runtime_context.get_parallel()`, else the runner's)."""
    sa = getattr(model_runner, "server_args", None)
    pc: Any = None
    try:
        from sglang.srt.runtime_context import get_parallel

        pc = get_parallel()
    except Exception:
        pc = None
    tp_size = int(_get(pc, "tp_size", _get(sa, "tp_size", 1)))
    tp_rank = int(_get(pc, "tp_rank", _get(model_runner, "tp_rank", 0)))
    dp_size = int(_get(pc, "attn_dp_size", 0) or 0)
    if not dp_size:
        dp_size = int(_get(sa, "dp_size", 1)) if _get(sa, "enable_dp_attention", False) else 1
    attn_tp_size = int(_get(pc, "attn_tp_size", max(1, tp_size // max(1, dp_size))))
    return RankInfo(
        tp_rank=tp_rank,
        tp_size=tp_size,
        attn_tp_rank=int(_get(pc, "attn_tp_rank", tp_rank % max(1, attn_tp_size))),
        attn_tp_size=attn_tp_size,
        attn_dp_rank=int(_get(pc, "attn_dp_rank", _get(model_runner, "dp_rank", 0))),
        attn_dp_size=dp_size,
        pp_rank=int(_get(pc, "pp_rank", _get(model_runner, "pp_rank", 0))),
        pp_size=int(_get(pc, "pp_size", _get(sa, "pp_size", 1))),
        ep_rank=int(_get(pc, "moe_ep_rank", 0)),
        ep_size=int(_get(pc, "moe_ep_size", _get(sa, "ep_size", 1))),
        a2a_backend=str(_get(sa, "moe_a2a_backend", "none") or "none"),
    )


def hf_config(model_runner: Any) -> Any:
    mc = getattr(model_runner, "model_config", None)
    return getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)


def model_config_dict(model_runner: Any) -> dict[str, Any]:
    """The model's config.json as SGLang loaded it (JSON-safe)."""
    mc = getattr(model_runner, "model_config", None)
    cfg = getattr(mc, "hf_config", None)
    try:
        raw = cfg.to_dict() if cfg is not None else {}
    except Exception:
        raw = {}
    return json.loads(json.dumps(raw, default=str))


def config_value(model_runner: Any, *keys: str) -> Any:
    cfg = hf_config(model_runner)
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    return None


def num_hidden_layers(model_runner: Any) -> int | None:
    n = config_value(model_runner, "num_hidden_layers")
    return int(n) if n is not None else None


def moe_layer_ids(model_runner: Any, num_layers: int) -> list[int]:
    """Decoder layers that route through experts: the `TopK` modules' `layer_id`s, else the config's
    MoE-layer rules (Qwen `decoder_sparse_step` / `mlp_only_layers`, DeepSeek `first_k_dense_replace`)."""
    model = getattr(model_runner, "model", None)
    found: set[int] = set()
    try:
        for module in model.modules() if model is not None else ():
            if type(module).__name__ == "TopK":
                lid = getattr(module, "layer_id", None)
                if isinstance(lid, int) and 0 <= lid < num_layers:
                    found.add(lid)
    except Exception:
        found = set()
    if found:
        return sorted(found)
    return moe_layer_ids_of_config(lambda key: config_value(model_runner, key), num_layers)


def moe_layer_ids_of_config(get: Any, num_layers: int) -> list[int]:
    """Decoder layers that are MoE by the config's rules (Qwen `decoder_sparse_step` / `mlp_only_layers`,
    DeepSeek `first_k_dense_replace`, `moe_layer_freq`); `get(key)` reads one config value (or None)."""
    step = int(get("decoder_sparse_step") or 1)
    dense = set(get("mlp_only_layers") or [])
    first = int(get("first_k_dense_replace") or 0)
    freq = int(get("moe_layer_freq") or 1)
    return [
        i
        for i in range(num_layers)
        if i not in dense and (i + 1) % max(1, step) == 0 and i >= first and (i - first) % max(1, freq) == 0
    ]


def fused_shared_experts(model_runner: Any) -> int:
    """Shared experts SGLang routes as extra top-k columns (`num_fused_shared_experts` of the MoE blocks)."""
    model = getattr(model_runner, "model", None)
    try:
        for module in model.modules() if model is not None else ():
            n = getattr(module, "num_fused_shared_experts", None)
            if isinstance(n, int) and n > 0:
                return n
    except Exception:
        pass
    return 0


def recorder() -> Any:
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

    return get_global_expert_distribution_recorder()


def recorder_mode(model_runner: Any) -> str | None:
    sa = getattr(model_runner, "server_args", None)
    mode = getattr(sa, "expert_distribution_recorder_mode", None)
    return str(mode) if mode else None


def gatherer_buffer(rec: Any) -> tuple[Any, str] | None:
    """(the primary gatherer's per-pass count tensor, 'global' | 'local') or None when this recorder
    has none (the no-op recorder, or a CPU-side gatherer such as DeepEP normal's `stat_approx`)."""
    gatherers = getattr(rec, "_single_pass_gatherers", None)
    if not isinstance(gatherers, dict):
        return None
    g = gatherers.get("primary")
    data = getattr(g, "_data", None)
    if data is None or not hasattr(data, "shape") or len(data.shape) != 2:
        return None
    scope = "global" if getattr(g, "_enable_global_physical_experts", True) else "local"
    return data, scope


def location_metadata() -> Any:
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        return get_global_expert_location_metadata()
    except Exception:
        return None


def server_arg_names(server_args: Any) -> list[str]:
    """Field names of a `ServerArgs` (a dataclass in 0.5.16, a msgspec struct in 0.5.23)."""
    if server_args is None:
        return []
    if dataclasses.is_dataclass(server_args):
        return [f.name for f in dataclasses.fields(server_args)]
    return list(getattr(server_args, "__struct_fields__", ()) or ())


def engine_args(model_runner: Any) -> dict[str, Any]:
    """The server arguments, JSON-safe."""
    sa = getattr(model_runner, "server_args", None)
    names = server_arg_names(sa)
    out: dict[str, Any] = {}
    for name in names:
        try:
            value = getattr(sa, name)
        except Exception:
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
        elif isinstance(value, (list, tuple, dict)):
            try:
                out[name] = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                out[name] = str(value)
    return out


def dtypes(model_runner: Any) -> dict[str, str]:
    mc = getattr(model_runner, "model_config", None)
    dtype = str(getattr(mc, "dtype", "") or "").replace("torch.", "")
    sa = getattr(model_runner, "server_args", None)
    kv = str(getattr(sa, "kv_cache_dtype", "auto") or "auto")
    out = {"weights": dtype, "activations": dtype} if dtype else {}
    out["kv_cache"] = dtype if kv == "auto" and dtype else kv
    return out


def quantization(model_runner: Any) -> dict[str, Any] | None:
    sa = getattr(model_runner, "server_args", None)
    q = getattr(sa, "quantization", None)
    return {"method": str(q)} if q else None


def load_format(model_runner: Any) -> str:
    sa = getattr(model_runner, "server_args", None)
    return str(getattr(sa, "load_format", "") or "").lower()


def model_path(model_runner: Any) -> str:
    sa = getattr(model_runner, "server_args", None)
    return str(getattr(sa, "served_model_name", None) or getattr(sa, "model_path", "") or "model")


# -- counts of real tokens only -------------------------------------------------------------------
# A CUDA graph replays a batch padded to its capture bucket (a 200-token prefill as 208, a decode of 3
# requests as 4), and the padded rows are routed like real ones. SGLang masks them to expert -1 only
# where the model passes `num_token_non_padded` to `select_experts` (its DeepEP paths); Qwen2-MoE's
# normal path does not, so SGLang's own select-experts gatherer counts the padding (seen on an H200
# with 0.5.16: 832 = 208 x 4 routed for a 200-token prefill, 16 for a 3-request decode at top-4).
# moecap masks rows at or beyond the pass's live token count in the ids the gatherer receives: a
# device scalar the tracer fills before each forward, read inside the replayed graph. The model's
# own routing is not touched (the gatherer gets a masked copy).
GATHERER_CLASS = ("sglang.srt.eplb.expert_distribution", "_SelectExpertsSinglePassGatherer")
CAPTURE_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs"
_NO_LIMIT = 2**31 - 1
_LIVE_TOKENS: dict[str, Any] = {}
"""str(device) -> int32 device scalar: the real tokens of the pass in flight (no limit until set)."""
_LIVE_SET: dict[str, int] = {}
"""str(device) -> the value last written to its scalar (host copy: an unchanged value needs no launch)."""


def allocate_live_tokens(device: Any) -> Any:
    """The live-token scalar of `device` (allocated once, before graphs are captured, so the graphs
    read its memory at every replay)."""
    import torch

    key = str(torch.device(device))
    if key not in _LIVE_TOKENS:
        _LIVE_TOKENS[key] = torch.full((), _NO_LIMIT, dtype=torch.int32, device=device)
        _LIVE_SET[key] = _NO_LIMIT
    return _LIVE_TOKENS[key]


def set_live_tokens(device: Any, num_tokens: int | None) -> bool:
    """Tell the gatherer how many leading rows of this pass are real (None: no limit). A device fill
    on the current stream, ordered before the pass's kernels, and only when the value changes (steady
    decode at one batch size: no launch at all); no host sync. False when no scalar was allocated for
    `device` (masking off)."""
    key = str(device)
    live = _LIVE_TOKENS.get(key)
    if live is None:
        return False
    value = _NO_LIMIT if num_tokens is None else int(num_tokens)
    if _LIVE_SET.get(key) != value:
        live.fill_(value)
        _LIVE_SET[key] = value
    return True


def reset_live_tokens() -> None:
    for key, live in _LIVE_TOKENS.items():
        live.fill_(_NO_LIMIT)
        _LIVE_SET[key] = _NO_LIMIT


def gatherer_class() -> Any:
    """SGLang's `_SelectExpertsSinglePassGatherer` (None when this release has none)."""
    import importlib

    try:
        return getattr(importlib.import_module(GATHERER_CLASS[0]), GATHERER_CLASS[1])
    except Exception:
        return None


def sglang_count_method() -> Any:
    """SGLang's own `on_select_experts` of the gatherer (under the plugin's patch, if applied)."""
    cls = gatherer_class()
    method = getattr(cls, "on_select_experts", None)
    return getattr(method, "__wrapped__", method)


def legacy_masked_count(gatherer: Any, layer_idx: int, topk_ids: Any, live: Any, sglang_method: Any) -> Any:
    """The unfused path: rows >= `live` become −1 (3 ops), then SGLang's own method counts (6 ops in
    0.5.16, 8 in 0.5.23). Used where the fused kernel is not (CPU, no Triton, or its check failed)."""
    import torch

    if topk_ids.dim() >= 1 and topk_ids.shape[0] > 0:
        rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
        pad = (rows >= live).reshape(-1, *([1] * (topk_ids.dim() - 1)))
        topk_ids = topk_ids.masked_fill(pad, -1)
    return sglang_method(gatherer, layer_idx, topk_ids)


def mask_padded_rows_in_gatherer() -> bool:
    """Patch the select-experts gatherer class (idempotent) so rows >= the live token count of their
    device are dropped (id -1) from what it counts: one fused kernel per layer where `prepare_fused`
    compiled and checked it on that device, else the mask and SGLang's own method. Devices without a
    live-token scalar (attention-DP, all-to-all MoE) keep SGLang's method untouched. False when this
    release has no such class."""
    from . import fused_count

    id_dtypes = fused_count.id_dtypes()  # compiled for these before capture; others: the old path
    cls = gatherer_class()
    if cls is None:
        return False
    original = cls.on_select_experts
    if getattr(original, "_moecap_masks_padding", False):
        return True

    def on_select_experts(self: Any, layer_idx: int, topk_ids: Any) -> Any:
        key = str(topk_ids.device)
        live = _LIVE_TOKENS.get(key)
        if live is None:
            return original(self, layer_idx, topk_ids)
        if topk_ids.dtype in id_dtypes and fused_count.is_ready(key):
            return fused_count.launch(self._data, layer_idx, topk_ids, live)
        return legacy_masked_count(self, layer_idx, topk_ids, live, original)

    on_select_experts._moecap_masks_padding = True  # type: ignore[attr-defined]
    on_select_experts.__wrapped__ = original  # type: ignore[attr-defined]
    cls.on_select_experts = on_select_experts
    return True


def prepare_fused(device: Any) -> bool:
    """Before graph capture, on a device whose live-token scalar exists: compile the fused count and
    check it against SGLang's own method (`fused_count.prepare`). True when the fused path is on."""
    from . import fused_count

    live = _LIVE_TOKENS.get(str(device))
    method = sglang_count_method()
    if live is None or method is None:
        return False
    return fused_count.prepare(device, method, live)


def count_path(device: Any) -> str:
    """How the gatherer counts on `device`: 'fused' (one kernel per layer, padded rows masked),
    'masked' (padded rows masked, then SGLang's method) or 'sglang' (SGLang's method untouched)."""
    from . import fused_count

    key = str(device)
    if key not in _LIVE_TOKENS:
        return "sglang"
    return "fused" if fused_count.is_ready(key) else "masked"


def masks_by_live_tokens(model_runner: Any) -> bool:
    """Whether this runner's gatherer sees exactly this rank's batch rows (one attention-DP rank, no
    all-to-all MoE backend), so the live-token mask applies; otherwise SGLang's own masking stands."""
    ranks = rank_info(model_runner)
    return ranks.a2a_backend in ("none", "") and ranks.attn_dp_size <= 1
