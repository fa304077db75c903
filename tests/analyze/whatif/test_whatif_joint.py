"""The step-time fit across batch sizes (issue #21): steps generated from a known per-step overhead and
bandwidth efficiency at several batch sizes must give them back; steps that all move the same bytes
(batch 1 with CUDA graphs) cannot, and must fall back to the stated prior and say so.

Hand-derived numbers: Qwen1.5-MoE-like decode on an H100 SXM (3.35 TB/s), per-GPU bytes per step
4.97 GB at batch 1 growing to 55.4 GB at batch 128 (activated experts + KV), with t = 1.3 ms +
B / (0.87 · 3.35 TB/s): 1.3 + 4.97e9 / 2.9145e12 s = 1.3 + 1.7053 = 3.0053 ms at batch 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from moecap.analyze.whatif import fit_roofline
from moecap.analyze.whatif.compare import verdict
from moecap.analyze.whatif.project import prior_table

BW, PEAK = 3.35e12, 989.4e12
ETA, C = 0.87, 1.3e-3
#: per-GPU bytes of a decode step by batch size (GB), as in the shipped H100 vLLM sweep.
DECODE_GB = {1: 4.97, 2: 6.82, 4: 10.04, 8: 15.36, 16: 23.53, 32: 32.72, 64: 41.23, 128: 55.40}


def _decode_steps(rng: np.random.Generator, sizes, n: int = 200, noise: float = 0.01):
    """Decode steps at each batch size: bytes (with a 0.3 % KV growth over the run), FLOPs 2 per byte
    per request (far below the ridge), times from the known model with multiplicative noise."""
    B = np.concatenate([DECODE_GB[s] * 1e9 * np.linspace(1.0, 1.003, n) for s in sizes])
    reqs = np.concatenate([np.full(n, s) for s in sizes])
    F = 2.0 * reqs * 1e9
    t = (C + B / (BW * ETA)) * rng.normal(1.0, noise, len(B))
    return B, F, t, reqs


def test_hand_derived_step_time():
    # The module docstring's arithmetic, so the numbers below are not the code's own output.
    step = C + 4.97e9 / (BW * ETA)
    assert step == pytest.approx(3.0053e-3, rel=1e-4)


def test_joint_fit_over_batch_sizes_recovers_overhead_and_efficiency():
    B, F, t, _ = _decode_steps(np.random.default_rng(0), [1, 4, 16, 64])
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.6)
    assert fit.bandwidth_identified
    assert fit.eta_bw == pytest.approx(ETA, rel=0.01)  # the prior (0.6) is far away: the data decided
    assert fit.overhead_s == pytest.approx(C, rel=0.02)


def test_held_out_batch_sizes_are_predicted_by_the_joint_fit():
    rng = np.random.default_rng(1)
    B, F, t, _ = _decode_steps(rng, [1, 4, 16, 64])
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK)
    for size in (2, 8, 32, 128):
        b = np.array([DECODE_GB[size] * 1e9])
        truth = C + b / (BW * ETA)
        assert fit.step_time(b, 2.0 * size * 1e9 + 0 * b, BW, PEAK) == pytest.approx(truth, rel=0.01), size
    # The same fit on another GPU (H200, 4.8 TB/s): the bytes part scales, the overhead does not.
    b1 = np.array([DECODE_GB[1] * 1e9])
    assert fit.step_time(b1, 2e9 + 0 * b1, 4.8e12, PEAK) == pytest.approx(C + b1 / (4.8e12 * ETA), rel=0.01)


def test_batch_one_alone_falls_back_to_the_prior_and_says_so():
    """Every step moves the same bytes (0.3 % KV growth, 1 % timing noise): overhead and η_bw are
    collinear. A free fit pinned η_bw at its cap of 1 and called 1.5 ms of a 3 ms step overhead."""
    B, F, t, _ = _decode_steps(np.random.default_rng(2), [1], n=1000)
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.85)
    assert not fit.bandwidth_identified
    assert fit.eta_bw == pytest.approx(0.85)
    # The overhead is what remains of the mean step (relative weights: the 1/t²-weighted mean).
    w = 1 / t**2
    expected_c = np.average(t - B / (BW * 0.85), weights=w)
    assert fit.overhead_s == pytest.approx(expected_c, rel=0.01)
    assert fit.overhead_s == pytest.approx(C + 4.97e9 / (BW * ETA) - 4.97e9 / (BW * 0.85), rel=0.02)
    assert "not identified" in fit.prior_note and "prior η_bw = 0.85" in fit.prior_note
    assert "collinear" in fit.prior_note


def test_exactly_constant_bytes_are_not_identified_even_without_noise():
    B = np.full(50, 4.97e9)
    F = np.full(50, 2e9)
    t = np.full(50, C + 4.97e9 / (BW * ETA))
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.85)
    assert not fit.bandwidth_identified and fit.eta_bw == pytest.approx(0.85)
    assert fit.overhead_s == pytest.approx(t[0] - 4.97e9 / (BW * 0.85), rel=1e-6)
    assert "bandwidth efficiency not identified" in fit.prior_note and "0.85" in fit.prior_note


def test_two_batch_sizes_are_enough_to_identify_the_efficiency():
    B, F, t, _ = _decode_steps(np.random.default_rng(3), [1, 128], n=100)
    fit = fit_roofline(B, F, t, bandwidth=BW, peak_flops=PEAK, eta_bw_prior=0.6)
    assert fit.bandwidth_identified and fit.eta_bw == pytest.approx(ETA, rel=0.01)


def test_priors_name_their_source():
    table = prior_table()
    assert table["eta_bw"]["value"] == 0.85 and "datasheet" in table["eta_bw"]["source"]
    assert table["eta_flops"]["value"] == 0.8 and table["eta_flops"]["source"]


def test_verdict_names_the_closest_model_and_the_baselines_that_beat_the_projection():
    v = verdict({"projection": 0.03, "no_change": -0.2, "bandwidth_ratio": 0.01})
    assert v == {"best": "bandwidth_ratio", "baselines_beating_projection": ["bandwidth_ratio"]}
    v = verdict({"projection": -0.02, "no_change": 0.2, "bandwidth_ratio": None})
    assert v == {"best": "projection", "baselines_beating_projection": []}
    # A tie is not a loss, and the projection is named closest.
    v = verdict({"projection": 0.05, "no_change": -0.05, "bandwidth_ratio": 0.3})
    assert v == {"best": "projection", "baselines_beating_projection": []}
    assert verdict({"projection": None, "no_change": None}) == {
        "best": None,
        "baselines_beating_projection": [],
    }


def test_prefill_inside_the_cuda_graphs_is_timed_with_decode():
    import polars as pl

    from moecap.analyze.whatif.project import fit_groups

    df = pl.DataFrame(
        {
            "phase": ["decode", "prefill", "prefill", "mixed", "mixed", "idle"],
            "num_tokens": [64, 200, 1024, 256, 16384, 0],
            "graph_max_tokens": [256] * 6,
        }
    )
    assert fit_groups(df).tolist() == ["decode", "decode", "prefill", "decode", "mixed", "idle"]
    # Eager engines (no recorded graph sizes): every step keeps its phase.
    eager = df.with_columns(graph_max_tokens=pl.lit(None, pl.Int64))
    assert fit_groups(eager).tolist() == ["decode", "prefill", "prefill", "mixed", "mixed", "idle"]
