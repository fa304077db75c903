"""Model spec: architecture, parameter counts per module class and weight bytes, from config.json.

`model_spec_from_config(config)` dispatches on `model_type` (then `architectures`) to one of the
supported MoE families and returns a frozen `ModelSpec`. Parameter counts follow the module
structure transformers builds for the family (checked against models built on the meta device
in tests/analyze/specs), counting every tensor the checkpoint stores for the decoder (DeepSeek's
multi-token-prediction layers are not part of it). Definitions and sources: docs/specs.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SpecError
from .params import EMPTY_GROUP, MODULE_CLASSES, LinearWeight, ModuleClass, ParamGroup
from .quant import (
    DTYPE_BYTES,
    ClassPrecision,
    QuantScheme,
    class_precision,
    normalize_dtype,
    parse_quantization,
)

AttentionKind = Literal["gqa", "mla"]
MlaLayout = Literal["latent", "decompressed"]

_LAYER = "model.layers.{layer}"


@dataclass(frozen=True)
class MlaDims:
    """Multi-head latent attention dimensions (DeepSeek V2/V3), in elements."""

    q_lora_rank: int | None  # r_q; None = queries projected directly from the hidden state
    kv_lora_rank: int  # r_kv, the cached latent
    qk_rope_head_dim: int  # d_r, the cached shared rope key
    qk_nope_head_dim: int  # d_n
    v_head_dim: int  # d_v


@dataclass(frozen=True)
class Precision:
    """Dtypes and bytes of a model's weights, per module class, and of its KV cache.

    method: `quant_method` of the checkpoint ("none" if unquantised).
    dtype: the unquantised weight dtype (bf16, fp16, fp32).
    kv_cache_dtype: default KV-cache dtype (the dtype, unless the config quantises the cache or
        an explicit engine KV dtype was given).
    classes: per module class, its storage format, GEMM activation dtype and bytes.
    scheme: the parsed quantisation config, for looking up a single weight's format.
    """

    method: str
    dtype: str
    kv_cache_dtype: str
    classes: Mapping[ModuleClass, ClassPrecision]
    scheme: QuantScheme = field(repr=False)

    @property
    def kv_cache_bytes(self) -> float:
        """Bytes per KV-cache element."""
        return DTYPE_BYTES[self.kv_cache_dtype]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one MoE model and its parameters per module class.

    Sizes are element counts (parameters, widths) unless the name says bytes. Module classes are
    described per *unit*: attention per decoder layer, router / shared experts per MoE layer, one
    routed expert of one MoE layer, dense FFN per dense layer, and embedding / LM head / norms
    (all layer norms and the final norm) once for the model. `units` gives how many units exist.
    """

    family: (
        str  # our family key: mixtral, phimoe, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss
    )
    model_type: str  # as written in config.json
    architectures: tuple[str, ...]
    num_layers: int  # L, decoder layers (DeepSeek MTP layers excluded)
    hidden_size: int  # D
    vocab_size: int  # V
    num_attention_heads: int  # H
    num_kv_heads: int  # G (for MLA: as in the config; the cache holds one latent per token)
    head_dim: int  # h, query/key head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
    attention_kind: AttentionKind
    mla: MlaDims | None
    num_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    expert_ffn_dim: int  # F, width of one routed expert
    num_shared_experts: int  # shared experts per MoE layer
    shared_expert_ffn_dim: int  # width of one shared expert (0 if none)
    shared_expert_gate: bool  # Qwen2-MoE: sigmoid gate (D parameters) on the shared expert
    dense_ffn_dim: int  # width of the dense FFN of non-MoE layers (0 if there are none)
    moe_layer_ids: tuple[int, ...]  # 0-based decoder-layer index of each MoE layer
    dense_layer_ids: tuple[int, ...]  # 0-based index of each dense-FFN layer
    attention_windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = full
    tie_word_embeddings: bool
    dtype: str  # unquantised weight dtype (bf16, fp16, fp32)
    num_mtp_layers: int  # DeepSeek `num_nextn_predict_layers`: stored in the checkpoint, not counted
    unit_params: Mapping[ModuleClass, ParamGroup]
    precision: Precision

    # ---- layers ---------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        """Decoder layers with a routed-expert FFN."""
        return len(self.moe_layer_ids)

    @property
    def num_dense_layers(self) -> int:
        """Decoder layers with a dense FFN."""
        return len(self.dense_layer_ids)

    @property
    def units(self) -> dict[ModuleClass, int]:
        """How many units of each class the model has (routed_expert: MoE layers × experts)."""
        return {
            "attention": self.num_layers,
            "router": self.num_moe_layers,
            "routed_expert": self.num_moe_layers * self.num_experts,
            "shared_experts": self.num_moe_layers,
            "dense_ffn": self.num_dense_layers,
            "embedding": 1,
            "lm_head": 1,
            "norms": 1,
        }

    # ---- parameters -----------------------------------------------------------------------
    def params_by_class(self) -> dict[ModuleClass, int]:
        """Parameter elements of each module class over the whole model."""
        units = self.units
        return {c: units[c] * self.unit_params[c].params for c in MODULE_CLASSES}

    def total_params(self) -> int:
        """All parameter elements of the model (tied LM head counted once)."""
        return sum(self.params_by_class().values())

    def active_params(self, experts_per_token: int | None = None) -> int:
        """Parameters one token passes through: every class, but only `experts_per_token`
        (default top_k) routed experts per MoE layer."""
        k = self.top_k if experts_per_token is None else experts_per_token
        idle = self.num_moe_layers * (self.num_experts - k) * self.unit_params["routed_expert"].params
        return self.total_params() - idle

    # ---- bytes ----------------------------------------------------------------------------
    def bytes_per_param(self, module_class: ModuleClass) -> float:
        """Average stored bytes per parameter of a class (scales, biases and norms included)."""
        return self.precision.classes[module_class].bytes_per_param

    def activation_dtype(self, module_class: ModuleClass) -> str:
        """Dtype the class's GEMMs run in (picks the peak FLOP/s)."""
        return self.precision.classes[module_class].activation_dtype

    def weight_bytes_by_class(self, experts_per_moe_layer: float | None = None) -> dict[ModuleClass, float]:
        """Stored weight bytes per class; routed experts counted `experts_per_moe_layer` times per
        MoE layer (default: all experts)."""
        units: dict[ModuleClass, float] = dict(self.units)
        if experts_per_moe_layer is not None:
            if not 0 <= experts_per_moe_layer <= self.num_experts:
                raise ValueError(
                    f"experts_per_moe_layer={experts_per_moe_layer} outside [0, {self.num_experts}]"
                )
            units["routed_expert"] = self.num_moe_layers * experts_per_moe_layer
        return {c: units[c] * self.precision.classes[c].bytes_per_unit for c in MODULE_CLASSES}

    def weight_bytes(self, experts_per_moe_layer: float | None = None) -> float:
        """Stored weight bytes of the model, by default with every expert (= checkpoint size)."""
        return sum(self.weight_bytes_by_class(experts_per_moe_layer).values())

    def kv_bytes_per_token_per_layer(
        self, *, kv_cache_dtype: str | None = None, mla_layout: MlaLayout = "latent"
    ) -> float:
        """Default KV-cache bytes one token occupies in one layer.

        GQA: 2·G·h·b. MLA "latent" (vLLM, SGLang, transformers 5.x): (r_kv + d_r)·b. MLA
        "decompressed" (transformers 4.x cached per-head K and V): H·(d_n + d_r)·b + H·d_v·b.
        b = bytes per element of `kv_cache_dtype` (default: the precision's KV dtype). Engines
        record what they allocate in the trace; this is the fallback.
        """
        b = (
            self.precision.kv_cache_bytes
            if kv_cache_dtype in (None, "auto")
            else DTYPE_BYTES[normalize_dtype(str(kv_cache_dtype))]
        )
        if self.mla is None:
            return 2 * self.num_kv_heads * self.head_dim * b
        m = self.mla
        if mla_layout == "latent":
            return (m.kv_lora_rank + m.qk_rope_head_dim) * b
        h = self.num_attention_heads
        return (h * (m.qk_nope_head_dim + m.qk_rope_head_dim) + h * m.v_head_dim) * b


# ---- config access -------------------------------------------------------------------------
def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language-model part of a (possibly multimodal) config, with top-level fields it inherits."""
    for path in (("thinker_config", "text_config"), ("text_config",), ("language_config",)):
        node: Any = config
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            merged = dict(node)
            for key in (
                "quantization_config",
                "torch_dtype",
                "dtype",
                "tie_word_embeddings",
                "architectures",
            ):
                if merged.get(key) is None and config.get(key) is not None:
                    merged[key] = config[key]
            return merged
    return dict(config)


def _first(cfg: Mapping[str, Any], spec: str) -> Any:
    """Value of the first present, non-null key of an alternatives spec "a|b"."""
    for key in spec.split("|"):
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _require(cfg: Mapping[str, Any], model_type: str, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if _first(cfg, f) is None]
    if missing:
        raise SpecError(
            f"config for model_type {model_type!r} lacks required field(s): {', '.join(missing)} "
            "('a|b' = either name)"
        )


def _layer_ids(n: int, is_moe: Callable[[int], bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    moe = tuple(i for i in range(n) if is_moe(i))
    dense = tuple(i for i in range(n) if not is_moe(i))
    return moe, dense


def _windows(cfg: Mapping[str, Any], n: int, default: Callable[[int], int | None]) -> tuple[int | None, ...]:
    """Per-layer attention window: `layer_types` when given, else the family's rule."""
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        return tuple(default(i) for i in range(n))
    if len(layer_types) < n:
        raise SpecError(f"layer_types has {len(layer_types)} entries for {n} layers")
    out: list[int | None] = []
    for kind in layer_types[:n]:
        if kind == "full_attention":
            out.append(None)
        elif kind == "sliding_attention":
            if cfg.get("sliding_window") is None:
                raise SpecError("layer_types names sliding_attention layers but sliding_window is null")
            out.append(int(cfg["sliding_window"]))
        else:
            raise SpecError(f"unsupported layer type {kind!r} in layer_types")
    return tuple(out)


def _qwen_window(cfg: Mapping[str, Any]) -> Callable[[int], int | None]:
    # Qwen's documented meaning: the first `max_window_layers` layers use full attention, later
    # ones the sliding window, when `use_sliding_window` is true. (transformers 5.17's qwen2_moe
    # config derives `layer_types` differently; a config that carries `layer_types` wins anyway.)
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return lambda i: None
    window, first = int(cfg["sliding_window"]), int(cfg.get("max_window_layers") or 0)
    return lambda i: window if i >= first else None


# ---- module builders -----------------------------------------------------------------------
def _gqa_attention(
    d: int,
    h_q: int,
    g: int,
    hd: int,
    *,
    qkv_bias: bool,
    o_bias: bool,
    norms: int = 0,
    sinks: int = 0,
) -> ParamGroup:
    p = f"{_LAYER}.self_attn."
    linears = (
        LinearWeight(p + "q_proj", h_q * hd, d),
        LinearWeight(p + "k_proj", g * hd, d),
        LinearWeight(p + "v_proj", g * hd, d),
        LinearWeight(p + "o_proj", d, h_q * hd),
    )
    biases = (h_q * hd + 2 * g * hd if qkv_bias else 0) + (d if o_bias else 0)
    return ParamGroup(linears, other=biases + norms + sinks)


def _mla_attention(d: int, h_q: int, m: MlaDims, *, bias: bool) -> ParamGroup:
    p = f"{_LAYER}.self_attn."
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    linears: list[LinearWeight] = []
    other = 0
    if m.q_lora_rank:
        linears += [
            LinearWeight(p + "q_a_proj", m.q_lora_rank, d),
            LinearWeight(p + "q_b_proj", h_q * qk, m.q_lora_rank),
        ]
        other += m.q_lora_rank + (m.q_lora_rank if bias else 0)  # q_a_layernorm (+ q_a_proj bias)
    else:
        linears.append(LinearWeight(p + "q_proj", h_q * qk, d))
    kv_a = m.kv_lora_rank + m.qk_rope_head_dim
    linears += [
        LinearWeight(p + "kv_a_proj_with_mqa", kv_a, d),
        LinearWeight(p + "kv_b_proj", h_q * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        LinearWeight(p + "o_proj", d, h_q * m.v_head_dim),
    ]
    other += m.kv_lora_rank + ((kv_a + d) if bias else 0)  # kv_a_layernorm (+ kv_a, o biases)
    return ParamGroup(tuple(linears), other=other)


def _glu(prefix: str, names: tuple[str, str, str], width: int, d: int, *, bias: bool = False) -> ParamGroup:
    """Gated FFN: gate (width×D), up (width×D), down (D×width); names in that order."""
    gate, up, down = names
    linears = (
        LinearWeight(f"{prefix}.{gate}", width, d),
        LinearWeight(f"{prefix}.{up}", width, d),
        LinearWeight(f"{prefix}.{down}", d, width),
    )
    return ParamGroup(linears, other=(2 * width + d) if bias else 0)


_GLU_NAMES = ("gate_proj", "up_proj", "down_proj")


def _lm_head(v: int, d: int, *, tied: bool, bias: bool) -> ParamGroup:
    linears = () if tied else (LinearWeight("lm_head", v, d),)
    return ParamGroup(linears, other=v if bias else 0)


@dataclass
class _Parts:
    """What a family builder works out; `model_spec_from_config` assembles the ModelSpec."""

    num_kv_heads: int
    head_dim: int
    mla: MlaDims | None
    num_experts: int
    top_k: int
    expert_ffn_dim: int
    moe_layer_ids: tuple[int, ...]
    dense_layer_ids: tuple[int, ...]
    windows: tuple[int | None, ...]
    groups: dict[ModuleClass, ParamGroup]
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int = 0
    shared_expert_gate: bool = False
    dense_ffn_dim: int = 0
    num_mtp_layers: int = 0


def _common(cfg: Mapping[str, Any]) -> tuple[int, int, int, int]:
    return (
        int(cfg["num_hidden_layers"]),
        int(cfg["hidden_size"]),
        int(cfg["vocab_size"]),
        int(cfg["num_attention_heads"]),
    )


def _head_dim(cfg: Mapping[str, Any], d: int, h_q: int) -> int:
    return int(cfg.get("head_dim") or d // h_q)


def _embed_norms(
    cfg: Mapping[str, Any], v: int, d: int, n: int, *, norm_size: int
) -> dict[ModuleClass, ParamGroup]:
    """Embedding, LM head and layer norms (two per layer plus the final norm, `norm_size` each)."""
    return {
        "embedding": ParamGroup(other=v * d),
        "lm_head": _lm_head(
            v, d, tied=bool(cfg.get("tie_word_embeddings", False)), bias=bool(cfg.get("lm_head_bias"))
        ),
        "norms": ParamGroup(other=(2 * n + 1) * norm_size),
    }


def _build_mixtral_like(cfg: Mapping[str, Any], *, layer_norm: bool) -> _Parts:
    # Mixtral and Phi-3.5-MoE: every layer MoE, experts w1 (gate) / w3 (up) / w2 (down) under
    # block_sparse_moe in the checkpoint; Phi-MoE adds biases (attention_bias, lm_head_bias) and
    # uses LayerNorm (weight + bias) instead of RMSNorm.
    n, d, v, h_q = _common(cfg)
    g, hd = int(cfg["num_key_value_heads"]), _head_dim(cfg, d, h_q)
    e, k, f = (
        int(_first(cfg, "num_local_experts|num_experts")),
        int(cfg["num_experts_per_tok"]),
        int(cfg["intermediate_size"]),
    )
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window")
    moe = f"{_LAYER}.block_sparse_moe"
    groups: dict[ModuleClass, ParamGroup] = {
        "attention": _gqa_attention(d, h_q, g, hd, qkv_bias=bias, o_bias=bias),
        "router": ParamGroup(other=e * d),
        "routed_expert": _glu(f"{moe}.experts.{{expert}}", ("w1", "w3", "w2"), f, d),
        **_embed_norms(cfg, v, d, n, norm_size=2 * d if layer_norm else d),
    }
    return _Parts(
        num_kv_heads=g,
        head_dim=hd,
        mla=None,
        num_experts=e,
        top_k=k,
        expert_ffn_dim=f,
        moe_layer_ids=tuple(range(n)),
        dense_layer_ids=(),
        windows=_windows(cfg, n, lambda i: None if window is None else int(window)),
        groups=groups,
    )


def _build_qwen_moe(cfg: Mapping[str, Any], *, qwen3: bool) -> _Parts:
    n, d, v, h_q = _common(cfg)
    g, hd = int(cfg["num_key_value_heads"]), _head_dim(cfg, d, h_q)
    e, k, f = int(cfg["num_experts"]), int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    if step < 1:
        raise SpecError(f"decoder_sparse_step must be >= 1, got {step}")
    mlp_only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    # transformers Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: MoE iff not in mlp_only_layers,
    # num_experts > 0 and (i + 1) % decoder_sparse_step == 0.
    moe_ids, dense_ids = _layer_ids(n, lambda i: i not in mlp_only and e > 0 and (i + 1) % step == 0)
    if dense_ids:
        _require(cfg, str(cfg.get("model_type")), ("intermediate_size",))
    fd = int(cfg["intermediate_size"]) if dense_ids else 0
    mlp = f"{_LAYER}.mlp"
    if qwen3:
        bias = bool(cfg.get("attention_bias", False))
        attention = _gqa_attention(d, h_q, g, hd, qkv_bias=bias, o_bias=bias, norms=2 * hd)  # q_norm, k_norm
        shared, fs = EMPTY_GROUP, 0
    else:
        attention = _gqa_attention(d, h_q, g, hd, qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False)
        fs = int(cfg["shared_expert_intermediate_size"])
        s = _glu(f"{mlp}.shared_expert", _GLU_NAMES, fs, d)
        shared = ParamGroup(s.linears, other=s.other + d)  # + shared_expert_gate (D -> 1, no bias)
    groups: dict[ModuleClass, ParamGroup] = {
        "attention": attention,
        "router": ParamGroup(other=e * d),
        "routed_expert": _glu(f"{mlp}.experts.{{expert}}", _GLU_NAMES, f, d),
        "shared_experts": shared,
        "dense_ffn": _glu(mlp, _GLU_NAMES, fd, d) if dense_ids else EMPTY_GROUP,
        **_embed_norms(cfg, v, d, n, norm_size=d),
    }
    return _Parts(
        num_kv_heads=g,
        head_dim=hd,
        mla=None,
        num_experts=e,
        top_k=k,
        expert_ffn_dim=f,
        moe_layer_ids=moe_ids,
        dense_layer_ids=dense_ids,
        windows=_windows(cfg, n, _qwen_window(cfg)),
        groups=groups,
        num_shared_experts=0 if qwen3 else 1,
        shared_expert_ffn_dim=fs,
        shared_expert_gate=not qwen3,
        dense_ffn_dim=fd,
    )


def _build_olmoe(cfg: Mapping[str, Any]) -> _Parts:
    n, d, v, h_q = _common(cfg)
    g = int(cfg.get("num_key_value_heads") or h_q)
    hd = _head_dim(cfg, d, h_q)
    e, k, f = (
        int(_first(cfg, "num_experts|num_local_experts")),
        int(cfg["num_experts_per_tok"]),
        int(cfg["intermediate_size"]),
    )
    bias = bool(cfg.get("attention_bias", False))
    # OLMoE normalises the whole q (width D) and k ((D // H) · G) projections.
    norms = d + (d // h_q) * g
    mlp = f"{_LAYER}.mlp"
    groups: dict[ModuleClass, ParamGroup] = {
        "attention": _gqa_attention(d, h_q, g, hd, qkv_bias=bias, o_bias=bias, norms=norms),
        "router": ParamGroup(other=e * d),
        "routed_expert": _glu(f"{mlp}.experts.{{expert}}", _GLU_NAMES, f, d),
        **_embed_norms(cfg, v, d, n, norm_size=d),
    }
    return _Parts(
        num_kv_heads=g,
        head_dim=hd,
        mla=None,
        num_experts=e,
        top_k=k,
        expert_ffn_dim=f,
        moe_layer_ids=tuple(range(n)),
        dense_layer_ids=(),
        windows=_windows(cfg, n, lambda i: None),
        groups=groups,
    )


def _build_deepseek(cfg: Mapping[str, Any], *, v3: bool) -> _Parts:
    n, d, v, h_q = _common(cfg)
    mla = MlaDims(
        q_lora_rank=int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
    )
    e, k, f = int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    # DeepSeek's modeling code: MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0
    # (transformers ignores moe_layer_freq, which is 1 in every released checkpoint).
    moe_ids, dense_ids = _layer_ids(n, lambda i: i >= first_dense and i % freq == 0)
    if dense_ids:
        _require(cfg, str(cfg.get("model_type")), ("intermediate_size",))
    fd = int(cfg["intermediate_size"]) if dense_ids else 0
    # transformers' defaults when the field is absent: 1 shared expert for V3, 2 for V2.
    n_shared = cfg.get("n_shared_experts")
    n_shared = int(n_shared) if n_shared is not None else (1 if v3 else 2)
    mlp_bias = bool(cfg.get("mlp_bias", False)) and not v3
    mlp = f"{_LAYER}.mlp"
    groups: dict[ModuleClass, ParamGroup] = {
        "attention": _mla_attention(d, h_q, mla, bias=bool(cfg.get("attention_bias", False))),
        # V3 routers carry `e_score_correction_bias` (E values, kept in fp32).
        "router": ParamGroup(other=e * d, fp32=e if v3 else 0),
        "routed_expert": _glu(f"{mlp}.experts.{{expert}}", _GLU_NAMES, f, d),
        "shared_experts": _glu(f"{mlp}.shared_experts", _GLU_NAMES, n_shared * f, d, bias=mlp_bias)
        if n_shared
        else EMPTY_GROUP,
        "dense_ffn": _glu(mlp, _GLU_NAMES, fd, d, bias=mlp_bias) if dense_ids else EMPTY_GROUP,
        **_embed_norms(cfg, v, d, n, norm_size=d),
    }
    return _Parts(
        num_kv_heads=int(cfg.get("num_key_value_heads") or h_q),
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        mla=mla,
        num_experts=e,
        top_k=k,
        expert_ffn_dim=f,
        moe_layer_ids=moe_ids,
        dense_layer_ids=dense_ids,
        windows=_windows(cfg, n, lambda i: None),
        groups=groups,
        num_shared_experts=n_shared,
        shared_expert_ffn_dim=f if n_shared else 0,
        dense_ffn_dim=fd,
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
    )


def _build_gpt_oss(cfg: Mapping[str, Any]) -> _Parts:
    n, d, v, h_q = _common(cfg)
    g, hd = int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
    e = int(_first(cfg, "num_local_experts|num_experts"))
    k = int(_first(cfg, "num_experts_per_tok|experts_per_token"))
    f = int(cfg["intermediate_size"])
    bias = bool(cfg.get("attention_bias", True))
    window = int(cfg.get("sliding_window") or 128)
    mlp = f"{_LAYER}.mlp"
    # Experts are stored fused over the expert axis as parameters of one module `mlp.experts`
    # (gate_up_proj [E, D, 2F], down_proj [E, F, D]; ignore lists name that module) with biases
    # (2F + D per expert); the router has a bias; attention has one sink per head.
    experts = f"{mlp}.experts"
    expert = ParamGroup((LinearWeight(experts, 2 * f, d), LinearWeight(experts, d, f)), other=2 * f + d)
    groups: dict[ModuleClass, ParamGroup] = {
        "attention": _gqa_attention(d, h_q, g, hd, qkv_bias=bias, o_bias=bias, sinks=h_q),
        "router": ParamGroup(other=e * d + e),
        "routed_expert": expert,
        **_embed_norms(cfg, v, d, n, norm_size=d),
    }
    return _Parts(
        num_kv_heads=g,
        head_dim=hd,
        mla=None,
        num_experts=e,
        top_k=k,
        expert_ffn_dim=f,
        moe_layer_ids=tuple(range(n)),
        dense_layer_ids=(),
        # gpt-oss alternates: even layers sliding (window 128), odd layers full, unless layer_types says.
        windows=_windows(cfg, n, lambda i: window if i % 2 == 0 else None),
        groups=groups,
    )


@dataclass(frozen=True)
class _Family:
    build: Callable[[Mapping[str, Any]], _Parts]
    required: tuple[str, ...]
    architectures: tuple[str, ...]


_COMMON = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DEEPSEEK_REQUIRED = (
    *_COMMON,
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)

# Keyed by transformers' model_type. Families whose transformers default for a missing field is
# not derivable from other fields (e.g. Mixtral's num_key_value_heads defaults to 8) require it.
FAMILIES: dict[str, _Family] = {
    "mixtral": _Family(
        lambda c: _build_mixtral_like(c, layer_norm=False),
        (
            *_COMMON,
            "num_key_value_heads",
            "intermediate_size",
            "num_local_experts|num_experts",
            "num_experts_per_tok",
        ),
        ("MixtralForCausalLM",),
    ),
    "phimoe": _Family(
        lambda c: _build_mixtral_like(c, layer_norm=True),
        (
            *_COMMON,
            "num_key_value_heads",
            "intermediate_size",
            "num_local_experts|num_experts",
            "num_experts_per_tok",
        ),
        ("PhiMoEForCausalLM", "PhimoeForCausalLM"),
    ),
    "qwen2_moe": _Family(
        lambda c: _build_qwen_moe(c, qwen3=False),
        (
            *_COMMON,
            "num_key_value_heads",
            "moe_intermediate_size",
            "num_experts",
            "num_experts_per_tok",
            "shared_expert_intermediate_size",
        ),
        ("Qwen2MoeForCausalLM",),
    ),
    "qwen3_moe": _Family(
        lambda c: _build_qwen_moe(c, qwen3=True),
        (*_COMMON, "num_key_value_heads", "moe_intermediate_size", "num_experts", "num_experts_per_tok"),
        ("Qwen3MoeForCausalLM",),
    ),
    "olmoe": _Family(
        _build_olmoe,
        (*_COMMON, "intermediate_size", "num_experts|num_local_experts", "num_experts_per_tok"),
        ("OlmoeForCausalLM",),
    ),
    "deepseek_v2": _Family(
        lambda c: _build_deepseek(c, v3=False), _DEEPSEEK_REQUIRED, ("DeepseekV2ForCausalLM",)
    ),
    "deepseek_v3": _Family(
        lambda c: _build_deepseek(c, v3=True), _DEEPSEEK_REQUIRED, ("DeepseekV3ForCausalLM",)
    ),
    "gpt_oss": _Family(
        _build_gpt_oss,
        (
            *_COMMON,
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "num_local_experts|num_experts",
            "num_experts_per_tok|experts_per_token",
        ),
        ("GptOssForCausalLM",),
    ),
}

_BY_ARCHITECTURE = {arch: key for key, fam in FAMILIES.items() for arch in fam.architectures}


def supported_families() -> list[str]:
    """The model_type values model_spec_from_config accepts (other model_types are dispatched by
    `architectures`, e.g. Kimi-K2's DeepseekV3ForCausalLM)."""
    return sorted(FAMILIES)


def _family_of(cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type
    architectures = [str(a) for a in cfg.get("architectures") or ()]
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise SpecError(
        f"unsupported model family: model_type {model_type!r}, architectures {architectures}; "
        f"supported model_type values: {', '.join(supported_families())}"
    )


def _config_dtype(cfg: Mapping[str, Any]) -> str:
    raw = cfg.get("torch_dtype") or cfg.get("dtype")
    # No dtype in the config (or "auto"): bf16, what every supported family is released in.
    return "bf16" if raw in (None, "auto") else normalize_dtype(str(raw))


def model_spec_from_config(
    config: Mapping[str, Any], *, dtype: str | None = None, kv_cache_dtype: str | None = None
) -> ModelSpec:
    """Build the ModelSpec of a HF config.json dict (a nested `text_config` is used if present).

    dtype: override of the unquantised weight dtype (e.g. an engine's `--dtype float16`).
    kv_cache_dtype: the engine's KV-cache dtype (e.g. "fp8"); None/"auto" = config default.
    Raises SpecError for an unsupported family, a missing required field or an unknown quant method.
    """
    cfg = _text_config(config)
    family = _family_of(cfg)
    fam = FAMILIES[family]
    model_type = str(cfg.get("model_type") or family)
    _require(cfg, model_type, fam.required)
    parts = fam.build(cfg)
    n, d, v, h_q = _common(cfg)

    weight_dtype = normalize_dtype(dtype) if dtype else _config_dtype(cfg)
    scheme = parse_quantization(
        cfg.get("quantization_config"), dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype
    )
    groups = {c: parts.groups.get(c, EMPTY_GROUP) for c in MODULE_CLASSES}
    # Ignore lists are matched at each class's first layer.
    first_moe = parts.moe_layer_ids[0] if parts.moe_layer_ids else 0
    first_dense = parts.dense_layer_ids[0] if parts.dense_layer_ids else 0
    layer_of: dict[ModuleClass, int] = {
        "router": first_moe,
        "routed_expert": first_moe,
        "shared_experts": first_moe,
    }
    layer_of["dense_ffn"] = first_dense
    precision = Precision(
        method=scheme.method,
        dtype=scheme.dtype,
        kv_cache_dtype=scheme.kv_cache_dtype,
        classes={c: class_precision(scheme, c, groups[c], layer=layer_of.get(c, 0)) for c in MODULE_CLASSES},
        scheme=scheme,
    )
    return ModelSpec(
        family=family,
        model_type=model_type,
        architectures=tuple(str(a) for a in cfg.get("architectures") or ()),
        num_layers=n,
        hidden_size=d,
        vocab_size=v,
        num_attention_heads=h_q,
        num_kv_heads=parts.num_kv_heads,
        head_dim=parts.head_dim,
        attention_kind="mla" if parts.mla else "gqa",
        mla=parts.mla,
        num_experts=parts.num_experts,
        top_k=parts.top_k,
        expert_ffn_dim=parts.expert_ffn_dim,
        num_shared_experts=parts.num_shared_experts,
        shared_expert_ffn_dim=parts.shared_expert_ffn_dim,
        shared_expert_gate=parts.shared_expert_gate,
        dense_ffn_dim=parts.dense_ffn_dim,
        moe_layer_ids=parts.moe_layer_ids,
        dense_layer_ids=parts.dense_layer_ids,
        attention_windows=parts.windows,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=weight_dtype,
        num_mtp_layers=parts.num_mtp_layers,
        unit_params=groups,
        precision=precision,
    )
