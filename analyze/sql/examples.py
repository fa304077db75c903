"""Example queries: rendered into docs/sql.md, run by the tests against independent computations.

Each is a question people ask of a benchmark run and the SQL that answers it over the views.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    name: str
    title: str
    description: str
    sql: str


EXAMPLES: tuple[Example, ...] = (
    Example(
        "steps_per_phase",
        "Steps and tokens per phase",
        "How many forward passes of each kind each run made, and the tokens they computed.",
        """
SELECT run_id, phase, count(*) AS steps, sum(num_tokens)::BIGINT AS tokens, avg(num_reqs) AS batch_mean
FROM steps
GROUP BY run_id, phase
ORDER BY run_id, phase
""",
    ),
    Example(
        "tokens_per_layer",
        "Routed tokens per MoE layer",
        "Σ of the per-step expert counts of each layer (tokens × top_k when every token is counted).",
        """
SELECT run_id, layer, sum(tokens)::BIGINT AS routed_tokens, count(DISTINCT expert) FILTER (WHERE tokens > 0) AS experts_used
FROM expert_tokens
GROUP BY run_id, layer
ORDER BY run_id, layer
""",
    ),
    Example(
        "top_experts_per_layer",
        "Top experts per layer",
        "The three most loaded experts of every MoE layer and their share of the layer's tokens "
        "(from the pre-aggregated `expert_totals`; use `expert_tokens` to restrict to some steps).",
        """
WITH load AS (
    SELECT run_id, layer, expert, sum(tokens)::BIGINT AS tokens
    FROM expert_totals
    GROUP BY run_id, layer, expert
), ranked AS (
    SELECT *,
           tokens / sum(tokens) OVER (PARTITION BY run_id, layer) AS share,
           row_number() OVER (PARTITION BY run_id, layer ORDER BY tokens DESC, expert) AS rank
    FROM load
)
SELECT run_id, layer, rank, expert, tokens, round(share, 4) AS share
FROM ranked
WHERE rank <= 3
ORDER BY run_id, layer, rank
""",
    ),
    Example(
        "tpot_by_batch_size",
        "TPOT by batch size",
        "Requests grouped by the mean number of requests in the steps that decoded them (their decode "
        "batch size): how time per output token grows with the batch.",
        """
SELECT r.run_id, round(s.decode_batch_reqs_mean) AS decode_batch_size, count(*) AS requests,
       avg(r.tpot_s) * 1e3 AS tpot_ms_mean,
       quantile_cont(r.tpot_s, 0.5) * 1e3 AS tpot_ms_p50,
       quantile_cont(r.tpot_s, 0.9) * 1e3 AS tpot_ms_p90
FROM request_metrics r
JOIN request_steps s USING (run_id, engine_req_id)
WHERE r.ok AND r.tpot_s IS NOT NULL
GROUP BY ALL
ORDER BY r.run_id, decode_batch_size
""",
    ),
    Example(
        "decode_step_time_by_batch_size",
        "Decode step time by batch size",
        "The engine-side view of TPOT: GPU time of decode steps by the number of requests in them, with S-MBU.",
        """
SELECT run_id, num_reqs AS batch_size, count(*) AS steps,
       avg(time_s) * 1e3 AS step_ms_mean,
       quantile_cont(time_s, 0.9) * 1e3 AS step_ms_p90,
       -- run_metrics' rule: a ratio of sums over the steps that computed tokens
       sum(bytes_total) FILTER (WHERE num_tokens > 0)
           / (any_value(gpu_bandwidth) * sum(time_s * gpus) FILTER (WHERE num_tokens > 0)) AS s_mbu
FROM step_metrics
WHERE phase = 'decode' AND NOT is_draft AND time_s > 0
GROUP BY run_id, num_reqs
ORDER BY run_id, batch_size
""",
    ),
    Example(
        "slowest_steps",
        "Slowest steps and their batch composition",
        "The ten longest steps (GPU time) with what was in them: requests, prompt-chunk vs single-token "
        "requests, context attended and expert imbalance.",
        """
SELECT m.run_id, m.step, m.phase, m.time_s * 1e3 AS time_ms, m.num_reqs, m.num_tokens,
       len(list_filter(s.req_new_tokens, lambda n: n > 1)) AS prompt_chunk_reqs,
       coalesce(list_sum(list_filter(s.req_new_tokens, lambda n: n > 1)), 0)::BIGINT AS prompt_chunk_tokens,
       len(list_filter(s.req_new_tokens, lambda n: n = 1)) AS single_token_reqs,
       m.context_tokens, list_max(s.req_prefix_lens) AS longest_prefix,
       e.imbalance_mean
FROM step_metrics m
JOIN steps s USING (run_id, dp, pp, tp, step)
LEFT JOIN expert_step_stats e USING (run_id, dp, pp, tp, step)
ORDER BY m.time_s DESC, m.run_id, m.step
LIMIT 10
""",
    ),
    Example(
        "imbalance_vs_step_time",
        "Expert imbalance vs step time",
        "Within decode steps of one batch size, does a more imbalanced routing (max/mean expert load) "
        "make the step slower? Correlation per batch size.",
        """
SELECT m.run_id, m.num_reqs AS batch_size, count(*) AS steps,
       avg(e.imbalance_mean) AS imbalance_mean,
       avg(m.time_s) * 1e3 AS step_ms_mean,
       corr(e.imbalance_mean, m.time_s) AS corr_imbalance_time
FROM step_metrics m
JOIN expert_step_stats e USING (run_id, dp, pp, tp, step)
WHERE m.phase = 'decode' AND NOT m.is_draft
GROUP BY m.run_id, m.num_reqs
HAVING count(*) >= 3
ORDER BY m.run_id, batch_size
""",
    ),
    Example(
        "smbu_over_window",
        "S-MBU and S-MFU over the metrics window",
        "The run-level utilisation of metrics.json per phase: `run_metrics` runs the metric layer's "
        "ratio of sums over `window_steps` (never re-type the formula: idle steps and steps without "
        "expert counts have rules).",
        """
SELECT run_id, phase, steps, s_mbu, s_mfu, gpu_seconds
FROM run_metrics
ORDER BY run_id, phase = 'all', phase
""",
    ),
    Example(
        "time_accounting",
        "Where the time went",
        "GPU-busy time vs host gaps per phase: a low S-MBU with a large host share means the engine is "
        "host-bound, not that the GPU is slow.",
        """
SELECT run_id, phase, count(*) AS steps,
       sum(time_s) AS gpu_busy_s, sum(host_gap_s) AS host_gap_s, sum(wall_s) AS wall_s,
       sum(time_s) / sum(wall_s) AS gpu_busy_fraction
FROM step_metrics
GROUP BY run_id, phase
ORDER BY run_id, phase
""",
    ),
    Example(
        "latency_percentiles",
        "Request latency percentiles",
        "TTFT, TPOT and end-to-end latency per run over successful requests (metrics.json's request "
        "metrics).",
        """
SELECT run_id, count(*) AS requests,
       avg(ttft_s) AS ttft_s_mean, quantile_cont(ttft_s, 0.99) AS ttft_s_p99,
       avg(tpot_s) AS tpot_s_mean, quantile_cont(tpot_s, 0.99) AS tpot_s_p99,
       avg(e2e_s) AS e2e_s_mean,
       sum(output_tokens)::BIGINT AS output_tokens
FROM request_metrics
WHERE ok
GROUP BY run_id
ORDER BY run_id
""",
    ),
    Example(
        "compare_runs",
        "Compare runs",
        "One line per run from `run_metrics`: batch size, S-MBU, S-MFU, mean step time and throughput.",
        """
SELECT run_id, gpu, batch_size, steps, s_mbu, s_mfu, step_time_s_mean * 1e3 AS step_ms_mean,
       window_output_throughput
FROM run_metrics
WHERE phase = 'all'
ORDER BY batch_size, run_id
""",
    ),
)

EXAMPLES_BY_NAME = {e.name: e for e in EXAMPLES}
