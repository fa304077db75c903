"""Cost constants: the bundled data file's provenance, overrides (YAML, flags, GPU table) and errors."""

from __future__ import annotations

import textwrap

import pytest

from moecap.analyze.cost import (
    ENV_OVERRIDES,
    PriceUnknown,
    Work,
    estimate_cost,
    gpu_energy,
    load_cost_settings,
    parse_gpu_values,
)
from moecap.analyze.errors import InputError
from moecap.analyze.specs import resolve_gpu


def test_every_bundled_constant_has_a_value_unit_source_and_date():
    s = load_cost_settings()
    assert s.model == "ownership"
    for c in s.constants.values():
        assert c.source and c.date and c.unit, c.name
        if c.low is not None:
            assert c.low <= c.value <= c.high, c.name
    for gpu, entry in s.bundled_gpu_prices.items():
        resolve_gpu(gpu)  # every priced GPU is in the GPU table
        for c in entry.values():
            assert c.source and c.date and c.value > 0, (gpu, c.name)
            if c.low is not None:
                assert c.low <= c.value <= c.high, (gpu, c.name)


def test_unknown_gpu_price_names_the_flag_to_pass():
    l40s = resolve_gpu("L40S")  # in the GPU table, not in the price list
    settings = load_cost_settings()
    with pytest.raises(PriceUnknown, match=r"--gpu-price-usd L40S=USD") as exc:
        settings.gpu_constant(l40s, "price_usd")
    assert "--cost-overrides" in str(exc.value) and ENV_OVERRIDES in str(exc.value)
    with pytest.raises(PriceUnknown, match=r"--usd-per-gpu-hour L40S=USD"):
        settings.gpu_constant(l40s, "usd_per_gpu_hour")
    # In a cost document the message is carried, not raised.
    energy = gpu_energy(None, 0, 1e9, gpu_uuids=None, num_gpus=1, tdp_w=l40s.tdp_w)
    doc = estimate_cost(l40s, 1, Work(1.0, 100, 100), energy, settings)
    assert "--gpu-price-usd L40S=USD" in doc["error"]
    assert "usd_per_1m_output_tokens" not in doc
    assert any("--gpu-price-usd" in w for w in doc["warnings"])
    # With the flag the same call prices it.
    priced = load_cost_settings(flags={"price_usd": {"L40S": 9000}})
    doc = estimate_cost(l40s, 1, Work(1.0, 100, 100), energy, priced)
    assert "error" not in doc and doc["constants"]["gpu_price_usd"]["value"] == 9000


def test_yaml_overrides_then_flags(tmp_path):
    path = tmp_path / "costs.yaml"
    path.write_text(
        textwrap.dedent(
            """
            model: cloud
            constants:
              electricity_usd_per_kwh: 0.2
              lifetime_years: {value: 5, low: 4, high: 7, source: our finance team, date: "2026-11"}
            gpus:
              NVIDIA H200:                  # any spelling the GPU table knows
                usd_per_gpu_hour: 3.1
            """
        )
    )
    s = load_cost_settings(path)
    assert s.model == "cloud"
    assert s.value("electricity_usd_per_kwh") == 0.2
    assert s.constants["electricity_usd_per_kwh"].origin == f"overrides {path}"
    assert s.constants["electricity_usd_per_kwh"].unit == "USD/kWh"  # kept from the data file
    life = s.constants["lifetime_years"]
    assert (life.value, life.low, life.high, life.source) == (5, 4, 7, "our finance team")
    h200 = resolve_gpu("H200")
    assert s.gpu_constant(h200, "usd_per_gpu_hour").value == 3.1
    assert s.gpu_constant(h200, "price_usd").origin == "bundled"  # untouched keys stay bundled
    # Flags beat the file; a bare flag price applies to every GPU without a named one.
    s = load_cost_settings(
        path,
        flags={
            "electricity_usd_per_kwh": 0.05,
            "model": "ownership",
            "price_usd": parse_gpu_values(["20000", "H200=33000"], "--gpu-price-usd"),
        },
    )
    assert s.model == "ownership" and s.value("electricity_usd_per_kwh") == 0.05
    assert s.gpu_constant(h200, "price_usd").value == 33000
    assert s.gpu_constant(resolve_gpu("L40S"), "price_usd").value == 20000
    assert s.layers[-1] == "flags"


def test_environment_names_the_overrides_file(tmp_path, monkeypatch):
    path = tmp_path / "env.yaml"
    path.write_text("constants: {pue: 1.1}\n")
    monkeypatch.setenv(ENV_OVERRIDES, str(path))
    assert load_cost_settings(use_env=True).value("pue") == 1.1
    assert load_cost_settings().value("pue") == 1.25  # only when asked to


def test_gpu_table_price_is_used_when_the_cost_file_has_none(tmp_path):
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text(
        "gpus:\n  - name: MyAccel\n    memory_gb: 64\n    memory_bandwidth_tb_s: 2\n"
        "    tflops_dense: {bf16: 500}\n    tdp_w: 500\n    price_usd: 12000\n"
    )
    gpu = resolve_gpu("MyAccel", overrides_yaml=gpus)
    s = load_cost_settings(gpu_overrides=str(gpus))
    price = s.gpu_constant(gpu, "price_usd")
    assert (price.value, price.origin) == (12000, "gpu table")
    assert price.low == pytest.approx(9600) and price.high == pytest.approx(14400)  # +/- 20 %
    s = load_cost_settings({"gpus": {"MyAccel": {"price_usd": 11000}}}, gpu_overrides=str(gpus))
    assert s.gpu_constant(gpu, "price_usd").value == 11000  # the cost overrides win


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"constants": {"electricty_usd_per_kwh": 0.1}}, "unknown constant 'electricty_usd_per_kwh'"),
        ({"constants": {"utilization": 1.5}}, "utilization is a fraction"),
        ({"constants": {"lifetime_years": 0}}, "lifetime_years must be > 0"),
        ({"constants": {"pue": "high"}}, "pue must be a number"),
        ({"gpus": {"Z9000": {"price_usd": 1}}}, "unknown GPU 'Z9000'"),
        ({"gpus": {"H100": {"price": 1}}}, "gpus.H100 must map price_usd / usd_per_gpu_hour"),
        ({"model": "lease"}, "--cost-model 'lease'"),
        ({"prices": {}}, "unknown key"),
    ],
)
def test_bad_overrides_are_one_line_input_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        load_cost_settings(overrides)


def test_unreadable_file_and_bad_flag_values(tmp_path):
    with pytest.raises(InputError, match="cannot read cost overrides"):
        load_cost_settings(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="expected USD or GPU=USD"):
        parse_gpu_values(["H200=lots"], "--gpu-price-usd")
