"""metrics.json `cost` on synthetic traces: measured energy from a gpu_samples file, TDP without one,
the window and run scopes, overrides from the environment, and an unknown price as a warning."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moecap.analyze.analysis import Options
from moecap.analyze.cost import ENV_OVERRIDES
from moecap.analyze.pipeline import analyze_paths
from moecap.schemas import TraceWriter, trace_file_name

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from synthetic_traces import SimConfig, simulate_run

YEAR_S = 365.25 * 86400


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    truth = simulate_run(out, SimConfig(num_requests=12, concurrency=4))
    return out, truth


def _write_samples(out: Path, run, t0_ns: int, t1_ns: int, power_w: float) -> None:
    """A sampler's file: 20 Hz from before the run to after it, constant power, exact counter."""
    t = np.arange(t0_ns - 200_000_000, t1_ns + 200_000_000, 50_000_000, dtype=np.int64)
    energy_mj = 7_000_000 + np.round(power_w * (t - t[0]) / 1e6).astype(np.int64)
    with TraceWriter(out / trace_file_name(run, "gpu_samples"), "gpu_samples", run) as w:
        for ti, ei in zip(t.tolist(), energy_mj.tolist()):
            w.write(
                {
                    "t_ns": ti,
                    "gpu_index": 0,
                    "gpu_uuid": "GPU-synthetic-0",
                    "power_w": power_w,
                    "energy_mj": ei,
                }
            )


def _cost(paths, tmp_path, **options):
    analysis = analyze_paths(paths, Options(window="all", **options), cache_dir=tmp_path / "cache")
    run = analysis.document["runs"][0]
    return run["metrics"]["cost"], run


def test_without_samples_energy_is_tdp_and_the_numbers_add_up(sim, tmp_path):
    out, _ = sim
    cost, run = _cost([out], tmp_path)
    steps = run["metrics"]["steps"]["all"]
    window = cost["scopes"]["window"]
    assert cost["headline_scope"] == "window" and cost["gpu"] == "H100-SXM-80GB"
    assert cost["energy"]["source"] == "tdp"
    assert window["duration_s"] == pytest.approx(steps["window_s"])
    assert window["output_tokens"] == steps["output_tokens"] and window["total_tokens"] == steps["tokens"]
    # Bundled constants: H100 30,000 $, host 4,000 $, x1.2, 4 years at 70 %; energy 700 W TDP + 575 W host,
    # PUE 1.25, 0.0895 $/kWh.
    t = window["duration_s"]
    capex = 34_000 * 1.2 * t / (4 * YEAR_S * 0.7)
    energy = (700 + 575) * t / 3.6e6 * 1.25 * 0.0895
    own = window["models"]["ownership"]
    assert own["capex_usd"] == pytest.approx(capex) and own["energy_usd"] == pytest.approx(energy)
    assert cost["usd_per_1m_output_tokens"] == pytest.approx((capex + energy) / steps["output_tokens"] * 1e6)
    lo, hi = cost["band_usd_per_1m_output_tokens"]
    assert lo < cost["usd_per_1m_output_tokens"] < hi
    # Run scope: the requests' makespan; 12 completed requests.
    scope = cost["scopes"]["run"]
    assert scope["requests"] == 12 == run["metrics"]["requests"]["succeeded"]
    assert scope["duration_s"] == pytest.approx(run["metrics"]["requests"]["makespan_s"])
    assert cost["usd_per_request"] == pytest.approx(scope["total_usd"] / 12)
    assert cost["constants"]["gpu_price_usd"]["value"] == 30_000
    assert all(c.get("source") for c in cost["constants"].values())


def test_measured_energy_from_gpu_samples(sim, tmp_path):
    src, truth = sim
    out = tmp_path / "with_samples"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    steps = truth["steps"]
    t0 = 1_000_000_000
    t1 = t0 + int(sum(s["time_s"] for s in steps) * 1e9) + 10_000_000
    _write_samples(out, truth["run"], t0, t1, power_w=250.0)
    cost, run = _cost([out], tmp_path)
    energy = cost["energy"]
    assert energy["source"] == "measured"
    assert energy["per_gpu"][0]["method"] == "energy_counter"
    assert energy["mean_power_w_per_gpu"] == pytest.approx(250.0, rel=1e-3)
    window = cost["scopes"]["window"]
    assert energy["gpu_joules"] == pytest.approx(250.0 * window["duration_s"], rel=1e-3)
    own = window["models"]["ownership"]
    assert own["energy_usd"] == pytest.approx(
        (250 + 575) * window["duration_s"] / 3.6e6 * 1.25 * 0.0895, rel=1e-3
    )
    assert not any("energy" in w for w in run["warnings"])


def test_overrides_from_the_environment(sim, tmp_path, monkeypatch):
    out, _ = sim
    path = tmp_path / "c.yaml"
    path.write_text("model: cloud\ngpus: {H100: {usd_per_gpu_hour: 2.0}}\n")
    monkeypatch.setenv(ENV_OVERRIDES, str(path))
    cost, _ = _cost([out], tmp_path)
    window = cost["scopes"]["window"]
    assert cost["model"] == "cloud"
    # 2 $/GPU-hour x 1 GPU x window seconds / 3600, per 1M output tokens.
    expected = 2.0 * window["duration_s"] / 3600 / window["output_tokens"] * 1e6
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(expected)


def test_unknown_price_is_a_warning_naming_the_flag(sim, tmp_path):
    out, _ = sim
    cost, run = _cost([out], tmp_path, gpu="L40S")
    assert "--gpu-price-usd L40S=USD" in cost["error"]
    assert any("--gpu-price-usd L40S=USD" in w for w in run["warnings"])
    assert run["metrics"]["steps"]["all"]["s_mbu"] is not None  # everything else still computed


def test_summary_cost_flags(sim, tmp_path):
    import json

    from typer.testing import CliRunner

    from moecap.analyze.cli import app

    out, _ = sim
    args = ["summary", str(out), "--gpu", "L40S", "--window", "all", "--format", "json"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(app, [*args, "--gpu-price-usd", "L40S=9000"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cost = json.loads(res.output)["runs"][0]["metrics"]["cost"]
    assert "error" not in cost
    assert cost["constants"]["gpu_price_usd"] == {
        "name": "price_usd",
        "value": 9000.0,
        "unit": "USD per GPU",
        "low": 7200.0,
        "high": 10800.0,
        "origin": "flag --gpu-price-usd",
    }
    res = CliRunner().invoke(app, [*args, "--cost-model", "cloud"], catch_exceptions=False)
    run = json.loads(res.output)["runs"][0]
    assert "--usd-per-gpu-hour L40S=USD" in run["metrics"]["cost"]["error"]
