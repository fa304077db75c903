"""Reference formula mode: the MoE-CAP metrics exactly as github Auto-CAP/MoE-CAP computes them.

Reproduces metrics.md sections 1-6 at commit e9e0d88 (defects included, on purpose) so that published
MoE-CAP numbers can be recomputed and compared. Self-contained: it reads model configs, GPU names and
precisions the reference's way, not through moecap's specs. Only this mode publishes under MoE-CAP's
field names (prefill_smbu, tpot, kv_size, ...).

Units: S-MBU / S-MFU are fractions (0..1); latencies in s; throughputs per s; kv_size in KV elements
/ 1e6; cost in USD; bandwidth tables in bytes/s, FLOPS tables in FLOP/s.
"""

from typing import TYPE_CHECKING, Any

#: Where each public name lives. Loaded on first use (PEP 562): the record frame (`records`) needs
#: polars, which reference mode on a record file does without (`moecap.analyze.lean`).
_EXPORTS = {
    "CONTINUOUS_KEYS": "continuous",
    "ReferenceHardware": "continuous",
    "reference_cost": "cost",
    "reference_cost_constants": "cost",
    "reference_hardware": "metrics",
    "reference_metrics": "metrics",
    "ReferenceDims": "model",
    "ReferenceModelSizes": "model",
    "normalize_model_id": "model",
    "reference_dims": "model",
    "reference_family": "model",
    "reference_model_sizes": "model",
    "reference_effective_precision": "precision",
    "reference_precision": "precision",
    "reference_precision_bytes": "precision",
    "reference_resolve_precision": "precision",
    "PER_REQ_INFO_FIELDS": "records",
    "RECORD_SCHEMA": "records",
    "frame_to_records": "records",
    "load_reference_records": "record_file",
    "normalize_frame": "records",
    "records_to_frame": "records",
    "RUN_LEVEL_KEYS": "run_level",
    "reference_gpu_raw_type": "tables",
    "reference_hardware_lookup": "tables",
    "reference_peak_bw": "tables",
    "reference_peak_flops": "tables",
    "reference_tables": "tables",
    "resolve_reference_gpu": "tables",
}

if TYPE_CHECKING:
    from .continuous import CONTINUOUS_KEYS, ReferenceHardware
    from .cost import reference_cost, reference_cost_constants
    from .metrics import reference_hardware, reference_metrics
    from .model import (
        ReferenceDims,
        ReferenceModelSizes,
        normalize_model_id,
        reference_dims,
        reference_family,
        reference_model_sizes,
    )
    from .precision import (
        reference_effective_precision,
        reference_precision,
        reference_precision_bytes,
        reference_resolve_precision,
    )
    from .record_file import load_reference_records
    from .records import (
        PER_REQ_INFO_FIELDS,
        RECORD_SCHEMA,
        frame_to_records,
        normalize_frame,
        records_to_frame,
    )
    from .run_level import RUN_LEVEL_KEYS
    from .tables import (
        reference_gpu_raw_type,
        reference_hardware_lookup,
        reference_peak_bw,
        reference_peak_flops,
        reference_tables,
        resolve_reference_gpu,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CONTINUOUS_KEYS",
    "PER_REQ_INFO_FIELDS",
    "RECORD_SCHEMA",
    "RUN_LEVEL_KEYS",
    "ReferenceDims",
    "ReferenceHardware",
    "ReferenceModelSizes",
    "frame_to_records",
    "load_reference_records",
    "normalize_frame",
    "normalize_model_id",
    "records_to_frame",
    "reference_cost",
    "reference_cost_constants",
    "reference_dims",
    "reference_effective_precision",
    "reference_family",
    "reference_gpu_raw_type",
    "reference_hardware",
    "reference_hardware_lookup",
    "reference_metrics",
    "reference_model_sizes",
    "reference_peak_bw",
    "reference_peak_flops",
    "reference_precision",
    "reference_precision_bytes",
    "reference_resolve_precision",
    "reference_tables",
    "resolve_reference_gpu",
]
