"""The host floor of steps launched kernel by kernel (`fit_with_floor`): a step the GPU starts with its host
spans at least the host's issue time L; the GPU work W = max(B/(BW·η_bw), F/(P·η_f)) + c. Steps are
generated from a hand-set truth shaped like the H100 vLLM sweep's prefills (docs/whatif.md): L ≈ 64.5 ms,
η_f 0.45, η_bw 0.85, c 1.3 ms, 28 GB of weights per step, 4.236 GFLOP per token."""

from __future__ import annotations

import numpy as np
import pytest

from moecap.analyze.whatif.roofline import fit_roofline, fit_with_floor

BW, PEAK = 3.35e12, 989.4e12  # H100 SXM: bytes/s, dense bf16 FLOP/s
WEIGHTS, FLOP_PER_TOKEN, C = 28e9, 4.236e9, 1.3e-3


def work(tokens: np.ndarray) -> np.ndarray:
    """The true GPU work (s): 16,384 tokens 69.4 TFLOP / (989.4 T x 0.45) = 155.9 ms + 1.3 ms = 157.2 ms;
    8192 tokens 79.2 ms; 569 tokens max(9.83, 5.41) + 1.3 = 11.1 ms (memory-bound)."""
    return np.maximum(WEIGHTS / (BW * 0.85), tokens * FLOP_PER_TOKEN / (PEAK * 0.45)) + C


def sweep_like():
    """(tokens, span s, head s, issue s): six small prefills the host paced (spans 61-69 ms, their median
    64.5 ms, started with the host, the host waited: no issue time shown), a 8192- and four 16,384-token
    steps started with the host that returned after 68-72 ms of issue (GPU-paced), and four 16,384-token
    steps queued 150 ms behind earlier work."""
    tokens = np.array([1024, 1024, 1024, 2048, 2048, 4096, 8192] + [16384] * 8, dtype=np.float64)
    span = np.concatenate([[0.065, 0.069, 0.061, 0.066, 0.063, 0.064], work(tokens[6:])])
    head = np.array([0.0] * 11 + [0.150] * 4)
    issue = np.array([np.nan] * 6 + [0.068, 0.070, 0.072, 0.069, 0.071] + [np.nan] * 4)
    return tokens, span, head, issue


def _fit(tokens, span, head, issue, **kw):
    return fit_with_floor(
        np.full(len(tokens), WEIGHTS),
        tokens * FLOP_PER_TOKEN,
        span,
        head,
        issue,
        bandwidth=BW,
        peak_flops=PEAK,
        eta_bw_prior=0.85,
        **kw,
    )


def test_the_floor_is_the_median_span_of_the_host_paced_steps_and_w_the_gpu_work():
    tokens, span, head, issue = sweep_like()
    fit = _fit(tokens, span, head, issue)
    assert fit.host_floor_s == pytest.approx(0.0645)
    assert fit.host_paced == 6
    assert fit.eta_flops == pytest.approx(0.45, rel=1e-3) and fit.overhead_s == pytest.approx(C, abs=1e-5)
    # Held out: an 8192-token step started with the host is GPU work (79.2 ms > 64.5 ms); a 2048-token one
    # is the floor; a 569-token step queued 150 ms behind earlier work is its GPU work, 11.1 ms.
    got = fit.step_time(
        np.full(3, WEIGHTS), np.array([8192, 2048, 569]) * FLOP_PER_TOKEN, BW, PEAK, np.array([0, 0, 0.150])
    )
    assert got == pytest.approx([work(np.array([8192.0]))[0], 0.0645, work(np.array([569.0]))[0]], rel=1e-3)
    # Without the floor, one line through both kinds of step: the 8192-token step off by more than 10 %.
    plain = fit_roofline(
        np.full(len(tokens), WEIGHTS), tokens * FLOP_PER_TOKEN, span, bandwidth=BW, peak_flops=PEAK
    )
    w8192 = plain.step_time(np.array([WEIGHTS]), np.array([8192 * FLOP_PER_TOKEN]), BW, PEAK)[0]
    assert abs(w8192 / work(np.array([8192.0]))[0] - 1) > 0.10


def test_no_floor_without_a_shown_issue_time_nor_above_the_longest_shown():
    tokens, span, head, issue = sweep_like()
    # An engine whose host waits for every step shows no issue time: no floor, the plain fit.
    none = _fit(tokens, span, head, np.full(len(tokens), np.nan))
    assert none.host_floor_s is None and none.host_paced == 0
    # Shown issue times of at most 50 ms: no candidate above 55 ms (1.1 x 50), and every span that
    # started with the host is longer: no floor.
    capped = _fit(tokens, span, head, np.where(np.isfinite(issue), 0.050, np.nan))
    assert capped.host_floor_s is None


def test_the_overhead_is_held_at_the_prior_when_one_size_cannot_split_it_from_the_slope():
    # Above the floor only 16,384-token steps: slope and overhead are collinear. Held at the decode steps'
    # 1.3 ms, the slope gives η_f = 69.4 T / (989.4 T x 155.9 ms) = 0.45 and a 8192-token step 79.2 ms;
    # without it the overhead takes what the FLOP prior (0.8) leaves, tens of ms, and that step is
    # over-predicted by more than 10 %.
    tokens, span, head, issue = sweep_like()
    keep = tokens != 8192
    fit = _fit(tokens[keep], span[keep], head[keep], issue[keep], eta_flops_prior=0.8, overhead_prior=C)
    assert fit.overhead_s == pytest.approx(C) and fit.eta_flops == pytest.approx(0.45, rel=1e-3)
    assert "overhead held at 1.3 ms" in fit.prior_note
    one = (np.array([WEIGHTS]), np.array([8192 * FLOP_PER_TOKEN]), BW, PEAK, np.zeros(1))
    assert fit.step_time(*one)[0] == pytest.approx(work(np.array([8192.0]))[0], rel=1e-3)
    free = _fit(tokens[keep], span[keep], head[keep], issue[keep], eta_flops_prior=0.8)
    assert free.overhead_s > 0.01 and free.step_time(*one)[0] / work(np.array([8192.0]))[0] - 1 > 0.10


def test_the_sweep_fit_has_a_floor_and_says_which_steps_it_held_out(tmp_path):
    """On the shipped H100 vLLM sweep (all eight runs jointly) the prefill fit has a host floor of 57-75 ms
    (the spans of the small prefills started with their host), the c64 run's two warm-up / compile steps
    are named with their rule, and the notes say both."""
    from pathlib import Path

    from moecap.analyze.analysis import Options
    from moecap.analyze.cost import load_cost_settings
    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.specs import resolve_gpu
    from moecap.analyze.whatif import whatif

    sweep = Path(__file__).resolve().parents[3] / "traces" / "h100-vllm-sweep"
    a = analyze_paths([str(sweep)], Options(), cache_dir=tmp_path)
    doc = whatif(a, [resolve_gpu("H200")], load_cost_settings())
    c64 = next(r for r in doc["runs"] if r["workload"]["concurrency"] == 64)
    floor = c64["calibration"]["fits"]["prefill"]["host_floor_s"]
    assert 0.057 <= floor <= 0.075
    assert any("host floor" in w for w in c64["warnings"])
    (held,) = [w for w in c64["warnings"] if "warm-up step(s)" in w]
    assert "906 (mixed, 1259 ms, first use)" in held and "909 (mixed, 1229 ms, compile)" in held
