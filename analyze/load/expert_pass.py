"""The expert-count pass: per-step summaries and per-(phase, layer, expert) totals of expert counts,
computed on flat numpy blocks while the counts stream by, so no query ever unnests them.

The pass reduces each block over the expert axis (tokens, busiest expert's tokens, experts with a
token per (step, layer)) and over the steps (tokens and active steps per (phase, layer, expert)); the
per-step statistics made of those reductions (imbalance, activated experts, ...) are the metric
layer's (`moecap.analyze.metrics.experts.step_statistics`), handed in by `load_traces` as
`StepStatistics`. Every reduction is one numpy call over the whole block (integer sums, exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moecap.schemas import PHASES

from .cache import ParquetSink, identity_schema, with_identity
from .runs import RANK_COLUMNS

StepStatistics = Callable[[np.ndarray, np.ndarray, np.ndarray, int], dict[str, np.ndarray]]
"""(layer_tokens, layer_max, layer_active [steps, MoE layers], num_experts) -> per-step columns."""


def step_stats_schema(step_statistics: StepStatistics) -> pa.Schema:
    """The `expert_step_stats` table's schema: identity, step, the columns `step_statistics` makes."""
    empty = np.zeros((0, 1), np.int64)
    cols = step_statistics(empty, empty, empty, 1)
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(k, pa.from_numpy_dtype(v.dtype)) for k, v in cols.items()]
    return identity_schema(pa.schema(fields))


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

    def add(self, step: np.ndarray, counts: np.ndarray) -> None:
        """Summarise `counts[i]` ([MoE layers, experts], non-negative integers) of step `step[i]`."""
        active = counts > 0
        stats = self.step_statistics(
            counts.sum(axis=2, dtype=np.int64),  # [rows, layers]: tokens routed in the layer
            counts.max(axis=2),  # the busiest expert's tokens
            active.sum(axis=2, dtype=np.int32),  # experts with a token
            self.n_experts,
        )
        batch = pa.RecordBatch.from_arrays(
            [pa.array(np.asarray(step, np.int64)), *(pa.array(v) for v in stats.values())],
            names=["step", *stats],
        )
        self.stats_sink.write(with_identity(batch, self.identity))
        if self.phase_map is not None and len(self.phase_map[0]):
            steps_sorted, phases_sorted = self.phase_map
            pos = np.clip(np.searchsorted(steps_sorted, step), 0, len(steps_sorted) - 1)
            phase_idx = np.where(steps_sorted[pos] == step, phases_sorted[pos], len(PHASES))
        else:
            phase_idx = np.full(len(step), len(PHASES))
        for ph in np.unique(phase_idx):
            sel = phase_idx == ph
            if sel.all():
                self.totals[ph] += counts.sum(axis=0, dtype=np.int64)
                self.active_steps[ph] += active.sum(axis=0, dtype=np.int64)
            else:
                self.totals[ph] += counts[sel].sum(axis=0, dtype=np.int64)
                self.active_steps[ph] += active[sel].sum(axis=0, dtype=np.int64)

    def close(self, totals_path: Path) -> dict[str, Path]:
        """Write both tables; their paths by view name."""
        identity, layer_ids, n_layers = self.identity, self.layer_ids, self.n_layers
        totals, active_steps = self.totals, self.active_steps
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
