"""The cost formulas (docs/metrics.md §13) and a cost estimate with its sensitivity band.

Ownership model, for N GPUs held for T seconds:
    capex  = (P_gpu + C_host) · N · f_capex · T / (L · 365.25 · 86400 · u)
    energy = (E_gpu + W_host · N · T) · PUE · price_kWh          (E_gpu in kWh; W_host·N·T in kWh)
    total  = capex + energy
with P_gpu the GPU purchase price (USD), C_host the rest of the server per GPU (USD), f_capex the
overhead on capex (network, storage, racks), L the lifetime (years), u the share of the lifetime's
hours the GPUs serve paid work, E_gpu the GPUs' energy over T (measured from gpu_samples, else
TDP · N · T), W_host the host power per GPU (W), PUE the facility overhead on IT energy.

Cloud model: total = R · N · T / 3600, with R the rental price per GPU-hour (it already includes
energy, host and facility).

Unit costs: USD per 1M output tokens = total / output tokens · 1e6; per 1M total tokens likewise
with every token computed (prompt tokens not served from a cache, plus output tokens); per request
= total / completed requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..specs import GpuSpec
from .constants import Constant, CostSettings, PriceUnknown
from .energy import EnergyResult

SECONDS_PER_YEAR = 365.25 * 86400

#: Constants the ownership model reads (besides the GPU price), in the order they are printed.
OWNERSHIP_CONSTANTS = (
    "lifetime_years",
    "utilization",
    "capex_overhead_factor",
    "host_capex_usd_per_gpu",
    "host_power_w_per_gpu",
    "pue",
    "electricity_usd_per_kwh",
)


def ownership_usd(
    *,
    duration_s: float,
    num_gpus: float,
    gpu_price_usd: float,
    gpu_energy_kwh: float,
    lifetime_years: float,
    utilization: float,
    capex_overhead_factor: float,
    host_capex_usd_per_gpu: float,
    host_power_w_per_gpu: float,
    pue: float,
    electricity_usd_per_kwh: float,
) -> dict[str, float]:
    """Ownership cost of holding `num_gpus` GPUs for `duration_s` seconds, USD (see module doc)."""
    capex_usd = (
        (gpu_price_usd + host_capex_usd_per_gpu)
        * num_gpus
        * capex_overhead_factor
        * duration_s
        / (lifetime_years * SECONDS_PER_YEAR * utilization)
    )
    host_kwh = host_power_w_per_gpu * num_gpus * duration_s / 3.6e6
    facility_kwh = (gpu_energy_kwh + host_kwh) * pue
    energy_usd = facility_kwh * electricity_usd_per_kwh
    return {
        "capex_usd": capex_usd,
        "energy_usd": energy_usd,
        "total_usd": capex_usd + energy_usd,
        "gpu_kwh": gpu_energy_kwh,
        "host_kwh": host_kwh,
        "facility_kwh": facility_kwh,
    }


def usd_for_duration(usd_per_hour: float, duration_s: float) -> float:
    """USD charged for `duration_s` seconds at `usd_per_hour`."""
    return usd_per_hour * duration_s / 3600


def usd_for_duration_sql(usd_per_hour: str, duration_s: str) -> str:
    """`usd_for_duration` as a SQL expression over two SQL expressions (the fleet's hourly cost)."""
    return f"({usd_per_hour} * {duration_s} / 3600)"


def usd_per_1m(usd: float, tokens: float) -> float | None:
    """USD per 1M tokens (None where there is no token)."""
    return usd / tokens * 1e6 if tokens else None


def usd_per_1m_sql(usd: str, tokens: str) -> str:
    """`usd_per_1m` as a SQL expression (null where there is no token)."""
    return f"({usd} / nullif({tokens}, 0) * 1e6)"


def cloud_usd(*, duration_s: float, num_gpus: float, usd_per_gpu_hour: float) -> float:
    """Rental cost of `num_gpus` GPUs for `duration_s` seconds at `usd_per_gpu_hour`, USD."""
    return usd_for_duration(usd_per_gpu_hour * num_gpus, duration_s)


@dataclass(frozen=True)
class Work:
    """What the GPUs produced while held: the time charged and its tokens / requests."""

    duration_s: float
    output_tokens: float
    total_tokens: float
    requests: int | None = None
    scope: str = ""
    """Human description of the interval (window, makespan, projection)."""


def unit_costs(total_usd: float, work: Work) -> dict[str, float | None]:
    """USD per 1M output tokens, per 1M total tokens and per request (None where the count is 0)."""
    return {
        "usd_per_1m_output_tokens": usd_per_1m(total_usd, work.output_tokens),
        "usd_per_1m_total_tokens": usd_per_1m(total_usd, work.total_tokens),
        "usd_per_request": total_usd / work.requests if work.requests else None,
    }


def _sensitivity(
    evaluate: Callable[[dict[str, float]], float],
    base: dict[str, float],
    bands: dict[str, tuple[float, float]],
    work: Work,
) -> tuple[dict[str, Any], float, float]:
    """One at a time: the unit cost with each constant at its low and at its high value. Combined:
    every constant at whichever end is cheaper (dearer) at once (the cost is monotone in each)."""
    per: dict[str, Any] = {}
    cheap, dear = dict(base), dict(base)
    for name, (low, high) in bands.items():
        at_low, at_high = evaluate({**base, name: low}), evaluate({**base, name: high})
        per[name] = {
            "low_value": low,
            "high_value": high,
            "usd_per_1m_output_tokens": [
                unit_costs(at_low, work)["usd_per_1m_output_tokens"],
                unit_costs(at_high, work)["usd_per_1m_output_tokens"],
            ],
        }
        cheap[name], dear[name] = (low, high) if at_low <= at_high else (high, low)
    return per, evaluate(cheap), evaluate(dear)


def _model_doc(
    evaluate: Callable[[dict[str, float]], float],
    base: dict[str, float],
    bands: dict[str, tuple[float, float]],
    parts: dict[str, float],
    work: Work,
) -> dict[str, Any]:
    total_usd = evaluate(base)
    sens, lo, hi = _sensitivity(evaluate, base, bands, work)
    return {
        **parts,
        "usd_per_hour": total_usd / work.duration_s * 3600 if work.duration_s else None,
        **unit_costs(total_usd, work),
        "band": {
            "total_usd": [lo, hi],
            "usd_per_1m_output_tokens": [
                unit_costs(lo, work)["usd_per_1m_output_tokens"],
                unit_costs(hi, work)["usd_per_1m_output_tokens"],
            ],
            "usd_per_1m_total_tokens": [
                unit_costs(lo, work)["usd_per_1m_total_tokens"],
                unit_costs(hi, work)["usd_per_1m_total_tokens"],
            ],
        },
        "sensitivity": sens,
    }


def _bands(constants: dict[str, Constant]) -> dict[str, tuple[float, float]]:
    """The constants that move in the sensitivity band (a band of zero width does not)."""
    return {
        k: (c.low, c.high)
        for k, c in constants.items()
        if c.low is not None and c.high is not None and c.low != c.high
    }


def estimate_cost(
    gpu: GpuSpec,
    num_gpus: int,
    work: Work,
    energy: EnergyResult,
    settings: CostSettings,
) -> dict[str, Any]:
    """The cost document for one run (or one projection): both models where their prices are known,
    the headline (settings.model) unit costs, a sensitivity band and every constant used.

    Never raises for a missing price: that model gets {"error": ...} and the message also goes to
    "warnings".
    """
    doc: dict[str, Any] = {
        "model": settings.model,
        "gpu": gpu.name,
        "num_gpus": num_gpus,
        "scope": work.scope,
        "duration_s": work.duration_s,
        "output_tokens": work.output_tokens,
        "total_tokens": work.total_tokens,
        "requests": work.requests,
        "energy": energy.as_dict(),
        "warnings": [],
        "notes": [],
    }
    constants: dict[str, Any] = {k: settings.constants[k].as_dict() for k in OWNERSHIP_CONSTANTS}
    constants["gpu_tdp_w"] = {"value": gpu.tdp_w, "unit": "W per GPU", "source": f"GPU table: {gpu.source}"}
    models: dict[str, Any] = {}

    # Ownership.
    try:
        price = settings.gpu_constant(gpu, "price_usd")
        constants["gpu_price_usd"] = price.as_dict()
        if energy.kwh is None:
            raise PriceUnknown(
                f"no energy for GPU {gpu.name}: the trace has no usable gpu_samples and the GPU table "
                "has no tdp_w (add it with --gpu-overrides)"
            )
        energy_kwh = energy.kwh

        def own(values: dict[str, float]) -> dict[str, float]:
            return ownership_usd(
                duration_s=work.duration_s,
                num_gpus=num_gpus,
                gpu_energy_kwh=energy_kwh,
                gpu_price_usd=values["gpu_price_usd"],
                **{k: values[k] for k in OWNERSHIP_CONSTANTS},
            )

        base = {"gpu_price_usd": price.value, **{k: settings.value(k) for k in OWNERSHIP_CONSTANTS}}
        bands = _bands({"gpu_price_usd": price, **{k: settings.constants[k] for k in OWNERSHIP_CONSTANTS}})
        models["ownership"] = _model_doc(lambda v: own(v)["total_usd"], base, bands, own(base), work)
    except PriceUnknown as exc:
        models["ownership"] = {"error": str(exc)}

    # Cloud.
    try:
        rate = settings.gpu_constant(gpu, "usd_per_gpu_hour")
        constants["usd_per_gpu_hour"] = rate.as_dict()

        def rent(values: dict[str, float]) -> float:
            return cloud_usd(
                duration_s=work.duration_s, num_gpus=num_gpus, usd_per_gpu_hour=values["usd_per_gpu_hour"]
            )

        base = {"usd_per_gpu_hour": rate.value}
        models["cloud"] = _model_doc(
            rent, base, _bands({"usd_per_gpu_hour": rate}), {"total_usd": rent(base)}, work
        )
    except PriceUnknown as exc:
        models["cloud"] = {"error": str(exc)}

    headline = models[settings.model]
    if "error" in headline:
        doc["error"] = headline["error"]
        doc["warnings"].append(f"cost ({settings.model} model): {headline['error']}")
    else:
        for key in ("total_usd", "usd_per_hour", "usd_per_1m_output_tokens", "usd_per_1m_total_tokens"):
            doc[key] = headline[key]
        doc["usd_per_request"] = headline["usd_per_request"]
        doc["band_usd_per_1m_output_tokens"] = headline["band"]["usd_per_1m_output_tokens"]
    if energy.source != "measured":
        doc["notes"].append(
            f"GPU energy: {energy.source}"
            + (" (TDP is an upper bound on board power)" if "tdp" in energy.source.lower() else "")
        )
    doc["models"] = models
    doc["constants"] = constants
    doc["settings"] = {"layers": list(settings.layers)}
    return doc
