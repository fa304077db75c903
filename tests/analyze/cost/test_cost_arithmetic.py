"""Cost formulas on hand-derived cases: the arithmetic is written out in each test."""

from __future__ import annotations

import pytest

from moecap.analyze.cost import (
    EnergyResult,
    GpuEnergyReading,
    Work,
    cloud_usd,
    estimate_cost,
    load_cost_settings,
    ownership_usd,
    unit_costs,
)
from moecap.analyze.specs import resolve_gpu

YEAR_S = 365.25 * 86400


def _fixed(value: float) -> dict:
    """An override with a zero-width band (the constant does not move in the sensitivity band)."""
    return {"value": value, "low": value, "high": value}


def _energy(joules: float, duration_s: float, n: int = 1) -> EnergyResult:
    per = joules / n
    return EnergyResult(
        duration_s,
        joules,
        "measured",
        [GpuEnergyReading(f"g{i}", per, "energy_counter", 1, 9) for i in range(n)],
    )


def test_ownership_cost_by_hand():
    out = ownership_usd(
        duration_s=1800,
        num_gpus=2,
        gpu_price_usd=30_000,
        gpu_energy_kwh=0.5,
        lifetime_years=4,
        utilization=0.5,
        capex_overhead_factor=1.2,
        host_capex_usd_per_gpu=4_000,
        host_power_w_per_gpu=500,
        pue=1.25,
        electricity_usd_per_kwh=0.10,
    )
    # capex: (30000 + 4000) $ x 2 GPUs x 1.2 = 81,600 $ spread over 4 years x 50 % of the hours;
    # 1800 s of it = 81,600 x 1800 / (4 x 31,557,600 x 0.5) = 146,880,000 / 63,115,200.
    assert out["capex_usd"] == pytest.approx(146_880_000 / 63_115_200)
    # host: 500 W x 2 x 1800 s = 1.8e6 J = 0.5 kWh; facility: (0.5 + 0.5) kWh x 1.25 = 1.25 kWh.
    assert out["host_kwh"] == pytest.approx(0.5)
    assert out["facility_kwh"] == pytest.approx(1.25)
    assert out["energy_usd"] == pytest.approx(0.125)  # 1.25 kWh x 0.10 $/kWh
    assert out["total_usd"] == pytest.approx(146_880_000 / 63_115_200 + 0.125)


def test_cloud_cost_by_hand():
    # 8 GPUs x 15 minutes x 4.916 $/GPU-h = 2 GPU-hours x 4.916 = 9.832 $
    assert cloud_usd(duration_s=900, num_gpus=8, usd_per_gpu_hour=4.916) == pytest.approx(9.832)


def test_unit_costs_by_hand():
    work = Work(duration_s=900, output_tokens=2_000_000, total_tokens=8_000_000, requests=4_000)
    u = unit_costs(9.832, work)
    assert u["usd_per_1m_output_tokens"] == pytest.approx(4.916)  # 9.832 $ / 2M
    assert u["usd_per_1m_total_tokens"] == pytest.approx(1.229)  # 9.832 $ / 8M
    assert u["usd_per_request"] == pytest.approx(0.002458)  # 9.832 $ / 4000
    assert unit_costs(1.0, Work(10, 0, 0))["usd_per_1m_output_tokens"] is None


def _settings(**gpu_price):
    return load_cost_settings(
        {
            "constants": {
                "lifetime_years": _fixed(5),
                "utilization": {"value": 0.8, "low": 0.5, "high": 1.0},
                "capex_overhead_factor": _fixed(1.0),
                "host_capex_usd_per_gpu": _fixed(0),
                "host_power_w_per_gpu": _fixed(0),
                "pue": _fixed(1.0),
                "electricity_usd_per_kwh": _fixed(0.12),
            },
            "gpus": {"H100": {"price_usd": gpu_price or _fixed(30_000), "usd_per_gpu_hour": _fixed(3.0)}},
        }
    )


def test_estimate_cost_document_by_hand():
    gpu = resolve_gpu("H100")
    work = Work(duration_s=3600, output_tokens=500_000, total_tokens=1_500_000, requests=1_000)
    doc = estimate_cost(gpu, 1, work, _energy(0.6 * 3.6e6, 3600), _settings())
    own = doc["models"]["ownership"]
    # capex: 30,000 $ / (5 years x 80 %) for one hour = 30,000 x 3600 / (5 x 31,557,600 x 0.8)
    capex = 30_000 * 3600 / (5 * YEAR_S * 0.8)
    assert own["capex_usd"] == pytest.approx(capex)  # ~0.855 $
    # energy: 0.6 kWh measured x PUE 1.0 x 0.12 $/kWh = 0.072 $
    assert own["energy_usd"] == pytest.approx(0.072)
    assert doc["usd_per_1m_output_tokens"] == pytest.approx((capex + 0.072) * 2)  # / 0.5M tokens
    assert doc["usd_per_1m_total_tokens"] == pytest.approx((capex + 0.072) / 1.5)
    assert doc["usd_per_request"] == pytest.approx((capex + 0.072) / 1000)
    assert doc["usd_per_hour"] == pytest.approx(capex + 0.072)
    # Only utilisation has a band (0.5 .. 1.0): low end of cost at u = 1.0, high end at u = 0.5.
    lo, hi = doc["band_usd_per_1m_output_tokens"]
    assert lo == pytest.approx((30_000 * 3600 / (5 * YEAR_S * 1.0) + 0.072) * 2)
    assert hi == pytest.approx((30_000 * 3600 / (5 * YEAR_S * 0.5) + 0.072) * 2)
    sens = own["sensitivity"]["utilization"]
    assert sens["low_value"] == 0.5 and sens["high_value"] == 1.0
    assert sens["usd_per_1m_output_tokens"] == pytest.approx([hi, lo])
    # Cloud, alongside: 3 $/GPU-h x 1 h = 3 $ -> 6 $ per 1M output tokens.
    assert doc["models"]["cloud"]["usd_per_1m_output_tokens"] == pytest.approx(6.0)
    # The constants used are in the document, with where they came from.
    assert doc["constants"]["gpu_price_usd"]["value"] == 30_000
    assert doc["constants"]["electricity_usd_per_kwh"]["origin"] == "overrides"
    assert doc["constants"]["gpu_tdp_w"]["value"] == 700


def test_combined_band_moves_every_constant_together():
    gpu = resolve_gpu("H100")
    work = Work(duration_s=3600, output_tokens=1_000_000, total_tokens=1_000_000)
    settings = _settings(value=30_000, low=20_000, high=40_000)
    doc = estimate_cost(gpu, 1, work, _energy(0.0, 3600), settings)
    lo, hi = doc["band_usd_per_1m_output_tokens"]
    # Cheapest: price 20,000 and utilisation 1.0; dearest: 40,000 and 0.5 (no energy: 0 J).
    assert lo == pytest.approx(20_000 * 3600 / (5 * YEAR_S * 1.0))
    assert hi == pytest.approx(40_000 * 3600 / (5 * YEAR_S * 0.5))
    per = doc["models"]["ownership"]["sensitivity"]
    assert set(per) == {"gpu_price_usd", "utilization"}
    assert lo < doc["usd_per_1m_output_tokens"] < hi


def test_cloud_model_headline():
    settings = load_cost_settings(flags={"model": "cloud", "usd_per_gpu_hour": {"L40S": 5.0, "H200": 5.0}})
    work = Work(duration_s=1800, output_tokens=250_000, total_tokens=1_000_000)
    doc = estimate_cost(resolve_gpu("L40S"), 4, work, _energy(1e6, 1800, 4), settings)
    # 4 GPUs x 0.5 h x 5 $ = 10 $ -> 40 $ per 1M output tokens, 10 $ per 1M total tokens.
    assert doc["model"] == "cloud"
    assert doc["usd_per_1m_output_tokens"] == pytest.approx(40.0)
    assert doc["usd_per_1m_total_tokens"] == pytest.approx(10.0)
    # A flag price without its own band gets +/- price_band_fraction (bundled: 20 %).
    assert doc["band_usd_per_1m_output_tokens"] == pytest.approx([32.0, 48.0])
    assert doc["constants"]["usd_per_gpu_hour"]["origin"] == "flag --usd-per-gpu-hour"
    # Where the data file has a band that holds the user's price, that band is kept (H200: 3.5 .. 8).
    h200 = estimate_cost(resolve_gpu("H200"), 4, work, _energy(1e6, 1800, 4), settings)
    assert h200["band_usd_per_1m_output_tokens"] == pytest.approx([28.0, 64.0])


def test_tdp_energy_is_noted_not_hidden():
    gpu = resolve_gpu("H100")
    tdp = EnergyResult(10.0, 7000.0, "tdp", [GpuEnergyReading("g", 7000.0, "tdp", 0.0, 0)])
    doc = estimate_cost(gpu, 1, Work(10, 1000, 1000), tdp, load_cost_settings())
    assert any("upper bound" in n for n in doc["notes"])
    assert doc["energy"]["source"] == "tdp"


@pytest.mark.parametrize(
    ("rate", "seconds", "tokens", "usd", "per_1m"),
    [
        (2.5, 1800.0, 250_000, 1.25, 5.0),  # half an hour at 2.5 USD/h; 1.25 USD / 0.25 M tokens
        (3.0, 7200.0, 0, 6.0, None),  # no token: no unit cost
    ],
)
def test_sql_forms_of_the_cost_formulas_are_the_python_ones(rate, seconds, tokens, usd, per_1m):
    """The fleet's hourly cost runs the SQL forms; they give the hand-derived values, as the Python ones."""
    import duckdb

    from moecap.analyze.cost.model import usd_for_duration, usd_for_duration_sql, usd_per_1m, usd_per_1m_sql

    assert usd_for_duration(rate, seconds) == pytest.approx(usd)
    assert usd_per_1m(usd, tokens) == (None if per_1m is None else pytest.approx(per_1m))
    con = duckdb.connect()
    got_usd, got_unit = con.execute(
        f"SELECT {usd_for_duration_sql('r', 's')}, {usd_per_1m_sql('u', 't')} "
        "FROM (SELECT ?::DOUBLE AS r, ?::DOUBLE AS s, ?::DOUBLE AS u, ?::BIGINT AS t)",
        [rate, seconds, usd, tokens],
    ).fetchall()[0]
    assert got_usd == usd_for_duration(rate, seconds)
    assert got_unit == usd_per_1m(usd, tokens)
