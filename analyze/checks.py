"""`moecap-analyze check`: reconcile the tables of a run; each finding is one line of text.

1. steps: num_tokens = Σ req_new_tokens (rows that list their requests; an imported dump may know a
   pass's tokens but not its requests) and num_reqs = #req_ids on every row.
2. step keys: gaps in the engine's step key per recording rank (lost rows or batches).
3. writer drops and truncated files.
4. expert counts: per step, Σ counts = num_tokens × top_k × MoE layers of the file (exact unless the
   engine fuses shared experts into routing, which the metadata says).
5. requests vs steps: Σ new tokens scheduled for a request = prompt + output − 1 − cached prompt
   tokens (the last sampled token is never fed back), for requests whose ids appear in steps — one
   more under SGLang's overlap scheduler (on unless `disable_overlap_schedule`), which launches the next
   decode before it learns the request finished and discards that token; a run that shows exactly one
   more without saying so is named as such.
0. what loading left out: rows with impossible values or repeated keys, duplicate files (`validity`).
6. TP ranks: the views keep the lowest TP rank of each (dp, pp) and drop the others as duplicates
   (TP ranks route the same tokens); every other TP rank's expert counts must equal it step by step.
   Ranks that each counted their own share (`counts_scope` `sum_over_ranks`) are summed instead, and
   differ by design: not compared; what summing them found is in the load warnings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .load import LoadedFile, LoadedRun, TraceDB


def check_run(db: TraceDB, run: LoadedRun) -> list[str]:
    """Findings for one run (empty when everything reconciles)."""
    rid = run.run_id.replace("'", "''")
    out: list[str] = list(run.findings)
    q = db.con.execute
    bad = q(
        f"""SELECT count(*) FILTER (WHERE len(req_ids) > 0 AND num_tokens <> coalesce(list_sum(req_new_tokens::BIGINT[]), 0)),
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
    left_out = {
        (f.run.rank.dp, f.run.rank.pp): len(f.excluded_steps) for f in run.recording_files if f.excluded_steps
    }
    for dp, pp, n, missing in gaps:
        ours = min(int(missing), left_out.get((dp, pp), 0))
        why = f"; {ours} of them left out above for an impossible value" if ours else ""
        out.append(f"rank dp{dp}-pp{pp}: {n} gap(s) in the step key, {missing} step(s) missing{why}")
    for f in run.files:
        if not f.complete:
            out.append(f"{f.path.name}: truncated, {f.lost_bytes} trailing byte(s) lost")
        if f.rows_dropped:
            out.append(f"{f.path.name}: the writer dropped {f.rows_dropped} row(s)")
        # What else the reader found (corrupt batches left out, a newer format): its own lines.
        out.extend(
            w
            for w in f.warnings
            if "truncated stream" not in w and "the writer dropped" not in w and w not in out
        )
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
    out.extend(tp_count_agreement(db, run))
    past_end = 1 if decodes_one_past_the_end(md) else 0
    per_req = q(
        f"""WITH sched AS (
                SELECT unnest(req_ids) AS rid, unnest(req_new_tokens)::BIGINT AS n FROM steps WHERE run_id = '{rid}' AND NOT is_draft
            ), tot AS (SELECT rid, sum(n) AS n FROM sched GROUP BY rid)
            SELECT count(*) FILTER (WHERE d = 1), count(*) FILTER (WHERE d <> 1),
                   any_value(req_id) FILTER (WHERE d <> 1)
            FROM (SELECT r.req_id,
                         tot.n - {past_end} - (r.prompt_tokens::BIGINT + r.output_tokens - 1 - coalesce(r.cached_prompt_tokens, 0)) AS d
                  FROM requests r JOIN tot ON tot.rid = coalesce(r.engine_req_id, r.req_id)
                  WHERE r.run_id = '{rid}' AND r.error IS NULL AND r.prompt_tokens IS NOT NULL
                    AND r.output_tokens IS NOT NULL)
            WHERE d <> 0"""
    ).fetchall()[0]
    one_more, other, first_other = per_req
    if one_more:
        out.append(
            f"{one_more} request(s) scheduled exactly one token more than prompt + output - 1 - cached: the engine "
            "ran one decode past their last token (SGLang's overlap scheduler does; that token is discarded); "
            "step metrics count it as the engine's work, not as output"
        )
    if other:
        want = (
            "prompt + output - cached (SGLang overlap schedule)"
            if past_end
            else "prompt + output - 1 - cached"
        )
        why = (
            f"; the {sum(left_out.values())} step(s) left out above scheduled some of their tokens"
            if left_out
            else ""
        )
        out.append(
            f"{other} request(s) whose scheduled tokens differ from {want} (first: {first_other}){why}"
        )
    return out


def check_notes(db: TraceDB, run: LoadedRun) -> list[str]:
    """What `check` notes about the measurement rather than the data: steps that compiled kernels (or
    captured graphs) inside the recorded window. The tables agree with each other; the window holds a
    one-off cost (`run --warmup` keeps it out). `check` exits 0 on notes alone, 1 with `--strict`."""
    return _slow_steps(db, run.run_id)


def _slow_steps(db: TraceDB, run_id: str) -> list[str]:
    """Steps far slower than their phase's peers (kernel compilation in the window): `slow_steps`' rule."""
    from .slow_steps import slow_step_findings

    frame = db.con.sql(
        """SELECT dp, pp, tp, step, phase, num_tokens, is_draft, gpu_start_ns, gpu_end_ns, t_start_ns, t_end_ns
           FROM steps WHERE run_id = $run_id""",
        params={"run_id": run_id},
    ).pl()
    return slow_step_findings(frame)


def decodes_one_past_the_end(md: object) -> bool:
    """Whether the run's engine schedules one decode past each request's last token: SGLang with its
    overlap scheduler on (its default; `disable_overlap_schedule` in the recorded server args)."""
    engine = getattr(md, "engine", None)
    if engine is None or engine.name != "sglang":
        return False
    return not (engine.args or {}).get("disable_overlap_schedule", False)


def tp_count_agreement(db: TraceDB, run: LoadedRun) -> list[str]:
    """Findings where a TP rank's expert counts differ from the lowest TP rank of its (dp, pp) on some
    step, or where one of the two recorded a step the other did not (empty when all agree)."""
    by_stage: dict[tuple[int, int], list[LoadedFile]] = {}
    for f in run.files_of("experts"):
        if "experts" in f.parquet and (f.run.rank.dp, f.run.rank.pp) not in run.sum_stages:
            by_stage.setdefault((f.run.rank.dp, f.run.rank.pp), []).append(f)
    out: list[str] = []
    for (dp, pp), files in sorted(by_stage.items()):
        files.sort(key=lambda f: f.run.rank.tp)
        ref = expert_counts(files[0])
        for other in files[1:]:
            compared, differ, unmatched, first = compare_counts(ref, expert_counts(other))
            if differ or unmatched:
                tag, ref_tag = other.run.rank.tp, files[0].run.rank.tp
                only = f", {unmatched} step(s) recorded by one rank only" if unmatched else ""
                out.append(
                    f"rank dp{dp}-pp{pp}: tp{tag}'s expert counts differ from tp{ref_tag}'s on {differ} of "
                    f"{compared} step(s){only} (first: step {first}); the views keep tp{ref_tag} only"
                )
    return out


def expert_counts(f: LoadedFile) -> tuple[np.ndarray, np.ndarray]:
    """(steps in order, counts [steps, MoE layers x experts] int64) of one experts file, from the cache."""
    path = Path(f.parquet["experts"])
    fmt = "parquet" if path.suffix == ".parquet" else "ipc"
    table = pads.dataset(str(path), format=fmt).to_table(columns=["step", "counts"])
    steps = table.column("step").to_numpy()
    counts = table.column("counts").combine_chunks()
    lengths = pc.list_value_length(counts).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and np.any(lengths != width):  # the loader already refuses ragged rows
        raise ValueError(f"{f.path}: experts.counts rows differ in length")
    flat = counts.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    order = np.argsort(steps, kind="stable")
    return steps[order], flat.reshape(len(steps), width)[order]


def compare_counts(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[int, int, int, int | None]:
    """(steps both recorded, of those with different counts, steps only one recorded, first step that
    differs or is unmatched) for two `expert_counts` results."""
    (sa, ca), (sb, cb) = a, b
    # The loader keeps one row per step key; unique keys here make the indices line up regardless.
    sa, keep_a = np.unique(sa, return_index=True)
    sb, keep_b = np.unique(sb, return_index=True)
    ca, cb = ca[keep_a], cb[keep_b]
    common, ia, ib = np.intersect1d(sa, sb, assume_unique=True, return_indices=True)
    if ca.shape[1:] != cb.shape[1:]:
        differ_mask = np.ones(len(common), dtype=bool)
    else:
        differ_mask = np.any(ca[ia] != cb[ib], axis=1) if len(common) else np.zeros(0, bool)
    unmatched = np.setxor1d(sa, sb, assume_unique=True)
    bad = np.concatenate([common[differ_mask], unmatched])
    first = int(bad.min()) if len(bad) else None
    return len(common), int(differ_mask.sum()), len(unmatched), first
