"""`moecap-analyze check`: reconcile the tables of a run; each finding is one line of text.

1. steps: num_tokens = Σ req_new_tokens and num_reqs = #req_ids on every row.
2. step keys: gaps in the engine's step key per recording rank (lost rows or batches).
3. writer drops and truncated files.
4. expert counts: per step, Σ counts = num_tokens × top_k × MoE layers of the file (exact unless the
   engine fuses shared experts into routing, which the metadata says).
5. requests vs steps: Σ new tokens scheduled for a request = prompt + output − 1 − cached prompt
   tokens (the last sampled token is never fed back), for requests whose ids appear in steps.
"""

from __future__ import annotations

from .load import LoadedRun, TraceDB


def check_run(db: TraceDB, run: LoadedRun) -> list[str]:
    """Findings for one run (empty when everything reconciles)."""
    rid = run.run_id.replace("'", "''")
    out: list[str] = []
    q = db.con.execute
    bad = q(
        f"""SELECT count(*) FILTER (WHERE num_tokens <> coalesce(list_sum(req_new_tokens), 0)),
                   count(*) FILTER (WHERE num_reqs <> len(req_ids)),
                   count(*) FILTER (WHERE len(req_ids) <> len(req_new_tokens) OR len(req_ids) <> len(req_prefix_lens))
            FROM steps WHERE run_id = '{rid}'"""
    ).fetchall()[0]
    if bad[0]:
        out.append(f"{bad[0]} step(s) whose num_tokens differs from the sum of req_new_tokens")
    if bad[1]:
        out.append(f"{bad[1]} step(s) whose num_reqs differs from the number of req_ids")
    if bad[2]:
        out.append(f"{bad[2]} step(s) whose per-request lists differ in length")
    gaps = q(
        f"""SELECT dp, pp, count(*) AS gaps, sum(step - prev - 1) AS missing FROM (
                SELECT dp, pp, step, lag(step) OVER (PARTITION BY dp, pp ORDER BY step) AS prev
                FROM steps WHERE run_id = '{rid}') WHERE prev IS NOT NULL AND step - prev > 1 GROUP BY dp, pp"""
    ).fetchall()
    for dp, pp, n, missing in gaps:
        out.append(f"rank dp{dp}-pp{pp}: {n} gap(s) in the step key, {missing} step(s) missing")
    for f in run.files:
        if not f.complete:
            out.append(f"{f.path.name}: truncated, {f.lost_bytes} trailing byte(s) lost")
        if f.rows_dropped:
            out.append(f"{f.path.name}: the writer dropped {f.rows_dropped} row(s)")
    md = run.metadata
    if run.files_of("experts") and md.moe.top_k:
        fused = " (shared expert fused into routing: +1 per token)" if md.moe.shared_expert_fused else ""
        k = md.moe.top_k + (1 if md.moe.shared_expert_fused else 0)
        mism = q(
            f"""SELECT count(*), count(*) FILTER (WHERE s.step IS NULL),
                       any_value(e.step) FILTER (WHERE s.step IS NOT NULL AND e.routed_tokens <> s.num_tokens::BIGINT * {k} * e.n_layers)
                FROM (SELECT *, (SELECT count(*) FROM moe_layers m WHERE m.run_id = x.run_id) AS n_layers
                      FROM expert_step_stats x WHERE run_id = '{rid}') e
                LEFT JOIN steps s USING (run_id, dp, pp, tp, ep, step)
                WHERE s.step IS NULL OR e.routed_tokens <> s.num_tokens::BIGINT * {k} * e.n_layers"""
        ).fetchall()[0]
        if mism[0]:
            orphan = f"; {mism[1]} without a steps row" if mism[1] else ""
            out.append(
                f"{mism[0]} step(s) whose expert counts do not sum to tokens x top_k x layers{fused}{orphan}"
                + (f" (first: step {mism[2]})" if mism[2] is not None else "")
            )
    per_req = q(
        f"""WITH sched AS (
                SELECT unnest(req_ids) AS rid, unnest(req_new_tokens) AS n FROM steps WHERE run_id = '{rid}' AND NOT is_draft
            ), tot AS (SELECT rid, sum(n) AS n FROM sched GROUP BY rid)
            SELECT count(*), any_value(r.req_id)
            FROM requests r JOIN tot ON tot.rid = coalesce(r.engine_req_id, r.req_id)
            WHERE r.run_id = '{rid}' AND r.error IS NULL AND r.prompt_tokens IS NOT NULL AND r.output_tokens IS NOT NULL
              AND tot.n <> r.prompt_tokens + r.output_tokens - 1 - coalesce(r.cached_prompt_tokens, 0)"""
    ).fetchall()[0]
    if per_req[0]:
        out.append(
            f"{per_req[0]} request(s) whose scheduled tokens differ from prompt + output - 1 - cached (first: {per_req[1]})"
        )
    return out
