"""Charts: each a function from a data frame to an Altair chart, usable on its own in a notebook.

The frames come from `moecap.analyze.report.frames` (already aggregated: binned steps, top-N
experts, quantile-reduced CDFs) or from anywhere with the same columns; Polars or pandas frames
and dicts of columns are accepted. Data is embedded inline (CSV text above `CSV_ABOVE_ROWS` rows,
numbers rounded to 5 significant digits) so a chart's spec stays small. A frame above
`MAX_ROWS` rows is refused: aggregate it first. Each chart states its data scope and scale in its
subtitle; charts never call `configure_*`, so they can still be layered or concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from .frames import PHASE_ORDER

MAX_ROWS = 50_000
"""A frame larger than this is refused (aggregate it with `frames` first): keeps specs well under 2 MB."""
CSV_ABOVE_ROWS = 200
"""Frames longer than this are embedded as CSV text (about a third of the JSON size): with 27 runs it
keeps report.html near 5 MB rather than 9 MB."""
WIDTH = 560
HEIGHT = 260
PHASE_COLORS = {"prefill": "#d95f02", "mixed": "#7570b3", "decode": "#1b9e77", "verify": "#e7298a"}


class ChartDataError(ValueError):
    """A frame a chart cannot draw (missing columns, too many rows)."""


# -- data helpers ---------------------------------------------------------------------------------
def as_frame(df: Any) -> pl.DataFrame:
    """A Polars frame from a Polars or pandas frame, a dict of columns or a list of row dicts."""
    if isinstance(df, pl.DataFrame):
        return df
    if hasattr(df, "to_dict") and hasattr(df, "columns") and hasattr(df, "dtypes"):  # pandas
        return pl.from_pandas(df)
    return pl.DataFrame(df)


def _require(df: pl.DataFrame, chart: str, *columns: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ChartDataError(f"{chart}: the frame lacks column(s) {', '.join(missing)}")
    if df.height > MAX_ROWS:
        raise ChartDataError(
            f"{chart}: {df.height} rows is too many to embed (max {MAX_ROWS}); aggregate with "
            "moecap.analyze.report.frames first"
        )


class SharedInlineData(alt.InlineData):
    """Inline data that Altair's copies share instead of copying: every `.encode`, `.properties` and
    layer deep-copies a chart with its data (a third of the report's chart time went to copying
    rows), and a chart's rows are never changed once built."""

    def __deepcopy__(self, memo: Any = None) -> SharedInlineData:
        return self


def inline_data(df: pl.DataFrame) -> alt.InlineData:
    """The frame as inline Vega data: JSON rows, or CSV text with a parse map when long."""
    df = df.with_columns(
        [
            pl.col(c).fill_nan(None).round_sig_figs(5)
            for c, t in df.schema.items()
            if t in (pl.Float64, pl.Float32)
        ]
    )
    if df.height > CSV_ABOVE_ROWS:
        parse = {c: "number" for c, t in df.schema.items() if t.is_numeric()}
        parse.update({c: "boolean" for c, t in df.schema.items() if t == pl.Boolean})
        return SharedInlineData(values=df.write_csv(), format=alt.DataFormat(type="csv", parse=parse))
    return SharedInlineData(values=df.to_dicts())


def _phase_scale(phases: Sequence[str]) -> alt.Scale:
    domain = [p for p in PHASE_ORDER if p in phases] + sorted(p for p in phases if p not in PHASE_ORDER)
    return alt.Scale(domain=domain, range=[PHASE_COLORS.get(p, "#666666") for p in domain])


def _title(text: str, *subtitle: str) -> alt.TitleParams:
    """A left-anchored title; each subtitle argument is one line (empty ones dropped)."""
    return alt.TitleParams(
        text=text,
        subtitle=[s for s in subtitle if s],
        anchor="start",
        subtitleFont="sans-serif",
        subtitleColor="#444",
    )


def _pct(x: float) -> str:
    return f"{x:.2%}" if x < 0.1 else f"{x:.1%}"


# -- experts --------------------------------------------------------------------------------------
def expert_heatmap(
    shares: Any, *, max_cells: int = 20_000, title: str = "Expert heatmap"
) -> alt.TopLevelMixin:
    """Layer × expert heatmap of each expert's share of its layer's routed tokens, one panel per
    phase, with the hottest expert of each layer marked (◆).

    Columns: phase, layer, expert, share (fraction of the layer's tokens in that phase); tokens
    optional. When layers × experts exceeds `max_cells` per phase, only the experts with the most
    tokens overall are kept (the subtitle says how many).
    """
    df = as_frame(shares)
    _require(df, "expert_heatmap", "phase", "layer", "expert", "share")
    if "tokens" not in df.columns:
        df = df.with_columns(tokens=pl.lit(None, pl.Int64))
    n_layers = max(1, df["layer"].n_unique())
    n_experts = max(1, df["expert"].n_unique())
    notes = []
    if n_layers * n_experts > max_cells:
        keep_n = max(1, max_cells // n_layers)
        keep = (
            df.group_by("expert")
            .agg(pl.col("share").sum())
            .sort("share", "expert", descending=[True, False])
            .head(keep_n)["expert"]
        )
        df = df.filter(pl.col("expert").is_in(keep.implode()))
        notes.append(f"showing the {keep_n} experts with the most tokens of {n_experts}")
    hottest = pl.col("share") == pl.col("share").max().over("phase", "layer")
    df = df.with_columns(hottest=hottest & (pl.col("share") > 0)).select(
        "phase", "layer", "expert", "share", "tokens", "hottest"
    )
    phases = df["phase"].unique().to_list()
    order = [p for p in PHASE_ORDER if p in phases] + sorted(p for p in phases if p not in PHASE_ORDER)
    shown = max(1, df["expert"].n_unique())
    step_x = max(2.0, min(14.0, 900 / shown))
    step_y = max(3.0, min(10.0, 360 / n_layers))
    x = alt.X(
        "expert:O",
        title="expert",
        axis=alt.Axis(labelOverlap=True, labelAngle=0, labelFontSize=9),
    )
    y = alt.Y("layer:O", title="decoder layer", axis=alt.Axis(labelOverlap=True, labelFontSize=9))
    rect = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=x,
            y=y,
            color=alt.Color(
                "share:Q",
                title="token share",
                scale=alt.Scale(scheme="viridis"),
                legend=alt.Legend(format=".1%"),
            ),
            tooltip=[
                alt.Tooltip("phase:N"),
                alt.Tooltip("layer:O"),
                alt.Tooltip("expert:O"),
                alt.Tooltip("share:Q", format=".2%", title="share of layer"),
                alt.Tooltip("tokens:Q", format=",", title="tokens"),
            ],
        )
    )
    marks = (
        alt.Chart()
        .mark_point(shape="diamond", filled=True, color="#ff2d55", size=max(12.0, step_x * step_y * 0.5))
        .encode(x=x, y=y, tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("expert:O", title="hottest expert")])
        .transform_filter(alt.datum.hottest)
    )
    # Constructors rather than .properties().facet(): each fluent call deep-copies the layers again.
    return alt.FacetChart(
        data=inline_data(df),
        spec=alt.LayerChart(layer=[rect, marks], width=alt.Step(step_x), height=alt.Step(step_y)),
        facet=alt.FacetMapping(
            row=alt.Row("phase:N", sort=order, title=None, header=alt.Header(labelFontWeight="bold"))
        ),
        title=_title(
            title,
            "Each expert's share of its layer's routed tokens, over all recorded steps; ◆ = the layer's "
            "hottest expert.",
            f"Even routing = 1/{n_experts} = {_pct(1 / n_experts)}.",
            "; ".join(notes),
        ),
    )


def expert_load_over_time(load: Any, *, num_experts: int | None = None) -> alt.TopLevelMixin:
    """Heat strip of the hottest (layer, expert) pairs over engine steps: one row per pair, one cell
    per bin of steps, coloured by the pair's share of its layer's routed tokens in the bin. With
    `num_experts` the colour is that share relative to even routing (share × num_experts, 1 = even;
    diverging around 1). Columns: step_start, expert_label, share; step_end, tokens optional.
    Rows keep the frame's order (frames.expert_load_frame lists the hottest first)."""
    df = as_frame(load)
    _require(df, "expert_load_over_time", "step_start", "expert_label", "share")
    if "step_end" not in df.columns:
        df = df.with_columns(step_end=pl.col("step_start"))
    if "tokens" not in df.columns:
        df = df.with_columns(tokens=pl.lit(None, pl.Int64))
    order = list(dict.fromkeys(df["expert_label"].to_list()))
    df = df.select(
        "step_start",
        "step_end",
        "expert_label",
        "share",
        "tokens",
        step_stop=pl.col("step_end") + 1,
        load=pl.col("share") * (num_experts or 1),
    )
    n_bins = df["step_start"].n_unique()
    if num_experts:
        # Small batches give a few extreme cells; clamp the scale so 1 (even) stays the visible midpoint.
        loads = df["load"].drop_nulls().cast(pl.Float64).to_numpy()
        high = float(np.quantile(loads, 0.99)) if loads.size else 1.0
        cap = max(2.0, min(8.0, high))
        clamped = bool(loads.size) and float(loads.max()) > cap
        color = alt.Color(
            "load:Q",
            title="× even share",
            scale=alt.Scale(scheme="blueorange", domain=[0, cap], domainMid=1, clamp=True),
            legend=alt.Legend(format=".1f"),
        )
        scale_note = (
            f"Colour: the expert's share of its layer's tokens ÷ even share (1/{num_experts}); 1 = even"
            + (f"; ≥ {cap:.3g} drawn as {cap:.3g}." if clamped else ".")
        )
    else:
        color = alt.Color(
            "share:Q",
            title="share of layer",
            scale=alt.Scale(scheme="viridis"),
            legend=alt.Legend(format="%"),
        )
        scale_note = "Colour: the expert's share of its layer's routed tokens."
    return (
        alt.Chart(inline_data(df))
        .mark_rect()
        .encode(
            x=alt.X("step_start:Q", title="engine step", scale=alt.Scale(nice=False, zero=False)),
            x2=alt.X2("step_stop:Q"),
            y=alt.Y("expert_label:N", title="layer · expert", sort=order),
            color=color,
            tooltip=[
                alt.Tooltip("expert_label:N", title="expert"),
                alt.Tooltip("step_start:Q", title="from step"),
                alt.Tooltip("step_end:Q", title="to step"),
                alt.Tooltip("share:Q", format=".1%", title="share of layer"),
                alt.Tooltip("tokens:Q", format=","),
            ],
        )
        .properties(
            width=WIDTH,
            height=alt.Step(18),
            title=_title(
                "Expert load over time (hottest experts)",
                f"The {len(order)} (layer, expert) pairs with the most tokens over the run; {n_bins} bins of steps.",
                scale_note,
            ),
        )
    )


def layer_imbalance(imbalance: Any) -> alt.TopLevelMixin:
    """Load imbalance (max / mean tokens per expert) per MoE layer and phase; 1 = perfectly even.
    Columns: phase, layer, imbalance; cv and dead_experts optional (shown in tooltips)."""
    df = as_frame(imbalance)
    _require(df, "layer_imbalance", "phase", "layer", "imbalance")
    cols = [c for c in ("phase", "layer", "imbalance", "cv", "dead_experts") if c in df.columns]
    df = df.select(cols)
    base = alt.Chart(inline_data(df)).encode(
        x=alt.X("layer:Q", title="decoder layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("imbalance:Q", title="max / mean tokens per expert", scale=alt.Scale(zero=False)),
        color=alt.Color("phase:N", scale=_phase_scale(df["phase"].unique().to_list())),
        tooltip=[
            alt.Tooltip("phase:N"),
            alt.Tooltip("layer:Q"),
            alt.Tooltip("imbalance:Q", format=".2f"),
            *([alt.Tooltip("cv:Q", format=".2f", title="CV")] if "cv" in cols else []),
            *([alt.Tooltip("dead_experts:Q", title="dead experts")] if "dead_experts" in cols else []),
        ],
    )
    even = (
        alt.Chart(alt.InlineData(values=[{"even": 1.0}]))
        .mark_rule(strokeDash=[4, 4], color="#555")
        .encode(y=alt.Y("even:Q"))
    )
    return alt.LayerChart(
        layer=[base.mark_line(point=True), even],
        width=WIDTH,
        height=HEIGHT,
        title=_title(
            "Load imbalance per layer",
            "max / mean tokens per expert over all recorded steps of the phase (dashed: 1 = even).",
        ),
    )


def activated_experts_vs_tokens(
    steps: Any, *, num_experts: int | None = None, top_k: int | None = None, note: str = ""
) -> alt.TopLevelMixin:
    """Mean activated experts per MoE layer against the step's batch tokens, per phase (point size
    = steps in the group). With `num_experts` and `top_k`, the dashed curve is what uniform random
    routing would activate, E·(1 − (1 − k/E)^T). Columns: phase, tokens, active_experts_per_layer;
    steps optional. Groups with 0 tokens (idle steps) are left out: they activate nothing and a log
    axis cannot place them; `note` (what the caller left out) goes into the subtitle."""
    df = as_frame(steps)
    _require(df, "activated_experts_vs_tokens", "phase", "tokens", "active_experts_per_layer")
    if "steps" not in df.columns:
        df = df.with_columns(steps=pl.lit(1))
    df = df.select("phase", "tokens", "active_experts_per_layer", "steps").drop_nulls(
        "active_experts_per_layer"
    )
    idle = df.filter(pl.col("tokens") <= 0)["steps"].sum()
    df = df.filter(pl.col("tokens") > 0)
    if idle and not note:
        note = f"Left out: {idle} idle (0-token) step{'s' if idle != 1 else ''}."
    log = spans_decades(df["tokens"].to_list())
    x = alt.X(
        "tokens:Q",
        title="batch tokens (per step)" + (" (log)" if log else ""),
        scale=alt.Scale(type="log") if log else alt.Scale(zero=False),
    )
    points = (
        alt.Chart(inline_data(df))
        .mark_circle(opacity=0.75)
        .encode(
            x=x,
            y=alt.Y("active_experts_per_layer:Q", title="activated experts per layer"),
            color=alt.Color("phase:N", scale=_phase_scale(df["phase"].unique().to_list())),
            size=alt.Size("steps:Q", title="steps", scale=alt.Scale(range=[15, 250])),
            tooltip=[
                alt.Tooltip("phase:N"),
                alt.Tooltip("tokens:Q", format=",.1f"),
                alt.Tooltip("active_experts_per_layer:Q", format=".1f", title="experts / layer"),
                alt.Tooltip("steps:Q"),
            ],
        )
    )
    layers: list[alt.Chart] = [points]
    subtitle = "Every recorded step, grouped by batch tokens."
    if num_experts and top_k and df.height:
        tokens = df["tokens"].cast(pl.Float64).to_numpy()
        lo, hi = max(1.0, float(np.nanmin(tokens))), max(1.0, float(np.nanmax(tokens)))
        grid = np.unique(np.geomspace(lo, max(hi, lo * 1.01), 60))
        expected = num_experts * (1 - (1 - top_k / num_experts) ** grid)
        curve = pl.DataFrame({"tokens": grid, "uniform": expected})
        layers.append(
            alt.Chart(inline_data(curve))
            .mark_line(strokeDash=[4, 4], color="#555")
            .encode(
                x=x,
                y=alt.Y("uniform:Q"),
                tooltip=[alt.Tooltip("uniform:Q", format=".1f", title="uniform routing")],
            )
        )
        subtitle += f" Dashed: uniform random top-{top_k} routing over {num_experts} experts."
    return alt.LayerChart(
        layer=layers,
        width=WIDTH,
        height=HEIGHT,
        title=_title("Activated experts vs batch tokens", subtitle, note),
    )


def step_time_vs_tokens(steps: Any, *, note: str = "") -> alt.TopLevelMixin:
    """Measured step time (mean GPU span per group, bar = p10–p90) against batch tokens, with the
    roofline bounds of the same batches: memory-bound = bytes / (bandwidth × GPUs), compute-bound =
    FLOPs / (peak × GPUs), from the GPU spec. One panel per phase. Columns: phase, tokens, time_ms,
    memory_bound_ms, compute_bound_ms; time_ms_p10, time_ms_p90, steps optional."""
    df = as_frame(steps)
    _require(df, "step_time_vs_tokens", "phase", "tokens", "time_ms", "memory_bound_ms", "compute_bound_ms")
    for c in ("time_ms_p10", "time_ms_p90"):
        if c not in df.columns:
            df = df.with_columns(pl.col("time_ms").alias(c))
    if "steps" not in df.columns:
        df = df.with_columns(steps=pl.lit(1))
    df = df.select(
        "phase",
        "tokens",
        "steps",
        "time_ms",
        "time_ms_p10",
        "time_ms_p90",
        "memory_bound_ms",
        "compute_bound_ms",
    ).with_columns(roofline_ms=pl.max_horizontal("memory_bound_ms", "compute_bound_ms"))
    phases = df["phase"].unique().to_list()
    order = [p for p in PHASE_ORDER if p in phases] + sorted(p for p in phases if p not in PHASE_ORDER)
    x = alt.X("tokens:Q", title="batch tokens (per step)")
    y_title = "step time (ms)"
    series = alt.Scale(
        domain=["measured", "roofline bound", "memory-bound", "compute-bound"],
        range=["#1f77b4", "#999999", "#2ca02c", "#d62728"],
    )
    measured = (
        alt.Chart()
        .transform_calculate(series="'measured'")
        .mark_circle(size=40)
        .encode(
            x=x,
            y=alt.Y("time_ms:Q", title=y_title),
            color=alt.Color("series:N", scale=series, title=None),
            tooltip=[
                alt.Tooltip("tokens:Q", format=",.1f"),
                alt.Tooltip("steps:Q"),
                alt.Tooltip("time_ms:Q", format=".3f", title="mean step ms"),
                alt.Tooltip("time_ms_p10:Q", format=".3f", title="p10 ms"),
                alt.Tooltip("time_ms_p90:Q", format=".3f", title="p90 ms"),
                alt.Tooltip("roofline_ms:Q", format=".3f", title="roofline bound ms"),
            ],
        )
    )
    spread = (
        alt.Chart()
        .mark_rule(opacity=0.5)
        .encode(x=x, y=alt.Y("time_ms_p10:Q", title=y_title), y2=alt.Y2("time_ms_p90:Q"))
    )
    roofline = "datum.series == 'roofline bound'"
    bounds = (
        alt.Chart()
        .transform_fold(["roofline_ms", "memory_bound_ms", "compute_bound_ms"], as_=["bound", "bound_ms"])
        .transform_calculate(
            series="datum.bound == 'roofline_ms' ? 'roofline bound' : "
            "datum.bound == 'memory_bound_ms' ? 'memory-bound' : 'compute-bound'"
        )
        .mark_line(point=alt.OverlayMarkDef(size=14))
        .encode(
            x=x,
            y=alt.Y("bound_ms:Q", title=y_title),
            color=alt.Color("series:N", scale=series, title=None),
            # Typed value channels, not alt.condition(): Altair resolves a condition's dict against the
            # whole schema (~25 ms each, a fifth of the report's chart time); the spec is the same.
            strokeDash=alt.StrokeDashValue([4, 3], condition={"test": roofline, "value": [1, 0]}),
            strokeWidth=alt.StrokeWidthValue(1.2, condition={"test": roofline, "value": 5}),
            opacity=alt.OpacityValue(1.0, condition={"test": roofline, "value": 0.45}),
            detail=alt.Detail("series:N"),
            tooltip=[
                alt.Tooltip("series:N"),
                alt.Tooltip("tokens:Q", format=",.1f"),
                alt.Tooltip("bound_ms:Q", format=".3f"),
            ],
        )
    )
    # Built by constructors, not .properties().facet().resolve_scale(): each of those deep-copies the
    # layered chart again (half this chart's build time); the spec is the same.
    return alt.FacetChart(
        data=inline_data(df),
        spec=alt.LayerChart(layer=[bounds, spread, measured], width=300, height=220),
        facet=alt.Facet("phase:N", sort=order, title=None),
        columns=2,
        resolve=alt.Resolve(scale=alt.ScaleResolveMap(x="independent", y="independent")),
        title=_title(
            "Step time vs batch tokens, with the roofline bound",
            "Points: mean GPU time of the steps with that many tokens (bar: p10–p90).",
            "Lines: the same batches' bytes / (bandwidth × GPUs) and FLOPs / (peak × GPUs) from the GPU "
            "spec; roofline bound = the larger.",
            note,
        ),
    )


def utilisation_over_time(timeline: Any, *, note: str = "") -> alt.TopLevelMixin:
    """S-MBU and S-MFU per time bin (ratio of sums over the bin's steps), with the metrics window
    shaded. The line breaks where bins hold no step (a long step or a pause): drawing across the gap
    would show a utilisation nothing measured. Columns: t_start_s, t_end_s, s_mbu, s_mfu; in_window
    (fraction of the bin's steps in the window) optional. `note` (what the caller left out) goes
    into the subtitle."""
    df = as_frame(timeline)
    _require(df, "utilisation_over_time", "t_start_s", "t_end_s", "s_mbu", "s_mfu")
    if "in_window" not in df.columns:
        df = df.with_columns(in_window=pl.lit(None, pl.Float64))
    df = df.select("t_start_s", "t_end_s", "s_mbu", "s_mfu", "in_window").sort("t_start_s")
    # A new segment starts where a bin does not begin where the previous one ended.
    widths = (df["t_end_s"] - df["t_start_s"]).cast(pl.Float64).to_numpy()
    width = float(np.median(widths)) if widths.size else 0.0
    gap = (pl.col("t_start_s") - pl.col("t_end_s").shift(1)) > 0.5 * width
    df = df.with_columns(
        t_mid_s=(pl.col("t_start_s") + pl.col("t_end_s")) / 2,
        segment=gap.fill_null(False).cast(pl.Int64).cum_sum(),
    )
    gaps = int(df["segment"].cast(pl.Int64).to_numpy().max()) if df.height else 0
    data = inline_data(df)
    x = alt.X("t_mid_s:Q", title="seconds from the first step")
    window = (
        alt.Chart(data)
        .transform_filter("datum.in_window >= 0.5")
        .mark_rect(opacity=0.12, color="#888")
        .encode(x=alt.X("t_start_s:Q", title="seconds from the first step"), x2="t_end_s:Q")
    )
    lines = (
        alt.Chart(data)
        .transform_fold(["s_mbu", "s_mfu"], as_=["metric", "value"])
        .transform_calculate(metric="datum.metric == 's_mbu' ? 'S-MBU' : 'S-MFU'")
        .transform_calculate(line="datum.metric + ' ' + datum.segment")
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=x,
            y=alt.Y("value:Q", title="utilisation", axis=alt.Axis(format="%")),
            detail=alt.Detail("line:N"),
            color=alt.Color(
                "metric:N",
                title=None,
                scale=alt.Scale(domain=["S-MBU", "S-MFU"], range=["#1f77b4", "#ff7f0e"]),
            ),
            tooltip=[
                alt.Tooltip("metric:N"),
                alt.Tooltip("t_mid_s:Q", format=".2f", title="s"),
                alt.Tooltip("value:Q", format=".2%"),
            ],
        )
    )
    return alt.LayerChart(
        layer=[window, lines],
        width=WIDTH,
        height=HEIGHT,
        title=_title(
            "S-MBU / S-MFU over time",
            "Ratio of sums over each time bin's steps (GPU span as time); shaded = the metrics window.",
            f"The line breaks at {gaps} gap{'s' if gaps != 1 else ''} where no step started (a long step or a pause)."
            if gaps
            else "",
            note,
        ),
    )


def time_accounting(timeline: Any, *, note: str = "") -> alt.TopLevelMixin:
    """Mean GPU-busy time and host gap per step in each time bin, stacked, one bar per bin (from its
    start to its end): a host-bound engine shows a gap comparable to its GPU time. Where no step ran
    (a pause, or a step the caller left out) there is no bar, rather than the last bin's value drawn
    across the gap. Columns: t_start_s, t_end_s, busy_ms_per_step, host_gap_ms_per_step. `note` (what
    the caller left out, e.g. compile steps whose second would flatten every other bin) goes into the
    subtitle."""
    df = as_frame(timeline)
    _require(df, "time_accounting", "t_start_s", "t_end_s", "busy_ms_per_step", "host_gap_ms_per_step")
    df = df.select("t_start_s", "t_end_s", "busy_ms_per_step", "host_gap_ms_per_step").with_columns(
        t_mid_s=(pl.col("t_start_s") + pl.col("t_end_s")) / 2
    )
    busy = float(df["busy_ms_per_step"].fill_null(0).sum())
    gap = float(df["host_gap_ms_per_step"].fill_null(0).sum())
    share = f"GPU busy {busy / (busy + gap):.0%} of step time over the bins." if busy + gap > 0 else ""
    # Stacked by hand (busy from 0, the gap on top): Vega-Lite does not stack bars that span x..x2.
    b = pl.col("busy_ms_per_step").fill_null(0)
    parts = pl.concat(
        [
            df.select("t_start_s", "t_end_s", "t_mid_s", part=pl.lit("GPU busy"), ms=b, lo=pl.lit(0.0), hi=b),
            df.select(
                "t_start_s",
                "t_end_s",
                "t_mid_s",
                part=pl.lit("host gap"),
                ms=pl.col("host_gap_ms_per_step").fill_null(0),
                lo=b,
                hi=b + pl.col("host_gap_ms_per_step").fill_null(0),
            ),
        ]
    )
    return (
        alt.Chart(inline_data(parts))
        .mark_rect(opacity=0.85)
        .encode(
            x=alt.X("t_start_s:Q", title="seconds from the first step"),
            x2=alt.X2("t_end_s:Q"),
            y=alt.Y("hi:Q", title="ms per step (mean in bin)"),
            y2=alt.Y2("lo:Q"),
            color=alt.Color(
                "part:N",
                title=None,
                scale=alt.Scale(domain=["GPU busy", "host gap"], range=["#1f77b4", "#bbbbbb"]),
            ),
            tooltip=[
                alt.Tooltip("part:N"),
                alt.Tooltip("t_mid_s:Q", format=".2f", title="s"),
                alt.Tooltip("ms:Q", format=".3f"),
            ],
        )
        .properties(
            width=WIDTH,
            height=HEIGHT,
            title=_title(
                "GPU-busy vs host-gap time per step",
                "GPU busy = the step's GPU span; host gap = time to the next step's start beyond it "
                "(scheduling, Python).",
                share,
                note,
            ),
        )
    )


# -- requests and runs ----------------------------------------------------------------------------
DECADES_FOR_LOG = 10.0
"""A quantity whose largest value is at least this many times (a decade) its smallest positive one
is drawn on a log axis: on a linear one the small runs sit on the axis (8 tok/s beside 700, a 7 ms
TPOT beside 138 ms)."""


def spans_decades(values: Any, ratio: float = DECADES_FOR_LOG) -> bool:
    """Whether positive `values` span `ratio` or more (max / min); False without two positives."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    return bool(v.size >= 2 and v.max() / v.min() >= ratio)


def _group_colour(df: pl.DataFrame, field: str = "group", title: str = "group") -> alt.Color:
    """Colour by `field` with one distinct colour per value (groups.palette: no repeats)."""
    from .groups import palette

    domain = sorted({str(v) for v in df[field].to_list() if v is not None})
    return alt.Color(
        f"{field}:N",
        title=title,
        scale=alt.Scale(domain=domain, range=palette(len(domain))),
        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=600),
    )


def _with_group(df: pl.DataFrame) -> pl.DataFrame:
    """A `group` column (the run itself when the frame has none): colour keys for many runs."""
    return df if "group" in df.columns else df.with_columns(group=pl.col("run"))


def latency_cdf(latency: Any, *, clip_quantile: float = 0.99) -> alt.TopLevelMixin:
    """Empirical CDFs of TTFT, TPOT and ITL (client clock), one panel per metric, one line per run,
    coloured by the run's group (column `group`, else the run). Each panel's x axis ends at the
    `clip_quantile` of all its values (the subtitle states the clip) and is logarithmic where the
    values span decades. Columns: run, metric, value_ms, cdf; group optional."""
    df = _with_group(as_frame(latency))
    _require(df, "latency_cdf", "run", "metric", "value_ms", "cdf")
    df = df.select("run", "group", "metric", "value_ms", "cdf")
    order = [m for m in ("TTFT", "TPOT", "ITL") if m in df["metric"].unique().to_list()]
    color = _group_colour(df)
    panels = []
    clips = []
    for metric in order:
        sub = df.filter(pl.col("metric") == metric)
        values = sub["value_ms"].drop_nulls().cast(pl.Float64).to_numpy()
        positive = values[values > 0]
        hi = float(np.quantile(values, clip_quantile)) if values.size else 1.0
        log = positive.size >= 2 and spans_decades([positive.min(), hi])
        lo = float(positive.min()) if log else 0.0
        hi = max(hi, lo * 1.01, 1e-9)
        clipped = bool(values.size) and float(values.max()) > hi
        if clipped:
            clips.append(f"{metric} at {hi:,.0f} ms" if hi >= 1000 else f"{metric} at {hi:.4g} ms")
        scale = alt.Scale(type="log", domain=[lo, hi]) if log else alt.Scale(domain=[0, hi], nice=False)
        panels.append(
            alt.Chart(inline_data(sub))
            .mark_line(interpolate="step-after", clip=True, opacity=0.8)
            .encode(
                x=alt.X("value_ms:Q", title=f"{metric}, ms" + (" (log)" if log else ""), scale=scale),
                y=alt.Y(
                    "cdf:Q", title="fraction ≤ x", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])
                ),
                color=color,
                detail=alt.Detail("run:N"),
                tooltip=[
                    alt.Tooltip("run:N"),
                    alt.Tooltip("group:N"),
                    alt.Tooltip("metric:N"),
                    alt.Tooltip("value_ms:Q", format=",.2f", title="ms"),
                    alt.Tooltip("cdf:Q", format=".1%"),
                ],
            )
            .properties(width=240, height=200, title=metric)
        )
    pct = f"p{clip_quantile * 100:g}"
    return alt.hconcat(*panels).properties(
        title=_title(
            "Latency distributions (CDF)",
            "Per request, client clock, successful requests: TTFT = first token − arrival;",
            "TPOT = (E2E − TTFT) / (output tokens − 1); ITL per token from chunk timestamps. Colour = group, "
            "one line per run.",
            (
                f"x axes end at the {pct} of all runs' values, tails beyond are clipped: "
                + "; ".join(clips)
                + "."
            )
            if clips
            else f"x axes end at the {pct} of all runs' values (nothing beyond it).",
        )
    )


def throughput_vs_batch(throughput: Any) -> alt.TopLevelMixin:
    """Generated tokens per second against batch size: lines from each run's steps grouped by the
    number of requests in the step (kind = steps), large points for each run's window throughput at
    its workload batch size (kind = run), coloured by group (column `group`, else the run). Axes are
    logarithmic where the values span decades. Columns: run, kind, batch_size, window_output_throughput;
    group, steps optional."""
    df = _with_group(as_frame(throughput))
    _require(df, "throughput_vs_batch", "run", "kind", "batch_size", "window_output_throughput")
    if "steps" not in df.columns:
        df = df.with_columns(steps=pl.lit(None, pl.Int64))
    df = df.select("run", "group", "kind", "batch_size", "window_output_throughput", "steps").filter(
        pl.col("window_output_throughput") > 0
    )
    data = inline_data(df)
    log_x = spans_decades(df["batch_size"].to_list())
    log_y = spans_decades(df["window_output_throughput"].to_list())
    enc = {
        "x": alt.X(
            "batch_size:Q",
            title="batch size (requests in the step / run concurrency)" + (" (log)" if log_x else ""),
            scale=alt.Scale(type="log") if log_x else alt.Scale(zero=True),
        ),
        "y": alt.Y(
            "window_output_throughput:Q",
            title="generated tokens / s" + (" (log)" if log_y else ""),
            scale=alt.Scale(type="log") if log_y else alt.Scale(zero=True),
        ),
        "color": _group_colour(df),
        "tooltip": [
            alt.Tooltip("run:N"),
            alt.Tooltip("group:N"),
            alt.Tooltip("kind:N"),
            alt.Tooltip("batch_size:Q"),
            alt.Tooltip("window_output_throughput:Q", format=",.1f", title="tok/s"),
            alt.Tooltip("steps:Q"),
        ],
    }
    lines = (
        alt.Chart(data)
        .transform_filter("datum.kind == 'steps'")
        .mark_line(point=True, opacity=0.7)
        .encode(**enc, detail=alt.Detail("run:N"))
    )
    runs = (
        alt.Chart(data)
        .transform_filter("datum.kind == 'run'")
        .mark_point(shape="diamond", filled=True, size=160, stroke="black", strokeWidth=0.8)
        .encode(**enc)
    )
    return alt.LayerChart(
        layer=[lines, runs],
        width=WIDTH,
        height=HEIGHT,
        title=_title(
            "Throughput vs batch size",
            "Lines: Σ generated tokens / Σ step wall time over each run's steps with that many requests.",
            "◆: the run's throughput over its metrics window at its configured batch size. Colour = group.",
        ),
    )


RADAR_AXES: tuple[tuple[str, str, str, bool], ...] = (
    ("cost", "cost_usd_per_m_output_tokens", "$ / 1M output tokens", False),
    ("accuracy", "accuracy", "exact match", True),
    ("TTFT", "ttft_ms", "ms, mean", False),
    ("TPOT", "tpot_ms", "ms, mean", False),
    ("throughput", "window_output_throughput", "generated tok/s", True),
)
"""(axis, column of `frames.runs_frame`, unit, higher is better)."""


def radar_frame(
    runs: Any, axes: Sequence[tuple[str, str, str, bool]] = RADAR_AXES, *, log_decades: int | None = None
) -> tuple[pl.DataFrame, list[str]]:
    """The radar's geometry and normalised scores, and notes on what was left out.

    Score per axis = value / best for higher-is-better, best / value for lower-is-better, where best
    is over the runs drawn (so the best run scores 1). An axis no run has is drawn as "n/a"; a run
    lacking an axis that others have is left out (noted). The radius is the score, or with
    `log_decades` = d, 1 + log10(score) / d (rings one decade apart; a run d decades behind the
    best sits at the centre)."""
    df = as_frame(runs)
    notes: list[str] = []
    present = [a for a in axes if a[1] in df.columns and df[a[1]].drop_nulls().len() > 0]
    missing_axes = [a for a in axes if a not in present]
    if missing_axes:
        notes.append("n/a (no run has it): " + ", ".join(a[0] for a in missing_axes))
    keep = pl.lit(True)
    for a in present:
        keep = keep & pl.col(a[1]).is_not_null()
    dropped = df.filter(~keep)
    for row in dropped.iter_rows(named=True):
        lacks = [a[0] for a in present if row[a[1]] is None]
        notes.append(f"left out {row['run']} (no {', '.join(lacks)})")
    drawn = df.filter(keep)
    n = len(axes)
    angle = {a[0]: math.pi / 2 - 2 * math.pi * i / n for i, a in enumerate(axes)}
    rows: list[dict[str, Any]] = []
    rings = [1 - d / log_decades for d in range(log_decades)][::-1] if log_decades else (0.25, 0.5, 0.75, 1.0)
    for r in rings:
        for i, a in enumerate([*axes, axes[0]]):
            rows.append(
                {
                    "kind": "ring",
                    "series": f"ring {r}",
                    "order": i,
                    "x": r * math.cos(angle[a[0]]),
                    "y": r * math.sin(angle[a[0]]),
                }
            )
    for a in axes:
        th = angle[a[0]]
        is_present = a in present
        better = "higher" if a[3] else "lower"
        label = f"{a[0]}\n{a[2]}\n({better} is better)" if is_present else f"{a[0]}\nn/a"
        rows.append({"kind": "spoke", "series": a[0], "order": 0, "x": 0.0, "y": 0.0})
        rows.append({"kind": "spoke", "series": a[0], "order": 1, "x": math.cos(th), "y": math.sin(th)})
        rows.append(
            {
                "kind": "label",
                "series": a[0],
                "order": 0,
                "x": 1.3 * math.cos(th),
                "y": 1.2 * math.sin(th),
                "text": label,
            }
        )
    if drawn.height and present:
        best = {}
        for a in present:
            col = drawn[a[1]].cast(pl.Float64).to_numpy()
            best[a[0]] = float(col.max() if a[3] else col.min())
        for row in drawn.iter_rows(named=True):
            pts = []
            for a in present:
                v = float(row[a[1]])
                b = best[a[0]]
                ratio = (v / b if b > 0 else 1.0) if a[3] else (b / v if v > 0 else 1.0)
                score = max(0.0, min(1.0, ratio))
                radius = max(0.0, 1 + math.log10(score) / log_decades) if log_decades and score > 0 else score
                th = angle[a[0]]
                pts.append(
                    {
                        "kind": "run",
                        "series": row["run"],
                        "axis": a[0],
                        "value": v,
                        "unit": a[2],
                        "score": score,
                        "x": radius * math.cos(th),
                        "y": radius * math.sin(th),
                    }
                )
            for i, p in enumerate([*pts, pts[0]]):
                rows.append({**p, "order": i})
    frame = pl.DataFrame(
        rows,
        schema={
            "kind": pl.String,
            "series": pl.String,
            "order": pl.Int64,
            "x": pl.Float64,
            "y": pl.Float64,
            "text": pl.String,
            "axis": pl.String,
            "value": pl.Float64,
            "unit": pl.String,
            "score": pl.Float64,
        },
    )
    return frame, notes


RADAR_OVERLAY_MAX = 6
"""Above this many runs the radar becomes one small panel per run (overlaid polygons are unreadable)."""


def cap_radar(
    runs: Any,
    axes: Sequence[tuple[str, str, str, bool]] = RADAR_AXES,
    *,
    overlay_max: int = RADAR_OVERLAY_MAX,
) -> alt.TopLevelMixin:
    """CAP radar across runs: cost, accuracy, TTFT, TPOT and throughput, each scaled so the best run
    scores 1 (value / best where higher is better, best / value where lower is better). Columns of
    `frames.runs_frame`: run plus the axes' columns (see RADAR_AXES). Missing figures are handled as
    `radar_frame` says; the subtitle lists them. Up to `overlay_max` runs share one radar; more get
    one small radar each (same scale: still relative to the best of all runs)."""
    df = _with_group(as_frame(runs))
    _require(df, "cap_radar", "run")
    geometry, notes = radar_frame(df, axes)
    scores = geometry.filter(pl.col("kind") == "run")["score"].drop_nulls()
    positive = scores.filter(scores > 0).cast(pl.Float64).to_numpy()
    low = float(positive.min()) if positive.size else 1.0
    decades = min(4, max(1, math.ceil(-math.log10(low)))) if low < 0.1 else None
    if decades:
        geometry, notes = radar_frame(df, axes, log_decades=decades)
    group_of = dict(zip(df["run"].to_list(), df["group"].to_list(), strict=True))
    geometry = geometry.with_columns(group=pl.col("series").replace_strict(group_of, default=None))
    drawn = geometry.filter(pl.col("kind") == "run")["series"].unique(maintain_order=True).to_list()
    panels = len(drawn) > overlay_max
    if panels:
        # Every panel needs its own copy of the grid: facets split the data by `panel`.
        # Small panels keep the axis name only (and its "n/a").
        grid_rows = geometry.filter(pl.col("kind") != "run").with_columns(
            text=pl.when(pl.col("text").str.ends_with("n/a"))
            .then(pl.col("text").str.replace("\n", " "))
            .otherwise(pl.col("text").str.split("\n").list.first())
        )
        geometry = pl.concat(
            [grid_rows.with_columns(panel=pl.lit(run)) for run in drawn]
            + [geometry.filter(pl.col("kind") == "run").with_columns(panel=pl.col("series"))]
        )
    data = inline_data(geometry)
    dom = alt.Scale(domain=[-1.6, 1.6])
    x = alt.X("x:Q", scale=dom, axis=None)
    y = alt.Y("y:Q", scale=dom, axis=None)
    grid = (
        alt.Chart()
        .transform_filter("datum.kind == 'ring' || datum.kind == 'spoke'")
        .mark_line(color="#cccccc", strokeWidth=1)
        .encode(x=x, y=y, detail=alt.Detail("series:N"), order=alt.Order("order:Q"))
    )
    labels = (
        alt.Chart()
        .transform_filter("datum.kind == 'label'")
        .mark_text(fontSize=9 if panels else 11, color="#333", lineBreak="\n")
        .encode(x=x, y=y, text=alt.Text("text:N"))
    )
    colour_frame = geometry.filter(pl.col("kind") == "run")
    color = (
        _group_colour(colour_frame) if panels else _group_colour(colour_frame, field="series", title="run")
    )
    polys = (
        alt.Chart()
        .transform_filter("datum.kind == 'run'")
        .mark_line(strokeWidth=2, opacity=0.85, point=True)
        .encode(
            x=x,
            y=y,
            color=color,
            order=alt.Order("order:Q"),
            tooltip=[
                alt.Tooltip("series:N", title="run"),
                alt.Tooltip("group:N"),
                alt.Tooltip("axis:N"),
                alt.Tooltip("value:Q", format=",.4g"),
                alt.Tooltip("unit:N"),
                alt.Tooltip("score:Q", format=".2f", title="score (best = 1)"),
            ],
        )
    )
    scale_text = (
        f"rings one decade apart (log scale: the values span more than 10×; centre = {10**decades:g}× behind)."
        if decades
        else "rings at 0.25 steps (linear)."
    )
    title = _title(
        "CAP radar across runs",
        "Scale, shared by every panel: each axis relative to the best run shown (= 1, outer ring): value / best",
        "where higher is better, best / value where lower is better; " + scale_text,
        "Colour = group." if panels else "",
        "; ".join(notes),
    )
    if panels:
        return (
            alt.layer(grid, labels, polys, data=data)
            .properties(width=200, height=200, view=alt.ViewBackground(stroke=None))
            .facet(
                facet=alt.Facet(
                    "panel:N",
                    sort=drawn,
                    title=None,
                    # Long labels wrap at their " · " separators instead of being cut.
                    header=alt.Header(labelExpr="split(datum.label, ' · ')", labelLimit=0, labelFontSize=10),
                ),
                columns=4,
            )
            .properties(title=title)
        )
    return alt.layer(grid, labels, polys, data=data).properties(
        width=460, height=460, view=alt.ViewBackground(stroke=None), title=title
    )


def pareto_points(runs: Any, y: str = "cost") -> tuple[pl.DataFrame, list[str], str, str]:
    """Runs with throughput and the y figure (cost or TPOT), `on_front` marking the Pareto-optimal
    ones (no other run has both higher throughput and lower y). Returns the frame, notes on runs
    left out, the y column and its axis title."""
    df = as_frame(runs)
    ycol, ytitle = {
        "cost": ("cost_usd_per_m_output_tokens", "$ / 1M output tokens"),
        "tpot": ("tpot_ms", "TPOT, ms (mean)"),
    }[y]
    notes = []
    has = df.filter(pl.col("window_output_throughput").is_not_null() & pl.col(ycol).is_not_null())
    for row in df.filter(~pl.col("run").is_in(has["run"].implode())).iter_rows(named=True):
        notes.append(f"left out {row['run']} (no {'cost' if y == 'cost' else 'TPOT'} or throughput)")
    lo, hi = ("cost_band_low", "cost_band_high") if y == "cost" else (ycol, ycol)
    pts = has.select(
        "run",
        x=pl.col("window_output_throughput").cast(pl.Float64),
        y=pl.col(ycol).cast(pl.Float64),
        y_low=(pl.col(lo) if lo in has.columns else pl.col(ycol)).cast(pl.Float64),
        y_high=(pl.col(hi) if hi in has.columns else pl.col(ycol)).cast(pl.Float64),
    )
    pts = pts.sort(["x", "y"], descending=[True, False])
    best = math.inf
    front = []
    for yv in pts["y"].to_list():
        front.append(yv < best)
        best = min(best, yv)
    return pts.with_columns(on_front=pl.Series(front, dtype=pl.Boolean)), notes, ycol, ytitle


def pareto_front(runs: Any, y: str = "cost") -> alt.TopLevelMixin:
    """Cost (or TPOT, `y="tpot"`) against throughput across runs, with the Pareto front (higher
    throughput and lower cost/TPOT are better) drawn through the runs nobody beats on both.
    Columns of `frames.runs_frame`: run, window_output_throughput, and cost_usd_per_m_output_tokens or
    tpot_ms."""
    df = _with_group(as_frame(runs))
    _require(df, "pareto_front", "run", "window_output_throughput")
    pts, notes, _ycol, ytitle = pareto_points(df, y)
    group_of = dict(zip(df["run"].to_list(), df["group"].to_list(), strict=True))
    # Costs and times are never negative: a band's low end below 0 (a wide sensitivity band) is
    # drawn from 0, and the axes start at 0 (or are logarithmic when the values span decades).
    pts = pts.with_columns(
        group=pl.col("run").replace_strict(group_of, default=None),
        y_low=pl.col("y_low").clip(lower_bound=0.0),
    )
    data = inline_data(pts)
    log_x = spans_decades(pts["x"].to_list())
    log_y = spans_decades([*pts["y"].to_list(), *pts["y_high"].to_list()])

    def scale(log: bool) -> alt.Scale:
        # nice=False: a "nice" log domain rounds out to whole decades, doubling the empty axis.
        # padding (pixels) keeps the end points whole; on a log scale it cannot reach 0 or below.
        return alt.Scale(type="log", nice=False, padding=12) if log else alt.Scale(zero=True, domainMin=0)

    enc = {
        "x": alt.X(
            "x:Q", title="generated tokens / s (window)" + (" (log)" if log_x else ""), scale=scale(log_x)
        ),
        "y": alt.Y("y:Q", title=ytitle + (" (log)" if log_y else ""), scale=scale(log_y)),
        "color": _group_colour(pts),
    }
    band = (
        alt.Chart(data)
        .transform_filter(
            "datum.y_low > 0 && datum.y_high > 0" if log_y else "datum.y_low != null && datum.y_high != null"
        )
        .mark_rule(opacity=0.45)
        .encode(x=enc["x"], y=alt.Y("y_low:Q"), y2=alt.Y2("y_high:Q"), color=enc["color"])
    )
    front = (
        alt.Chart(data)
        .transform_filter("datum.on_front")
        .mark_line(color="#d62728", strokeDash=[5, 3])
        .encode(x=enc["x"], y=enc["y"], order=alt.Order("x:Q"))
    )
    points = (
        alt.Chart(data)
        .mark_point(filled=True, size=90)
        .encode(
            **enc,
            shape=alt.Shape(
                "on_front:N",
                title="on the front",
                scale=alt.Scale(domain=[True, False], range=["diamond", "circle"]),
            ),
            tooltip=[
                alt.Tooltip("run:N"),
                alt.Tooltip("group:N"),
                alt.Tooltip("x:Q", format=",.1f", title="tok/s"),
                alt.Tooltip("y:Q", format=",.4g", title=ytitle),
                alt.Tooltip("on_front:N", title="on the front"),
            ],
        )
    )
    what = "cost" if y == "cost" else "TPOT"
    return alt.LayerChart(
        layer=[band, front, points],
        width=WIDTH,
        height=HEIGHT,
        title=_title(
            f"{what.capitalize() if what == 'cost' else what}–throughput Pareto front",
            f"Dashed: runs no other run beats on both throughput (higher) and {what} (lower)."
            + (" Bars: the cost model's low–high band." if y == "cost" else ""),
            "; ".join(notes),
        ),
    )


def whatif_projection(
    whatif: Any, metric: str = "window_output_throughput", title: str = ""
) -> alt.TopLevelMixin:
    """Each run's `metric` measured on its own GPU and projected onto other GPUs (model =
    projection), with the two baselines as ticks. Columns: run, gpu, model, `metric`
    (frames.whatif_frame)."""
    df = as_frame(whatif)
    _require(df, "whatif_projection", "run", "gpu", "model", metric)
    df = df.filter(pl.col(metric).is_not_null() & (pl.col(metric) > 0)).select("run", "gpu", "model", metric)
    data = inline_data(df)
    log = spans_decades(df[metric].to_list())
    x_scale = alt.Scale(type="log") if log else alt.Scale(zero=True)
    y = alt.Y("run:N", title=None, axis=alt.Axis(labelLimit=420))
    gpu_domain = sorted(df["gpu"].unique().to_list())
    offset = alt.YOffset("gpu:N", scale=alt.Scale(domain=gpu_domain))
    from .groups import palette

    color = alt.Color(
        "gpu:N",
        title="GPU",
        scale=alt.Scale(domain=gpu_domain, range=palette(len(gpu_domain))),
        legend=alt.Legend(orient="bottom"),
    )
    tooltip = [
        alt.Tooltip("run:N"),
        alt.Tooltip("gpu:N"),
        alt.Tooltip("model:N"),
        alt.Tooltip(f"{metric}:Q", format=",.4g"),
    ]
    base = alt.Chart(data).transform_filter("datum.model == 'projection' || datum.model == 'measured'")
    # A bar's length from 0 means nothing on a log axis: there each value is a dot, without a stack.
    marked = base.mark_circle(size=70, opacity=1.0) if log else base.mark_bar()
    bars = marked.encode(
        x=alt.X(
            f"{metric}:Q", title=(title or metric) + (" (log)" if log else ""), scale=x_scale, stack=None
        ),
        y=y,
        yOffset=offset,
        color=color,
        opacity=alt.OpacityValue(0.6, condition={"test": "datum.model == 'measured'", "value": 1.0}),
        tooltip=tooltip,
    )
    ticks = [
        alt.Chart(data)
        .transform_filter(f"datum.model == '{model}'")
        .mark_tick(thickness=2, color=tick_color)
        .encode(x=alt.X(f"{metric}:Q", scale=x_scale), y=y, yOffset=offset, tooltip=tooltip)
        for model, tick_color in (("no_change", "black"), ("bandwidth_ratio", "#888888"))
    ]
    runs = df["run"].n_unique()
    gpus = max(df["gpu"].n_unique(), 1)
    return alt.LayerChart(
        layer=[bars, *ticks],
        width=WIDTH,
        height=max(HEIGHT // 2, 14 * runs * gpus),
        title=_title(
            title or metric,
            ("Solid dot" if log else "Solid bar")
            + ": measured on the run's own GPU; light: projected (calibrated roofline, "
            "docs/whatif.md).",
            "Baselines: black tick = no change, grey tick = bandwidth ratio."
            + (" Log x axis: the values span decades." if log else ""),
        ),
    )
