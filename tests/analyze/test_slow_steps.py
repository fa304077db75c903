"""Steps far slower than their phase's median (kernel compilation inside the recorded window) are named;
big-but-proportional prefills are not. Durations are hand-set; the expected verdicts follow the rule in
analyze/slow_steps.py by arithmetic done in the comments."""

from __future__ import annotations

import polars as pl
import pytest

from moecap.analyze.slow_steps import slow_step_findings, slow_steps

MS = 1_000_000


def _row(step, phase, tokens, ms, *, gpu=True, tp=0, draft=False):
    start = step * 10_000 * MS
    span = {"gpu_start_ns": start, "gpu_end_ns": start + int(ms * MS)} if gpu else {
        "gpu_start_ns": None, "gpu_end_ns": None, "t_start_ns": start, "t_end_ns": start + int(ms * MS)}  # fmt: skip
    return {
        "dp": 0,
        "pp": 0,
        "tp": tp,
        "step": step,
        "phase": phase,
        "num_tokens": tokens,
        "is_draft": draft,
        **span,
    }


def test_a_jit_decode_step_is_named_with_its_typical_time():
    # Decodes of 12 ms; step 3 took 1312 ms: 109x the median (12 ms), 1300 ms over it.
    rows = [_row(i, "decode", 64, 12.0) for i in range(10)]
    rows[3] = _row(3, "decode", 64, 1312.0)
    (s,) = slow_steps(rows)
    assert (s.rank, s.step, s.phase, s.duration_ms, s.typical_ms) == (
        "dp0-pp0-tp0",
        3,
        "decode",
        1312.0,
        12.0,
    )
    (line,) = slow_step_findings(rows)
    assert "1 step(s)" in line and "dp0-pp0-tp0 step 3 (decode, 1312 ms vs ~12 ms)" in line


def test_a_long_prefill_with_the_same_cost_per_token_is_not_named():
    # 256-token prefills of 20 ms (0.078 ms/token) and one 16384-token prefill of 1280 ms: same per-token
    # cost, so nothing; a 256-token prefill of 900 ms is 45x the per-token median and 880 ms over 20 ms.
    rows = [_row(i, "prefill", 256, 20.0) for i in range(6)] + [_row(6, "prefill", 16384, 1280.0)]
    assert slow_steps(rows) == []
    rows.append(_row(7, "prefill", 256, 900.0))
    assert [s.step for s in slow_steps(rows)] == [7]


def test_small_absolute_excess_few_peers_host_spans_and_draft_rows():
    # 0.2 ms decodes and one of 3 ms: 15x, but only 2.8 ms over: not named (a hiccup, not a compilation).
    rows = [_row(i, "decode", 1, 0.2) for i in range(8)] + [_row(8, "decode", 1, 3.0)]
    assert slow_steps(rows) == []
    # Four peers only: not judged.
    assert slow_steps([_row(i, "decode", 1, 10.0) for i in range(3)] + [_row(3, "decode", 1, 900.0)]) == []
    # Host spans when the GPU span is missing; draft passes are not judged; ranks are separate streams.
    rows = [_row(i, "decode", 4, 10.0, gpu=False) for i in range(6)] + [
        _row(6, "decode", 4, 500.0, gpu=False)
    ]
    rows += [_row(i, "decode", 4, 10.0, tp=1) for i in range(6)] + [_row(9, "decode", 4, 900.0, draft=True)]
    assert [(s.rank, s.step) for s in slow_steps(rows)] == [("dp0-pp0-tp0", 6)]
    assert slow_step_findings([_row(i, "decode", 1, 5.0) for i in range(6)]) == []


def test_a_lone_mixed_compile_step_is_judged_against_the_pooled_cost_per_token():
    # vLLM's shape: 2 prefills (2048 tokens in 118 ms, 1600 in 111 ms: 0.058 and 0.069 ms a token), one mixed
    # step of 1162 tokens in 952 ms (0.82 ms a token) and 40 decodes of 6 ms. Mixed and prefill have fewer
    # than 5 peers each, so both are judged against the pooled per-token median of the 3 (0.069 ms):
    # the mixed step's typical time is max(1162 x 0.069 = 80.4, 6) ms; 952 >= 804 and 871 ms over: named.
    # The prefills are at or under the pooled median: kept.
    rows = [_row(0, "prefill", 2048, 118.0), _row(1, "mixed", 1162, 952.0), _row(2, "prefill", 1600, 111.0)]
    rows += [_row(i, "decode", 16, 6.0) for i in range(3, 43)]
    (s,) = slow_steps(rows)
    assert (s.step, s.phase, s.dp, s.pp, s.tp) == (1, "mixed", 0, 0, 0)
    assert s.typical_ms == pytest.approx(1162 * 111.0 / 1600, abs=0.1)
    # HF's shape: a 23-token mixed step takes what a decode takes (host-bound, ~110 ms); per token that is
    # 4.8 ms against 0.03 ms for its big steps, but its typical time is no less than the decode median
    # (110 ms): 121 < 1100, kept.
    rows = [_row(0, "prefill", 8192, 210.0), _row(1, "mixed", 8192, 234.0), _row(2, "mixed", 23, 121.0)]
    rows += [_row(i, "decode", 16, 110.0) for i in range(3, 40)]
    assert slow_steps(rows) == []
    # A phase of too few steps that is not per token (idle here) is not judged.
    assert slow_steps([_row(i, "idle", 0, 1.0) for i in range(2)] + [_row(2, "idle", 0, 900.0)]) == []


def test_the_first_step_of_a_shape_is_named_against_the_other_steps_of_its_size():
    # The engine's first prefill after a start (vLLM c1 of the H100 sweep): 1024 tokens in 139.5 ms, the run's
    # second 1024-token prefill 68.9 ms, 254 decodes of 3 ms. Two prefills: too few for the first rule. First
    # use: 139.5 >= 1.5 x 68.9 = 103.4 and 70.6 ms >= 20 ms over it: named, typical 68.9 ms.
    rows = [_row(0, "prefill", 1024, 139.5)] + [_row(i, "decode", 1, 3.0) for i in range(1, 128)]
    rows += [_row(128, "prefill", 1024, 68.9)] + [_row(i, "decode", 1, 3.0) for i in range(129, 256)]
    (s,) = slow_steps(rows)
    assert (s.step, s.phase, s.duration_ms, s.typical_ms, s.rule) == (0, "prefill", 139.5, 68.9, "first use")
    # The second one, not the first of its shape, is never judged by this rule, however slow.
    rows[128] = _row(128, "prefill", 1024, 300.0)
    rows[0] = _row(0, "prefill", 1024, 70.0)
    assert slow_steps(rows) == []


def test_first_use_peers_are_other_steps_of_one_to_two_times_the_size_in_the_phase_group():
    # A 15,425-token mixed step of 1,258 ms (a Triton kernel compiled for its shape) before two 16,384-token
    # mixed steps of 158 and 157 ms, after six 16,384-token ones: per token it is 8.5x the median, under
    # the first rule's 10x. First use: peers of 15,425-30,850 tokens are the eight 16,384-token steps
    # around it (158 ms x 7, 157 ms), median 158 ms; 1258 >= 237 and 1100 ms over: named.
    rows = [_row(i, "mixed", 16384, 158.0) for i in range(6)]
    rows += [
        _row(6, "mixed", 15425, 1258.0),
        _row(7, "mixed", 16384, 158.0),
        _row(8, "prefill", 16384, 157.0),
    ]
    rows += [_row(i, "decode", 64, 15.0) for i in range(9, 40)]
    (s,) = slow_steps(rows)
    assert (s.step, s.rule, s.typical_ms) == (6, "first use", 158.0)
    # Peers only count within 1-2x its tokens: a 40,000-token step (over 2x) says nothing, a smaller one
    # neither (a step may take longer than a smaller one), before or after it: no peer, not judged.
    far = [_row(0, "prefill", 1024, 139.5), _row(1, "prefill", 4096, 60.0), _row(2, "prefill", 512, 20.0)]
    assert slow_steps(far) == []
    far = [_row(0, "prefill", 40000, 300.0), _row(1, "prefill", 512, 20.0), _row(2, "prefill", 1024, 139.5)]
    assert slow_steps(far) == []


def test_first_use_peers_may_come_before_the_step():
    # H100 SGLang sweep, c16: the second wave's prompts are prefilled in chunks of 8,192 tokens and one of
    # 7,167 (the only count not divisible by 16: Triton compiles another specialization), 498 ms, after three
    # 8,192-token chunks of ~103 ms and before a 1,024-token prefill only. No later step of 7,167-14,334
    # tokens exists; the earlier ones are peers: 498 >= 1.5 x 103.1 and 395 ms over: named, typical 103.1.
    rows = [_row(0, "prefill", 8192, 103.06), _row(1, "prefill", 8192, 103.11)]
    rows += [_row(i, "decode", 16, 8.6) for i in range(2, 130)]
    rows += [_row(130, "prefill", 8192, 103.36), _row(131, "prefill", 7167, 497.9)]
    rows += [_row(i, "decode", 15, 8.4) for i in range(132, 260)] + [_row(260, "prefill", 1024, 21.7)]
    (s,) = slow_steps(rows)
    assert (s.step, s.phase, s.rule, s.typical_ms) == (131, "prefill", "first use", 103.1)
    # The same step at 1.4x its earlier peers (a warm chunk of that size): not named.
    rows[131] = _row(131, "prefill", 7167, 144.0)
    assert slow_steps(rows) == []


def test_first_use_needs_both_the_factor_and_the_absolute_excess():
    # 1.4x a later peer (84 vs 60 ms): warm steps of one shape spread about +-15 %; not named.
    assert slow_steps([_row(0, "prefill", 2048, 84.0), _row(1, "prefill", 2048, 60.0)]) == []
    # 1.5x a 3 ms decode (the first decode after a prefill), 1.5 ms over: under 20 ms, not named.
    rows = [_row(0, "decode", 1, 4.5)] + [_row(i, "decode", 1, 3.0) for i in range(1, 4)]
    assert slow_steps(rows) == []
    # HF eager's cold first decode (687 ms, later decodes 134 ms): named by this rule, idle steps never.
    rows = [_row(0, "decode", 1, 687.0)] + [_row(i, "decode", 1, 134.0) for i in range(1, 4)]
    assert [(s.step, s.rule, s.typical_ms) for s in slow_steps(rows)] == [(0, "first use", 134.0)]
    assert slow_steps([_row(0, "idle", 0, 90.0), _row(1, "idle", 0, 0.01)]) == []


def test_a_step_both_rules_name_is_listed_once_as_compile():
    # 1312 ms among 12 ms decodes, and the first decode of its shape: the first rule's entry only.
    rows = [_row(0, "decode", 64, 1312.0)] + [_row(i, "decode", 64, 12.0) for i in range(1, 10)]
    assert [(s.step, s.rule) for s in slow_steps(rows)] == [(0, "compile")]


def test_first_use_peer_medians_equal_the_brute_force_definition():
    """Each candidate's typical is the median of the OTHER steps of its rank and group with n..2n tokens
    (checked against a plain per-candidate loop on random steps with ties, gaps and two ranks)."""
    import random
    import statistics

    from moecap.analyze.slow_steps import WARMUP_SIZE_WINDOW, _peer_medians

    rng = random.Random(7)
    rows = [
        {
            "rank": r,
            "group": "per-token",
            "step": s,
            "n": rng.choice([0, 1, 5, 8, 16, 17, 40]),
            "d": rng.uniform(1, 90),
        }
        for r in ("dp0-pp0-tp0", "dp1-pp0-tp0")
        for s in range(300)
    ]
    steps = pl.DataFrame(rows)
    cand = steps.filter(pl.col("step") % 37 == 0)
    got = {(r["rank"], r["step"]): r["typical_b"] for r in _peer_medians(steps, cand).iter_rows(named=True)}
    want = {}
    for c in cand.iter_rows(named=True):
        peers = [
            x["d"]
            for x in rows
            if x["rank"] == c["rank"]
            and x["step"] != c["step"]
            and c["n"] <= x["n"] <= WARMUP_SIZE_WINDOW * c["n"]
        ]
        if peers:
            want[(c["rank"], c["step"])] = statistics.median(peers)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-12 for k in want)


def test_check_names_the_jit_chunk_of_the_shipped_sglang_sweep(tmp_path):
    """The real H100 SGLang sweep, c16: `moecap-analyze check` names its 7,167-token prefill chunk (step 263,
    ~498 ms; the three 8,192-token chunks before it took ~103 ms) as the first of its shape."""
    import subprocess
    import sys
    from pathlib import Path

    sweep = Path(__file__).resolve().parents[2] / "traces" / "h100-sglang-sweep"
    files = sorted(str(p) for p in sweep.glob("*-c16-r0-*.arrow"))
    assert files, "the shipped SGLang sweep's c16 run is missing"
    code = "from moecap.analyze.cli import main; main()"
    r = subprocess.run(
        [sys.executable, "-c", code, "check", *files, "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    out = r.stdout + r.stderr
    assert "dp0-pp0-tp0 step 263 (prefill, 497.9 ms vs ~103.1 ms, first of its shape)" in out, out
