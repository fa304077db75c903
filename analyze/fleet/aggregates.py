"""Fleet aggregates: per (model, GPU, engine, hour), over the dataset's step and request rows.

The quantities are the run-level ones of metrics.json taken over a group of runs instead of one run's
window: S-MBU / S-MFU as the same ratio of sums over GPU time (`analysis.step_aggregates`), step and
token counts by the same pipeline-stage rule (steps and tokens on the first stage, logit rows on the
last), TPOT from `request_metrics.tpot_s` (the view's per-request definition). Cost charges each run's
headline rate (`runs.usd_per_hour`, from its metrics.json cost section) for the time its steps span in
the hour. Columns: `layout.FLEET_HOURLY` (docs/fleet-dataset.md).
"""

from __future__ import annotations

FLEET_HOURLY_SQL = """
CREATE OR REPLACE VIEW fleet_hourly AS
WITH s AS (
    SELECT s.model, s.gpu, s.engine, s.hour, s.run_id, s.pp, s.num_tokens, s.logit_rows, s.time_s,
           s.gpus, s.bytes_total, s.flops_total, s.gpu_bandwidth, s.gpu_peak_flops, s.active_experts,
           s.t_start_ns, s.t_end_ns, r.pp AS pp_degree, r.usd_per_hour
    FROM step_metrics s JOIN runs r USING (run_id)
    WHERE NOT s.is_draft AND s.time_s > 0
),
steps AS (
    SELECT model, gpu, engine, hour,
           count(DISTINCT run_id) AS runs,
           count(*) FILTER (WHERE pp = 0) AS steps,
           sum(num_tokens) FILTER (WHERE pp = 0) AS tokens,
           sum(logit_rows) FILTER (WHERE pp = greatest(pp_degree, 1) - 1) AS output_tokens,
           sum(time_s * gpus) AS gpu_seconds,
           CASE WHEN count(*) FILTER (WHERE isnan(active_experts)) = 0
                THEN sum(bytes_total) / sum(gpu_bandwidth * time_s * gpus) END AS s_mbu,
           sum(flops_total) / sum(gpu_peak_flops * time_s * gpus) AS s_mfu
    FROM s GROUP BY ALL
),
spans AS (
    SELECT model, gpu, engine, hour, run_id,
           (max(t_end_ns) - min(t_start_ns)) / 1e9 AS span_s, any_value(usd_per_hour) AS usd_per_hour
    FROM s GROUP BY ALL
),
cost AS (
    SELECT model, gpu, engine, hour, sum(usd_per_hour * span_s / 3600) AS cost_usd
    FROM spans GROUP BY ALL
),
req AS (
    SELECT q.model, q.gpu, q.engine, q.hour, count(*) AS requests,
           quantile_cont(m.tpot_s, [0.5, 0.9, 0.99]) AS tpot_q
    FROM request_metrics m JOIN requests q USING (run_id, req_id)
    GROUP BY ALL
)
SELECT model, gpu, engine, hour, coalesce(steps.runs, 0) AS runs, coalesce(steps.steps, 0) AS steps,
       tokens, output_tokens, gpu_seconds,
       output_tokens / 3600 AS output_tokens_per_s,
       output_tokens / nullif(gpu_seconds, 0) AS output_tokens_per_gpu_s,
       s_mbu, s_mfu,
       coalesce(req.requests, 0) AS requests,
       req.tpot_q[1] AS tpot_s_p50, req.tpot_q[2] AS tpot_s_p90, req.tpot_q[3] AS tpot_s_p99,
       cost.cost_usd,
       cost.cost_usd / nullif(output_tokens, 0) * 1e6 AS usd_per_1m_output_tokens
FROM steps
FULL JOIN req USING (model, gpu, engine, hour)
LEFT JOIN cost USING (model, gpu, engine, hour)
ORDER BY model, gpu, engine, hour
"""
