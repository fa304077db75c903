"""Which charts a report holds: an `Analysis` → sections of named charts (frames → charts).

A chart whose data is absent (no expert counts, no requests, no cost in any run) is left out and
the section says why, so every chart that is drawn has data.
"""

from __future__ import annotations

import copy
import functools
import queue
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import altair as alt
import polars as pl

from . import charts as C
from . import frames as F


@dataclass
class Figure:
    """One chart of the report; `slug` names its exported files (unique within a report)."""

    slug: str
    title: str
    chart: alt.TopLevelMixin
    _spec: dict[str, Any] | None = field(default=None, repr=False)

    def spec(self) -> dict[str, Any]:
        """The Vega-Lite spec, built once: the page and the exports share it. Not schema-validated
        here (jsonschema took half the report's time over 27 runs); the chart tests validate every
        chart function's output, and the browser test renders every chart."""
        if self._spec is None:
            self._spec = self.chart.to_dict(validate=False)
        return self._spec


@dataclass
class Section:
    """A group of figures: the cross-run comparison or one run."""

    id: str
    title: str
    run_id: str | None = None
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, pl.DataFrame]] = field(default_factory=list)
    """(caption, display-ready frame) shown under the charts."""


@dataclass
class FigureOptions:
    """How far large traces are reduced before charting."""

    top_experts: int = 8
    step_bins: int = 120
    time_bins: int = 150
    step_points: int = 1500
    cdf_points: int = 80  # per run and metric: a step CDF 240 px wide; 27 runs x 3 metrics stay ~0.4 MB
    heatmap_max_cells: int = 20_000


def safe_name(text: str, limit: int = 80) -> str:
    """A file-name-safe form of a run id (letters, digits, . _ - only)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "run"


def _add_groups(frame: pl.DataFrame, groups: dict[str, str], labels: dict[str, str]) -> pl.DataFrame:
    """A `group` column from the frame's `run` label (labels: run_id -> label)."""
    by_label = {labels[rid]: g for rid, g in groups.items() if rid in labels}
    return frame.with_columns(group=pl.col("run").replace_strict(by_label, default=pl.col("run")))


def cross_run_section(
    analysis: Any, labels: dict[str, str], options: FigureOptions, excluded: dict[str, Any] | None = None
) -> Section:
    """Latency CDFs, throughput vs batch size, CAP radar and the Pareto front across the runs,
    coloured by group (model · engine · GPU · CUDA graphs or eager) rather than one colour per run."""
    from .. import slow_steps as slow
    from .groups import info_rows, run_groups, run_modes
    from .steps import steps_predicate

    db = analysis.db
    groups = run_groups(info_rows(analysis), run_modes(analysis))
    sec = Section(id="compare", title="Across runs")
    n_groups = len(set(groups.values()))
    if len(groups) > n_groups:
        sec.notes.append(
            f"{len(groups)} runs in {n_groups} groups (model · engine · GPU · CUDA graphs or eager): colour = "
            "group, one line or panel per run; hover a mark for its run."
        )
    lat = _add_groups(F.latency_cdf_frame(db, labels, points=options.cdf_points), groups, labels)
    if lat.height:
        sec.figures.append(Figure("compare-latency_cdf", "Latency distributions (CDF)", C.latency_cdf(lat)))
    else:
        sec.notes.append("no request timings in any run: latency CDFs left out")
    where, lost = steps_predicate(db, list(labels), excluded)
    tput = _add_groups(F.throughput_frame(db, labels, analysis, where=where), groups, labels)
    outliers = [
        f"{labels[rid]}: {len(ex.outliers)}" for rid, ex in lost.items() if ex.outliers and rid in labels
    ]
    if outliers:
        sec.notes.append(
            "Throughput vs batch size leaves out compile-outlier and warm-up steps (the slow steps `check` "
            f"names: ≥ {slow.FACTOR:g}× a typical step of their phase, ≥ {slow.MIN_EXCESS_MS:g} ms over it; or "
            f"the first of their shape at ≥ {slow.WARMUP_FACTOR:g}× the later ones, "
            f"≥ {slow.MIN_WARMUP_EXCESS_MS:g} ms over them): " + "; ".join(outliers) + "."
        )
    if tput.height:
        sec.figures.append(
            Figure("compare-throughput_vs_batch", "Throughput vs batch size", C.throughput_vs_batch(tput))
        )
    else:
        sec.notes.append("no steps with wall time: throughput vs batch size left out")
    runs = _add_groups(F.runs_frame(analysis, labels), groups, labels)
    geometry, _ = C.radar_frame(runs)
    if geometry.filter(geometry["kind"] == "run").height:
        sec.figures.append(Figure("compare-cap_radar", "CAP radar", C.cap_radar(runs)))
    else:
        sec.notes.append("no run has the radar's figures: CAP radar left out")
    has_cost = runs["cost_usd_per_m_output_tokens"].drop_nulls().len() > 0
    y = "cost" if has_cost else "tpot"
    pts, _, _, _ = C.pareto_points(runs, y)
    if not has_cost:
        sec.notes.append("no run has a cost figure: the Pareto front uses TPOT instead of cost")
    if pts.height:
        name = "Cost–throughput Pareto front" if has_cost else "TPOT–throughput Pareto front"
        sec.figures.append(Figure(f"compare-pareto_{y}", name, C.pareto_front(runs, y)))
    else:
        sec.notes.append("no run has throughput and cost/TPOT: Pareto front left out")
    return sec


def run_section(
    analysis: Any,
    ctx: Any,
    label: str,
    index: int,
    options: FigureOptions,
    left_out: Any = None,
    timeline: pl.DataFrame | None = None,
) -> Section:
    """Expert, step and time-accounting charts of one run. `left_out` (steps.Excluded) and
    `timeline` (frames.timeline_frame with the slow steps left out) when already computed."""
    db = analysis.db
    rid = ctx.run.run_id
    info = F.run_info(db, rid)
    n_experts = int(info.get("num_experts") or 0) or None
    top_k = int(info.get("top_k") or 0) or None
    prefix = f"run{index}-{safe_name(rid)}"
    sec = Section(id=f"run-{index}", title=f"#{index} {label}", run_id=rid)

    shares = F.expert_share_frame(db, rid)
    if shares.height:
        sec.figures.append(
            Figure(
                f"{prefix}-expert_heatmap",
                "Expert heatmap",
                C.expert_heatmap(shares, max_cells=options.heatmap_max_cells),
            )
        )
        load = F.expert_load_frame(db, rid, top_n=options.top_experts, bins=options.step_bins)
        if load.height:
            sec.figures.append(
                Figure(
                    f"{prefix}-expert_load",
                    "Expert load over time",
                    C.expert_load_over_time(load, num_experts=n_experts),
                )
            )
        sec.figures.append(
            Figure(
                f"{prefix}-layer_imbalance",
                "Load imbalance per layer",
                C.layer_imbalance(F.layer_imbalance_frame(shares, n_experts)),
            )
        )
    else:
        sec.notes.append("no expert counts in this run: expert heatmap, load and imbalance left out")

    from .steps import excluded_steps

    if left_out is None:
        left_out = excluded_steps(db, rid)
    note = left_out.note()
    if note:
        sec.notes.append("Per-step charts (activated experts, step time): " + note)
    time_note = left_out.note(idle=False)
    if time_note:
        sec.notes.append("Charts over time (S-MBU / S-MFU, GPU-busy vs host gap): " + time_note)
    steps = F.step_frame(db, rid, max_points=options.step_points, where=left_out.predicate())
    if steps.height:
        if steps["active_experts_per_layer"].drop_nulls().len():
            sec.figures.append(
                Figure(
                    f"{prefix}-activated_experts",
                    "Activated experts vs batch tokens",
                    C.activated_experts_vs_tokens(steps, num_experts=n_experts, top_k=top_k, note=note),
                )
            )
        sec.figures.append(
            Figure(
                f"{prefix}-step_time", "Step time vs batch tokens", C.step_time_vs_tokens(steps, note=note)
            )
        )
    else:
        reason = ctx.spec_error or ctx.gpu_error or "no steps with a positive duration"
        sec.notes.append(f"no per-step metrics ({reason}): step charts left out")

    # Over time, idle steps stay (their time was spent); compile steps go, as in the per-step charts.
    if timeline is None:
        timeline = F.timeline_frame(db, rid, bins=options.time_bins, where=left_out.predicate(idle=False))
    if timeline.height:
        if timeline["s_mfu"].drop_nulls().len():
            sec.figures.append(
                Figure(
                    f"{prefix}-utilisation",
                    "S-MBU / S-MFU over time",
                    C.utilisation_over_time(timeline, note=time_note),
                )
            )
        sec.figures.append(
            Figure(
                f"{prefix}-time_accounting",
                "GPU-busy vs host-gap time",
                C.time_accounting(timeline, note=time_note),
            )
        )
    _rank_view(db, rid, prefix, sec)
    return sec


def _rank_view(db: Any, rid: str, prefix: str, sec: Section) -> None:
    """Per-rank view for multi-GPU runs: which rank's rows feed the metrics, and whether TP ranks'
    expert counts agree step by step (one row per rank, whatever the trace length)."""
    from . import ranks as R

    run = db.runs.get(rid) if hasattr(db, "runs") else None
    if run is not None and len(run.files_of("steps")) <= 1:
        return  # one rank: nothing to compare (rank_frame would read its counts to say so)
    rf = R.rank_frame(db, rid)
    if rf.height <= 1:
        return
    sec.figures.append(Figure(f"{prefix}-ranks", "Ranks", R.rank_agreement_chart(rf)))
    table = R.rank_table(rf)
    sec.notes.append(
        "; ".join(
            f"{r['rank']} ({r['role']})"
            if r["role"] == "summed share"  # shares differ by design: nothing to agree on
            else f"{r['rank']} ({r['role']}): {r['counts = kept rank (steps)']} steps agree"
            for r in table.to_dicts()
        )
    )


DEFAULT_WHATIF_GPUS = ("H100", "H200", "B200")
"""GPUs every report projects its runs onto (a run's own GPU is skipped)."""


def whatif_section(analysis: Any, labels: dict[str, str], gpus: Sequence[str]) -> Section:
    """Each run projected onto `gpus` (what-if, docs/whatif.md): throughput and TPOT charts, and a
    table of every projected metric beside both baselines."""
    from ..errors import InputError
    from ..specs import resolve_gpu
    from ..whatif import ASSUMPTIONS, whatif

    sec = Section(id="whatif", title="What-if on other GPUs")
    try:
        targets = [resolve_gpu(g) for g in gpus]
        doc = whatif(analysis, targets, analysis.cost_settings)
    except InputError as exc:
        sec.notes.append(f"no run could be projected: {exc}")
        return sec
    frame = F.whatif_frame(doc, labels)
    own = {r["run_id"]: r["source_gpu"] for r in doc["runs"] if "error" not in r}
    frame = frame.filter(
        (pl.col("model") == "measured")
        | (pl.col("gpu") != pl.col("run_id").replace_strict(own, default=None))
    )
    for run in doc["runs"]:
        if "error" in run:
            sec.notes.append(f"{labels.get(run['run_id'], run['run_id'])}: not projected ({run['error']})")
    if frame.filter(pl.col("model") == "projection").height == 0:
        sec.notes.append("no run could be projected (no expert counts or no GPU time)")
        return sec
    sec.notes.append("Assumptions: " + "; ".join(ASSUMPTIONS) + ".")
    for slug, metric, title in (
        ("whatif-throughput", "window_output_throughput", "What-if: generated tokens / s (window)"),
        ("whatif-tpot", "tpot_ms", "What-if: TPOT, ms (mean)"),
    ):
        if frame[metric].drop_nulls().len():
            sec.figures.append(Figure(slug, title, C.whatif_projection(frame, metric, title)))
    order = {"measured": 0, "projection": 1, "no_change": 2, "bandwidth_ratio": 3}
    table = frame.sort("run", pl.col("model").replace_strict(order, default=9) > 0, "gpu", "model").select(
        "run",
        "gpu",
        "model",
        pl.col("window_output_throughput").round(1).alias("tok/s"),
        pl.col("tpot_ms").round(3).alias("TPOT ms"),
        pl.col("ttft_ms").round(1).alias("TTFT ms"),
        pl.col("decode_step_ms").round(3).alias("decode step ms"),
        (pl.col("decode_smbu") * 100).round(1).alias("decode S-MBU %"),
        pl.col("usd_per_1m_output_tokens").round(3).alias("$ / 1M out"),
    )
    sec.tables.append(("Measured and projected metrics (projection and both baselines)", table))
    return sec


REPORT_THREADS = 2
"""Threads building the sections. DuckDB and Polars release the GIL while they run, so on a 2-core
machine one thread's queries overlap the other's chart building (Altair is pure Python)."""


def report_sections(
    analysis: Any,
    options: FigureOptions | None = None,
    whatif_gpus: Sequence[str] = DEFAULT_WHATIF_GPUS,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    threads: int = REPORT_THREADS,
) -> list[Section]:
    """The cross-run section, the what-if section (unless `whatif_gpus` is empty), then one section
    per run, in the document's run order, each figure's spec built. `progress("charts", done,
    total)` after each section; `threads` > 1 builds sections concurrently, each thread on its own
    DuckDB cursor (the sections and their order do not depend on it)."""
    from altair.utils.schemapi import debug_mode

    # debug_mode(False): Altair skips validating each schema object as it is built (jsonschema was a
    # third of the report's time over 27 runs); the chart tests validate every chart function's output.
    with report_connections(analysis, max(1, threads)) as pool, debug_mode(False):
        return _sections(analysis, pool, options or FigureOptions(), whatif_gpus, progress)


@contextmanager
def report_connections(analysis: Any, n: int) -> Iterator[queue.Queue[Any]]:
    """A queue of `n` analyses to build sections with: `analysis` itself and n - 1 copies whose db
    uses its own cursor of the same database; on each, the views the report reads come from
    memory (`memviews.in_memory`)."""
    from ..memviews import in_memory

    db = analysis.db
    con = getattr(db, "con", None)  # first use of `con` caches request lists: before any thread
    pool: queue.Queue[Any] = queue.Queue()
    if con is None:
        pool.put(analysis)
        yield pool
        return
    with in_memory(con, extra_cursors=n - 1) as cursors:
        # The façade's frames are computed once and shared by the copies below (one `_frames` dict):
        # computed here, before any thread, not by two threads at once, whose cursors would both
        # (re)define the run views and meet DuckDB's catalog write-write conflict.
        analysis.run_info()
        analysis.run_metrics()
        analysis.slow_steps()
        pool.put(analysis)
        for c in cursors[1:]:
            clone = copy.copy(db)
            clone._con = c
            other = copy.copy(analysis)  # shares everything but the db, which has its own cursor
            other.db = clone
            pool.put(other)
        yield pool


def _sections(
    analysis: Any,
    pool: queue.Queue[Any],
    options: FigureOptions,
    whatif_gpus: Sequence[str],
    progress: Callable[[str, int, int], None] | None,
) -> list[Section]:
    from concurrent.futures import ThreadPoolExecutor

    from .groups import info_rows, run_labels, run_modes
    from .steps import excluded_steps_all, steps_predicate

    labels = run_labels(info_rows(analysis), run_modes(analysis))
    excluded = excluded_steps_all(analysis.db, list(labels), analysis.slow_steps())
    # Every run's time bins in one query (per run, planning the query cost more than running it).
    slow_only, _ = steps_predicate(analysis.db, list(labels), excluded, idle=False)
    timelines = F.timeline_frames(analysis.db, list(labels), bins=options.time_bins, where=slow_only)
    by_id = {ctx.run.run_id: ctx for ctx in analysis.contexts}

    def _run_job(a: Any, *, i: int, rid: str) -> Section:
        return run_section(a, by_id[rid], labels[rid], i, options, excluded.get(rid), timelines.get(rid))

    jobs: list[Callable[[Any], Section]] = [lambda a: cross_run_section(a, labels, options, excluded)]
    if whatif_gpus:
        jobs.append(lambda a: whatif_section(a, labels, whatif_gpus))
    for i, rid in enumerate(analysis.run_ids, start=1):
        if rid in by_id:
            jobs.append(functools.partial(_run_job, i=i, rid=rid))

    def build(job: Callable[[Any], Section]) -> Section:
        own = pool.get()
        try:
            sec = job(own)
            for fig in sec.figures:
                fig.spec()  # in the thread too: to_dict is most of a chart's cost
            return sec
        finally:
            pool.put(own)

    total = len(jobs)
    if pool.qsize() == 1:
        sections = []
        for done, job in enumerate(jobs, 1):
            sections.append(build(job))
            if progress:
                progress("charts", done, total)
        return sections
    with ThreadPoolExecutor(max_workers=pool.qsize()) as ex:
        futures = [ex.submit(build, job) for job in jobs]
        for done, fut in enumerate(futures, 1):
            fut.result()
            if progress:
                progress("charts", done, total)
    return [f.result() for f in futures]
