"""Precision resolution and bytes per weight, the reference's way.

Reference: `model_loader/precision_utils.py` (`resolve_precision`) and `HFModelInfoRetriever`
(`__init__`, `get_model_precision_bytes`). An explicit CLI precision other than bf16 wins; otherwise the
checkpoint's `quantization_config` decides; otherwise `torch_dtype` / `dtype`; default `bfloat16`
(metrics.md 1.4, defect 7.22). The same bytes are used for weights and KV cache (7.11).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moecap.analyze.errors import InputError

from .tables import reference_tables

#: The reference's CAPConfig default for `--precision`.
DEFAULT_CLI_PRECISION = "bfloat16"

_NESTED_CONFIGS = ("text_config", "thinker_config", "language_config")


def _find_quant_config(cfg: Any) -> Any:
    if not isinstance(cfg, Mapping):
        return None
    qc = cfg.get("quantization_config")
    if qc:
        return qc
    for sub in _NESTED_CONFIGS:
        s = cfg.get(sub)
        if isinstance(s, Mapping):
            found = _find_quant_config(s)
            if found:
                return found
    return None


def _find_dtype(cfg: Any) -> str | None:
    if not isinstance(cfg, Mapping):
        return None
    for key in ("torch_dtype", "dtype"):
        v = cfg.get(key)
        if v:
            return str(v)
    for sub in _NESTED_CONFIGS:
        s = cfg.get(sub)
        if isinstance(s, Mapping):
            found = _find_dtype(s)
            if found:
                return found
    return None


def _compressed_tensors_weight_bits(qc: Mapping[str, Any]) -> tuple[Any, Any]:
    groups = qc.get("config_groups") or {}
    for g in groups.values():
        w = (g or {}).get("weights") or {}
        if w.get("num_bits") is not None:
            return w.get("num_bits"), w.get("type")
    return qc.get("num_bits"), qc.get("type")


def reference_resolve_precision(config: Mapping[str, Any]) -> str | None:
    """The checkpoint's precision label from its config.json (`resolve_precision`), or None.

    compressed-tensors: 4-bit int -> ``int4``, other 4-bit -> ``mxfp4``, 8-bit -> ``fp8``; ``mxfp4`` /
    ``nvfp4`` kept; any other `quant_method` returned as is (``fp8``, ``gptq``, ``awq``, ...);
    without a quantization config, `torch_dtype` / `dtype`.
    """
    if not isinstance(config, Mapping):
        return None
    qc = _find_quant_config(config)
    if not qc:
        return _find_dtype(config)
    qm = str(qc.get("quant_method", "")).lower()
    is_ct = (
        qm == "compressed-tensors"
        or qc.get("config_groups")
        or "quantized" in str(qc.get("format", "")).lower()
    )
    if is_ct:
        nbits, wtype = _compressed_tensors_weight_bits(qc)
        if nbits == 4:
            return "int4" if str(wtype or "").lower() == "int" else "mxfp4"
        if nbits == 8:
            return "fp8"
    if qm:
        return qm
    return _find_dtype(config)


def check_cli_precision(cli_precision: str | None) -> None:
    """Raise InputError for a `--precision` value the reference refuses (case-sensitive list)."""
    valid = reference_tables()["VALID_PRECISIONS"]
    if cli_precision and cli_precision not in valid:
        raise InputError(f"precision {cli_precision!r} is not one the reference accepts: {', '.join(valid)}")


def reference_effective_precision(config: Mapping[str, Any], cli_precision: str | None = None) -> str:
    """The precision string the reference uses (`used_dtype`): names the FLOPS table section.

    `cli_precision` None means the reference's default (``bfloat16``).
    """
    check_cli_precision(cli_precision)
    cli = DEFAULT_CLI_PRECISION if cli_precision is None else cli_precision
    explicit = (cli or "").lower()
    resolved = reference_resolve_precision(config)
    if explicit and explicit not in ("bfloat16", "bf16"):
        return cli
    return resolved or cli or "bfloat16"


def reference_precision_bytes(effective_precision: str | None) -> float:
    """Bytes per weight (and per KV element) for a precision string (`get_model_precision_bytes`)."""
    p = (effective_precision or "").lower()
    if p in ("float32", "fp32"):
        return 4.0
    if p in ("float16", "fp16", "bfloat16", "bf16"):
        return 2.0
    if p in ("int8", "fp8"):
        return 1.0
    if p in ("int4", "fp4", "mxfp4", "nvfp4", "awq", "gptq"):
        return 0.5
    return 2.0


def reference_precision(config: Mapping[str, Any], cli_precision: str | None = None) -> dict[str, Any]:
    """All precision facts the reference derives: `resolve_precision` (checkpoint label or None),
    `effective_precision` (= `restated_effective`, the FLOPS section name) and `bytes_per_param`."""
    effective = reference_effective_precision(config, cli_precision)
    return {
        "resolve_precision": reference_resolve_precision(config),
        "effective_precision": effective,
        "restated_effective": effective,
        "bytes_per_param": reference_precision_bytes(effective),
    }
