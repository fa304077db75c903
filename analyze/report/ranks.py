"""Per-rank view of a multi-GPU run: what each recording process wrote, and whether TP ranks agree.

The analyzer's views keep one TP rank per (dp, pp) — the lowest — and drop the others as duplicates
(TP ranks route the same tokens), or, where each rank counted only its own share of the expert
counts (`counts_scope` `sum_over_ranks`), sum the ranks' counts. This module looks at *every* rank's
files, so a reader can see what was dropped and that it really was a duplicate:

    frame = rank_frame(db, run_id)     # one row per engine-side rank (steps file) of the run
    rank_table(frame)                  # the same, display-ready (a Polars frame)
    rank_agreement_chart(frame)        # Altair: steps recorded vs steps whose counts equal the kept rank's

The frame has one row per rank, never per step, so it stays a handful of rows for any trace length.
Columns of `rank_frame`: rank (tag dp0-pp0-tp1), dp, pp, tp, ep, recording (feeds the views),
layers (decoder layers [start, end) the file counts), gpus (GPUs its steps stand for), gpu_uuids,
steps, tokens, gpu_busy_s (Σ GPU span, host span where a step has none), expert_steps (steps with
counts), routed_tokens, steps_agreeing (steps whose counts equal the kept rank's of its (dp, pp);
the kept rank agrees with itself), steps_compared (steps both recorded), summed (its counts are one
share of a sum over the ranks of its (dp, pp); then steps_agreeing and steps_compared are null:
shares differ by design).
"""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..checks import compare_counts, expert_counts
from ..load import LoadedFile, TraceDB
from ..metrics.steps import step_time_s
from .charts import as_frame, inline_data

_SCHEMA = {
    "rank": pl.String,
    "dp": pl.Int32,
    "pp": pl.Int32,
    "tp": pl.Int32,
    "ep": pl.Int32,
    "recording": pl.Boolean,
    "layers": pl.String,
    "gpus": pl.Int32,
    "gpu_uuids": pl.String,
    "steps": pl.Int64,
    "tokens": pl.Int64,
    "gpu_busy_s": pl.Float64,
    "expert_steps": pl.Int64,
    "routed_tokens": pl.Int64,
    "steps_agreeing": pl.Int64,
    "steps_compared": pl.Int64,
    "summed": pl.Boolean,
}


def rank_frame(db: TraceDB, run_id: str) -> pl.DataFrame:
    """One row per engine-side rank of `run_id` (columns in the module docstring); empty if unknown."""
    run = db.runs.get(run_id)
    if run is None:
        return pl.DataFrame(schema=_SCHEMA)
    steps_files = run.files_of("steps")
    recorders = {(f.run.rank.dp, f.run.rank.pp, f.run.rank.tp) for f in run.recording_files}
    experts: dict[tuple[int, int, int], LoadedFile] = {
        (f.run.rank.dp, f.run.rank.pp, f.run.rank.tp): f
        for f in run.files_of("experts")
        if "experts" in f.parquet
    }
    kept = {(dp, pp): tp for dp, pp, tp in recorders}
    cache: dict[tuple[int, int, int], Any] = {}
    rows = []
    for f in sorted(steps_files, key=lambda f: (f.run.rank.dp, f.run.rank.pp, f.run.rank.tp)):
        r = f.run.rank
        key = (r.dp, r.pp, r.tp)
        scalars = pq.read_table(
            f.parquet["step_scalars"],
            columns=["num_tokens", "gpu_start_ns", "gpu_end_ns", "t_start_ns", "t_end_ns"],
        )
        steps, tokens = scalars.num_rows, int(pc.sum(scalars["num_tokens"]).as_py() or 0)
        # Each step's time_s as step_metrics has it (metrics/steps.py), summed without rounding.
        busy = math.fsum(
            step_time_s(*(scalars[c].to_numpy(zero_copy_only=False) for c in scalars.column_names[1:]))[0]
        )
        mine = experts.get(key)
        expert_steps = routed = agreeing = compared = None
        summed = (r.dp, r.pp) in run.sum_stages
        if mine is not None and summed:
            expert_steps, routed = expert_share(mine)
        elif mine is not None:
            counts = cache[key] = cache.get(key) or expert_counts(mine)
            expert_steps, routed = len(counts[0]), int(counts[1].sum())
            ref_key = (r.dp, r.pp, kept.get((r.dp, r.pp), r.tp))
            if ref_key in experts:
                ref = cache[ref_key] = cache.get(ref_key) or expert_counts(experts[ref_key])
                compared, differ, _, _ = compare_counts(ref, counts)
                agreeing = compared - differ
        end = "end" if r.layer_end is None else str(r.layer_end)
        rows.append(
            {
                "rank": r.tag(),
                "dp": r.dp,
                "pp": r.pp,
                "tp": r.tp,
                "ep": r.ep,
                "recording": key in recorders,
                "layers": f"{r.layer_start}-{end}",
                "gpus": len(r.gpu_uuids) or max(1, f.run.parallelism.tp),
                "gpu_uuids": ", ".join(r.gpu_uuids),
                "steps": steps,
                "tokens": tokens,
                "gpu_busy_s": float(busy),
                "expert_steps": expert_steps,
                "routed_tokens": routed,
                "steps_agreeing": agreeing,
                "steps_compared": compared,
                "summed": summed,
            }
        )
    return pl.DataFrame(rows, schema=_SCHEMA)


def expert_share(f: LoadedFile) -> tuple[int, int]:
    """(steps with counts, tokens routed) of one rank's share, from its cached per-step summaries."""
    stats = pl.scan_parquet(f.parquet["expert_step_stats"])
    steps, routed = stats.select(pl.len(), pl.col("routed_tokens").sum()).collect().row(0)
    return int(steps), int(routed or 0)


def _role() -> pl.Expr:
    """kept / TP duplicate / summed share (frames without `summed` predate the sum rule)."""
    return (
        pl.when(pl.col("summed"))
        .then(pl.lit("summed share"))
        .when(pl.col("recording"))
        .then(pl.lit("kept"))
        .otherwise(pl.lit("TP duplicate"))
    )


def _with_summed(df: pl.DataFrame) -> pl.DataFrame:
    return df if "summed" in df.columns else df.with_columns(pl.lit(False).alias("summed"))


def rank_table(frame: Any) -> pl.DataFrame:
    """`rank_frame` as a display table: rank, role (kept / TP duplicate / summed share), layers, GPUs,
    steps, tokens, GPU busy s, and 'counts = kept rank' as 'agreeing / compared' steps."""
    df = _with_summed(as_frame(frame))
    if df.is_empty():
        return pl.DataFrame(schema={"rank": pl.String})
    agree = [
        "" if c is None else f"{a}/{c}"
        for a, c in zip(df["steps_agreeing"].to_list(), df["steps_compared"].to_list(), strict=True)
    ]
    return df.select(
        pl.col("rank"),
        _role().alias("role"),
        pl.col("layers"),
        pl.col("gpus").alias("GPUs"),
        pl.col("steps"),
        pl.col("tokens"),
        pl.col("gpu_busy_s").round(3).alias("GPU busy s"),
        pl.col("routed_tokens").alias("routed tokens"),
    ).with_columns(pl.Series("counts = kept rank (steps)", agree))


def rank_agreement_chart(frame: Any, *, title: str = "Ranks") -> alt.TopLevelMixin:
    """Per rank: steps recorded (bar) and steps whose expert counts equal the kept rank's (dark bar);
    colour says whether the rank feeds the views or is dropped as a TP duplicate."""
    df = _with_summed(as_frame(frame))
    for c in ("rank", "recording", "steps", "steps_agreeing"):
        if c not in df.columns:
            raise ValueError(f"rank_agreement_chart: the frame lacks column {c}")
    df = df.with_columns(
        _role().alias("role"),
        pl.col("steps_agreeing").fill_null(0),
    )
    total = int(df.filter(~pl.col("recording"))["steps_agreeing"].sum() or 0)
    compared = int(df.filter(~pl.col("recording"))["steps_compared"].fill_null(0).sum() or 0)
    note = (
        f"TP duplicates: {total} of {compared} compared steps have counts equal to the kept rank's"
        if compared
        else "no TP duplicates to compare"
    )
    base = alt.Chart(inline_data(df)).encode(y=alt.Y("rank:N", title=None, sort=None))
    tooltip = [
        "rank:N",
        "role:N",
        "layers:N",
        "gpus:Q",
        "steps:Q",
        "steps_agreeing:Q",
        alt.Tooltip("gpu_busy_s:Q", format=".3f"),
    ]
    recorded = base.mark_bar(opacity=0.35).encode(
        x=alt.X("steps:Q", title="steps"),
        color=alt.Color(
            "role:N",
            scale=alt.Scale(
                domain=["kept", "TP duplicate", "summed share"], range=["#1b9e77", "#7570b3", "#d95f02"]
            ),
            title=None,
        ),
        tooltip=tooltip,
    )
    agreeing = base.mark_bar(size=6).encode(
        x="steps_agreeing:Q", color=alt.Color("role:N", legend=None), tooltip=tooltip
    )
    return (recorded + agreeing).properties(
        width=480,
        height=alt.Step(28),
        title=alt.TitleParams(
            text=title,
            subtitle=[
                "Wide bar: steps the rank recorded. Thin bar: steps whose expert counts equal the kept rank's.",
                note,
            ],
            anchor="start",
        ),
    )
