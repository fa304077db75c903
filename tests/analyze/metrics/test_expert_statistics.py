"""Per-step expert statistics (metrics/experts.py:step_statistics) and the loader's expert pass that
feeds them: hand-derived values, and its sums against plain integer sums over several blocks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq

from moecap.analyze.load.expert_pass import ExpertSummary
from moecap.analyze.metrics.experts import imbalance_ratio, layer_statistics, step_statistics
from moecap.schemas import PHASES

# Two steps, 2 MoE layers, 4 experts (top_k 2).
# step 0: layer 0 [3, 1, 2, 0] (6 tokens, max 3 -> 3*4/6 = 2), layer 1 [1, 1, 2, 2] (6, max 2 -> 4/3)
# step 1: nothing routed in either layer (an idle step)
COUNTS = np.array(
    [
        [[3, 1, 2, 0], [1, 1, 2, 2]],
        [[0, 0, 0, 0], [0, 0, 0, 0]],
    ],
    dtype=np.int32,
)


def _reductions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return counts.sum(axis=2), counts.max(axis=2), (counts > 0).sum(axis=(1, 2))


def test_step_statistics_hand_derived():
    got = step_statistics(*_reductions(COUNTS), num_experts=4)
    assert got["active_experts"].tolist() == [3 + 4, 0]
    assert got["routed_tokens"].tolist() == [12, 0]
    assert got["imbalance_mean"][0] == (2 + 4 / 3) / 2
    assert got["imbalance_max"][0] == 2.0
    assert got["layer_tokens_min"].tolist() == [6, 0] and got["layer_tokens_max"].tolist() == [6, 0]
    # An idle step has no imbalance (not -inf, not 0).
    assert math.isnan(got["imbalance_mean"][1]) and math.isnan(got["imbalance_max"][1])


def test_one_imbalance_for_steps_and_runs():
    # A layer's run-level imbalance (layer_statistics) and a step's are the same formula: for one
    # step, the run statistics of its counts equal the step's per-layer values.
    layer = layer_statistics(COUNTS[0].astype(np.float64))["imbalance"]
    assert layer.tolist() == [2.0, 4 / 3]
    assert imbalance_ratio(np.array([3, 2]), np.array([6, 6]), 4).tolist() == layer.tolist()
    assert math.isnan(imbalance_ratio(np.array([0]), np.array([0]), 4)[0])


def test_expert_pass_sums_are_exact(tmp_path):
    # Counts up to 2^31 - 1 summed over 3,000 steps in blocks: the totals equal one integer sum.
    rng = np.random.default_rng(7)
    rows, layers, experts = 3000, 3, 8
    counts = rng.integers(0, 50, size=(rows, layers, experts), dtype=np.int32)
    counts[::5] = 0
    counts[1, 2, 3] = np.iinfo(np.int32).max
    steps = np.arange(rows, dtype=np.int64)
    phases = (steps % 3).astype(np.int8)  # prefill / decode / mixed rotating
    ident = {"run_id": "r", "dp": 0, "pp": 0, "tp": 0, "ep": 0}
    summary = ExpertSummary(
        ident,
        np.array([1, 3, 5], np.int32),
        experts,
        (steps, phases),
        tmp_path / "s.parquet",
        step_statistics,
    )
    for start in range(0, rows, 1024):  # several blocks, as the conversion hands them over
        summary.add(steps[start : start + 1024], counts[start : start + 1024])
    out = summary.close(tmp_path / "t.parquet")
    stats = pq.read_table(out["expert_step_stats"]).to_pydict()
    assert stats["routed_tokens"] == counts.reshape(rows, -1).sum(axis=1, dtype=np.int64).tolist()
    assert stats["active_experts"] == (counts > 0).reshape(rows, -1).sum(axis=1).tolist()
    totals = pq.read_table(out["expert_totals"]).to_pandas()
    for p in range(3):
        part = totals[totals.phase == PHASES[p]].sort_values(["moe_layer", "expert"])
        sel = phases == p
        assert part.tokens.tolist() == counts[sel].sum(axis=0, dtype=np.int64).reshape(-1).tolist()
        assert part.active_steps.tolist() == (counts[sel] > 0).sum(axis=0).reshape(-1).tolist()
