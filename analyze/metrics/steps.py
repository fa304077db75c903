"""Step-level metrics over a window (docs/metrics.md §6, §9, §10): S-MBU / S-MFU per step and as a
ratio of sums, throughput over the window's busy time, time accounting, activated experts.

Every formula is one SQL expression here; the `step_metrics` view (per step), the `run_metrics` view
(per run and phase), metrics.json, the report's timeline and `whatif` (over its projected steps)
all run these, so they agree by construction. Inputs are step rows with the columns of
`step_metrics` (bytes_total, flops_total, time_s, wall_s, host_gap_s, gpus, num_tokens, logit_rows,
active_experts, gpu_bandwidth, gpu_peak_flops, dp, pp, phase) and a settings row per run
(`run_settings`: last_pp, num_moe_layers).

Rules stated once:
* A step that computed no token (an idle pass) has no S-MBU / S-MFU (null) and is left out of the
  ratios of sums; it still occupies time, so it counts in the window's busy time.
* S-MBU is null where any step of the group lacks expert counts (its weight bytes are unknown).
* Throughput = tokens / busy time of the window, busy time = Σ over the window's steps of the step's
  wall time (GPU span + host gap to the next step), per (dp, pp) step stream, the longest stream.
  A window of separate stretches is charged the stretches, not the time between them.
* Pipeline stages each record the same engine step: steps and tokens count on stage 0, logit rows
  on the last stage; bytes, FLOPs and GPU time sum over every stage.
* Sums are exact and do not depend on row order (`exact_sum`): DuckDB adds rows on several threads
  in whatever order they come, and a sum of doubles then differs in its last bits from run to run;
  every fractional quantity is summed as integers in fixed point (HUGEINT) and divided once.
"""

from __future__ import annotations

from typing import Any

from moecap.schemas.latency import QUANTILES  # one set of percentiles for steps and requests
from moecap.schemas.tables import PHASES

from .window import COUNTED_SQL, IN_WINDOW_SQL

BYTES_SCALE = 2**40
"""Fixed point of byte and FLOP sums: units of 2^-40 (a per-step value above 2^12 keeps every bit
of its double). HUGEINT holds sums up to 1.5e26 bytes or FLOPs."""
SECONDS_SCALE = 2**60
"""Fixed point of time sums: units of 2^-60 s (~1e-18 s: a step of 1 µs keeps all but its last
bits). HUGEINT holds sums up to 1.5e20 s."""


def exact_sum(expr: str, scale: int) -> str:
    """SQL: Σ `expr` as a HUGEINT count of 1/`scale` units: each value rounded once to a multiple of
    1/scale, then summed as integers, so the sum is exact whatever order the rows come in (a NaN or
    null value is left out: the caller says where that makes the sum unknown). `exact_value` divides."""
    return f"sum(TRY_CAST(round(({expr}) * {scale}) AS HUGEINT))"


def exact_value(column: str, scale: int) -> str:
    """SQL: an `exact_sum` column (or a sum of them) as DOUBLE in the quantity's unit."""
    return f"({column}::DOUBLE / {scale})"


COMPUTED_TOKENS_SQL = "(s.num_tokens > 0)"
"""A step that computed tokens: the only steps with an S-MBU / S-MFU."""

STEP_SMBU_SQL = (
    f"CASE WHEN {COMPUTED_TOKENS_SQL} AND s.time_s > 0 "
    "THEN s.bytes_total / (s.gpu_bandwidth * s.time_s * s.gpus) END"
)
"""Per-step S-MBU (fraction): bytes_total / (BW · t · g); null for an idle or zero-time step."""

STEP_SMFU_SQL = (
    f"CASE WHEN {COMPUTED_TOKENS_SQL} AND s.time_s > 0 "
    "THEN s.flops_total / (s.gpu_peak_flops * s.time_s * s.gpus) END"
)
"""Per-step S-MFU (fraction): flops_total / (peak · t · g); null for an idle or zero-time step."""


def step_time_s(gpu_start_ns: Any, gpu_end_ns: Any, t_start_ns: Any, t_end_ns: Any) -> tuple[Any, Any]:
    """Per step (`time_s`, `has_gpu`): the step's busy time, s — its GPU span where the engine
    recorded one (`has_gpu`), else its host span. Arrays of ns (GPU times NaN where missing)."""
    import numpy as np

    g0 = np.asarray(gpu_start_ns, dtype=np.float64)
    g1 = np.asarray(gpu_end_ns, dtype=np.float64)
    t0 = np.asarray(t_start_ns, dtype=np.int64)
    t1 = np.asarray(t_end_ns, dtype=np.int64)
    has_gpu = ~(np.isnan(g0) | np.isnan(g1))
    return np.where(has_gpu, (g1 - g0) / 1e9, (t1 - t0) / 1e9), has_gpu


def host_gap_and_wall_s(time_s: Any, span_end_ns: Any, next_span_start_ns: Any) -> tuple[Any, Any]:
    """Per step (`host_gap_s`, `wall_s`): the gap from the step's span end to the next step's span
    start on its stream, s (0 where they overlap), and the step's wall time = time_s + host gap (the
    window's busy time sums these)."""
    import numpy as np

    gap = np.maximum(np.asarray(next_span_start_ns) - np.asarray(span_end_ns), 0) / 1e9
    return gap, time_s + gap


MEMORY_BOUND_S_SQL = "(s.bytes_total / (s.gpu_bandwidth * s.gpus))"
"""Per-step roofline memory time (s): the step's bytes at the GPUs' full bandwidth."""

COMPUTE_BOUND_S_SQL = "(s.flops_total / (s.gpu_peak_flops * s.gpus))"
"""Per-step roofline compute time (s): the step's FLOPs at the GPUs' dense peak."""

# (name, SQL type, unit, meaning) of every scalar per (run, phase): the columns of `run_metrics` and
# the keys of metrics.json `steps.<phase>`, in this order.
SUMMARY_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("steps", "BIGINT", "steps", "Steps in the window (pipeline stage 0)."),
    ("tokens", "BIGINT", "tokens", "Tokens computed in the window (stage 0)."),
    ("output_tokens", "DOUBLE", "tokens", "Logit rows sampled in the window (last pipeline stage)."),
    (
        "s_mbu",
        "DOUBLE",
        "fraction",
        "Σ bytes_total / (bandwidth × Σ time_s × gpus) over the steps that computed tokens (ratio of sums); "
        "null if a step lacks expert counts.",
    ),
    ("s_mfu", "DOUBLE", "fraction", "Σ flops_total / (peak FLOP/s × Σ time_s × gpus), as s_mbu."),
    ("step_time_s_mean", "DOUBLE", "s", "Mean step time_s."),
    ("step_wall_s_mean", "DOUBLE", "s", "Mean step wall_s (GPU span + host gap)."),
    ("bytes_total", "DOUBLE", "bytes", "Σ bytes_total."),
    ("bytes_routed_experts", "DOUBLE", "bytes", "Σ bytes_routed_experts."),
    ("bytes_kv_read", "DOUBLE", "bytes", "Σ bytes_kv_read."),
    ("flops_total", "DOUBLE", "FLOP", "Σ flops_total."),
    ("gpu_seconds", "DOUBLE", "GPU·s", "Σ time_s × gpus."),
    ("gpu_busy_s", "DOUBLE", "s", "Σ time_s."),
    ("host_gap_s", "DOUBLE", "s", "Σ host_gap_s."),
    (
        "window_s",
        "DOUBLE",
        "s",
        "Busy time of the window: Σ wall_s of its steps per (dp, pp) stream, the longest stream.",
    ),
    ("gpu_busy_fraction", "DOUBLE", "fraction", "Σ time_s / Σ wall_s."),
    ("window_total_token_throughput", "DOUBLE", "tokens/s", "tokens / window_s."),
    ("window_output_throughput", "DOUBLE", "tokens/s", "output_tokens / window_s."),
    (
        "activated_experts_per_step_mean",
        "DOUBLE",
        "experts",
        "Mean activated (layer, expert) pairs per step, all pipeline stages together.",
    ),
    (
        "activated_experts_per_layer_mean",
        "DOUBLE",
        "experts",
        "Mean activated experts per MoE layer per step.",
    ),
    ("batch_size_mean", "DOUBLE", "requests", "Mean num_reqs per step (stage 0)."),
)


def summary_sql(
    source: str, settings: str = "run_settings", key: str = "s.phase", unit: str = "s.run_id"
) -> str:
    """One row per (unit, key) and per unit with key 'all': every SUMMARY_COLUMNS metric, the
    unit's value in column `run_id`, the group's value in column `phase` (text).

    `source`: a relation of step rows (already filtered to the window and COUNTED_SQL);
    `settings`: a relation with run_id, last_pp, num_moe_layers (joined per step row on its run);
    `key`: what groups are made of (default the step phase; the report's timeline groups by time
    bin); `unit`: what one result row summarises (default the run; the fleet's hourly aggregates
    pass a group of runs; step streams stay per run)."""
    B, S = BYTES_SCALE, SECONDS_SCALE
    return f"""
WITH per_stream AS (
    SELECT {unit} AS run_id,
           CASE WHEN grouping({key}) = 1 THEN 'all' ELSE coalesce(({key})::VARCHAR, 'unknown') END AS phase,
           count(*) FILTER (WHERE s.pp = 0) AS steps,
           sum(s.num_tokens) FILTER (WHERE s.pp = 0) AS tokens,
           sum(s.logit_rows) FILTER (WHERE s.pp = r.last_pp) AS output_tokens,
           sum(s.num_reqs) FILTER (WHERE s.pp = 0) AS reqs,
           count(*) AS rows_, count(*) FILTER (WHERE isnan(s.active_experts)) AS without_counts,
           {exact_sum("s.bytes_total", B)} FILTER (WHERE {COMPUTED_TOKENS_SQL}) AS bytes_computed,
           {exact_sum("s.flops_total", B)} FILTER (WHERE {COMPUTED_TOKENS_SQL}) AS flops_computed,
           {exact_sum("s.time_s * s.gpus", S)} FILTER (WHERE {COMPUTED_TOKENS_SQL}) AS gpu_s_computed,
           {exact_sum("s.bytes_total", B)} AS bytes_total,
           {exact_sum("s.bytes_routed_experts", B)} AS bytes_routed_experts,
           {exact_sum("s.bytes_kv_read", B)} AS bytes_kv_read, {exact_sum("s.flops_total", B)} AS flops_total,
           {exact_sum("s.time_s * s.gpus", S)} AS gpu_seconds, {exact_sum("s.time_s", S)} AS gpu_busy_s,
           {exact_sum("s.host_gap_s", S)} AS host_gap_s, {exact_sum("s.wall_s", S)} AS wall_s,
           sum(s.active_experts) AS active_experts,
           any_value(s.gpu_bandwidth) AS bw, any_value(s.gpu_peak_flops) AS peak,
           any_value(r.num_moe_layers) AS num_moe_layers
    FROM {source} s JOIN {settings} r USING (run_id)
    GROUP BY GROUPING SETS (({unit}, {key}, s.run_id, s.dp, s.pp), ({unit}, s.run_id, s.dp, s.pp))
), per_phase AS (
    SELECT run_id, phase,
           sum(steps) AS steps, sum(tokens) AS tokens, sum(output_tokens) AS output_tokens,
           sum(reqs) AS reqs, sum(rows_) AS rows_, sum(without_counts) AS without_counts,
           sum(bytes_computed) AS bytes_computed, sum(flops_computed) AS flops_computed,
           sum(gpu_s_computed) AS gpu_s_computed,
           sum(bytes_total) AS bytes_total, sum(bytes_routed_experts) AS bytes_routed_experts,
           sum(bytes_kv_read) AS bytes_kv_read, sum(flops_total) AS flops_total,
           sum(gpu_seconds) AS gpu_seconds, sum(gpu_busy_s) AS gpu_busy_s, sum(host_gap_s) AS host_gap_s,
           sum(wall_s) AS wall_s, max(wall_s) AS window_s, sum(active_experts) AS active_experts,
           any_value(bw) AS bw, any_value(peak) AS peak, any_value(num_moe_layers) AS num_moe_layers
    FROM per_stream GROUP BY run_id, phase
), exact AS (
    SELECT * REPLACE (
           CASE WHEN without_counts > 0 THEN NULL ELSE {exact_value("bytes_computed", B)} END AS bytes_computed,
           {exact_value("flops_computed", B)} AS flops_computed,
           {exact_value("gpu_s_computed", S)} AS gpu_s_computed,
           CASE WHEN without_counts > 0 THEN NULL ELSE {exact_value("bytes_total", B)} END AS bytes_total,
           CASE WHEN without_counts > 0 THEN NULL ELSE {exact_value("bytes_routed_experts", B)} END
               AS bytes_routed_experts,
           {exact_value("bytes_kv_read", B)} AS bytes_kv_read, {exact_value("flops_total", B)} AS flops_total,
           {exact_value("gpu_seconds", S)} AS gpu_seconds, {exact_value("gpu_busy_s", S)} AS gpu_busy_s,
           {exact_value("host_gap_s", S)} AS host_gap_s, {exact_value("wall_s", S)} AS wall_s,
           {exact_value("window_s", S)} AS window_s)
    FROM per_phase
)
SELECT run_id, phase,
       steps::BIGINT AS steps, tokens::BIGINT AS tokens, output_tokens::DOUBLE AS output_tokens,
       bytes_computed / (bw * gpu_s_computed) AS s_mbu,
       flops_computed / (peak * gpu_s_computed) AS s_mfu,
       gpu_busy_s / rows_ AS step_time_s_mean,
       wall_s / rows_ AS step_wall_s_mean,
       bytes_total, bytes_routed_experts, bytes_kv_read, flops_total,
       gpu_seconds, gpu_busy_s, host_gap_s, window_s,
       CASE WHEN wall_s > 0 THEN gpu_busy_s / wall_s END AS gpu_busy_fraction,
       CASE WHEN window_s > 0 THEN tokens / window_s END AS window_total_token_throughput,
       CASE WHEN window_s > 0 THEN coalesce(output_tokens, 0) / window_s END AS window_output_throughput,
       active_experts / nullif(steps, 0) AS activated_experts_per_step_mean,
       active_experts / nullif(steps, 0) / greatest(1, num_moe_layers) AS activated_experts_per_layer_mean,
       reqs / nullif(steps, 0) AS batch_size_mean
FROM exact
"""


def quantiles_sql(source: str, column: str) -> str:
    """p50/p90/p99 (linear interpolation) of a per-step column per (run_id, phase) and per run_id
    ('all'); one column per query, so exact quantiles hold one column's values at a time."""
    qs = ", ".join(map(str, QUANTILES))
    return f"""
SELECT s.run_id, CASE WHEN grouping(s.phase) = 1 THEN 'all' ELSE coalesce(s.phase, 'unknown') END AS phase,
       quantile_cont({column}, [{qs}]) AS q
FROM {source} s
GROUP BY GROUPING SETS ((s.run_id, s.phase), (s.run_id))
"""


WINDOW_STEPS_SQL = f"""
SELECT s.* FROM step_metrics s JOIN run_windows w USING (run_id)
WHERE {COUNTED_SQL} AND {IN_WINDOW_SQL}
"""
"""`window_steps`: the step_metrics rows every run-level step metric is computed over."""


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v or v in (float("inf"), float("-inf")) else v


def summary_rows(
    con: Any,
    source: str,
    settings: str = "run_settings",
    params: list[Any] | None = None,
    key: str = "s.phase",
) -> dict[str, dict[str, dict[str, Any]]]:
    """run_id -> group -> {SUMMARY_COLUMNS metric: value} (NaN / inf as None), from `summary_sql`."""
    rel = con.sql(summary_sql(source, settings, key), params=params)
    names = rel.columns
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rel.fetchall():
        r = dict(zip(names, row, strict=True))
        if not r["steps"] and not r["gpu_busy_s"]:
            continue
        values = {}
        for name, sqltype, _, _ in SUMMARY_COLUMNS:
            v = r[name]
            values[name] = v if sqltype == "BIGINT" or v is None else _num(v)
        out.setdefault(r["run_id"], {})[r["phase"]] = values
    # DuckDB returns the groups in no fixed order: metrics.json's keys (and every table printed from
    # them) come in one order, `all` first, then the phases as the trace schema lists them.
    return {
        rid: dict(sorted(groups.items(), key=lambda kv: _group_order(kv[0]))) for rid, groups in out.items()
    }


def _group_order(group: str) -> tuple[int, float, str]:
    """Sort key of a summary group: `all`, the trace schema's phases in order, numbers (batch sizes,
    time bins) by value, then any other text."""
    if group == "all":
        return (0, 0.0, "")
    if group in PHASES:
        return (1, float(PHASES.index(group)), "")
    try:
        return (2, float(group), "")
    except ValueError:
        return (3, 0.0, group)


def quantile_rows(
    con: Any, source: str, column: str, params: list[Any] | None = None
) -> dict[str, dict[str, list[float | None] | None]]:
    """run_id -> phase -> [p50, p90, p99] of `column` (None where the column has no value)."""
    out: dict[str, dict[str, list[float | None] | None]] = {}
    for rid, phase, q in con.sql(quantiles_sql(source, column), params=params).fetchall():
        out.setdefault(rid, {})[phase] = None if q is None else [_num(x) for x in q]
    return out
