"""The expert pass's fast reductions (load/expert_pass.py:block_reductions) against the plain numpy
formulas (sum / max / count over an axis, a boolean selection per phase), on engine-like blocks:
counts summing to tokens x top_k per layer, idle steps, interleaved phases, counts near int32's
limit (where sums must widen), and the buffered per-step statistics across several flushes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from moecap.analyze.load import expert_pass
from moecap.analyze.load.expert_pass import ExpertSummary, block_reductions
from moecap.analyze.metrics.experts import step_statistics

N_PHASES = 4  # prefill, decode, mixed, unknown


def engine_like_block(
    rng: np.random.Generator, rows: int, layers: int, experts: int, top_k: int
) -> np.ndarray:
    """Counts as an engine records them: each step's tokens x top_k spread over the experts of every
    layer (skewed), one step in five idle (no token)."""
    tokens = rng.integers(1, 2049, rows)
    tokens[::5] = 0
    routing = rng.dirichlet(np.full(experts, 0.6), size=layers)
    out = np.zeros((rows, layers, experts), np.int32)
    for r in range(rows):
        for layer in range(layers):
            out[r, layer] = rng.multinomial(tokens[r] * top_k, routing[layer])
    return out


def plain(counts: np.ndarray, phase: np.ndarray) -> dict[str, np.ndarray]:
    """The straightforward formulas, in int64."""
    c = counts.astype(np.int64)
    return {
        "layer_tokens": c.sum(axis=2),
        "layer_max": c.max(axis=2) if c.shape[2] else np.zeros(c.shape[:2], np.int64),
        "active_experts": (c > 0).sum(axis=(1, 2)),
        "tokens": np.stack([c[phase == p].sum(axis=0) for p in range(N_PHASES)]),
        "active_steps": np.stack([(c[phase == p] > 0).sum(axis=0) for p in range(N_PHASES)]),
    }


def assert_matches(counts: np.ndarray, phase: np.ndarray) -> None:
    got = block_reductions(counts, phase, N_PHASES)
    want = plain(counts, phase)
    for name, value in want.items():
        assert np.array_equal(getattr(got, name), value), name
    assert got.layer_tokens.dtype == np.int64 and got.active_experts.dtype == np.int32
    assert got.tokens.dtype == np.int64 and got.active_steps.dtype == np.int64
    assert got.layer_max.dtype == counts.dtype


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_like_blocks_with_interleaved_phases(seed):
    rng = np.random.default_rng(seed)
    counts = engine_like_block(rng, 256, 4, 16, 2)
    phase = rng.integers(0, N_PHASES, 256)  # phases change from step to step
    assert_matches(counts, phase)
    # Routed tokens per layer are tokens x top_k, so the sums are the engine's own bookkeeping.
    got = block_reductions(counts, phase, N_PHASES)
    assert (got.layer_tokens == got.layer_tokens[:, :1]).all()


def test_one_phase_block_and_idle_steps():
    rng = np.random.default_rng(3)
    counts = engine_like_block(rng, 100, 3, 8, 2)
    counts[10:20] = 0  # a stretch of idle steps
    assert_matches(counts, np.full(100, 1))
    got = block_reductions(counts, np.full(100, 1), N_PHASES)
    assert got.active_experts[10:20].tolist() == [0] * 10 and got.layer_max[10:20].max() == 0


def test_sums_widen_where_int32_would_overflow():
    # One count of 2^31 - 1: the layer sum and the phase sums exceed int32 and must still be exact.
    rng = np.random.default_rng(4)
    counts = engine_like_block(rng, 50, 2, 8, 2)
    counts[7, 1, 3] = np.iinfo(np.int32).max
    counts[8, 1, 3] = np.iinfo(np.int32).max
    phase = np.arange(50) % 3
    assert_matches(counts, phase)
    got = block_reductions(counts, phase, N_PHASES)
    assert got.tokens[7 % 3, 1, 3] == counts[phase == 7 % 3][:, 1, 3].astype(np.int64).sum()
    assert got.tokens.sum() == counts.astype(np.int64).sum()


def test_int32_sums_up_to_the_limit():
    # busiest count x max(experts, rows) = 2^31 - 2: the narrow sums reach it without wrapping.
    half = (1 << 30) - 1
    counts = np.array([[[half, half]]], np.int32)
    assert_matches(counts, np.array([0]))
    assert block_reductions(counts, np.array([0]), N_PHASES).layer_tokens.tolist() == [[2 * half]]
    counts = np.array([[[half + 1, half + 1]]], np.int32)  # 2^31: widened
    assert block_reductions(counts, np.array([2]), N_PHASES).tokens[2].tolist() == [[1 << 30, 1 << 30]]


def test_empty_block():
    got = block_reductions(np.zeros((0, 3, 4), np.int32), np.zeros(0, np.int64), N_PHASES)
    assert got.layer_tokens.shape == (0, 3) and got.active_experts.shape == (0,)
    assert got.tokens.shape == (N_PHASES, 3, 4) and not got.tokens.any()


def test_buffered_statistics_keep_order_across_flushes(tmp_path, monkeypatch):
    # Statistics are written every STATS_ROWS steps: rows, order and values as computed block by block.
    monkeypatch.setattr(expert_pass, "STATS_ROWS", 300)
    rng = np.random.default_rng(5)
    rows, layers, experts = 1000, 3, 8
    counts = engine_like_block(rng, rows, layers, experts, 2)
    steps = np.arange(rows, dtype=np.int64)[::-1].copy()  # any order: written as handed over
    phases = (steps % 3).astype(np.int8)
    order = np.argsort(steps)
    ident = {"run_id": "r", "dp": 0, "pp": 0, "tp": 0, "ep": 0}
    summary = ExpertSummary(
        ident, np.arange(layers, dtype=np.int32), experts, (steps[order], phases[order]),
        tmp_path / "s.parquet", step_statistics,
    )  # fmt: skip
    for start in range(0, rows, 128):
        summary.add(steps[start : start + 128], counts[start : start + 128])
    out = summary.close(tmp_path / "t.parquet")
    stats = pq.read_table(out["expert_step_stats"])
    assert stats.column("step").to_pylist() == steps.tolist()
    p = plain(counts, np.zeros(rows, np.int64))
    want = step_statistics(p["layer_tokens"], p["layer_max"], p["active_experts"], experts)
    for name, value in want.items():
        assert np.array_equal(stats.column(name).to_numpy(), value, equal_nan=True), name
