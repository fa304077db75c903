"""Cost (the C of CAP): capex amortised over lifetime and utilisation plus energy, or a cloud price.

    from moecap.analyze.cost import load_cost_settings, gpu_energy, estimate_cost, Work
    settings = load_cost_settings("my-costs.yaml", flags={"electricity_usd_per_kwh": 0.12})
    energy = gpu_energy(samples, t0_ns, t1_ns, gpu_uuids=None, num_gpus=1, tdp_w=700)
    doc = estimate_cost(resolve_gpu("H100"), 1, Work(3600, 2e6, 9e6, 4000), energy, settings)
    doc["usd_per_1m_output_tokens"], doc["band_usd_per_1m_output_tokens"]

Formulas: `model.py` (and docs/cost.md); constants with sources and dates:
`data/cost_constants.yaml`. The MoE-CAP reference formula lives in `analyze/reference/cost.py`
and is used by `--formula reference` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Submodules load on first use, so `moecap-analyze --help` does not import polars/duckdb for them.
_EXPORTS = {
    "COST_MODELS": ".constants",
    "ENV_OVERRIDES": ".constants",
    "Constant": ".constants",
    "CostSettings": ".constants",
    "PriceUnknown": ".constants",
    "load_cost_settings": ".constants",
    "parse_gpu_values": ".constants",
    "EnergyResult": ".energy",
    "GpuEnergyReading": ".energy",
    "counter_energy_j": ".energy",
    "gpu_energy": ".energy",
    "integrate_power_j": ".energy",
    "Work": ".model",
    "cloud_usd": ".model",
    "estimate_cost": ".model",
    "ownership_usd": ".model",
    "unit_costs": ".model",
}

if TYPE_CHECKING:
    from .constants import (
        COST_MODELS,
        ENV_OVERRIDES,
        Constant,
        CostSettings,
        PriceUnknown,
        load_cost_settings,
        parse_gpu_values,
    )
    from .energy import EnergyResult, GpuEnergyReading, counter_energy_j, gpu_energy, integrate_power_j
    from .model import Work, cloud_usd, estimate_cost, ownership_usd, unit_costs

__all__ = [
    "COST_MODELS",
    "ENV_OVERRIDES",
    "Constant",
    "CostSettings",
    "EnergyResult",
    "GpuEnergyReading",
    "PriceUnknown",
    "Work",
    "cloud_usd",
    "counter_energy_j",
    "estimate_cost",
    "gpu_energy",
    "integrate_power_j",
    "load_cost_settings",
    "ownership_usd",
    "parse_gpu_values",
    "unit_costs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
