"""The calibrated roofline fit: exact recovery, noise, one-sided data, and its limits."""

from __future__ import annotations

import numpy as np
import pytest

from moecap.analyze.whatif import fit_roofline

BW, PEAK = 3.35e12, 989.4e12  # H100 SXM: bytes/s, dense bf16 FLOP/s


def _steps(rng: np.random.Generator, n_mem: int, n_comp: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode-like steps (low arithmetic intensity) and prefill-like steps (high)."""
    B = rng.uniform(5e9, 3e10, n_mem + n_comp)
    F = np.concatenate([rng.uniform(1e10, 2e12, n_mem), rng.uniform(8e13, 3e14, n_comp)])
    return B, F


def _times(B, F, eta_bw, eta_f, c):
    return np.maximum(B / (BW * eta_bw), F / (PEAK * eta_f)) + c


def test_recovers_a_known_model_exactly():
    B, F = _steps(np.random.default_rng(0), 300, 80)
    fit = fit_roofline(B, F, _times(B, F, 0.62, 0.47, 4e-4), bandwidth=BW, peak_flops=PEAK)
    assert fit.eta_bw == pytest.approx(0.62, rel=1e-9)
    assert fit.eta_flops == pytest.approx(0.47, rel=1e-9)
    assert fit.overhead_s == pytest.approx(4e-4, rel=1e-6)
    assert fit.bandwidth_identified and fit.flops_identified
    assert fit.memory_bound_fraction == pytest.approx(np.mean(B / (BW * 0.62) >= F / (PEAK * 0.47)))
    assert fit.rmse_s < 1e-12 and fit.r2 == pytest.approx(1.0)
    # Evaluated on another GPU: the same efficiencies against its peaks.
    t = fit.step_time(B[:3], F[:3], 4.8e12, PEAK)
    assert t == pytest.approx(_times(B[:3], F[:3], 0.62 * 4.8 / 3.35, 0.47, 4e-4), rel=1e-9)


def test_noisy_times_within_a_few_percent():
    rng = np.random.default_rng(1)
    B, F = _steps(rng, 2000, 500)
    t = _times(B, F, 0.55, 0.6, 2e-3) * rng.normal(1.0, 0.02, len(B))
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    assert fit.eta_bw == pytest.approx(0.55, rel=0.03)
    assert fit.eta_flops == pytest.approx(0.6, rel=0.03)
    assert fit.overhead_s == pytest.approx(2e-3, abs=3e-4)
    assert fit.mape == pytest.approx(0.016, abs=0.004)  # E|N(0, 2 %)| = 1.6 %


def test_all_memory_bound_reports_the_flop_bound_and_uses_the_prior():
    rng = np.random.default_rng(2)
    B, F = _steps(rng, 200, 0)
    t = B / (BW * 0.7) + 1e-3
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_flops_prior=0.8)
    assert fit.eta_bw == pytest.approx(0.7) and fit.overhead_s == pytest.approx(1e-3)
    assert fit.bandwidth_identified and not fit.flops_identified
    # No step may become compute-bound: b·F <= a·B for all, i.e. η_f >= max(F/B) · BW·η_bw / P.
    bound = (F / B).max() * BW * 0.7 / PEAK
    assert fit.eta_flops_bound == pytest.approx(bound)
    assert fit.eta_flops == pytest.approx(max(0.8, bound))
    assert "not identified" in fit.prior_note
    # A prior below the bound is raised to it (the measured steps stay memory-bound).
    low = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_flops_prior=bound / 10)
    assert low.eta_flops == pytest.approx(bound)
    assert np.allclose(low.step_time(B, F, BW, PEAK), t)


def test_all_compute_bound_reports_the_bandwidth_bound():
    rng = np.random.default_rng(3)
    B, F = _steps(rng, 0, 200)
    t = F / (PEAK * 0.5)
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.8)
    assert fit.eta_flops == pytest.approx(0.5) and fit.flops_identified
    assert not fit.bandwidth_identified
    assert fit.eta_bw == pytest.approx(max(0.8, fit.eta_bw_bound))


def test_large_runs_are_subsampled_and_bad_rows_ignored():
    rng = np.random.default_rng(4)
    B, F = _steps(rng, 60_000, 20_000)
    t = _times(B, F, 0.6, 0.5, 3e-4)
    B[:5] = np.nan  # steps without expert counts
    t[5:10] = 0.0  # steps without a duration
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    assert fit.n_steps == 50_000
    assert fit.eta_bw == pytest.approx(0.6, rel=1e-6) and fit.eta_flops == pytest.approx(0.5, rel=1e-6)


def test_an_implausibly_low_efficiency_becomes_overhead():
    """A launch-bound engine: ~110 ms steps whose time grows a little with context (bytes) because of
    per-token host work. A free fit would say "memory-bound at 0.75 % of peak" and scale the whole
    step with bandwidth on another GPU; below the 30 % floor the time is overhead instead."""
    rng = np.random.default_rng(5)
    B = np.linspace(2.6e9, 2.9e9, 200)  # weights + a growing KV cache
    F = B * 2.0  # decode-like intensity
    t = 0.11 * B / 2.75e9 * rng.normal(1.0, 0.01, len(B))
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.8)
    assert fit.eta_bw_below_floor == pytest.approx(1 / (BW * 0.11 / 2.75e9), rel=0.05)  # ~0.0075
    assert fit.eta_bw == pytest.approx(0.8) and not fit.bandwidth_identified
    assert fit.overhead_s == pytest.approx(0.11 - 2.75e9 / (BW * 0.8), rel=0.01)
    assert "below the floor" in fit.prior_note
    # On a GPU with 43 % more bandwidth only the ~1 ms of bytes gets faster.
    on_h200 = fit.step_time(B, F, 4.8e12, PEAK)
    assert on_h200.mean() == pytest.approx(t.mean() - 2.75e9 / (BW * 0.8) * (1 - 3.35 / 4.8), rel=0.01)
    # With the floor off, the free fit scales everything.
    free = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, min_efficiency=0.0)
    assert free.eta_bw < 0.01 and free.step_time(B, F, 4.8e12, PEAK).mean() < 0.8 * t.mean()


def test_too_few_steps():
    with pytest.raises(ValueError, match="at least 3 steps"):
        fit_roofline(np.ones(2), np.ones(2), np.ones(2), bandwidth=BW, peak_flops=PEAK)


def test_a_few_outlier_steps_do_not_move_the_fit():
    # 5 % of decode-like steps carry a JIT compile or GC pause of 10-30 ms: no roofline explains them.
    rng = np.random.default_rng(3)
    B = rng.uniform(5e9, 3e10, 400)
    F = B * rng.uniform(1, 30, 400)  # decode: a few FLOPs per byte, far below the ridge
    t = B / (BW * 0.85) + 1.7e-3
    hit = rng.choice(len(t), 20, replace=False)
    t[hit] += rng.uniform(0.01, 0.03, len(hit))
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    assert fit.eta_bw == pytest.approx(0.85, rel=1e-6)
    assert fit.overhead_s == pytest.approx(1.7e-3, rel=1e-6)
    assert fit.outliers == len(hit) and "outliers" in fit.prior_note
    # The reported errors still cover every step, the outliers included.
    assert fit.n_steps == len(t)
    assert fit.rmse_s == pytest.approx(np.sqrt(np.mean((t - (B / (BW * 0.85) + 1.7e-3)) ** 2)), rel=1e-6)


def test_noise_alone_leaves_almost_every_step_in():
    rng = np.random.default_rng(4)
    B, F = _steps(rng, 1000, 0)
    t = (B / (BW * 0.7) + 1e-3) * rng.normal(1.0, 0.02, len(B))
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    # |z| > 3.5 for a normal: 0.05 % of the steps.
    assert fit.outliers <= 5


def test_an_efficiency_above_one_is_held_at_one():
    # Times that imply 1.5x the peak bandwidth (a byte model that over-counts): physically impossible.
    rng = np.random.default_rng(5)
    B, F = _steps(rng, 200, 0)
    t = B / (BW * 1.5) + 2e-3
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    assert fit.eta_bw == pytest.approx(1.0)
    assert "above 1: held at 1" in fit.prior_note
    # At the peak the bytes take longer than the 1.5x the times imply: less is left for the overhead.
    assert 0 <= fit.overhead_s < 2e-3
