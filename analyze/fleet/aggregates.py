"""Fleet aggregates: per (model, GPU, engine, hour), over the dataset's step and request rows.

The step quantities are the run-level ones of metrics.json taken over a group of runs instead of one
run's window: `metrics.steps.summary_sql` (the `run_metrics` SQL) with the (model, GPU, engine,
hour) group as its unit, over the steps every run-level metric counts (`metrics.window.COUNTED_SQL`)
and each run's stored `run_settings` row (so S-MBU / S-MFU are the same ratio of sums, steps and
tokens count on the first pipeline stage, logit rows on each run's last). TPOT quantiles are taken
over `request_metrics.tpot_s` (the local per-request rows). Cost charges each run's headline rate
(`runs.usd_per_hour`: the `Analysis.costs` frame of its local analysis) for the busy time of its steps in the
hour (`window_s` of the same SQL with the hour as the group), as the run's cost section charges it.
Columns: `layout.FLEET_HOURLY` (docs/fleet-dataset.md).
"""

from __future__ import annotations

from ..cost.model import usd_for_duration_sql, usd_per_1m_sql
from ..metrics.steps import summary_sql
from ..metrics.window import COUNTED_SQL

_GROUP = "{'model': s.model, 'gpu': s.gpu, 'engine': s.engine, 'hour': s.hour}"
"""The unit of `summary_sql`: one (model, GPU, engine, hour) group of the dataset's step rows."""

FLEET_HOURLY_SQL = f"""
CREATE OR REPLACE VIEW fleet_hourly AS
WITH counted AS (
    SELECT s.* FROM step_metrics s WHERE {COUNTED_SQL}
),
summary AS (
    SELECT run_id.model AS model, run_id.gpu AS gpu, run_id.engine AS engine, run_id.hour AS hour,
           steps, tokens, output_tokens, gpu_seconds, s_mbu, s_mfu
    FROM ({summary_sql("counted", unit=_GROUP)})
    WHERE phase = 'all'
),
run_hours AS (
    SELECT DISTINCT run_id, model, gpu, engine, hour, hour::VARCHAR AS phase FROM counted
),
per_run AS (
    SELECT h.model, h.gpu, h.engine, h.hour, h.run_id, m.window_s, r.usd_per_hour
    FROM ({summary_sql("counted", key="s.hour")}) m
    JOIN run_hours h USING (run_id, phase) JOIN runs r USING (run_id)
),
per_group AS (
    SELECT model, gpu, engine, hour, count(*) AS runs, sum({usd_for_duration_sql("usd_per_hour", "window_s")}) AS cost_usd
    FROM per_run GROUP BY ALL
),
req AS (
    SELECT q.model, q.gpu, q.engine, q.hour, count(*) AS requests,
           quantile_cont(m.tpot_s, [0.5, 0.9, 0.99]) AS tpot_q
    FROM request_metrics m JOIN requests q USING (run_id, req_id)
    GROUP BY ALL
)
SELECT model, gpu, engine, hour, coalesce(per_group.runs, 0) AS runs,
       coalesce(summary.steps, 0) AS steps, summary.tokens, summary.output_tokens, summary.gpu_seconds,
       summary.output_tokens / 3600 AS output_throughput,
       summary.output_tokens / nullif(summary.gpu_seconds, 0) AS output_tokens_per_gpu_s,
       summary.s_mbu, summary.s_mfu,
       coalesce(req.requests, 0) AS requests,
       req.tpot_q[1] AS tpot_s_p50, req.tpot_q[2] AS tpot_s_p90, req.tpot_q[3] AS tpot_s_p99,
       per_group.cost_usd,
       {usd_per_1m_sql("per_group.cost_usd", "summary.output_tokens")} AS usd_per_1m_output_tokens
FROM summary
FULL JOIN req USING (model, gpu, engine, hour)
LEFT JOIN per_group USING (model, gpu, engine, hour)
ORDER BY model, gpu, engine, hour
"""
