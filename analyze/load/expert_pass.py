"""The expert-count pass: per-step summaries and per-(phase, layer, expert) totals of expert counts,
computed on flat numpy blocks while the counts stream by, so no query ever unnests them.

The pass reduces each block over the expert axis (tokens and busiest expert's tokens per (step,
layer)), over each step (experts with a token) and over the steps (tokens and active steps per
(phase, layer, expert)): `block_reductions`, every one an integer reduction, exact. The per-step
statistics made of those reductions (imbalance, activated experts, ...) are the metric layer's
(`moecap.analyze.metrics.experts.step_statistics`), handed in by `load_traces` as `StepStatistics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moecap.schemas import PHASES

from .cache import ParquetSink, identity_schema, with_identity
from .runs import RANK_COLUMNS

StepStatistics = Callable[[np.ndarray, np.ndarray, np.ndarray, int], dict[str, np.ndarray]]
"""(layer_tokens, layer_max [steps, MoE layers], active_experts [steps], num_experts) -> per-step
columns."""

STATS_ROWS = 1 << 15
"""Steps whose reductions are buffered before their statistics are computed and written (one
Parquet row group): per-batch writes of a few hundred rows cost more than the statistics."""


def step_stats_schema(step_statistics: StepStatistics) -> pa.Schema:
    """The `expert_step_stats` table's schema: identity, step, the columns `step_statistics` makes."""
    empty = np.zeros((0, 1), np.int64)
    cols = step_statistics(empty, empty, np.zeros(0, np.int32), 1)
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(k, pa.from_numpy_dtype(v.dtype)) for k, v in cols.items()]
    return identity_schema(pa.schema(fields))


@dataclass(frozen=True)
class BlockSums:
    """`block_reductions` of one [rows, MoE layers, experts] block of counts."""

    layer_tokens: np.ndarray
    """[rows, layers] int64: tokens routed in the layer."""
    layer_max: np.ndarray
    """[rows, layers], the counts' dtype: the busiest expert's tokens."""
    active_experts: np.ndarray
    """[rows] int32: (layer, expert) pairs with a token."""
    tokens: np.ndarray
    """[phases, layers, experts] int64: tokens per expert, summed over the block's rows of each phase."""
    active_steps: np.ndarray
    """[phases, layers, experts] int64: rows of each phase in which the expert had a token."""


def block_reductions(counts: np.ndarray, phase: np.ndarray, n_phases: int) -> BlockSums:
    """The pass's reductions of `counts` ([rows, MoE layers, experts], non-negative integers; row i
    of phase index `phase[i]` < `n_phases`). Integer arithmetic throughout, so exact: sums are taken
    in the counts' own type (int32: no widening copy of the block) where no sum can reach its
    maximum (busiest count × max(experts, rows) bounds every one), in int64 otherwise. The fast
    forms (einsum's integer sum loops, a max with a 0 start, byte-wide activity) are several times
    faster than `sum`/`max` over the short expert axis and give the same integers."""
    rows, n_layers, n_experts = counts.shape
    flat = counts.reshape(rows, n_layers * n_experts)
    # initial=0 is the max of non-negative values, and numpy's reduction runs ~1.5x faster with it.
    layer_max = np.maximum.reduce(counts, axis=2, initial=0)
    peak = int(layer_max.max(initial=0))
    narrow = (
        np.issubdtype(counts.dtype, np.integer)
        and peak * max(n_experts, rows, 1) <= np.iinfo(counts.dtype).max
    )
    if narrow:
        layer_tokens = np.einsum("rle->rl", counts).astype(np.int64)
    else:
        layer_tokens = counts.sum(axis=2, dtype=np.int64)
    active = (flat > 0).view(np.uint8)
    active_experts = np.add.reduce(active, axis=1, dtype=np.int32)
    tokens = np.zeros((n_phases, n_layers * n_experts), np.int64)
    active_steps = np.zeros_like(tokens)
    present = np.unique(phase)
    for ph in present:
        if len(present) == 1:
            tokens[ph] = np.einsum("rx->x", flat) if narrow else flat.sum(axis=0, dtype=np.int64)
            active_steps[ph] = np.add.reduce(active, axis=0, dtype=np.int32)
        else:
            sel = phase == ph
            if narrow:  # a 0/1 weight per row: no copy of the phase's rows
                tokens[ph] = np.einsum("r,rx->x", sel.astype(counts.dtype), flat)
            else:
                tokens[ph] = flat[sel].sum(axis=0, dtype=np.int64)
            active_steps[ph] = np.add.reduce(active[sel], axis=0, dtype=np.int32)
    shape = (n_phases, n_layers, n_experts)
    return BlockSums(
        layer_tokens, layer_max, active_experts, tokens.reshape(shape), active_steps.reshape(shape)
    )


class ExpertSummary:
    """Per-step summaries (-> `expert_step_stats`) and per (phase, layer, expert) totals (->
    `expert_totals`) of expert counts handed over as [rows, MoE layers, experts] blocks. Used on one
    file's counts, and on the element-wise sums of ranks that each counted their own share."""

    def __init__(
        self,
        identity: dict[str, Any],
        layer_ids: np.ndarray,
        n_experts: int,
        phase_map: tuple[np.ndarray, np.ndarray] | None,
        stats_path: Path,
        step_statistics: StepStatistics,
    ) -> None:
        self.identity = identity
        self.layer_ids = layer_ids
        self.n_layers = len(layer_ids)
        self.n_experts = n_experts
        self.phase_map = phase_map
        self.step_statistics = step_statistics
        self.stats_sink = ParquetSink(stats_path)
        self.totals = np.zeros((len(PHASES) + 1, max(self.n_layers, 1), n_experts), dtype=np.int64)
        self.active_steps = np.zeros_like(self.totals)
        self._pending: list[tuple[np.ndarray, BlockSums]] = []
        self._pending_rows = 0

    def add(self, step: np.ndarray, counts: np.ndarray) -> None:
        """Summarise `counts[i]` ([MoE layers, experts], non-negative integers) of step `step[i]`."""
        if self.phase_map is not None and len(self.phase_map[0]):
            steps_sorted, phases_sorted = self.phase_map
            pos = np.clip(np.searchsorted(steps_sorted, step), 0, len(steps_sorted) - 1)
            phase_idx = np.where(steps_sorted[pos] == step, phases_sorted[pos], len(PHASES))
        else:
            phase_idx = np.full(len(step), len(PHASES))
        sums = block_reductions(counts, phase_idx, len(PHASES) + 1)
        self.totals += sums.tokens
        self.active_steps += sums.active_steps
        self._pending.append((np.asarray(step, np.int64), sums))
        self._pending_rows += len(step)
        if self._pending_rows >= STATS_ROWS:
            self._write_stats()

    def _write_stats(self) -> None:
        """Per-step statistics of the buffered blocks, written as one batch."""
        if not self._pending:
            return
        parts = self._pending
        self._pending, self._pending_rows = [], 0
        step = np.concatenate([s for s, _ in parts])
        stats = self.step_statistics(
            np.concatenate([b.layer_tokens for _, b in parts]),
            np.concatenate([b.layer_max for _, b in parts]),
            np.concatenate([b.active_experts for _, b in parts]),
            self.n_experts,
        )
        batch = pa.RecordBatch.from_arrays(
            [pa.array(step), *(pa.array(v) for v in stats.values())],
            names=["step", *stats],
        )
        self.stats_sink.write(with_identity(batch, self.identity))

    def close(self, totals_path: Path) -> dict[str, Path]:
        """Write both tables; their paths by view name."""
        identity, layer_ids, n_layers = self.identity, self.layer_ids, self.n_layers
        totals, active_steps = self.totals, self.active_steps
        self._write_stats()
        out = {"expert_step_stats": self.stats_sink.close(step_stats_schema(self.step_statistics))}
        phase_names = [*PHASES, "unknown"]
        ph, li, ex = np.nonzero(np.ones_like(totals, dtype=bool)) if n_layers else (np.array([]),) * 3
        # Keep every (phase, layer, expert) of phases that occurred, so dead experts show as zeros.
        seen_phase = totals.sum(axis=(1, 2)) > 0 if n_layers else np.array([], bool)
        keep = seen_phase[ph] if n_layers else np.array([], bool)
        n = int(np.count_nonzero(keep))
        totals_table = pa.table(
            {
                "run_id": pa.array([identity["run_id"]] * n, pa.string()),
                **{k: pa.array(np.full(n, identity[k], np.int32)) for k in RANK_COLUMNS[1:]},
                "phase": pa.array([phase_names[i] for i in ph[keep]], pa.string()),
                "moe_layer": pa.array(li[keep].astype(np.int32)),
                "layer": pa.array(layer_ids[li[keep]] if n_layers else np.array([], np.int32)),
                "expert": pa.array(ex[keep].astype(np.int32)),
                "tokens": pa.array(
                    totals[ph[keep], li[keep], ex[keep]] if n_layers else np.array([], np.int64)
                ),
                "active_steps": pa.array(
                    active_steps[ph[keep], li[keep], ex[keep]] if n_layers else np.array([], np.int64)
                ),
            }
        )
        pq.write_table(totals_table, totals_path.with_suffix(".tmp"), compression="zstd")
        os.replace(totals_path.with_suffix(".tmp"), totals_path)
        out["expert_totals"] = totals_path
        return out
