"""Expert-activation statistics (docs/metrics.md §12): every expert formula, defined once.

* Per run (and phase): from the `expert_totals` view (columns layer, expert, tokens). Per layer:
  load imbalance = max / mean tokens per expert, coefficient of variation, share of tokens on the
  top 10 % experts, dead experts (no token in the run), normalised entropy (1 = uniform).
* Per step (the `expert_statistics` columns of `expert_step_stats`): from per-(step, layer)
  reductions over the expert axis that the loader computes while it streams the counts (tokens,
  busiest expert's tokens) and each step's count of (layer, expert) pairs with a token: activated
  experts, routed tokens, imbalance mean / max over layers, fewest / most tokens in one layer.

Both imbalances are `imbalance_ratio`: max / mean tokens per expert = max · E / Σ tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl


def imbalance_ratio(peak: np.ndarray, total: np.ndarray, num_experts: int) -> np.ndarray:
    """Load imbalance (ratio, 1 = even, E = everything on one expert): max / mean tokens per expert
    = peak · E / total, elementwise; NaN where the layer routed no token (total 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.asarray(peak, np.float64) * num_experts / total, np.nan)


STEP_STATISTICS: tuple[tuple[str, str], ...] = (
    ("active_experts", "int32"),
    ("routed_tokens", "int64"),
    ("imbalance_mean", "float64"),
    ("imbalance_max", "float64"),
    ("layer_tokens_min", "int64"),
    ("layer_tokens_max", "int64"),
)
"""(column, numpy dtype) of `step_statistics`, in order: the per-step columns of `expert_step_stats`."""


def step_statistics(
    layer_tokens: np.ndarray, layer_max: np.ndarray, active_experts: np.ndarray, num_experts: int
) -> dict[str, np.ndarray]:
    """Per step (rows of the [steps, MoE layers] inputs: tokens routed in the layer, the busiest
    expert's tokens; `active_experts` [steps]: (layer, expert) pairs with a token), the
    STEP_STATISTICS columns: activated (layer, expert) pairs, routed tokens (Σ over layers, =
    tokens × top_k), imbalance_ratio's mean and max over the layers that routed a token (NaN for a
    step that routed none), fewest / most tokens in a layer. Vectorised over the whole block; no
    loop over steps."""
    rows = layer_tokens.shape[0]
    imbalance = imbalance_ratio(layer_max, layer_tokens, num_experts)
    routed = ~np.isnan(imbalance)
    layers_routed = routed.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        imbalance_mean = np.where(routed, imbalance, 0.0).sum(axis=1) / layers_routed
    if layer_tokens.shape[1]:
        imbalance_max = np.where(routed, imbalance, -np.inf).max(axis=1)
        tokens_min, tokens_max = layer_tokens.min(axis=1), layer_tokens.max(axis=1)
    else:
        imbalance_max = np.full(rows, -np.inf)
        tokens_min = tokens_max = np.zeros(rows, np.int64)
    return {
        "active_experts": np.asarray(active_experts, np.int32),
        "routed_tokens": layer_tokens.sum(axis=1, dtype=np.int64),
        "imbalance_mean": np.where(layers_routed > 0, imbalance_mean, np.nan),
        "imbalance_max": np.where(layers_routed > 0, imbalance_max, np.nan),
        "layer_tokens_min": tokens_min.astype(np.int64),
        "layer_tokens_max": tokens_max.astype(np.int64),
    }


def token_matrix(totals: pl.DataFrame, num_experts: int) -> tuple[list[int], np.ndarray]:
    """(layer ids, [layers, num_experts] token totals) from rows of (layer, expert, tokens), summed."""
    per = totals.group_by("layer", "expert").agg(pl.col("tokens").sum()).sort("layer", "expert")
    layers = per["layer"].unique().sort().to_list()
    mat = np.zeros((len(layers), num_experts), dtype=np.float64)
    li = {layer: i for i, layer in enumerate(layers)}
    mat[[li[x] for x in per["layer"].to_list()], per["expert"].to_numpy()] = per["tokens"].to_numpy()
    return layers, mat


def layer_statistics(mat: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer (rows of `mat`, [layers, experts] token totals; every expert a column, unused ones
    0): imbalance = max / mean, cv = population std / mean (NaN where the layer routed nothing),
    top10pct_token_share, dead experts, normalised entropy, hottest expert. The one definition."""
    num_experts = mat.shape[1]
    total = mat.sum(axis=1, keepdims=True)
    imbalance = imbalance_ratio(mat.max(axis=1), total[:, 0], num_experts)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, mat / total, 0.0)
        mean = total[:, 0] / num_experts
        cv = np.where(mean > 0, mat.std(axis=1) / mean, np.nan)
        plogp = np.where(share > 0, share * np.log(share), 0.0)
        entropy = -plogp.sum(axis=1) / np.log(num_experts) if num_experts > 1 else np.ones(len(mat))
    top_n = max(1, round(0.1 * num_experts))
    return {
        "imbalance": imbalance,
        "cv": cv,
        "top_share": np.sort(share, axis=1)[:, ::-1][:, :top_n].sum(axis=1),
        "dead": (mat == 0).sum(axis=1),
        "entropy": entropy,
        "hottest": mat.argmax(axis=1),
    }


def expert_stats(totals: pl.DataFrame, num_experts: int) -> dict[str, Any]:
    """Run-level and per-layer statistics; `totals` may hold several phases (summed here)."""
    if totals.is_empty():
        return {}
    layers, mat = token_matrix(totals, num_experts)
    st = layer_statistics(mat)
    imbalance, cv, top_share, dead, entropy = (
        st["imbalance"],
        st["cv"],
        st["top_share"],
        st["dead"],
        st["entropy"],
    )

    def f(x: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else float(v) for v in x]

    return {
        "layers": layers,
        "imbalance_max_over_mean": f(imbalance),
        "cv": f(cv),
        "top10pct_token_share": f(top_share),
        "dead_experts": [int(v) for v in dead],
        "entropy_normalized": f(entropy),
        "hottest_expert": [int(v) for v in st["hottest"]],
        "summary": {
            "imbalance_max_over_mean_mean": float(np.nanmean(imbalance)) if len(layers) else None,
            "cv_mean": float(np.nanmean(cv)) if len(layers) else None,
            "top10pct_token_share_mean": float(top_share.mean()) if len(layers) else None,
            "dead_experts_total": int(dead.sum()),
            "entropy_normalized_mean": float(np.nanmean(entropy)) if len(layers) else None,
            "routed_tokens_total": int(mat.sum()),
        },
    }
