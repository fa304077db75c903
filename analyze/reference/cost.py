"""The reference cost model (MoE-CAP `cost_utils.calculate_cost`), defects included.

cost ($) = 1.2 x energy + 1.25 x capital, where capital = GPU price x N + CPU price (the full purchase
price, not amortised) and energy = (GPU TDP x N + CPU TDP) / 1000 x $/kWh x T / 3600. The two factors
are named "capital" (1.2) and "energy" (1.25) in the reference but applied the other way round
(metrics.md 7.2-7.3). A GPU key without a price gives None (7.1).
"""

from __future__ import annotations

import copy
from typing import Any

from .tables import reference_tables, resolve_reference_gpu


def reference_cost(e2e_latency_s: float, gpu: str | None, num_gpus: float) -> float | None:
    """Reference cost in USD of a run of makespan `e2e_latency_s` seconds on `num_gpus` GPUs of type `gpu`.

    `gpu` may be a reference key or a moecap GPU name (mapped by `resolve_reference_gpu`). Returns
    None where the reference does: the key has no entry in its price table.
    """
    key = resolve_reference_gpu(gpu)
    t = reference_tables()
    if key not in t["GPU_COST_DICT"]:
        return None
    gpu_capital = t["GPU_COST_DICT"][key]
    gpu_power = t["GPU_TDP_DICT"][key]
    capital_cost = gpu_capital * num_gpus + t["CPU_COST"]
    energy_cost = (gpu_power * num_gpus + t["CPU_TDP"]) / 1000 * t["ENERGY_COST"] * e2e_latency_s / 3600
    # Swapped on purpose: the reference multiplies energy by the "capital" factor and vice versa.
    cost: float = (
        energy_cost * t["SCALE_RATE_OTHER_COST_CAPITAL"] + capital_cost * t["SCALE_RATE_OTHER_COST_ENERGY"]
    )
    return cost


def reference_cost_constants() -> dict[str, Any]:
    """The reference's cost constants under its own names (prices USD, TDP W, energy USD/kWh)."""
    t = reference_tables()
    names = (
        "GPU_COST_DICT",
        "GPU_TDP_DICT",
        "CPU_COST",
        "CPU_TDP",
        "ENERGY_COST",
        "SCALE_RATE_OTHER_COST_CAPITAL",
        "SCALE_RATE_OTHER_COST_ENERGY",
    )
    return {name: copy.deepcopy(t[name]) for name in names}
