"""GPU energy from synthetic gpu_samples: counter differences, power integration, coverage, TDP."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moecap.analyze.cost import counter_energy_j, gpu_energy, integrate_power_j

S = 1_000_000_000  # ns per second


def _samples(uuid: str, t_s: np.ndarray, power_w: np.ndarray, energy_j: np.ndarray | None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "t_ns": (t_s * S).astype(np.int64),
            "gpu_uuid": [uuid] * len(t_s),
            "power_w": power_w.astype(np.float32),
            "energy_mj": None if energy_j is None else (energy_j * 1000).round().astype(np.int64),
        },
        schema={"t_ns": pl.Int64, "gpu_uuid": pl.String, "power_w": pl.Float32, "energy_mj": pl.Int64},
    )


def test_constant_power_both_ways():
    t = np.arange(0, 10.01, 0.1)  # 10 Hz for 10 s
    p = np.full_like(t, 300.0)
    # 300 W x 10 s = 3000 J by the trapezoid rule and by the counter (started at 5 MJ).
    assert integrate_power_j(t * S, p, 0, 10 * S) == pytest.approx(3000)
    assert counter_energy_j(t * S, (5e6 + 300 * t) * 1000, 0, 10 * S) == pytest.approx(3000)


def test_linear_ramp_integrates_exactly_with_interpolated_ends():
    t = np.arange(0, 10.01, 0.5)
    p = 100 + 20 * t  # W
    # ∫ from 2.25 s to 7.75 s of (100 + 20 t) dt = 100 x 5.5 + 10 x (7.75² − 2.25²) = 550 + 550 = 1100 J.
    assert integrate_power_j(t * S, p, 2.25 * S, 7.75 * S) == pytest.approx(1100)
    # The counter is the integral 100 t + 10 t² (J): interpolating it between samples is linear, so
    # within one sample period it is off by at most (20 W/s x 0.5 s x 0.5 s)/8 per end.
    e = 100 * t + 10 * t**2
    assert counter_energy_j(t * S, e * 1000, 2.25 * S, 7.75 * S) == pytest.approx(1100, abs=1.3)


def test_counter_preferred_and_reset_falls_back_to_power():
    t = np.arange(0, 4.01, 0.25)
    p = np.full_like(t, 200.0)
    e = 1000 + 250.0 * t  # the counter says 250 W while the power readings say 200 W
    r = gpu_energy(_samples("A", t, p, e), 0, 4 * S, gpu_uuids=["A"], num_gpus=1, tdp_w=700)
    assert r.source == "measured" and r.gpus[0].method == "energy_counter"
    assert r.joules == pytest.approx(1000)  # 250 W x 4 s, from the counter
    e_reset = e.copy()
    e_reset[8:] -= 900  # driver reload: the counter starts again lower
    r = gpu_energy(_samples("A", t, p, e_reset), 0, 4 * S, gpu_uuids=["A"], num_gpus=1, tdp_w=700)
    assert r.gpus[0].method == "power_samples"
    assert r.joules == pytest.approx(800)  # 200 W x 4 s, from power
    assert r.mean_power_w == pytest.approx(200)


def test_no_counter_column_uses_power():
    t = np.arange(0, 2.01, 0.1)
    r = gpu_energy(
        _samples("A", t, np.full_like(t, 150.0), None), 0, 2 * S, gpu_uuids=None, num_gpus=1, tdp_w=700
    )
    assert r.gpus[0].method == "power_samples" and r.joules == pytest.approx(300)


def test_partial_coverage_extrapolates_then_falls_back_to_tdp():
    t = np.arange(0, 6.01, 0.5)  # samples cover 6 s of a 10 s interval
    df = _samples("A", t, np.full_like(t, 200.0), 200.0 * t)
    r = gpu_energy(df, 0, 10 * S, gpu_uuids=["A"], num_gpus=1, tdp_w=700)
    assert r.gpus[0].coverage == pytest.approx(0.6)
    assert r.joules == pytest.approx(2000)  # 200 W mean over the covered 6 s, times 10 s
    short = df.filter(pl.col("t_ns") <= 3 * S)  # 30 % coverage: below the 50 % floor
    r = gpu_energy(short, 0, 10 * S, gpu_uuids=["A"], num_gpus=1, tdp_w=700)
    assert r.source == "tdp" and r.joules == pytest.approx(7000)  # 700 W x 10 s
    assert r.gpus[0].coverage == pytest.approx(0.3)


def test_only_the_runs_gpus_count_and_missing_ones_use_tdp():
    t = np.arange(0, 5.01, 0.5)
    df = pl.concat(
        [
            _samples("A", t, np.full_like(t, 100.0), 100.0 * t),
            _samples("OTHER", t, np.full_like(t, 999.0), 999.0 * t),  # another job's GPU on the host
        ]
    )
    r = gpu_energy(df, 0, 5 * S, gpu_uuids=["A", "B"], num_gpus=2, tdp_w=400)
    # A measured: 100 W x 5 s = 500 J; B has no samples: 400 W TDP x 5 s = 2000 J.
    assert r.joules == pytest.approx(2500)
    assert r.source.startswith("partly measured (1 of 2 GPUs")
    assert [g.method for g in r.gpus] == ["energy_counter", "tdp"]


def test_no_samples_at_all_is_tdp_and_unknown_tdp_is_unknown():
    r = gpu_energy(None, 0, 2 * S, gpu_uuids=None, num_gpus=4, tdp_w=700)
    assert r.source == "tdp" and r.joules == pytest.approx(4 * 700 * 2)
    assert r.kwh == pytest.approx(4 * 700 * 2 / 3.6e6)
    r = gpu_energy(None, 0, 2 * S, gpu_uuids=None, num_gpus=1, tdp_w=None)
    assert r.source == "unknown" and r.joules is None and r.kwh is None
