"""Model and GPU specs: parameters and bytes per module class, KV bytes, GPU peaks.

    >>> from moecap.analyze.specs import load_model_spec, resolve_gpu
    >>> spec = load_model_spec("Qwen/Qwen1.5-MoE-A2.7B")
    >>> spec.total_params(), spec.kv_bytes_per_token_per_layer()
    (14315784192, 8192.0)
    >>> resolve_gpu("NVIDIA H100 80GB HBM3").name
    'H100-SXM-80GB'

Definitions, byte rules and sources: docs/specs.md.
"""

from typing import TYPE_CHECKING, Any

#: Where each public name lives, loaded on first use (PEP 562): reading a config.json
#: (`registry.load_model_config`) needs neither the GPU table nor its YAML loader.
_EXPORTS = {
    "FLOPS_DTYPES": "gpu",
    "GpuSpec": "gpu",
    "gpu_names": "gpu",
    "gpu_table": "gpu",
    "normalize_gpu_name": "gpu",
    "resolve_gpu": "gpu",
    "MlaDims": "model",
    "ModelSpec": "model",
    "Precision": "model",
    "model_spec_from_config": "model",
    "supported_families": "model",
    "MODULE_CLASSES": "params",
    "LinearWeight": "params",
    "ModuleClass": "params",
    "ParamGroup": "params",
    "DTYPE_BYTES": "quant",
    "SUPPORTED_QUANT_METHODS": "quant",
    "ClassPrecision": "quant",
    "QuantScheme": "quant",
    "WeightFormat": "quant",
    "normalize_dtype": "quant",
    "parse_quantization": "quant",
    "list_registry": "registry",
    "load_model_config": "registry",
    "load_model_spec": "registry",
}

if TYPE_CHECKING:
    from .gpu import FLOPS_DTYPES, GpuSpec, gpu_names, gpu_table, normalize_gpu_name, resolve_gpu
    from .model import MlaDims, ModelSpec, Precision, model_spec_from_config, supported_families
    from .params import MODULE_CLASSES, LinearWeight, ModuleClass, ParamGroup
    from .quant import (
        DTYPE_BYTES,
        SUPPORTED_QUANT_METHODS,
        ClassPrecision,
        QuantScheme,
        WeightFormat,
        normalize_dtype,
        parse_quantization,
    )
    from .registry import list_registry, load_model_config, load_model_spec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DTYPE_BYTES",
    "FLOPS_DTYPES",
    "MODULE_CLASSES",
    "SUPPORTED_QUANT_METHODS",
    "ClassPrecision",
    "GpuSpec",
    "LinearWeight",
    "MlaDims",
    "ModelSpec",
    "ModuleClass",
    "ParamGroup",
    "Precision",
    "QuantScheme",
    "WeightFormat",
    "gpu_names",
    "gpu_table",
    "list_registry",
    "load_model_config",
    "load_model_spec",
    "model_spec_from_config",
    "normalize_dtype",
    "normalize_gpu_name",
    "parse_quantization",
    "resolve_gpu",
    "supported_families",
]
