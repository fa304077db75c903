"""Model facts the reference's way: config reading, family dispatch and static sizes (metrics.md 1.2-2.3).

This deliberately does not use moecap's model specs: the reference reads config.json its own way
(`HFModelInfoRetriever` recursive lookups for the dimensions, top-level attributes for the family
helpers) and dispatches on case-sensitive substrings of the model id. Sizes are in "T-units"
(parameters / 1e12) except `per_token_kv_size` (elements per token).

Where the reference would raise while computing these (a missing or non-numeric field), the helpers
here raise `SpecError` naming the field; `reference_metrics` turns that into null metrics + `reason`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moecap.analyze.errors import SpecError

FAMILIES = ("qwen", "qwen3", "deepseek", "generic")

_MISSING = object()


def normalize_model_id(name: str) -> str:
    """Reduce a checkpoint reference to ``org/model`` (`normalize_model_id`): local paths keep their
    last two segments, a proper ``org/model`` id is left intact."""
    if not name:
        return name
    s = str(name).rstrip("/")
    if s.startswith("/") or s.count("/") >= 2:
        parts = [p for p in s.split("/") if p]
        return "/".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else s)
    return s


def reference_family(model_name: str) -> str:
    """Formula family by the reference's case-sensitive substring rule (metrics.md 1.3, defect 7.17).

    ``"Qwen"`` without ``"Qwen3"`` -> qwen; ``"Qwen3"`` -> qwen3; ``"DeepSeek"`` -> deepseek; else generic.
    """
    if "Qwen" in model_name and "Qwen3" not in model_name:
        return "qwen"
    if "Qwen3" in model_name:
        return "qwen3"
    if "DeepSeek" in model_name:
        return "deepseek"
    return "generic"


def _deep_get(d: Any, *keys: str) -> Any:
    """First non-None value of `keys`: thinker_config.text_config first, then top level, then any nested
    dict (depth first, in insertion order) - the reference's `_deep_get`."""
    if not isinstance(d, Mapping):
        return None
    thinker = d.get("thinker_config")
    if isinstance(thinker, Mapping):
        text_cfg = thinker.get("text_config")
        if isinstance(text_cfg, Mapping):
            for k in keys:
                if text_cfg.get(k) is not None:
                    return text_cfg[k]
            for v in text_cfg.values():
                if isinstance(v, Mapping):
                    found = _deep_get(v, *keys)
                    if found is not None:
                        return found
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    for v in d.values():
        if isinstance(v, Mapping):
            found = _deep_get(v, *keys)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class ReferenceDims:
    """The dimensions `HFModelInfoRetriever` extracts (any may be None, or even a dict, as there)."""

    n_layers: Any
    d_model: Any
    n_attn_heads: Any
    n_kv_heads: Any
    d_head: Any
    d_ff: Any
    moe_top_k: Any
    num_experts_per_layer: Any


def reference_dims(config: Mapping[str, Any], model_name: str) -> ReferenceDims:
    """Read L, D, H, G, h, F (and the unused top-k / expert count) the way the reference does."""
    is_dbrx = config.get("model_type") == "dbrx" or str(model_name).startswith("databricks/dbrx")
    heads = _deep_get(config, "num_attention_heads", "encoder_attention_heads", "num_heads")
    kv_heads = _deep_get(config, "num_key_value_heads", "num_kv_heads", "num_key_value_groups")
    head_dim = _deep_get(config, "head_dim")
    if not head_dim:
        hidden = _deep_get(config, "hidden_size", "d_model")
        if heads and hidden:
            try:
                head_dim = hidden // heads
            except TypeError as exc:
                raise SpecError(
                    f"cannot derive head_dim from hidden_size {hidden!r} // heads {heads!r}"
                ) from exc
    d_model = _deep_get(config, "hidden_size")
    n_layers = _deep_get(config, "num_hidden_layers")
    d_ff = _deep_get(config, "moe_intermediate_size", "intermediate_size", "ffn_hidden_size")
    n_experts = _deep_get(
        config, "num_experts_per_layer", "n_experts", "num_local_experts", "expert_number", "num_experts"
    )
    top_k = _deep_get(config, "moe_top_k", "router_topk", "num_experts_per_tok", "topk", "n_routed_experts")
    if is_dbrx:
        # Reproduced as is: `_deep_get(cfg, "attn_config", "kv_n_heads")` returns the attn_config dict.
        heads = heads or _deep_get(config, "n_heads")
        kv_heads = kv_heads or _deep_get(config, "attn_config", "kv_n_heads")
        d_model = d_model or _deep_get(config, "d_model")
        n_layers = n_layers or _deep_get(config, "n_layers")
        ffn_cfg = config.get("ffn_config", {})
        if isinstance(ffn_cfg, Mapping):
            n_experts = n_experts or ffn_cfg.get("moe_num_experts")
            top_k = top_k or ffn_cfg.get("moe_top_k")
            d_ff = d_ff or ffn_cfg.get("ffn_hidden_size")
    return ReferenceDims(
        n_layers=n_layers,
        d_model=d_model,
        n_attn_heads=heads,
        n_kv_heads=kv_heads,
        d_head=head_dim,
        d_ff=d_ff,
        moe_top_k=top_k,
        num_experts_per_layer=n_experts,
    )


class _Attrs:
    """The config's top-level keys as the attributes the reference's family helpers read."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = config

    def has(self, name: str) -> bool:
        return name in self._config

    def get(self, name: str, default: Any = _MISSING) -> Any:
        if name in self._config:
            return self._config[name]
        if default is _MISSING:
            raise SpecError(
                f"config has no top-level {name!r}, which the reference reads (AttributeError there)"
            )
        return default


def _num(value: Any, what: str) -> float:
    """`value` if it is a number; SpecError (the reference's TypeError) otherwise."""
    if isinstance(value, (int, float)):
        return value
    raise SpecError(f"{what} is {value!r}, not a number (the reference raises TypeError)")


@dataclass(frozen=True)
class ReferenceModelSizes:
    """Static per-model quantities of the reference (metrics.md section 2).

    `per_token_kv_size`: KV elements per token; `attention_size_per_token`, expert sizes: T-units;
    `expert_config`: the reference's dict (keys as there); `score_*`: the attention-score term per
    context token (T-units x 1e12), `score_mla` telling which formula applies.
    """

    model_name: str
    family: str
    dims: ReferenceDims
    per_token_kv_size: float
    attention_size_per_token: float
    expert_config: dict[str, float] = field(default_factory=dict)
    score_mla: bool = False
    score_k_size: float = 0.0
    score_v_size: float = 0.0
    score_kv_size: float = 0.0
    kv_mla: bool = False
    attention_mla: bool = False

    def derived_sizes(self) -> dict[str, Any]:
        """The quantities under the names of the oracle's `derived_sizes` (hardware excluded)."""
        return {
            "per_token_kv_size": self.per_token_kv_size,
            "attention_size_per_token": self.attention_size_per_token,
            "expert_config": dict(self.expert_config),
        }


def _qwen_expert_config(cfg: _Attrs, d_model: float) -> dict[str, float]:
    if cfg.has("moe_intermediate_size") and cfg.has("shared_expert_intermediate_size"):
        moe = _num(cfg.get("moe_intermediate_size"), "moe_intermediate_size")
        shared = _num(cfg.get("shared_expert_intermediate_size"), "shared_expert_intermediate_size")
        return {
            "expert_size": moe * 3 * d_model / 1e12,
            "shared_experts_size_total": shared * 3 * d_model / 1e12,
        }
    return {}


def _qwen3_expert_config(cfg: _Attrs, d_model: float) -> dict[str, float]:
    if not cfg.has("moe_intermediate_size"):
        # Defect 7.18: without it the Qwen3 formulas count 0 MoE layers and L dense layers of size 0.
        return {}
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(n_layers, int):
        raise SpecError(f"top-level num_hidden_layers is {n_layers!r}; the reference's range() needs an int")
    mlp_only = cfg.get("mlp_only_layers", [])
    if not isinstance(mlp_only, (list, tuple, set)):
        raise SpecError(f"mlp_only_layers is {mlp_only!r}, not a list (the reference raises TypeError)")
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int):
        raise SpecError(f"decoder_sparse_step is {step!r}, not an int (the reference raises TypeError)")
    if step == 0 and n_layers > 0:
        raise SpecError("decoder_sparse_step is 0 (the reference raises ZeroDivisionError)")
    mlp_only_set = set(mlp_only)
    num_moe = sum(1 for i in range(n_layers) if i not in mlp_only_set and (i + 1) % step == 0)
    moe = _num(cfg.get("moe_intermediate_size"), "moe_intermediate_size")
    dense = _num(cfg.get("intermediate_size"), "intermediate_size")
    return {
        "expert_size": moe * 3 * d_model / 1e12,
        "dense_ffn_size": dense * 3 * d_model / 1e12,
        "num_moe_layers": num_moe,
        "num_dense_layers": n_layers - num_moe,
    }


def _deepseek_expert_config(cfg: _Attrs, d_model: float, n_layers: float) -> dict[str, float]:
    if cfg.has("moe_intermediate_size") and cfg.has("intermediate_size") and cfg.has("first_k_dense_replace"):
        moe = _num(cfg.get("moe_intermediate_size"), "moe_intermediate_size")
        dense = _num(cfg.get("intermediate_size"), "intermediate_size")
        n_dense = _num(cfg.get("first_k_dense_replace"), "first_k_dense_replace")
        return {
            "expert_size": moe * 3 * d_model / 1e12,
            # Defect 7.9: two shared experts hard-coded, n_shared_experts ignored.
            "shared_experts_size_total": moe * 3 * d_model * 2 / 1e12,
            "deepseek_dense_ffn_size": dense * 3 * d_model / 1e12,
            "deepseek_sparse_layer_num": n_layers - n_dense,
            "deepseek_num_dense_layer": n_dense,
        }
    return {}


def reference_model_sizes(model_config: Mapping[str, Any], model_name: str) -> ReferenceModelSizes:
    """Static sizes for `model_config` (a config.json dict) served as `model_name`.

    `model_name` is normalised first (`normalize_model_id`), then dispatched by substring. Raises
    SpecError where the reference would raise computing these (missing / non-numeric fields).
    """
    if not isinstance(model_config, Mapping):
        raise SpecError(f"model config must be a mapping (config.json), got {type(model_config).__name__}")
    name = normalize_model_id(model_name)
    family = reference_family(name)
    dims = reference_dims(model_config, name)
    cfg = _Attrs(model_config)
    is_ds = "DeepSeek" in name

    n_layers = _num(dims.n_layers, "num_hidden_layers")

    kv_mla = is_ds and cfg.has("kv_lora_rank") and cfg.has("qk_rope_head_dim")
    if kv_mla:
        kv_lora = _num(cfg.get("kv_lora_rank"), "kv_lora_rank")
        rope = _num(cfg.get("qk_rope_head_dim"), "qk_rope_head_dim")
        per_token_kv = n_layers * (kv_lora + rope)
    else:
        d_head = _num(dims.d_head, "head_dim (or hidden_size // num_attention_heads)")
        n_kv = _num(dims.n_kv_heads, "num_key_value_heads")
        per_token_kv = 2 * n_layers * d_head * n_kv

    attention_mla = (
        is_ds
        and cfg.has("qk_rope_head_dim")
        and cfg.has("qk_nope_head_dim")
        and cfg.has("v_head_dim")
        and cfg.has("kv_lora_rank")
    )
    d_model = _num(dims.d_model, "hidden_size")
    n_heads = _num(dims.n_attn_heads, "num_attention_heads")
    if attention_mla:
        rope = _num(cfg.get("qk_rope_head_dim"), "qk_rope_head_dim")
        nope = _num(cfg.get("qk_nope_head_dim"), "qk_nope_head_dim")
        v_dim = _num(cfg.get("v_head_dim"), "v_head_dim")
        kv_lora = _num(cfg.get("kv_lora_rank"), "kv_lora_rank")
        q_head_dim = rope + nope
        base = (
            d_model * (kv_lora + rope)
            + kv_lora * n_heads * (q_head_dim - rope + v_dim)
            + v_dim * n_heads * d_model
        )
        q_lora = cfg.get("q_lora_rank", None)
        if q_lora:
            q_lora = _num(q_lora, "q_lora_rank")
            q_size = d_model * q_lora + q_lora * n_heads * q_head_dim
        else:
            q_size = d_model * n_heads * q_head_dim
        attention = (base + q_size) / 1e12
    else:
        d_head = _num(dims.d_head, "head_dim (or hidden_size // num_attention_heads)")
        n_kv = _num(dims.n_kv_heads, "num_key_value_heads")
        attention = (d_model * (n_heads * d_head + n_kv * d_head * 2) + n_heads * d_head * d_model) / 1e12

    d_ff = _num(dims.d_ff, "moe_intermediate_size / intermediate_size / ffn_hidden_size")
    expert_config: dict[str, float] = {
        "expert_size": d_ff * 3 * d_model / 1e12,
        "shared_experts_size_total": 0,
        "deepseek_dense_ffn_size": 0,
        "deepseek_sparse_layer_num": 0,
        "deepseek_num_dense_layer": 0,
    }
    if family == "qwen":
        expert_config.update(_qwen_expert_config(cfg, d_model))
    elif family == "qwen3":
        expert_config.update(_qwen3_expert_config(cfg, d_model))
    elif family == "deepseek":
        expert_config.update(_deepseek_expert_config(cfg, d_model, n_layers))

    # Attention-score term (per record; computed here once). Needs rope/nope/v only, not kv_lora_rank.
    score_mla = (
        is_ds and cfg.has("qk_rope_head_dim") and cfg.has("qk_nope_head_dim") and cfg.has("v_head_dim")
    )
    k_size = v_size = kv_size = 0.0
    if score_mla:
        q_head_dim = _num(cfg.get("qk_rope_head_dim"), "qk_rope_head_dim") + _num(
            cfg.get("qk_nope_head_dim"), "qk_nope_head_dim"
        )
        k_size = n_layers * n_heads * q_head_dim
        v_size = n_layers * n_heads * _num(cfg.get("v_head_dim"), "v_head_dim")
    else:
        kv_size = n_layers * n_heads * _num(dims.d_head, "head_dim (or hidden_size // num_attention_heads)")

    return ReferenceModelSizes(
        model_name=name,
        family=family,
        dims=dims,
        per_token_kv_size=per_token_kv,
        attention_size_per_token=attention,
        expert_config=expert_config,
        score_mla=score_mla,
        score_k_size=k_size,
        score_v_size=v_size,
        score_kv_size=kv_size,
        kv_mla=kv_mla,
        attention_mla=attention_mla,
    )
