"""Derived SQL views over the loaded traces: per-request metrics, the metrics window, per-run metrics.

The loader (`moecap.analyze.load`) defines the trace views (`runs`, `steps`, `experts`, `expert_tokens`,
`expert_step_stats`, `expert_totals`, `requests`, `outputs`, `gpu_samples`, `moe_layers`) and the
analysis (`moecap.analyze.analysis`) defines `step_metrics`. This module adds, on the same connection:

- `request_steps`: per request, what the engine's steps say about it (steps, decode batch size, …),
- `request_metrics`: per request, the latency metrics of the default (moecap) formula plus `request_steps`,
- `run_metrics`: one row per run and step phase (and `all`), the step metrics of metrics.json,
  generated from `moecap.analyze.metrics.steps` (the analysis defines `window_steps`).

`request_steps` is plain SQL over `steps`; `request_metrics` and `run_metrics` are generated from the
metric layer (`moecap.analyze.metrics`), so SQL, metrics.json and the report read one definition.
"""

from __future__ import annotations

import duckdb

from ..metrics.steps import SUMMARY_COLUMNS, summary_sql

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

REQUEST_METRICS_COLUMNS = (
    "run_id", "req_id", "engine_req_id", "sample_id", "ok", "arrival_ns", "first_token_ns", "finish_ns",
    "prompt_tokens", "output_tokens", "cached_prompt_tokens", "ttft_s", "e2e_s", "decode_s", "tpot_s",
    "decode_tokens_per_s", "itl_tokens", "itl_mean_s", "itl_max_s", "queue_s", "preemptions",
    "finish_reason", "error", "retries",
)  # fmt: skip
"""Columns of `request_metrics`, in order."""


RUN_INFO_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("run_id", "VARCHAR", "", "Run id."),
    ("phase", "VARCHAR", "", "prefill | decode | mixed | … or `all` (every phase)."),
    ("model_id", "VARCHAR", "", "Model id of the run."),
    ("gpu", "VARCHAR", "", "GPU the metrics are computed for (resolved name; --gpu when re-targeted)."),
    ("retargeted", "BOOLEAN", "", "True when analysed as another GPU than the trace's (`--gpu`)."),
    ("num_gpus", "INTEGER", "GPUs", "GPUs of the run."),
    ("batch_size", "INTEGER", "requests", "Target concurrency of the workload."),
    ("window_description", "VARCHAR", "", "The metrics window (default: steady state), in words."),
)
"""Columns of `run_metrics` before the step metrics of metrics/steps.py SUMMARY_COLUMNS."""

RUN_METRICS_SQL = f"""
CREATE OR REPLACE VIEW run_metrics AS
SELECT m.run_id, m.phase, r.model_id, r.gpu, r.retargeted, r.num_gpus, r.batch_size,
       w.description AS window_description,
       {", ".join(f"m.{name}" for name, _, _, _ in SUMMARY_COLUMNS)}
FROM ({summary_sql("window_steps")}) m
JOIN run_settings r USING (run_id) JOIN run_windows w USING (run_id)
WHERE m.steps > 0
"""
"""`run_metrics`: the step metrics of metrics/steps.py per run and phase over each run's window
(the same SQL as metrics.json `steps`), beside what identifies the run."""


def define_request_views(con: duckdb.DuckDBPyConnection) -> None:
    """`request_steps` (SQL over `steps`) and `request_metrics`: the per-request figures of
    `moecap.analyze.metrics.requests.request_table` (the formulas of metrics.json) as a table."""
    import polars as pl

    from ..metrics.requests import request_table

    con.execute(REQUEST_STEPS_SQL)
    table = request_table(con.sql("SELECT * FROM requests").pl()).with_columns(
        engine_req_id=pl.coalesce("engine_req_id", "req_id"), queue_s=pl.col("queue_ns") / 1e9
    )
    frame = table.select(REQUEST_METRICS_COLUMNS).to_arrow()
    con.register("_request_metrics_frame", frame)
    try:
        con.execute("CREATE OR REPLACE TABLE request_metrics AS SELECT * FROM _request_metrics_frame")
    finally:
        con.unregister("_request_metrics_frame")


def define_run_views(con: duckdb.DuckDBPyConnection) -> None:
    """`run_metrics` (needs `window_steps`, `run_settings` and `run_windows`: the analysis defines them)."""
    con.execute(RUN_METRICS_SQL)


def define_derived_views(con: duckdb.DuckDBPyConnection) -> None:
    """Every view this module owns, on a connection that already has the trace and window views."""
    define_request_views(con)
    define_run_views(con)
