"""From paths to a metrics document: load -> specs -> per-step costs -> aggregates (moecap formula).

`analyze_paths` is the library entry point behind `moecap-analyze PATHS…`. The document follows the
`moecap.metrics/1` schema: one object per run with run info, formula, window, constants, metrics,
warnings and the per-file load report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import polars as pl

from . import __version__
from .accuracy import score_outputs
from .analysis import (
    METRICS_SCHEMA,
    Options,
    RunContext,
    Settings,
    define_step_metrics_view,
    define_window_views,
    resolve_context,
    resolve_run_window,
    step_aggregates,
)
from .cost.constants import CostSettings
from .cost.section import cost_section, settings_for
from .load import TraceDB, load_traces, require_runs
from .memviews import in_memory
from .metrics.experts import expert_stats
from .metrics.requests import request_metrics
from .metrics.window import Window

REQUEST_SUMMARY_SCHEMA: dict[str, Any] = {
    "run_id": pl.String,
    "requests": pl.Int64,
    "succeeded": pl.Int64,
    "ttft_s_mean": pl.Float64,
    "tpot_s_mean": pl.Float64,
    "itl_s_p50": pl.Float64,
    "e2e_s_mean": pl.Float64,
    "request_throughput": pl.Float64,
    "output_throughput": pl.Float64,
    "total_token_throughput": pl.Float64,
}
"""`Analysis.request_summary`: per run, the request-level figures of metrics/requests.py (seconds,
requests/s, tokens/s; throughputs over the requests' makespan, as `vllm bench serve`)."""

COST_SCHEMA: dict[str, Any] = {
    "run_id": pl.String,
    "usd_per_1m_output_tokens": pl.Float64,
    "band_low": pl.Float64,
    "band_high": pl.Float64,
    "usd_per_hour": pl.Float64,
}
"""`Analysis.costs`: per run, cost/section.py's headline USD per 1M output tokens, its band, and the
headline scope's rate (USD per hour of the run's GPUs; null where the headline cost model has no
price)."""

ACCURACY_SCHEMA: dict[str, Any] = {
    "run_id": pl.String,
    "exact_match": pl.Float64,
    "correct": pl.Float64,
    "total": pl.Float64,
}
"""`Analysis.accuracy`: per run with scorable outputs, exact match (fraction) and its counts."""


@dataclass
class Analysis:
    """The loaded traces, their resolved contexts and what the analysis computed, as frames.

    The façade (HolisticTraceAnalysis' shape): consumers read `run_info()`, `run_metrics()`
    (the SQL views), `slow_steps()` / `slow_step_totals()` and the per-run frames `request_summary`,
    `costs`, `accuracy`; `document` is metrics.json, built from the same results and written only at the
    edge (`--out`)."""

    db: TraceDB
    contexts: list[RunContext]
    document: dict[str, Any]
    windows: dict[str, Window]
    """run_id -> that run's resolved metrics window (also the `run_windows` table)."""
    settings: Settings | None = None
    """What the analysis was asked for (GPU, window, SLOs, cost settings)."""
    request_summary: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=REQUEST_SUMMARY_SCHEMA))
    costs: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=COST_SCHEMA))
    accuracy: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ACCURACY_SCHEMA))
    warnings: dict[str, list[str]] = field(default_factory=dict)
    """run_id -> what the analysis of that run warns about."""
    _frames: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cost_settings(self) -> CostSettings:
        """The cost constants and model every cost of this analysis uses."""
        return settings_for(self.settings or Settings())

    @property
    def run_ids(self) -> list[str]:
        """The runs in analysis order (metrics.json's order)."""
        return [ctx.run.run_id for ctx in self.contexts]

    def run_metrics(self) -> pl.DataFrame:
        """The `run_metrics` view (metrics/steps.py per run and phase over the run's window); read
        once (the views do not change after the analysis)."""
        from .sql.views import define_run_views

        if "run_metrics" not in self._frames:
            with self.db.defer_request_lists():
                define_run_views(self.db.con)
                self._frames["run_metrics"] = self.db.con.sql("SELECT * FROM run_metrics").pl()
        return self._frames["run_metrics"]

    def slow_steps(self) -> pl.DataFrame:
        """The steps `check` names (compile / JIT or first-use warm-up, analyze/slow_steps.py), one row
        per (run, dp, pp, step); columns `slow_steps.SLOW_STEPS_SCHEMA`. Computed once."""
        from .slow_steps import slow_steps_frame

        if "slow_steps" not in self._frames:
            self._frames["slow_steps"] = slow_steps_frame(self.db, self.run_ids)
        return self._frames["slow_steps"]

    def slow_step_totals(self) -> pl.DataFrame:
        """Per run (every run has a row), the count and summed duration of its `slow_steps()`:
        run_id, compile_steps, compile_s (seconds)."""
        totals = (
            self.slow_steps()
            .group_by("run_id")
            .agg(compile_steps=pl.len().cast(pl.Int64), compile_s=pl.col("duration_s").sum())
        )
        runs = pl.DataFrame({"run_id": self.run_ids}, schema={"run_id": pl.String})
        return runs.join(totals, on="run_id", how="left").with_columns(
            pl.col("compile_steps").fill_null(0), pl.col("compile_s").fill_null(0.0)
        )

    def run_info(self) -> pl.DataFrame:
        """Per run, what identifies it: the `runs` table (trace metadata) with the GPU the metrics
        are computed for and its count (`run_settings`). Columns: run_id, model, engine,
        engine_version, gpu, num_gpus, batch_size, dataset, created_at."""
        if "run_info" not in self._frames:
            with self.db.defer_request_lists():
                self._frames["run_info"] = self.db.con.sql(
                    """SELECT r.run_id, r.model_id AS model, r.engine, r.engine_version,
                              coalesce(s.gpu, r.gpu_name) AS gpu, s.num_gpus::BIGINT AS num_gpus,
                              r.batch_size::BIGINT AS batch_size, r.dataset, r.created_at
                       FROM runs r LEFT JOIN run_settings s USING (run_id)"""
                ).pl()
        return self._frames["run_info"]


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
    spec = options.window_spec
    contexts = [resolve_context(run, options) for run in db.runs.values()]
    cost = settings_for(options)
    # No metric reads a request list except the client join (which asks for them itself): the
    # lists are cached when `db.con` is first used outside this block.
    with db.defer_request_lists():
        define_step_metrics_view(db, contexts)
        windows = {
            ctx.run.run_id: resolve_run_window(db, ctx, spec)
            if ctx.step_files
            else Window("all", "every recorded step")
            for ctx in contexts
        }
        define_window_views(db, windows)
        joins = client_engine_joins(db)
        # Each run's queries read these views from memory, not by re-opening every run's files.
        # Not step_metrics: over a copy, DuckDB adds a run's float sums in another order than over
        # the run's own file, and the last bits of metrics.json would change.
        with in_memory(db.con, views=("expert_totals", "requests", "experts")):
            runs = [_run_document(db, ctx, options, cost, windows[ctx.run.run_id], joins) for ctx in contexts]
    frames = _section_frames(runs)
    document = {
        "schema": METRICS_SCHEMA,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "moecap_version": __version__,
        "formula": "moecap",
        "runs": runs,
        "load_errors": db.errors,
        "load_warnings": db.warnings,
    }
    return Analysis(
        db=db,
        contexts=contexts,
        document=document,
        windows=windows,
        settings=options,
        request_summary=frames["requests"],
        costs=frames["cost"],
        accuracy=frames["accuracy"],
        warnings={r["run_id"]: list(r["warnings"]) for r in runs},
    )


def _section_frames(runs: list[dict[str, Any]]) -> dict[str, pl.DataFrame]:
    """The façade's per-run frames from each run's computed sections (the return values of
    metrics/requests.py `request_metrics`, cost/section.py `cost_section` and the accuracy scorer)."""
    requests, costs, accuracy = [], [], []
    for run in runs:
        rid, m = run["run_id"], run["metrics"]
        req = m["requests"]
        requests.append(
            {
                "run_id": rid,
                "requests": req.get("requests"),
                "succeeded": req.get("succeeded"),
                "ttft_s_mean": (req.get("ttft_s") or {}).get("mean"),
                "tpot_s_mean": (req.get("tpot_s") or {}).get("mean"),
                "itl_s_p50": (req.get("itl_s") or {}).get("p50"),
                "e2e_s_mean": (req.get("e2e_s") or {}).get("mean"),
                "request_throughput": req.get("request_throughput"),
                "output_throughput": req.get("output_throughput"),
                "total_token_throughput": req.get("total_token_throughput"),
            }
        )
        cost = m.get("cost") or {}
        head = (cost.get("scopes") or {}).get(cost.get("headline_scope") or "") or {}
        if cost.get("usd_per_1m_output_tokens") is not None or head.get("usd_per_hour") is not None:
            band = cost.get("band_usd_per_1m_output_tokens") or [None, None]
            costs.append(
                {
                    "run_id": rid,
                    "usd_per_1m_output_tokens": cost.get("usd_per_1m_output_tokens"),
                    "band_low": band[0],
                    "band_high": band[1],
                    "usd_per_hour": head.get("usd_per_hour"),
                }
            )
        acc = m.get("accuracy")
        if acc:
            total = acc.get("total")
            em = acc.get("exact_match")
            if em is None and total:
                em = acc.get("correct", 0) / total
            accuracy.append({"run_id": rid, "exact_match": em, "correct": acc.get("correct"), "total": total})
    return {
        "requests": pl.DataFrame(requests, schema=REQUEST_SUMMARY_SCHEMA),
        "cost": pl.DataFrame(costs, schema=COST_SCHEMA),
        "accuracy": pl.DataFrame(accuracy, schema=ACCURACY_SCHEMA),
    }


def _accuracy(db: TraceDB, rid: str) -> dict[str, Any] | None:
    """`accuracy_metrics` for outputs that carry a reference answer (None when nothing is scorable)."""
    outputs = db.con.sql(
        "SELECT req_id, sample_id, dataset, output, reference FROM outputs WHERE run_id = ?", params=[rid]
    ).pl()
    if outputs.is_empty() or outputs["reference"].null_count() == outputs.height:
        return None
    summary, _ = score_outputs(outputs)
    return summary if summary.get("total") else None


_JOIN_NOTE = (
    "client arrival (driver clock) to the start of the first engine step computing the request "
    "(engine clock); both are the host's monotonic clock when driver and engine share a host"
)


def client_engine_joins(db: TraceDB) -> dict[str, dict[str, Any]]:
    """run_id -> its client rows joined to the engine's steps by request id: how many join, and the
    gap between the client's arrival and the first step that computed the request (queue +
    transport), s. Runs without requests or without steps are absent. One query for every run
    (per run, the steps view re-opened every run's files)."""
    if not db.con.execute("SELECT count(*) FROM requests").fetchall()[0][0]:
        return {}  # nothing to join: the steps' request lists need not be cached
    db.ensure_request_lists()  # the join reads steps.req_ids
    with_steps = {r for (r,) in db.con.execute("SELECT DISTINCT run_id FROM steps").fetchall()}
    rows = db.con.execute(
        """WITH first_step AS (
                SELECT run_id, rid, min(t_start_ns) AS first_ns FROM (
                    SELECT run_id, unnest(req_ids) AS rid, t_start_ns FROM steps)
                GROUP BY run_id, rid)
            SELECT r.run_id, count(*), count(f.rid),
                   quantile_cont((f.first_ns - r.arrival_ns) / 1e9, [0.5, 0.9, 0.99]),
                   -- The mean of integer ns is exact (a hugeint sum), so it does not depend on the order
                   -- DuckDB's threads add the rows in; a mean of doubles differed in its last bits run to run.
                   avg(f.first_ns - r.arrival_ns) / 1e9
            FROM requests r LEFT JOIN first_step f
                 ON f.run_id = r.run_id AND f.rid = coalesce(r.engine_req_id, r.req_id)
            GROUP BY r.run_id"""
    ).fetchall()
    return {
        rid: {
            "requests": total,
            "joined": joined,
            "arrival_to_first_step_s_mean": mean,
            "arrival_to_first_step_s_p50_p90_p99": q,
            "note": _JOIN_NOTE,
        }
        for rid, total, joined, q, mean in rows
        if total and rid in with_steps
    }


def _run_document(
    db: TraceDB,
    ctx: RunContext,
    options: Settings,
    cost: CostSettings,
    run_window: Window,
    joins: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    md = ctx.run.metadata
    warnings = list(ctx.warnings) + list(ctx.run.warnings)
    rid = ctx.run.run_id
    if ctx.spec_error:
        warnings.append(f"model spec: {ctx.spec_error}")
    if ctx.gpu_error:
        warnings.append(f"gpu spec: {ctx.gpu_error}")
    counts = bool(md.moe.counts_available) and bool(ctx.run.files_of("experts"))
    if not counts:
        reason = md.moe.counts_unavailable_reason or "the run has no experts table"
        warnings.append(f"no expert counts ({reason}): S-MBU and expert statistics are null")
    window: dict[str, Any] = {"kind": "all"}
    steps_doc: dict[str, Any] = {}
    if ctx.step_files:
        window = run_window.as_dict()
        steps_doc = step_aggregates(db, rid)
        zero, idle = db.con.execute(
            "SELECT count(*) FILTER (WHERE time_s <= 0), count(*) FILTER (WHERE time_s > 0 AND num_tokens = 0) "
            "FROM step_metrics WHERE run_id = ?",
            [rid],
        ).fetchall()[0]
        if zero:
            warnings.append(f"{zero} step(s) with zero or negative duration were left out of every metric")
        if idle:
            warnings.append(
                f"{idle} step(s) computed no token: no S-MBU / S-MFU for them (their time counts as busy time)"
            )
    elif not ctx.run.files_of("steps"):
        from .output import RUN_WITHOUT_STEPS

        warnings.append(RUN_WITHOUT_STEPS)
    requests = db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[rid]).pl()
    req_doc = request_metrics(
        requests,
        slo_ttft_s=options.slo_ttft_ms / 1e3 if options.slo_ttft_ms else None,
        slo_tpot_s=options.slo_tpot_ms / 1e3 if options.slo_tpot_ms else None,
    )
    cost_doc = cost_section(db, ctx, steps_doc, req_doc, cost)
    warnings.extend(cost_doc["warnings"])
    totals = db.con.sql(
        "SELECT layer, expert, tokens, phase FROM expert_totals WHERE run_id = ?", params=[rid]
    ).pl()
    experts_doc = expert_stats(totals, md.moe.num_experts) if counts else {}
    if experts_doc:
        experts_doc["by_phase"] = {
            phase: expert_stats(totals.filter(pl.col("phase") == phase), md.moe.num_experts)["summary"]
            for phase in sorted(totals["phase"].unique().to_list())
        }
    accuracy_doc = _accuracy(db, rid)
    joined = joins.get(rid)
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
    return doc
