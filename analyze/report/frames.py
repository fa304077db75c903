"""Chart-ready data frames: SQL over the analyzer's views, aggregated so a chart stays small.

Every function here returns a Polars frame whose size is bounded by its arguments (bins, top-N,
points), never by the trace: a 10-hour trace with millions of steps gives the same few thousand
rows as a 30-second one. The chart functions in `charts.py` take these frames (or any frame with
the same columns, e.g. from a notebook). Times are in milliseconds (`*_ms`) or seconds (`*_s`),
shares are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow.dataset as pads

from ..load import TraceDB
from ..metrics.experts import layer_statistics, token_matrix
from ..metrics.requests import itl_samples, request_table
from ..metrics.steps import COMPUTE_BOUND_S_SQL, MEMORY_BOUND_S_SQL, summary_rows
from ..metrics.window import COUNTED_SQL, IN_WINDOW_SQL
from .groups import disambiguate, group_label, info_rows

PHASE_ORDER = ("prefill", "mixed", "decode", "verify", "idle", "unknown")


def _q(db: TraceDB, sql: str, params: list[Any]) -> Any:
    """A DuckDB relation over `sql` with positional parameters (`.pl()`, `.fetchall()`)."""
    return db.con.sql(sql, params=params)


def _one(db: TraceDB, sql: str, params: list[Any]) -> tuple[Any, ...]:
    rows = _q(db, sql, params).fetchall()
    return rows[0] if rows else ()


def run_info(db: TraceDB, run_id: str) -> dict[str, Any]:
    """The `runs` row of one run as a dict (num_experts, num_moe_layers, top_k, …)."""
    rel = _q(db, "SELECT * EXCLUDE (metadata_json) FROM runs WHERE run_id = ?", [run_id])
    rows = rel.fetchall()
    return dict(zip(rel.columns, rows[0], strict=True)) if rows else {}


# -- experts ---------------------------------------------------------------------------------------
def expert_share_frame(db: TraceDB, run_id: str) -> pl.DataFrame:
    """Tokens routed to each (phase, layer, expert) over every recorded step, and each expert's
    share of its layer's routed tokens in that phase. Columns: phase, layer, expert, tokens, share.

    DP/EP ranks are summed (the experts are shared); `layer` is the decoder-layer index.
    """
    df = _q(
        db,
        """SELECT phase, layer, expert, sum(tokens)::BIGINT AS tokens
           FROM expert_totals WHERE run_id = ? GROUP BY phase, layer, expert""",
        [run_id],
    ).pl()
    if df.is_empty():
        return pl.DataFrame(
            schema={
                "phase": pl.String,
                "layer": pl.Int32,
                "expert": pl.Int32,
                "tokens": pl.Int64,
                "share": pl.Float64,
            }
        )
    total = pl.col("tokens").sum().over("phase", "layer")
    df = df.with_columns(share=pl.when(total > 0).then(pl.col("tokens") / total).otherwise(0.0))
    # A phase that routed nothing (e.g. the `unknown` bucket of steps without a phase) is noise.
    live = df.group_by("phase").agg(pl.col("tokens").sum()).filter(pl.col("tokens") > 0)["phase"]
    df = _order_phases(df.filter(pl.col("phase").is_in(live.implode())))
    return df.sort("phase_rank", "layer", "expert").drop("phase_rank")


def layer_imbalance_frame(shares: pl.DataFrame, num_experts: int | None = None) -> pl.DataFrame:
    """Per (phase, layer): load imbalance = max / mean tokens per expert (1 = perfectly even),
    coefficient of variation, and dead experts. Input: `expert_share_frame`'s columns.

    The mean is over `num_experts` (default: the distinct experts in the frame), so experts that
    never received a token count as zeros."""
    if shares.is_empty():
        return pl.DataFrame(
            schema={
                "phase": pl.String,
                "layer": pl.Int32,
                "imbalance": pl.Float64,
                "cv": pl.Float64,
                "dead_experts": pl.Int64,
            }
        )
    e = num_experts or shares["expert"].n_unique()
    rows = []
    for (phase,), part in shares.group_by("phase"):
        layers, mat = token_matrix(part, e)  # metrics/experts.py: the one definition
        st = layer_statistics(mat)
        for i, layer in enumerate(layers):
            rows.append(
                {
                    "phase": phase,
                    "layer": layer,
                    "imbalance": None if np.isnan(st["imbalance"][i]) else float(st["imbalance"][i]),
                    "cv": None if np.isnan(st["cv"][i]) else float(st["cv"][i]),
                    "dead_experts": int(st["dead"][i]),
                }
            )
    schema = {
        "phase": pl.String,
        "layer": pl.Int32,
        "imbalance": pl.Float64,
        "cv": pl.Float64,
        "dead_experts": pl.Int64,
    }
    out = pl.DataFrame(rows, schema=schema)
    return _order_phases(out).sort("phase_rank", "layer").drop("phase_rank")


def expert_load_frame(db: TraceDB, run_id: str, *, top_n: int = 8, bins: int = 120) -> pl.DataFrame:
    """Load over time of the `top_n` hottest (layer, expert) pairs: steps are binned into at most
    `bins` equal step ranges and each expert's tokens summed per bin. `share` is the expert's share
    of its layer's routed tokens in the bin (uniform routing gives 1 / num_experts).

    Columns: bin, step_start, step_end, steps, expert_label ("L3 E17"), layer, expert, tokens, share.
    Counts are read as flat numpy buffers from the cached experts table (only the `step` and
    `counts` columns), one pass; DP ranks of a step are summed, PP stages hold their own layers.
    """
    info = run_info(db, run_id)
    n_experts = int(info.get("num_experts") or 0)
    empty = pl.DataFrame(
        schema={
            "bin": pl.Int64,
            "step_start": pl.Int64,
            "step_end": pl.Int64,
            "steps": pl.Int64,
            "expert_label": pl.String,
            "layer": pl.Int32,
            "expert": pl.Int32,
            "tokens": pl.Int64,
            "share": pl.Float64,
        }
    )
    if not n_experts or top_n <= 0:
        return empty
    top = _q(
        db,
        """SELECT pp, moe_layer, layer, expert, sum(tokens) AS t FROM expert_totals WHERE run_id = ?
           GROUP BY pp, moe_layer, layer, expert HAVING sum(tokens) > 0
           ORDER BY t DESC, layer, expert LIMIT ?""",
        [run_id, int(top_n)],
    ).fetchall()
    lo_hi = _one(db, "SELECT min(step), max(step) FROM experts WHERE run_id = ?", [run_id])
    if not top or not lo_hi or lo_hi[0] is None:
        return empty
    lo, hi = int(lo_hi[0]), int(lo_hi[1])
    width = max(1, math.ceil((hi - lo + 1) / max(1, bins)))
    n_bins = (hi - lo) // width + 1
    expert_tokens = np.zeros((len(top), n_bins))
    layer_tokens = np.zeros((len(top), n_bins))
    seen_steps = []
    for f in _expert_files(db, run_id):
        mine = [
            (i, int(ml), int(e)) for i, (pp, ml, _layer, e, _t) in enumerate(top) if int(pp) == f.run.rank.pp
        ]
        for batch in _scan(f.parquet["experts"], ["step", "counts"]):
            steps = batch.column("step").to_numpy().astype(np.int64)
            seen_steps.append(steps)
            if not mine or batch.num_rows == 0:
                continue
            flat = batch.column("counts").flatten().to_numpy(zero_copy_only=False)
            counts = flat.reshape(batch.num_rows, -1)  # layer-major over the file's MoE layers
            b = (steps - lo) // width
            for i, moe_layer, expert in mine:
                layer = counts[:, moe_layer * n_experts : (moe_layer + 1) * n_experts]
                expert_tokens[i] += np.bincount(b, weights=layer[:, expert], minlength=n_bins)
                layer_tokens[i] += np.bincount(b, weights=layer.sum(axis=1), minlength=n_bins)
    all_steps = np.unique(np.concatenate(seen_steps)) if seen_steps else np.array([], np.int64)
    b_all = (all_steps - lo) // width
    present = np.bincount(b_all, minlength=n_bins)
    keep = present > 0
    last = np.full(n_bins, -1, np.int64)
    np.maximum.at(last, b_all, all_steps)
    first_step = np.full(n_bins, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first_step, b_all, all_steps)
    bins_idx = np.nonzero(keep)[0]
    parts = []
    for i, (_pp, _ml, layer, expert, _t) in enumerate(top):
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(layer_tokens[i] > 0, expert_tokens[i] / layer_tokens[i], np.nan)
        parts.append(
            pl.DataFrame(
                {
                    "bin": bins_idx.astype(np.int64),
                    "step_start": first_step[keep],
                    "step_end": last[keep],
                    "steps": present[keep].astype(np.int64),
                    "expert_label": [f"L{layer} E{expert}"] * len(bins_idx),
                    "layer": np.full(len(bins_idx), int(layer), np.int32),
                    "expert": np.full(len(bins_idx), int(expert), np.int32),
                    "tokens": expert_tokens[i][keep].astype(np.int64),
                    "share": share[keep],
                }
            ).with_columns(pl.col("share").fill_nan(None))
        )
    return pl.concat(parts)


def _scan(path: Any, columns: list[str]) -> Any:
    """Record batches of a cached table, Arrow IPC file (`.arrow`) or Parquet, only `columns`."""
    fmt = "ipc" if str(path).endswith(".arrow") else "parquet"
    return pads.dataset(str(path), format=fmt).to_batches(columns=columns, batch_size=16384)


def _expert_files(db: TraceDB, run_id: str) -> list[Any]:
    """The run's experts files that feed the views (one TP rank per (dp, pp), or the sum over its
    ranks, as the loader rules: analyze/load/ranks.py)."""
    run = db.runs.get(run_id)
    if run is None:
        return []
    return [f for f in run.counting_files if "experts" in f.parquet]


# -- steps ----------------------------------------------------------------------------------------
def step_frame(db: TraceDB, run_id: str, *, max_points: int = 1500, where: str = "TRUE") -> pl.DataFrame:
    """Steps grouped by (phase, batch tokens) with the measured step time and the roofline bound
    for that batch. A phase keeps one row per distinct token count when it has few enough, else
    tokens are binned into equal-width buckets so the frame has at most ~`max_points` rows.

    Columns: phase, tokens (mean of the group), tokens_min, tokens_max, steps, time_ms (mean GPU
    span), time_ms_p10, time_ms_p90, memory_bound_ms (bytes / (bandwidth x GPUs)), compute_bound_ms
    (FLOPs / (peak x GPUs)), active_experts_per_layer (mean; null without expert counts).
    Every recorded non-draft step with a positive duration is used, not only the metrics window,
    that also passes `where` (SQL over step_metrics, e.g. `steps.Excluded.predicate()`).
    """
    info = run_info(db, run_id)
    n_moe = max(1, int(info.get("num_moe_layers") or 1))
    n_phases = _one(
        db,
        f"SELECT count(DISTINCT phase) FROM step_metrics WHERE run_id = ? AND NOT is_draft AND time_s > 0 AND ({where})",
        [run_id],
    )
    per_phase = max(10, max_points // max(1, int(n_phases[0] if n_phases else 1)))
    df = _q(
        db,
        f"""
        WITH s AS (
            SELECT phase, num_tokens, time_s,
                   CASE WHEN isnan(active_experts) THEN NULL ELSE active_experts END AS active,
                   {MEMORY_BOUND_S_SQL} AS mem_s, {COMPUTE_BOUND_S_SQL} AS comp_s
            FROM step_metrics s WHERE run_id = ? AND NOT is_draft AND time_s > 0 AND ({where})
        ), w AS (
            SELECT phase, min(num_tokens) AS lo, count(DISTINCT num_tokens) AS distinct_tokens,
                   greatest(1, ceil((max(num_tokens) - min(num_tokens) + 1) / {per_phase}))::BIGINT AS width
            FROM s GROUP BY phase
        )
        SELECT s.phase,
               CASE WHEN w.distinct_tokens <= {per_phase} THEN s.num_tokens
                    ELSE w.lo + (s.num_tokens - w.lo) // w.width * w.width END AS bucket,
               avg(num_tokens) AS tokens, min(num_tokens) AS tokens_min, max(num_tokens) AS tokens_max,
               count(*) AS steps,
               avg(time_s) * 1e3 AS time_ms,
               quantile_cont(time_s, 0.1) * 1e3 AS time_ms_p10,
               quantile_cont(time_s, 0.9) * 1e3 AS time_ms_p90,
               avg(mem_s) * 1e3 AS memory_bound_ms,
               avg(comp_s) * 1e3 AS compute_bound_ms,
               avg(active) / {n_moe} AS active_experts_per_layer
        FROM s JOIN w USING (phase)
        GROUP BY s.phase, bucket
        """,
        [run_id],
    ).pl()
    return _order_phases(df).sort("phase_rank", "tokens").drop("phase_rank", "bucket")


TIMELINE_SCHEMA = {
    "bin": pl.Int64,
    "t_start_s": pl.Float64,
    "t_end_s": pl.Float64,
    "steps": pl.Int64,
    "tokens": pl.Int64,
    "busy_ms_per_step": pl.Float64,
    "host_gap_ms_per_step": pl.Float64,
    "s_mbu": pl.Float64,
    "s_mfu": pl.Float64,
    "in_window": pl.Float64,
}


def timeline_frame(db: TraceDB, run_id: str, *, bins: int = 150, where: str = "TRUE") -> pl.DataFrame:
    """Steps binned over wall time (seconds from the run's first step; at most `bins` bins).

    Per bin: steps, tokens, busy_ms_per_step (mean GPU span), host_gap_ms_per_step (mean gap to the
    next step's start beyond the GPU span), S-MBU and S-MFU of the bin's steps (metrics/steps.py:
    ratios of sums; S-MBU null where a step lacks expert counts), and in_window = the fraction of
    the bin's steps inside the run's metrics window (`run_windows`).
    Columns: bin, t_start_s, t_end_s, steps, tokens, busy_ms_per_step, host_gap_ms_per_step, s_mbu,
    s_mfu, in_window. `where` (SQL over step_metrics) leaves steps out of the bins (e.g. compile
    steps: `steps.Excluded.predicate(idle=False)`); the bins still span every step.
    """
    return timeline_frames(db, [run_id], bins=bins, where=where)[run_id]


def timeline_frames(
    db: TraceDB, run_ids: list[str], *, bins: int = 150, where: str = "TRUE"
) -> dict[str, pl.DataFrame]:
    """run_id -> its `timeline_frame`, for every run in two queries (the summary query costs
    ~15 ms to plan: per run, that was most of the report's time for this frame)."""
    out = {rid: pl.DataFrame(schema=TIMELINE_SCHEMA) for rid in run_ids}
    if not run_ids:
        return out
    spans = _q(
        db,
        "SELECT run_id, count(*), max(t_start_ns) - min(t_start_ns), min(t_start_ns) FROM step_metrics "
        f"WHERE run_id IN ({', '.join('?' * len(run_ids))}) AND NOT is_draft GROUP BY run_id",
        list(run_ids),
    ).fetchall()
    grid = {}  # run_id -> (first step's start ns, bin width s, bins)
    for rid, n, span_ns, t0 in spans:
        if n:
            k = max(1, min(int(bins), int(n)))
            grid[rid] = (int(t0), max((span_ns or 0) / 1e9, 1e-9) / k, k)
    if not grid:
        return out
    values = ", ".join("(?, ?::BIGINT, ?::DOUBLE, ?::BIGINT)" for _ in grid)
    params = [x for rid, (t0, width, k) in grid.items() for x in (rid, t0, width, k)]
    source = f"""(SELECT s.*, least(floor((s.t_start_ns - p.t0) / 1e9 / p.width), p.k - 1)::BIGINT AS bin,
                         coalesce({IN_WINDOW_SQL}, false) AS in_win
                  FROM step_metrics s JOIN run_windows w USING (run_id)
                       JOIN (VALUES {values}) AS p(run_id, t0, width, k) USING (run_id)
                  WHERE NOT s.is_draft AND s.time_s > 0 AND ({where}))"""
    per_run = summary_rows(db.con, source, params=params, key="s.bin")
    in_win: dict[str, dict[int, float]] = {}
    for rid, b, frac in _q(
        db, f"SELECT run_id, bin, avg(in_win::INTEGER) FROM {source} GROUP BY run_id, bin", params
    ).fetchall():
        in_win.setdefault(rid, {})[int(b)] = float(frac)
    for rid, per_bin in per_run.items():
        if rid not in grid:
            continue
        width = grid[rid][1]
        rows = [
            {
                "bin": int(b),
                "t_start_s": int(b) * width,
                "t_end_s": (int(b) + 1) * width,
                "steps": int(v["steps"] or 0),
                "tokens": int(v["tokens"] or 0),
                "busy_ms_per_step": None if v["step_time_s_mean"] is None else v["step_time_s_mean"] * 1e3,
                "host_gap_ms_per_step": None
                if v["step_wall_s_mean"] is None or v["step_time_s_mean"] is None
                else (v["step_wall_s_mean"] - v["step_time_s_mean"]) * 1e3,
                "s_mbu": v["s_mbu"],
                "s_mfu": v["s_mfu"],
                "in_window": in_win.get(rid, {}).get(int(b), 0.0),
            }
            for b, v in per_bin.items()
            if b != "all"
        ]
        out[rid] = pl.DataFrame(rows, schema=TIMELINE_SCHEMA).sort("bin")
    return out


# -- requests and runs ----------------------------------------------------------------------------
def latency_cdf_frame(db: TraceDB, labels: dict[str, str], *, points: int = 200) -> pl.DataFrame:
    """Empirical CDFs of TTFT, TPOT and ITL per run (client clock, successful requests), each
    reduced to at most `points` quantiles. Columns: run (label), metric, value_ms, cdf."""
    parts = []
    for run_id, label in labels.items():
        req = _q(db, "SELECT * FROM requests WHERE run_id = ?", [run_id]).pl()
        if req.is_empty():
            continue
        ok = request_table(req).filter(pl.col("ok"))
        series = {
            "TTFT": ok["ttft_s"].drop_nulls().to_numpy(),
            "TPOT": ok["tpot_s"].drop_nulls().to_numpy(),
            "ITL": itl_samples(ok),
        }
        for metric, values in series.items():
            v = np.sort(np.asarray(values, dtype=np.float64))
            v = v[~np.isnan(v)]
            if v.size == 0:
                continue
            if v.size <= points:
                cdf = np.arange(1, v.size + 1) / v.size
                vals = v
            else:
                cdf = np.linspace(0.0, 1.0, points)
                vals = np.quantile(v, cdf)
            parts.append(
                pl.DataFrame(
                    {
                        "run": [label] * len(vals),
                        "metric": [metric] * len(vals),
                        "value_ms": vals * 1e3,
                        "cdf": cdf,
                    }
                )
            )
    if not parts:
        return pl.DataFrame(
            schema={"run": pl.String, "metric": pl.String, "value_ms": pl.Float64, "cdf": pl.Float64}
        )
    return pl.concat(parts)


def throughput_frame(
    db: TraceDB,
    labels: dict[str, str],
    analysis: Any | None = None,
    *,
    min_steps: int = 3,
    where: str = "TRUE",
) -> pl.DataFrame:
    """Generated tokens per second against batch size (requests in the step).

    kind = "steps": per run and batch size, the window_output_throughput (metrics/steps.py) of that
    run's steps with that many requests (groups of fewer than `min_steps` steps dropped); kind = "run":
    the run's window throughput (`run_metrics`, phase `all`, of `analysis`) at its workload batch
    size (`runs.batch_size`). Columns: run, kind, batch_size, window_output_throughput, steps. `where`
    (SQL over step_metrics) filters the steps, e.g. `steps.steps_predicate` leaving out idle and
    compile-outlier steps.
    """
    ids = list(labels)
    parts = []
    if ids:
        # Each batch-size group's window_output_throughput, as metrics/steps.py defines it.
        marks = ", ".join("?" * len(ids))
        source = f"(SELECT * FROM step_metrics s WHERE s.run_id IN ({marks}) AND {COUNTED_SQL} AND ({where}))"
        summary = summary_rows(db.con, source, params=ids, key="s.num_reqs")
        rows = [
            {
                "run_id": rid,
                "batch_size": int(group),
                "window_output_throughput": values["window_output_throughput"],
                "steps": int(values["steps"] or 0),
            }
            for rid, groups in summary.items()
            for group, values in groups.items()
            if group != "all" and group != "unknown" and (values["steps"] or 0) >= int(min_steps)
        ]
        df = pl.DataFrame(
            rows,
            schema={
                "run_id": pl.String,
                "batch_size": pl.Int64,
                "window_output_throughput": pl.Float64,
                "steps": pl.Int64,
            },
        )
        parts.append(
            df.with_columns(
                run=pl.col("run_id").replace_strict(labels, return_dtype=pl.String),
                kind=pl.lit("steps"),
            ).select("run", "kind", "batch_size", "window_output_throughput", "steps")
        )
    if analysis is not None:
        runs = (
            analysis.run_metrics()
            .filter((pl.col("phase") == "all") & pl.col("run_id").is_in(list(labels)))
            .join(analysis.run_info().select("run_id", "batch_size"), on="run_id", how="inner")
            .filter(
                pl.col("batch_size").is_not_null()
                & (pl.col("batch_size") > 0)
                & pl.col("window_output_throughput").is_not_null()
                & (pl.col("window_output_throughput") != 0)
            )
        )
        if runs.height:
            parts.append(
                runs.select(
                    run=pl.col("run_id").replace_strict(labels, return_dtype=pl.String),
                    kind=pl.lit("run"),
                    batch_size=pl.col("batch_size").cast(pl.Int64),
                    window_output_throughput=pl.col("window_output_throughput").cast(pl.Float64),
                    steps=pl.col("steps").cast(pl.Int64),
                )
            )
    if not parts:
        return pl.DataFrame(
            schema={
                "run": pl.String,
                "kind": pl.String,
                "batch_size": pl.Int64,
                "window_output_throughput": pl.Float64,
                "steps": pl.Int64,
            }
        )
    return pl.concat(parts).sort("run", "kind", "batch_size")


def run_labels(analysis: Any) -> dict[str, str]:
    """run_id -> a short, unique legend label: "model · engine · GPU×n · bs N", plus the dataset
    where that alone repeats, plus "#i" (the run's 1-based position in the analysis, as the report
    numbers its sections) where even that repeats. From `Analysis.run_info()` (the `runs` and
    `run_settings` tables), as the charts' labels (`groups.run_labels`)."""
    base: dict[str, str] = {}
    datasets: dict[str, str] = {}
    for row in info_rows(analysis):
        rid = row["run_id"]
        base[rid] = group_label(row, short_gpu=False) + (
            f" · bs {row['batch_size']}" if row.get("batch_size") else ""
        )
        datasets[rid] = str(row.get("dataset") or "")
    return disambiguate(base, datasets, lambda i, rid: f"#{i}")


RUNS_FRAME_SCHEMA: dict[str, Any] = {
    "run": pl.String,
    "run_id": pl.String,
    "model": pl.String,
    "engine": pl.String,
    "engine_version": pl.String,
    "gpu": pl.String,
    "num_gpus": pl.Int64,
    "batch_size": pl.Int64,
    "dataset": pl.String,
    "created_at": pl.String,
    "cost_usd_per_m_output_tokens": pl.Float64,
    "cost_band_low": pl.Float64,
    "cost_band_high": pl.Float64,
    "accuracy": pl.Float64,
    "accuracy_correct": pl.Float64,
    "accuracy_total": pl.Float64,
    "ttft_ms": pl.Float64,
    "tpot_ms": pl.Float64,
    "itl_ms": pl.Float64,
    "window_output_throughput": pl.Float64,
    "output_throughput": pl.Float64,
    "request_throughput": pl.Float64,
    "prefill_smbu": pl.Float64,
    "prefill_smfu": pl.Float64,
    "decode_smbu": pl.Float64,
    "decode_smfu": pl.Float64,
    "compile_steps": pl.Int64,
    "compile_s": pl.Float64,
    "warnings": pl.Int64,
}


def runs_frame(analysis: Any, labels: dict[str, str] | None = None) -> pl.DataFrame:
    """One row per run of an `Analysis` with the CAP figures the cross-run charts and the
    leaderboard use, read from the façade: `run_info()` and `run_metrics()` (the SQL views) and the
    per-run frames `request_summary`, `costs`, `accuracy`. Missing figures are null (cost and
    accuracy are often absent); NaN reads as null.

    Columns (RUNS_FRAME_SCHEMA): run, run_id, model, engine, engine_version, gpu, num_gpus,
    batch_size, dataset, created_at, cost_usd_per_m_output_tokens (+ cost_band_low/high: the cost
    model's sensitivity band), accuracy (exact match, fraction), accuracy_correct, accuracy_total,
    ttft_ms, tpot_ms (means), itl_ms (p50), window_output_throughput (tok/s over the metrics
    window's busy time), output_throughput and request_throughput (over the requests' makespan),
    prefill_smbu, prefill_smfu, decode_smbu, decode_smfu, compile_steps and compile_s (the steps
    `check` names as compile / JIT or first-use warm-up, `analyze/slow_steps.py`, and their summed time:
    the figures above include them), warnings.
    """
    labels = labels or run_labels(analysis)
    ids = analysis.run_ids
    order = pl.DataFrame(
        {"run_id": ids, "_order": list(range(len(ids)))}, schema={"run_id": pl.String, "_order": pl.Int64}
    )
    steps = analysis.run_metrics().select("run_id", "phase", "window_output_throughput", "s_mbu", "s_mfu")

    def phase(name: str, **cols: str) -> pl.DataFrame:
        part = steps.filter(pl.col("phase") == name)
        return part.select("run_id", *(pl.col(src).alias(dst) for dst, src in cols.items()))

    req = analysis.request_summary
    parts = [
        analysis.run_info(),
        phase("all", window_output_throughput="window_output_throughput"),
        phase("prefill", prefill_smbu="s_mbu", prefill_smfu="s_mfu"),
        phase("decode", decode_smbu="s_mbu", decode_smfu="s_mfu"),
        req.select(
            "run_id",
            ttft_ms=pl.col("ttft_s_mean") * 1e3,
            tpot_ms=pl.col("tpot_s_mean") * 1e3,
            itl_ms=pl.col("itl_s_p50") * 1e3,
            output_throughput="output_throughput",
            request_throughput="request_throughput",
        ),
        analysis.costs.select(
            "run_id",
            cost_usd_per_m_output_tokens="usd_per_1m_output_tokens",
            cost_band_low="band_low",
            cost_band_high="band_high",
        ),
        analysis.accuracy.select(
            "run_id", accuracy="exact_match", accuracy_correct="correct", accuracy_total="total"
        ),
        analysis.slow_step_totals(),
    ]
    frame = order
    for part in parts:  # one row per run in each; runs a part lacks get nulls
        frame = frame.join(part, on="run_id", how="left")
    frame = frame.sort("_order").with_columns(
        run=pl.col("run_id").replace_strict(labels, default=pl.col("run_id"), return_dtype=pl.String),
        warnings=pl.col("run_id").replace_strict(
            {rid: len(w) for rid, w in analysis.warnings.items()}, default=0, return_dtype=pl.Int64
        ),
    )
    floats = [c for c, t in RUNS_FRAME_SCHEMA.items() if t == pl.Float64]
    return frame.with_columns(pl.col(c).cast(pl.Float64).fill_nan(None) for c in floats).select(
        pl.col(c).cast(t) for c, t in RUNS_FRAME_SCHEMA.items()
    )


def _order_phases(df: pl.DataFrame) -> pl.DataFrame:
    rank = {p: i for i, p in enumerate(PHASE_ORDER)}
    return df.with_columns(
        phase_rank=pl.col("phase").replace_strict(rank, default=len(rank), return_dtype=pl.Int32)
    )


WHATIF_METRICS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("window_output_throughput", ("phases", "all", "window_output_throughput"), 1.0),
    ("tpot_ms", ("requests", "tpot_s", "mean"), 1e3),
    ("ttft_ms", ("requests", "ttft_s", "mean"), 1e3),
    ("decode_step_ms", ("phases", "decode", "step_time_s_mean"), 1e3),
    ("decode_smbu", ("phases", "decode", "s_mbu"), 1.0),
    ("usd_per_1m_output_tokens", ("cost", "usd_per_1m_output_tokens"), 1.0),
)
"""(column, path into a what-if view, scale to the column's unit) of `whatif_frame`."""


def whatif_frame(document: dict[str, Any], labels: dict[str, str]) -> pl.DataFrame:
    """One row per run × GPU × model of a what-if document (`moecap.analyze.whatif.whatif`):
    `model` is measured (on the run's own GPU), projection, no_change or bandwidth_ratio; columns of
    WHATIF_METRICS (tok/s, ms, fraction, $)."""

    def pick(view: dict[str, Any], path: tuple[str, ...]) -> float | None:
        cur: Any = view
        for key in path:
            cur = cur.get(key) if isinstance(cur, dict) else None
        return float(cur) if isinstance(cur, (int, float)) else None

    rows = []
    for run in document.get("runs", []):
        if "error" in run:
            continue
        label = labels.get(run["run_id"], run["run_id"])
        views = [(run["source_gpu"], "measured", run["measured"])]
        for gpu, target in run["targets"].items():
            views += [(gpu, model, view) for model, view in target["models"].items()]
        for gpu, model, view in views:
            row: dict[str, Any] = {"run": label, "run_id": run["run_id"], "gpu": gpu, "model": model}
            for col, path, scale in WHATIF_METRICS:
                v = pick(view, path)
                row[col] = v * scale if v is not None else None
            rows.append(row)
    schema = {"run": pl.Utf8, "run_id": pl.Utf8, "gpu": pl.Utf8, "model": pl.Utf8} | {
        c: pl.Float64 for c, _, _ in WHATIF_METRICS
    }
    return pl.DataFrame(rows, schema=schema)
