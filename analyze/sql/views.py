"""Derived SQL views over the loaded traces: per-request metrics, the metrics window, per-run metrics.

The loader (`moecap.analyze.load`) defines the trace views (`runs`, `steps`, `experts`, `expert_tokens`,
`expert_step_stats`, `expert_totals`, `requests`, `outputs`, `gpu_samples`, `moe_layers`) and the
analysis (`moecap.analyze.analysis`) defines `step_metrics`. This module adds, on the same connection:

- `request_steps`: per request, what the engine's steps say about it (steps, decode batch size, …),
- `request_metrics`: per request, the latency metrics of the default (moecap) formula plus `request_steps`,
- `window_steps`: the `step_metrics` rows the run-level step metrics are computed over (the window),
- `run_metrics`: one row per run and step phase (and `all`), the step metrics of metrics.json.

Every view is plain SQL over the others, so a query only computes what it reads, and the per-request
formulas are the ones of `moecap.analyze.metrics.requests` (tests check they agree).
"""

from __future__ import annotations

import math
from typing import Any

import duckdb

# Per request, from the engine's steps. A request's step is a *decode* step once the request has
# sampled a token in an earlier step (req_num_logits > 0); where the engine does not report logits,
# a step computing exactly one token on top of a non-empty KV cache counts as decode. Only pipeline
# stage 0 is read: every stage lists the same requests. The first-token step is found by an
# aggregate joined back (not a window over the unnested rows), so memory stays at one row per
# request: a window would hold every (step, request) pair of every run at once.
REQUEST_STEPS_SQL = """
CREATE OR REPLACE VIEW request_steps AS
WITH per_request AS NOT MATERIALIZED (
    SELECT run_id, dp, step, phase, num_reqs, num_tokens,
           unnest(req_ids) AS engine_req_id,
           unnest(req_prefix_lens) AS prefix_len,
           unnest(req_new_tokens) AS new_tokens,
           unnest(req_num_logits) AS num_logits
    FROM steps
    WHERE pp = 0 AND NOT is_draft
),
first_token AS (
    SELECT run_id, engine_req_id, min(step) FILTER (WHERE num_logits > 0) AS first_token_step
    FROM per_request
    GROUP BY run_id, engine_req_id
),
classified AS (
    SELECT p.*,
           CASE WHEN p.num_logits IS NULL THEN p.new_tokens = 1 AND p.prefix_len > 0
                ELSE coalesce(p.step > f.first_token_step, false) END AS is_decode
    FROM per_request p
    JOIN first_token f USING (run_id, engine_req_id)
)
SELECT run_id, engine_req_id,
       min(dp)::INTEGER AS dp,
       count(*) AS steps,
       count(*) FILTER (WHERE NOT is_decode) AS prefill_steps,
       count(*) FILTER (WHERE is_decode) AS decode_steps,
       min(step) AS first_step,
       max(step) AS last_step,
       sum(new_tokens)::BIGINT AS computed_tokens,
       avg(num_reqs) AS batch_reqs_mean,
       avg(num_reqs) FILTER (WHERE is_decode) AS decode_batch_reqs_mean,
       avg(num_tokens) FILTER (WHERE is_decode) AS decode_batch_tokens_mean,
       max(prefix_len + new_tokens) AS max_context_tokens
FROM classified
GROUP BY run_id, engine_req_id
"""

# Per request, client clock (metrics.md §8.7, as moecap.analyze.metrics.requests.request_table):
# TTFT = first token − arrival, E2E = finish − arrival, TPOT = (E2E − TTFT) / (output tokens − 1).
# ITL over the streamed chunks: a chunk's gap to the previous chunk, spread over its tokens.
# Kept apart from request_steps (join them on run_id, engine_req_id): DuckDB does not drop an
# unused LEFT JOIN, and request_steps unnests every step's request list.
REQUEST_METRICS_SQL = """
CREATE OR REPLACE VIEW request_metrics AS
WITH timed AS (
    SELECT r.*,
           (r.first_token_ns - r.arrival_ns) / 1e9 AS ttft_s,
           (r.finish_ns - r.arrival_ns) / 1e9 AS e2e_s,
           list_transform(range(2, len(r.chunk_times_ns) + 1),
                          lambda i: CASE WHEN r.chunk_tokens[i] > 0
                                         THEN r.chunk_times_ns[i] - r.chunk_times_ns[i - 1] END) AS gaps_ns,
           list_transform(range(2, len(r.chunk_times_ns) + 1),
                          lambda i: CASE WHEN r.chunk_tokens[i] > 0 THEN r.chunk_tokens[i] END) AS gap_tokens
    FROM requests r
)
SELECT run_id, req_id, coalesce(engine_req_id, req_id) AS engine_req_id, sample_id,
       (error IS NULL AND first_token_ns IS NOT NULL) AS ok,
       arrival_ns, first_token_ns, finish_ns,
       prompt_tokens, output_tokens, cached_prompt_tokens,
       ttft_s, e2e_s,
       e2e_s - ttft_s AS decode_s,
       CASE WHEN output_tokens > 1 THEN (e2e_s - ttft_s) / (output_tokens - 1) END AS tpot_s,
       CASE WHEN output_tokens > 1 AND e2e_s > ttft_s
            THEN (output_tokens - 1) / (e2e_s - ttft_s) END AS decode_tokens_per_s,
       CASE WHEN chunk_tokens IS NOT NULL THEN list_sum(gap_tokens)::BIGINT END AS itl_tokens,
       CASE WHEN chunk_tokens IS NOT NULL
            THEN list_sum(gaps_ns) / 1e9 / nullif(list_sum(gap_tokens), 0) END AS itl_mean_s,
       CASE WHEN chunk_tokens IS NOT NULL
            THEN list_max(list_transform(range(1, len(gaps_ns) + 1),
                                         lambda j: gaps_ns[j] / gap_tokens[j])) / 1e9 END AS itl_max_s,
       queue_ns / 1e9 AS queue_s,
       preemptions, finish_reason, error, retries
FROM timed
"""

_RUN_METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("steps", "BIGINT"),
    ("tokens", "BIGINT"),
    ("output_tokens", "DOUBLE"),
    ("s_mbu", "DOUBLE"),
    ("s_mfu", "DOUBLE"),
    ("step_time_s_mean", "DOUBLE"),
    ("bytes_total", "DOUBLE"),
    ("bytes_routed_experts", "DOUBLE"),
    ("bytes_kv_read", "DOUBLE"),
    ("flops_total", "DOUBLE"),
    ("gpu_seconds", "DOUBLE"),
    ("gpu_busy_s", "DOUBLE"),
    ("host_gap_s", "DOUBLE"),
    ("wall_s", "DOUBLE"),
    ("gpu_busy_fraction", "DOUBLE"),
    ("activated_experts_per_layer_mean", "DOUBLE"),
    ("batch_size_mean", "DOUBLE"),
    ("throughput_tokens_per_s", "DOUBLE"),
    ("throughput_output_tokens_per_s", "DOUBLE"),
)
"""Scalar step metrics of metrics.json (`runs[*].metrics.steps[phase]`) copied into `run_metrics`."""

_RUN_INFO_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR"),
    ("phase", "VARCHAR"),
    ("model_id", "VARCHAR"),
    ("gpu", "VARCHAR"),
    ("retargeted", "BOOLEAN"),
    ("num_gpus", "INTEGER"),
    ("batch_size", "INTEGER"),
    ("window_description", "VARCHAR"),
)


def define_request_views(con: duckdb.DuckDBPyConnection) -> None:
    """`request_steps` and `request_metrics` (need the `steps` and `requests` views)."""
    con.execute(REQUEST_STEPS_SQL)
    con.execute(REQUEST_METRICS_SQL)


def window_steps_sql(windows: dict[str, str]) -> str:
    """`window_steps`: the step_metrics rows each run's step metrics are computed over.

    `windows` maps run_id -> SQL predicate over step_metrics (`Analysis.windows`). The same filter as
    the aggregation: not a draft pass, a positive duration, inside the run's window.
    """
    if not windows:
        return "CREATE OR REPLACE VIEW window_steps AS SELECT * FROM step_metrics WHERE false"
    arms = " OR ".join(
        f"(run_id = '{rid.replace(chr(39), chr(39) * 2)}' AND ({where}))"
        for rid, where in sorted(windows.items())
    )
    return (
        "CREATE OR REPLACE VIEW window_steps AS\n"
        f"SELECT * FROM step_metrics WHERE NOT is_draft AND time_s > 0 AND ({arms})"
    )


def run_metrics_rows(document: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Rows of `run_metrics` from a metrics document (one per run and step phase, `all` included)."""
    rows = []
    for run in document.get("runs", []):
        gpu = run.get("constants", {}).get("gpu", {})
        window = run.get("window", {})
        info = (
            run["run_id"],
            None,
            run.get("model"),
            gpu.get("name") or (run.get("gpu") or {}).get("name"),
            bool(gpu.get("retargeted", False)),
            (run.get("gpu") or {}).get("count"),
            (run.get("workload") or {}).get("batch_size") or (run.get("workload") or {}).get("concurrency"),
            window.get("description") or window.get("kind"),
        )
        for phase, values in (run.get("metrics", {}).get("steps") or {}).items():
            row = list(info)
            row[1] = phase
            row += [_scalar(values.get(name)) for name, _ in _RUN_METRIC_COLUMNS]
            rows.append(tuple(row))
    return rows


def _scalar(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def define_run_metrics(con: duckdb.DuckDBPyConnection, document: dict[str, Any]) -> None:
    """`run_metrics`: a table of the per-run, per-phase step metrics of `document` (metrics.json)."""
    columns = [*_RUN_INFO_COLUMNS, *_RUN_METRIC_COLUMNS]
    con.execute(
        "CREATE OR REPLACE TABLE run_metrics ("
        + ", ".join(f"{name} {sqltype}" for name, sqltype in columns)
        + ")"
    )
    rows = run_metrics_rows(document)
    if rows:
        con.executemany(f"INSERT INTO run_metrics VALUES ({', '.join('?' * len(columns))})", rows)


def define_run_views(
    con: duckdb.DuckDBPyConnection, windows: dict[str, str], document: dict[str, Any]
) -> None:
    """`window_steps` and `run_metrics`, from an analysis' windows and metrics document."""
    con.execute(window_steps_sql(windows))
    define_run_metrics(con, document)


def define_derived_views(
    con: duckdb.DuckDBPyConnection, windows: dict[str, str], document: dict[str, Any]
) -> None:
    """Every view this module owns, on a connection that already has the trace views and step_metrics."""
    define_request_views(con)
    define_run_views(con, windows, document)
