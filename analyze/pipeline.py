"""From paths to a metrics document: load -> specs -> per-step costs -> aggregates (moecap formula).

`analyze_paths` is the library entry point behind `moecap-analyze PATHS…`. The document follows the
`moecap.metrics/1` schema: one object per run with run info, formula, window, constants, metrics,
warnings and the per-file load report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import polars as pl

from . import __version__
from .accuracy import score_outputs
from .analysis import (
    METRICS_SCHEMA,
    Options,
    RunContext,
    define_step_metrics_view,
    resolve_context,
    step_aggregates,
    window_predicate,
)
from .cost.section import cost_section, settings_for
from .load import TraceDB, load_traces, require_runs
from .metrics.experts import expert_stats
from .metrics.requests import request_metrics


@dataclass
class Analysis:
    """The loaded traces, their resolved contexts and the metrics document."""

    db: TraceDB
    contexts: list[RunContext]
    document: dict[str, Any]
    windows: dict[str, str]
    """run_id -> SQL predicate over step_metrics for that run's window."""


def analyze_paths(
    paths: Iterable[str | os.PathLike[str]],
    options: Options | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    expert_counts: bool = True,
) -> Analysis:
    """Load traces and compute every moecap-formula metric per run.

    `expert_counts=False` leaves the raw-count views (`experts`, `expert_tokens`) empty; no metric
    needs them (see `load_traces`)."""
    options = options or Options()
    db = load_traces(
        paths, cache_dir=cache_dir, strict=strict, progress=progress, expert_counts=expert_counts
    )
    require_runs(db)
    contexts = [resolve_context(run, options) for run in db.runs.values()]
    runs = []
    windows: dict[str, str] = {}
    # No metric reads a request list except the client join (which asks for them itself): the
    # lists are cached when `db.con` is first used outside this block.
    with db.defer_request_lists():
        define_step_metrics_view(db, contexts)
        for ctx in contexts:
            run_doc, where = _run_document(db, ctx, options)
            windows[ctx.run.run_id] = where
            runs.append(run_doc)
    document = {
        "schema": METRICS_SCHEMA,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "moecap_version": __version__,
        "formula": "moecap",
        "runs": runs,
        "load_errors": db.errors,
        "load_warnings": db.warnings,
    }
    return Analysis(db=db, contexts=contexts, document=document, windows=windows)


def _accuracy(db: TraceDB, rid: str) -> dict[str, Any] | None:
    """`accuracy_metrics` for outputs that carry a reference answer (None when nothing is scorable)."""
    outputs = db.con.sql(
        f"SELECT req_id, sample_id, dataset, output, reference FROM outputs WHERE run_id = '{rid}'"
    ).pl()
    if outputs.is_empty() or outputs["reference"].null_count() == outputs.height:
        return None
    summary, _ = score_outputs(outputs)
    return summary if summary.get("total") else None


def _client_engine_join(db: TraceDB, rid: str) -> dict[str, Any] | None:
    """Client rows joined to the engine's steps by request id: how many join, and the gap between
    the client's arrival and the first step that computed the request (queue + transport), s."""
    if not db.con.execute(f"SELECT count(*) FROM requests WHERE run_id = '{rid}'").fetchall()[0][0]:
        return None
    db.ensure_request_lists()  # the join reads steps.req_ids
    rows = db.con.execute(
        f"""WITH first_step AS (
                SELECT rid, min(t_start_ns) AS first_ns FROM (
                    SELECT unnest(req_ids) AS rid, t_start_ns FROM steps WHERE run_id = '{rid}')
                GROUP BY rid)
            SELECT count(*), count(f.rid),
                   quantile_cont((f.first_ns - r.arrival_ns) / 1e9, [0.5, 0.9, 0.99]),
                   avg((f.first_ns - r.arrival_ns) / 1e9)
            FROM requests r LEFT JOIN first_step f ON f.rid = coalesce(r.engine_req_id, r.req_id)
            WHERE r.run_id = '{rid}'"""
    ).fetchall()[0]
    total, joined, q, mean = rows
    if not total or not db.con.execute(f"SELECT count(*) FROM steps WHERE run_id = '{rid}'").fetchall()[0][0]:
        return None
    return {
        "requests": total,
        "joined": joined,
        "arrival_to_first_step_s_mean": mean,
        "arrival_to_first_step_s_p50_p90_p99": q,
        "note": "client arrival (driver clock) to the start of the first engine step computing the request "
        "(engine clock); both are the host's monotonic clock when driver and engine share a host",
    }


def _run_document(db: TraceDB, ctx: RunContext, options: Options) -> tuple[dict[str, Any], str]:
    md = ctx.run.metadata
    warnings = list(ctx.warnings) + list(ctx.run.warnings)
    rid = ctx.run.run_id.replace("'", "''")
    if ctx.spec_error:
        warnings.append(f"model spec: {ctx.spec_error}")
    if ctx.gpu_error:
        warnings.append(f"gpu spec: {ctx.gpu_error}")
    counts = bool(md.moe.counts_available) and bool(ctx.run.files_of("experts"))
    if not counts:
        reason = md.moe.counts_unavailable_reason or "the run has no experts table"
        warnings.append(f"no expert counts ({reason}): S-MBU and expert statistics are null")
    where = "TRUE"
    window: dict[str, Any] = {"kind": "all"}
    steps_doc: dict[str, Any] = {}
    if ctx.step_files:
        where, window = window_predicate(db, ctx, options)
        steps_doc = step_aggregates(db, ctx, where)
        zero = db.con.execute(
            f"SELECT count(*) FROM step_metrics WHERE run_id = '{rid}' AND time_s <= 0"
        ).fetchall()[0][0]
        if zero:
            warnings.append(f"{zero} step(s) with zero or negative duration were left out of every metric")
    elif not ctx.run.files_of("steps"):
        from .output import RUN_WITHOUT_STEPS

        warnings.append(RUN_WITHOUT_STEPS)
    requests = db.con.sql(f"SELECT * FROM requests WHERE run_id = '{rid}'").pl()
    req_doc = request_metrics(
        requests,
        slo_ttft_s=options.slo_ttft_ms / 1e3 if options.slo_ttft_ms else None,
        slo_tpot_s=options.slo_tpot_ms / 1e3 if options.slo_tpot_ms else None,
    )
    cost_doc = cost_section(db, ctx, where, steps_doc, req_doc, settings_for(options))
    warnings.extend(cost_doc["warnings"])
    totals = db.con.sql(f"SELECT layer, expert, tokens, phase FROM expert_totals WHERE run_id = '{rid}'").pl()
    experts_doc = expert_stats(totals, md.moe.num_experts) if counts else {}
    if experts_doc:
        experts_doc["by_phase"] = {
            phase: expert_stats(totals.filter(pl.col("phase") == phase), md.moe.num_experts)["summary"]
            for phase in sorted(totals["phase"].unique().to_list())
        }
    accuracy_doc = _accuracy(db, rid)
    joined = _client_engine_join(db, rid)
    if joined:
        req_doc["client_engine_join"] = joined
    constants: dict[str, Any] = {}
    if ctx.gpu is not None:
        constants["gpu"] = {
            "name": ctx.gpu.name,
            "memory_bandwidth_bytes_per_s": ctx.gpu.memory_bandwidth,
            "peak_flops_dense": ctx.gpu.peak_flops(ctx.peak_dtype, fallback="bf16"),
            "peak_dtype": ctx.peak_dtype,
            "source": ctx.gpu.source,
            "retargeted": options.gpu is not None,
        }
    if ctx.spec is not None:
        constants["model"] = {
            "family": ctx.spec.family,
            "num_layers": ctx.spec.num_layers,
            "num_moe_layers": ctx.spec.num_moe_layers,
            "num_experts": ctx.spec.num_experts,
            "top_k": ctx.spec.top_k,
            "total_params": ctx.spec.total_params(),
            "active_params": ctx.spec.active_params(),
            "weight_bytes": ctx.spec.weight_bytes(),
            "kv_bytes_per_token_per_layer": md.model.kv_bytes_per_token_per_layer
            or [ctx.spec.kv_bytes_per_token_per_layer()] * ctx.spec.num_layers,
            "kv_bytes_source": "trace metadata (engine allocation)"
            if md.model.kv_bytes_per_token_per_layer
            else "derived from config (engine did not record it)",
        }
    constants["num_gpus"] = ctx.num_gpus
    file_report = [
        {
            "path": str(f.path),
            "table": f.table_kind,
            "rank": f.run.rank.tag(),
            "rows": f.rows,
            "complete": f.complete,
            "lost_bytes": f.lost_bytes,
            "rows_dropped": f.rows_dropped,
        }
        for f in ctx.run.files
    ]
    for f in ctx.run.files:
        if not f.complete:
            warnings.append(f"{f.path.name}: truncated; {f.lost_bytes} trailing bytes lost")
        if f.rows_dropped:
            warnings.append(f"{f.path.name}: the writer dropped {f.rows_dropped} rows while recording")
    doc = {
        "run_id": ctx.run.run_id,
        "model": md.model.id,
        "engine": {"name": md.engine.name, "version": md.engine.version},
        "gpu": {"name": md.gpus[0].name if md.gpus else None, "count": ctx.num_gpus},
        "parallelism": asdict(md.parallelism),
        "workload": md.workload,
        "random_weights": md.model.random_weights,
        "window": window,
        "constants": constants,
        "metrics": {
            "steps": steps_doc,
            "requests": req_doc,
            "experts": experts_doc,
            "cost": cost_doc,
            "accuracy": accuracy_doc,
        },
        "warnings": warnings,
        "files": file_report,
    }
    if ctx.run.summed:
        # Where each rank counted only its own share: say the counts are sums, over which ranks.
        doc["expert_counts"] = {
            "rule": "summed over ranks (counts_scope sum_over_ranks)",
            "stages": [
                {
                    "dp": f.run.rank.dp,
                    "pp": f.run.rank.pp,
                    "ranks_summed": len(f.summed_ranks),
                    "tp_ranks": f.summed_ranks,
                    "steps_summed": f.rows,
                    "steps_left_out": f.steps_left_out,
                }
                for f in ctx.run.summed
            ],
        }
    return doc, where
