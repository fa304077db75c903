"""Cost flags shared by the commands. A command turns them into `CostSettings` with
`settings_from_flags` and hands them to the analysis as `Settings(cost=...)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the constants load YAML and the GPU table: not for `--help`
    from .constants import CostSettings

CostOverrides = Annotated[
    str | None,
    typer.Option(
        "--cost-overrides",
        help="YAML file replacing cost constants (layout of moecap/analyze/cost/data/cost_constants.yaml; "
        "default: $MOECAP_COST_OVERRIDES).",
    ),
]
CostModelFlag = Annotated[
    str | None,
    typer.Option("--cost-model", help="ownership (capex + energy, default) or cloud ($/GPU-hour)."),
]
GpuPrice = Annotated[
    list[str] | None,
    typer.Option(
        "--gpu-price-usd", help="Purchase price per GPU, USD: H200=35000, or a bare number for every GPU."
    ),
]
GpuHour = Annotated[
    list[str] | None,
    typer.Option("--usd-per-gpu-hour", help="Cloud price per GPU-hour, USD: H200=5.4, or a bare number."),
]
Electricity = Annotated[
    float | None, typer.Option("--electricity-usd-per-kwh", help="Electricity price, USD/kWh.")
]
Lifetime = Annotated[float | None, typer.Option("--lifetime-years", help="Years the capex is spread over.")]
Utilization = Annotated[
    float | None, typer.Option("--utilization", help="Share of the lifetime's hours the GPUs serve, (0, 1].")
]
Pue = Annotated[float | None, typer.Option("--pue", help="Facility energy / IT energy.")]


def settings_from_flags(
    *,
    gpu_overrides: str | None = None,
    cost_overrides: str | None = None,
    cost_model: str | None = None,
    gpu_price_usd: list[str] | None = None,
    usd_per_gpu_hour: list[str] | None = None,
    electricity_usd_per_kwh: float | None = None,
    lifetime_years: float | None = None,
    utilization: float | None = None,
    pue: float | None = None,
) -> CostSettings:
    """CostSettings from the command-line flags, on top of --cost-overrides (else the YAML named by
    $MOECAP_COST_OVERRIDES) and the bundled constants."""
    from .constants import load_cost_settings, parse_gpu_values

    flags = {
        "model": cost_model,
        "price_usd": parse_gpu_values(gpu_price_usd, "--gpu-price-usd") or None,
        "usd_per_gpu_hour": parse_gpu_values(usd_per_gpu_hour, "--usd-per-gpu-hour") or None,
        "electricity_usd_per_kwh": electricity_usd_per_kwh,
        "lifetime_years": lifetime_years,
        "utilization": utilization,
        "pue": pue,
    }
    return load_cost_settings(cost_overrides, flags=flags, gpu_overrides=gpu_overrides, use_env=True)
