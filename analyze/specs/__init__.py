"""Model and GPU specs: parameters and bytes per module class, KV bytes, GPU peaks.

    >>> from moecap.analyze.specs import load_model_spec, resolve_gpu
    >>> spec = load_model_spec("Qwen/Qwen1.5-MoE-A2.7B")
    >>> spec.total_params(), spec.kv_bytes_per_token_per_layer()
    (14315784192, 8192.0)
    >>> resolve_gpu("NVIDIA H100 80GB HBM3").name
    'H100-SXM-80GB'

Definitions, byte rules and sources: docs/specs.md.
"""

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
