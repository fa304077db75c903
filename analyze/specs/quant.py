"""Bytes per parameter and GEMM activation dtypes from a checkpoint's `quantization_config`.

`parse_quantization` turns the config block into a `QuantScheme`; `QuantScheme.weight_format`
says how one linear weight is stored (element bytes plus the exact scale / zero-point / index
overhead for its shape) and which dtype its GEMM's activations have (the dtype whose peak FLOP/s
applies). Everything not a quantisable linear weight (biases, norms, router weights, embeddings)
stays in the unquantised dtype. The rules and their sources are listed in docs/specs.md.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SpecError
from .params import LinearWeight, ModuleClass, ParamGroup

#: Bytes per element of each dtype name used in specs.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "fp4": 0.5,
    "int4": 0.5,
}

# Spellings found in config.json (`torch_dtype` / `dtype`), engine flags (`--kv-cache-dtype`) and torch.
_DTYPE_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "fp8": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "fp8_ds_mla": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "e4m3": "fp8",
    "int8": "int8",
    "fp4": "fp4",
    "nvfp4": "fp4",
    "int4": "int4",
}

SUPPORTED_QUANT_METHODS: tuple[str, ...] = (
    "awq",
    "bitsandbytes",
    "compressed-tensors",
    "fbgemm_fp8",
    "fp8",
    "gptq",
    "modelopt",
    "mxfp4",
    "nvfp4",
    "w8a8_int8",
)


def normalize_dtype(name: str) -> str:
    """Canonical dtype name (`bf16`, `fp16`, `fp32`, `fp8`, `int8`, `fp4`, `int4`) of a spelling."""
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        known = ", ".join(sorted(_DTYPE_ALIASES))
        raise SpecError(f"unknown dtype {name!r}; known spellings: {known}") from None


@dataclass(frozen=True)
class WeightFormat:
    """How one linear weight is stored, and the dtype its GEMM runs in.

    Stored bytes of an out × in weight = out·in·element_bytes
      + out·ceil(in/group_size)·group_bytes  (scale (+ zero point) per group along the input dim;
                                               group_size -1 = one group per output row)
      + ceil(out/block[0])·ceil(in/block[1])·block_bytes  (one scale per 2-D block)
      + out·row_bytes + in·col_bytes  (per-channel scales; GPTQ's int32 `g_idx`).
    Per-tensor scalar scales (≤ 8 B per matrix) are not counted.
    """

    name: str
    element_bytes: float
    activation_dtype: str
    quantized: bool = True
    group_size: int | None = None
    group_bytes: float = 0.0
    block: tuple[int, int] | None = None
    block_bytes: float = 0.0
    row_bytes: float = 0.0
    col_bytes: float = 0.0

    def weight_bytes(self, out_features: int, in_features: int) -> float:
        """Stored bytes of one out_features × in_features weight, scales included."""
        total = out_features * in_features * self.element_bytes
        if self.group_size is not None:
            group = in_features if self.group_size <= 0 else self.group_size
            total += out_features * math.ceil(in_features / group) * self.group_bytes
        if self.block is not None:
            rows, cols = self.block
            total += math.ceil(out_features / rows) * math.ceil(in_features / cols) * self.block_bytes
        return total + out_features * self.row_bytes + in_features * self.col_bytes


def plain_format(dtype: str) -> WeightFormat:
    """The unquantised format of `dtype` (bytes per element = the dtype's size)."""
    dtype = normalize_dtype(dtype)
    return WeightFormat(name=dtype, element_bytes=DTYPE_BYTES[dtype], activation_dtype=dtype, quantized=False)


MatchStyle = Literal["hf", "compressed-tensors", "glob"]


def _matches(pattern: str, name: str, style: MatchStyle) -> bool:
    """Whether an ignore/target pattern names module `name`, the way the quantiser reads it."""
    if style == "compressed-tensors":
        # compressed-tensors: "re:<regex>" is re.match'ed; anything else is an exact module name or
        # a module class name (all our weights are `Linear`).
        if pattern.startswith("re:"):
            return re.match(pattern[3:], name) is not None
        return pattern in (name, "Linear")
    if style == "glob":
        # NVIDIA ModelOpt `exclude_modules`: shell-style wildcards over module names.
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    # transformers `should_convert_module`: regex match at the start, or a name suffix.
    try:
        return bool(re.match(pattern + r"\.", name) or re.match(pattern, name) or name.endswith(pattern))
    except re.error:
        return pattern in name


@dataclass(frozen=True)
class _Rule:
    targets: tuple[str, ...]  # ("*",) targets every linear weight
    fmt: WeightFormat


@dataclass(frozen=True)
class QuantScheme:
    """A parsed `quantization_config`: which linear weights are stored how.

    method: the `quant_method` ("none" when the checkpoint is unquantised).
    dtype: the unquantised dtype (biases, norms, routers, embeddings, excluded modules).
    kv_cache_dtype: the default KV-cache dtype (the dtype unless the config quantises the cache).
    """

    method: str
    dtype: str
    kv_cache_dtype: str
    rules: tuple[_Rule, ...] = ()
    exclude: tuple[str, ...] = ()
    match_style: MatchStyle = "hf"
    classes: frozenset[str] | None = None
    quantize_lm_head: bool = False

    def weight_format(self, module_class: ModuleClass, module_name: str) -> WeightFormat:
        """Format of the linear weight `module_name` (a checkpoint module name) of `module_class`."""
        plain = plain_format(self.dtype)
        if self.classes is not None and module_class not in self.classes:
            return plain
        if module_class == "lm_head" and not self.quantize_lm_head:
            return plain
        if any(_matches(p, module_name, self.match_style) for p in self.exclude):
            return plain
        for rule in self.rules:
            if rule.targets == ("*",) or any(
                _matches(t, module_name, self.match_style) for t in rule.targets
            ):
                return rule.fmt
        return plain


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _int(qc: Mapping[str, Any], *keys: str, default: int) -> int:
    for key in keys:
        if qc.get(key) is not None:
            return int(qc[key])
    return default


def _ct_format(weights: Mapping[str, Any], activations: Mapping[str, Any] | None, dtype: str) -> WeightFormat:
    """A compressed-tensors `weights` / `input_activations` argument pair as a WeightFormat."""
    bits = int(weights.get("num_bits", 8))
    kind = str(weights.get("type", "int"))
    strategy = str(weights.get("strategy", "tensor"))
    group = weights.get("group_size")
    if weights.get("scale_dtype") is not None:
        scale_bytes = DTYPE_BYTES.get(normalize_dtype(str(weights["scale_dtype"])), 1.0)
    elif kind == "float" and bits == 4:
        scale_bytes = 1.0  # nvfp4: fp8 E4M3 scale per 16; mxfp4: E8M0 scale per 32
    else:
        scale_bytes = DTYPE_BYTES[dtype]  # scales are created in the weight's dtype
    zero_bytes = 0.0 if weights.get("symmetric", True) else bits / 8
    per_scale = scale_bytes + zero_bytes
    if activations:
        act_bits = int(activations.get("num_bits", 8))
        act_kind = str(activations.get("type", "int"))
        activation = f"{'fp' if act_kind == 'float' else 'int'}{act_bits}"
        activation = activation if activation in DTYPE_BYTES else dtype
    else:
        activation = dtype  # weight-only: the GEMM runs in the unquantised dtype
    label = f"{'fp' if kind == 'float' else 'int'}{bits}"
    name = f"compressed-tensors-{label}-{strategy}" + (f"{group}" if group else "")
    common: dict[str, Any] = {"name": name, "element_bytes": bits / 8, "activation_dtype": activation}
    if strategy in ("group", "tensor_group"):
        return WeightFormat(**common, group_size=int(group or -1), group_bytes=per_scale)
    if strategy == "channel":
        return WeightFormat(**common, row_bytes=per_scale)
    if strategy == "block":
        block = weights.get("block_structure") or [128, 128]
        if isinstance(block, str):  # older configs spell it "128x128"
            block = [int(x) for x in block.lower().split("x")]
        return WeightFormat(**common, block=(int(block[0]), int(block[1])), block_bytes=per_scale)
    return WeightFormat(**common)


def _kv_from_scheme(scheme: Mapping[str, Any] | None) -> str | None:
    if not scheme:
        return None
    bits = int(scheme.get("num_bits", 8))
    return f"{'fp' if scheme.get('type', 'float') == 'float' else 'int'}{bits}"


def parse_quantization(
    quantization_config: Mapping[str, Any] | None, *, dtype: str, kv_cache_dtype: str | None = None
) -> QuantScheme:
    """Parse a config.json `quantization_config` block (None: unquantised).

    dtype: the checkpoint's unquantised dtype (`torch_dtype`/`dtype`). kv_cache_dtype: the engine's
    KV-cache dtype when known (e.g. `--kv-cache-dtype fp8`); None or "auto" = the config's default.
    Raises SpecError for a `quant_method` this module does not know.
    """
    dtype = normalize_dtype(dtype)
    explicit_kv = None if kv_cache_dtype in (None, "auto") else normalize_dtype(str(kv_cache_dtype))
    qc: dict[str, Any] = dict(quantization_config or {})
    if isinstance(qc.get("quantization"), Mapping):  # ModelOpt hf_quant_config.json layout
        qc = {**qc, **qc["quantization"], "quant_method": qc.get("quant_method", "modelopt")}
    method = str(qc.get("quant_method") or "none").lower()
    if method == "none" or not qc:
        return QuantScheme("none", dtype, explicit_kv or dtype)

    not_convert = tuple(_as_list(qc.get("modules_to_not_convert")))
    kv_default = dtype
    if method == "fp8":
        # transformers FineGrainedFP8 / DeepSeek-V3: e4m3 weights, one fp32 `weight_scale_inv` per block.
        block = qc.get("weight_block_size")
        if block:
            rows, cols = (int(b) for b in block)
            fmt = WeightFormat(f"fp8-block{rows}x{cols}", 1.0, "fp8", block=(rows, cols), block_bytes=4.0)
        else:
            fmt = WeightFormat("fp8", 1.0, "fp8")
        return QuantScheme(method, dtype, explicit_kv or kv_default, (_Rule(("*",), fmt),), not_convert)
    if method == "fbgemm_fp8":
        fmt = WeightFormat("fp8-channel", 1.0, "fp8", row_bytes=4.0)  # fp32 scale per output row
        return QuantScheme(method, dtype, explicit_kv or kv_default, (_Rule(("*",), fmt),), not_convert)
    if method == "w8a8_int8":
        fmt = WeightFormat("int8-channel", 1.0, "int8", row_bytes=4.0)
        return QuantScheme(method, dtype, explicit_kv or kv_default, (_Rule(("*",), fmt),), not_convert)
    if method in ("gptq", "awq"):
        bits = _int(qc, "bits", "w_bit", default=4)
        group = _int(qc, "group_size", "q_group_size", default=128)
        if method == "gptq":
            # qweight bits/8 B per weight; per group of `group` inputs and per output: an fp16 scale
            # (2 B) + a packed bits-wide zero point (bits/8 B); plus int32 g_idx per input column.
            fmt = WeightFormat(
                f"gptq-int{bits}-g{group}",
                bits / 8,
                dtype,
                group_size=group,
                group_bytes=2 + bits / 8,
                col_bytes=4,
            )
            lm_head = bool(qc.get("lm_head", False))
        else:
            zero = bits / 8 if qc.get("zero_point", True) else 0.0
            fmt = WeightFormat(
                f"awq-int{bits}-g{group}", bits / 8, dtype, group_size=group, group_bytes=2 + zero
            )
            lm_head = False
        return QuantScheme(
            method,
            dtype,
            explicit_kv or kv_default,
            (_Rule(("*",), fmt),),
            not_convert,
            quantize_lm_head=lm_head,
        )
    if method == "mxfp4":
        # OCP MX: 4-bit E2M1 elements, one E8M0 (1 B) scale per 32 along the input dim. transformers
        # and vLLM apply it to the MoE experts only; weight-only on Hopper (activations stay 16-bit).
        fmt = WeightFormat("mxfp4", 0.5, dtype, group_size=32, group_bytes=1.0)
        return QuantScheme(
            method,
            dtype,
            explicit_kv or kv_default,
            (_Rule(("*",), fmt),),
            not_convert,
            classes=frozenset({"routed_expert"}),
        )
    if method in ("modelopt", "nvfp4", "modelopt_fp4"):
        algo = str(qc.get("quant_algo") or ("NVFP4" if method != "modelopt" else "")).upper()
        exclude = tuple(_as_list(qc.get("exclude_modules")) + _as_list(qc.get("ignore")) + list(not_convert))
        if algo == "NVFP4":
            # 4-bit E2M1 elements, one fp8 E4M3 scale (1 B) per 16 along the input dim; activations
            # are quantised to nvfp4 too (W4A4) where the GPU has fp4 tensor cores.
            group = _int(qc, "group_size", default=16)
            fmt = WeightFormat("nvfp4", 0.5, "fp4", group_size=group, group_bytes=1.0)
        elif algo == "FP8":
            fmt = WeightFormat("fp8", 1.0, "fp8")
        else:
            raise SpecError(f"unsupported ModelOpt quant_algo {algo!r} (supported: NVFP4, FP8)")
        kv_algo = qc.get("kv_cache_quant_algo")
        kv = normalize_dtype(str(kv_algo)) if kv_algo else kv_default
        return QuantScheme(
            method, dtype, explicit_kv or kv, (_Rule(("*",), fmt),), exclude, match_style="glob"
        )
    if method == "compressed-tensors":
        rules = []
        for group_cfg in (qc.get("config_groups") or {}).values():
            weights = group_cfg.get("weights")
            if not weights:
                continue
            targets = tuple(_as_list(group_cfg.get("targets")) or ["Linear"])
            rules.append(_Rule(targets, _ct_format(weights, group_cfg.get("input_activations"), dtype)))
        ct_kv = _kv_from_scheme(qc.get("kv_cache_scheme"))
        return QuantScheme(
            method,
            dtype,
            explicit_kv or (normalize_dtype(ct_kv) if ct_kv else kv_default),
            tuple(rules),
            tuple(_as_list(qc.get("ignore"))),
            match_style="compressed-tensors",
            quantize_lm_head=True,  # decided by its targets / ignore list
        )
    if method == "bitsandbytes":
        skip = tuple(_as_list(qc.get("llm_int8_skip_modules"))) + not_convert
        if qc.get("load_in_8bit"):
            fmt = WeightFormat("bnb-int8", 1.0, "int8", row_bytes=4.0)  # LLM.int8: fp32 scale per row
        elif qc.get("load_in_4bit"):
            kind = str(qc.get("bnb_4bit_quant_type", "fp4"))
            # one absmax per 64 elements: fp32, or with double quantisation an 8-bit absmax plus
            # one fp32 second-level scale per 256 blocks.
            absmax = 1 + 4 / 256 if qc.get("bnb_4bit_use_double_quant") else 4.0
            fmt = WeightFormat(f"bnb-{kind}", 0.5, dtype, group_size=64, group_bytes=absmax)
        else:
            raise SpecError("bitsandbytes quantization_config sets neither load_in_8bit nor load_in_4bit")
        return QuantScheme(method, dtype, explicit_kv or kv_default, (_Rule(("*",), fmt),), skip)
    raise SpecError(
        f"unsupported quant_method {method!r} in quantization_config; supported: {', '.join(SUPPORTED_QUANT_METHODS)}"
    )


@dataclass(frozen=True)
class ClassPrecision:
    """Storage and GEMM dtype of one module class.

    weight_format: the format of the class's linear weights ("mixed(a,b)" when they differ), or the
        unquantised dtype for classes without quantisable weights.
    activation_dtype: dtype of the GEMM inputs, which picks the peak FLOP/s (fp8 for W8A8/FP8; the
        16-bit dtype for weight-only W4A16 / mxfp4 / GPTQ / AWQ).
    bytes_per_unit: stored bytes of one unit of the class (scales, biases, norms included).
    bytes_per_param: bytes_per_unit / parameters of one unit (0 for an empty class).
    """

    weight_format: str
    activation_dtype: str
    bytes_per_unit: float
    bytes_per_param: float


def class_precision(
    scheme: QuantScheme, module_class: ModuleClass, group: ParamGroup, *, layer: int = 0
) -> ClassPrecision:
    """Bytes and dtypes of one unit of `module_class`.

    Ignore lists are matched against the module names of decoder layer `layer` (the class's first
    layer) and expert 0.
    """
    plain = plain_format(scheme.dtype)
    formats: list[tuple[LinearWeight, WeightFormat]] = [
        (w, scheme.weight_format(module_class, w.name.format(layer=layer, expert=0))) for w in group.linears
    ]
    total = sum(fmt.weight_bytes(w.out_features, w.in_features) for w, fmt in formats)
    total += group.other * plain.element_bytes + group.fp32 * DTYPE_BYTES["fp32"]
    names = sorted({fmt.name for _, fmt in formats})
    if not names:
        weight_format = plain.name
    elif len(names) == 1:
        weight_format = names[0]
    else:
        weight_format = f"mixed({','.join(names)})"
    largest = max(formats, key=lambda wf: wf[0].params)[1] if formats else plain
    params = group.params
    return ClassPrecision(weight_format, largest.activation_dtype, total, total / params if params else 0.0)
