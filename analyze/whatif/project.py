"""What-if: re-time every recorded step on another GPU and recompute the run's metrics there.

1. Calibrate (per phase) the roofline model of `roofline.py` on the measured steps: per-GPU bytes
   and FLOPs of each step (the analyzer's `step_metrics`) against its GPU time.
2. Project each step's GPU time on the target GPU with the same efficiencies and overhead; its host
   gap (wall time minus GPU time) is kept.
3. Recompute on the projected timeline: per-phase step times, S-MBU / S-MFU against the target's
   peaks, window throughput, request latencies (every request timestamp is carried over by a
   piecewise-linear time warp built from the step boundaries) and cost.

Two naive baselines are computed the same way, for validation: `no_change` (the measured times)
and `bandwidth_ratio` (a step that is memory-bound on the source GPU's nominal roofline takes
t · BW_src / BW_tgt, a compute-bound one t · P_src / P_tgt).

Assumptions (also printed in every result): the same batch composition and schedule (the engine
would form the same batches in the same order), the same routing, the same kernels (no new
kernels or fusions on the target), the same host (host gaps unchanged), per-GPU bytes and FLOPs
unchanged (same parallel layout and GPU count), and efficiencies that carry over between GPUs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..analysis import RUN_SETTINGS_COLUMNS, RunContext, run_settings_row
from ..cost import CostSettings
from ..cost.section import energy_at_power, window_cost
from ..errors import InputError
from ..metrics.requests import request_metrics
from ..metrics.steps import quantile_rows, summary_rows
from ..metrics.window import COUNTED_SQL, IN_WINDOW_SQL
from ..pipeline import Analysis
from ..specs import GpuSpec
from .roofline import MIN_EFFICIENCY, RooflineFit, fit_roofline, fit_with_floor

WHATIF_SCHEMA = "moecap.whatif/1"
MODELS = ("projection", "no_change", "bandwidth_ratio")
FIT_PHASES = ("prefill", "decode", "mixed")
MIN_PHASE_STEPS = 10
"""A phase with fewer measured steps uses a pooled fit (prefill and mixed: PREFILL_POOL), else the fit over
all steps."""
PREFILL_LIKE = ("prefill", "mixed")
PREFILL_POOL = "prefill+mixed"
"""Prefill and mixed steps fitted together when one of them has too few steps for its own fit: both
compute prompt tokens outside the decode CUDA graphs (vLLM runs them piecewise or eager, with a per-step
cost of tens of ms the decode fit knows nothing about), so a decode-dominated fit over all steps would
predict a 1024-token prefill at a tenth of its time."""

ASSUMPTIONS = (
    "same batch composition and schedule: the engine forms the same batches in the same order",
    "same routing: the same experts receive the same tokens",
    "same kernels: no new kernels, fusions or CUDA graphs on the target",
    "same host: each step's host gap (wall time minus GPU time) is unchanged",
    "same parallel layout and GPU count: per-GPU bytes and FLOPs are unchanged",
    "the efficiencies (fraction of peak bandwidth / FLOPs) and the per-step overhead fitted on the "
    "measured run carry over to the target GPU, per phase",
)

_STEP_COLUMNS = ", ".join(
    f"s.{c}"
    for c in [
        "dp",
        "pp",
        "step",
        "phase",
        "is_draft",
        "num_reqs",
        "num_tokens",
        "logit_rows",
        "active_experts",
        "time_s",
        "wall_s",
        "host_gap_s",
        "gpus",
        "bytes_total",
        "bytes_routed_experts",
        "bytes_kv_read",
        "flops_total",
        "t_start_ns",
        "t_end_ns",
    ]
)


@dataclass(frozen=True)
class CalibrationSpec:
    """Which measured steps the roofline is fitted on.

    Default: jointly, the steps of every run given with the projected run that shares its model, GPU and
    engine configuration (`same_config`): a sweep folder's runs at several batch sizes identify the
    per-step overhead and η_bw that one batch size cannot. runs: calibrate on these runs instead (e.g. a
    sweep on the same GPU, `--calibrate-on`), jointly, using those of the projected run's model served by
    the same engine on the same GPU. per_run: each run on its own steps only. batch_sizes: only steps
    with this many requests, so the other batch sizes are held out and the comparison tells them apart."""

    runs: Analysis | None = None
    batch_sizes: frozenset[int] | None = None
    per_run: bool = False


Frames = dict[tuple[int, str], pl.DataFrame]
"""Step frames (`step_frame`) by (id of their Analysis, run id): built once per call of `whatif` /
`compare_runs`, shared by every run's calibration (analyses of different windows stay apart)."""

SIZING_ARGS = frozenset(
    {
        "model",
        "model_path",
        "served_model_name",
        "tokenizer",
        "tokenizer_path",
        "max_num_seqs",
        "max_requests_per_batch",
        "max_running_requests",
        "pp_max_micro_batch_size",
        "num_blocks",
        "num_gpu_blocks",
        "num_gpu_blocks_override",
        "gpu_memory_utilization",
        "mem_fraction_static",
    }
)
"""Engine arguments that do not make two runs' steps different kinds of steps: paths (vLLM's `model` /
`tokenizer`, SGLang's `model_path` / `tokenizer_path`, which name the per-engine scratch copy of a
random-weight config: an SGLang sweep starts one engine per point), the request-count limit a
concurrency sweep varies (with SGLang's `pp_max_micro_batch_size`, which SGLang derives from it at
start: seen on the real H100 sweep, 2026-12-07), and KV-cache sizing (blocks, memory fractions). Runs that
differ only in these calibrate jointly by default; any other difference (CUDA graphs on / off, chunked
prefill, dtype, version) keeps them apart."""


def same_config(a: RunContext, b: RunContext) -> bool:
    """Same model, GPU and engine configuration (name, version, arguments but SIZING_ARGS)."""
    ma, mb = a.run.metadata, b.run.metadata
    if (
        ma.model.id != mb.model.id
        or ma.engine.name != mb.engine.name
        or ma.engine.version != mb.engine.version
    ):
        return False
    if a.gpu is None or b.gpu is None or a.gpu.name != b.gpu.name:
        return False
    args_a, args_b = ma.engine.args or {}, mb.engine.args or {}
    keys = (set(args_a) | set(args_b)) - SIZING_ARGS
    return all(args_a.get(k) == args_b.get(k) for k in keys)


@dataclass
class Calibration:
    """Per-phase fits of one run on its measured GPU."""

    gpu: GpuSpec
    peak_dtype: str
    peak_flops: float
    fits: dict[str, RooflineFit]
    """"all" plus every phase with enough steps."""
    notes: list[str] = field(default_factory=list)
    calibrated_on: dict[str, Any] = field(default_factory=dict)
    """The runs, batch sizes and step count the fits used."""

    def fit_for(self, phase: str) -> RooflineFit:
        return self.fits[self.fit_name(phase)]

    def fit_name(self, phase: str) -> str:
        """The fit a phase uses: its own, else (prefill, mixed) the pooled prefill+mixed fit, else all."""
        if phase in self.fits:
            return phase
        if phase in PREFILL_LIKE and PREFILL_POOL in self.fits:
            return PREFILL_POOL
        return "all"

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "peak_dtype": self.peak_dtype,
            "bandwidth_bytes_per_s": self.gpu.memory_bandwidth,
            "peak_flops": self.peak_flops,
            "fits": {k: v.as_dict() for k, v in self.fits.items()},
            "phase_uses": {p: self.fit_name(p) for p in FIT_PHASES},
            "calibrated_on": self.calibrated_on,
            "notes": self.notes,
        }


def peak_flops_of(gpu: GpuSpec, dtype: str) -> float:
    return gpu.peak_flops(dtype, fallback="bf16")


def step_frame(analysis: Analysis, ctx: RunContext) -> pl.DataFrame:
    """The run's steps from `step_metrics`, with `in_window` (the analysis window), `counted` (what
    every run-level step metric counts) and per-GPU bytes / FLOPs, ordered by stream and step."""
    df = analysis.db.con.sql(
        f"""SELECT {_STEP_COLUMNS}, coalesce({IN_WINDOW_SQL}, false) AS in_window,
                   CASE WHEN s.time_source = 'gpu' AND s.span_start_ns > s.t_start_ns
                        THEN (s.span_start_ns - s.t_start_ns) / 1e9 ELSE 0.0 END AS head_s,
                   CASE WHEN s.time_source = 'gpu' AND s.t_end_ns < s.span_end_ns - 0.1 * (s.span_end_ns - s.span_start_ns)
                        THEN (s.t_end_ns - s.t_start_ns) / 1e9 END AS issue_s,
                   coalesce({COUNTED_SQL}, false) AS counted
            FROM step_metrics s JOIN run_windows w USING (run_id)
            WHERE s.run_id = ? ORDER BY s.dp, s.pp, s.step""",
        params=[ctx.run.run_id],
    ).pl()
    df = df.with_columns(
        bytes_per_gpu=pl.col("bytes_total") / pl.col("gpus"),
        flops_per_gpu=pl.col("flops_total") / pl.col("gpus"),
    )
    keys = ("dp", "pp", "step")
    slow = compile_steps(analysis, ctx).cast({k: df.schema[k] for k in keys})
    df = df.join(slow, on=list(keys), how="left")
    graph_max = cuda_graph_max_tokens(ctx)
    return df.with_columns(
        compile_step=pl.col("typical_s").is_not_null(),
        graph_max_tokens=pl.lit(graph_max, pl.Int64),
    )


def cuda_graph_max_tokens(ctx: RunContext) -> int | None:
    """The largest batch (tokens) of any phase the engine replays as CUDA graphs, from its recorded
    arguments: vLLM's `cudagraph_capture_sizes` (v1 captures piecewise graphs for prefill and mixed
    batches of up to that many tokens too). None when eager, not recorded, or an engine whose graphs
    cover decode only (SGLang's `cuda_graph_max_bs` counts decode requests; its prefills run eager)."""
    args = ctx.run.metadata.engine.args or {}
    if args.get("enforce_eager") or str(args.get("cudagraph_mode", "")).upper() == "NONE":
        return None
    sizes = args.get("cudagraph_capture_sizes")
    if isinstance(sizes, list) and sizes and all(isinstance(x, int) for x in sizes):
        return max(sizes)
    return None


def fit_groups(df: pl.DataFrame) -> np.ndarray:
    """The fit each step belongs to: its phase, except that a prefill or mixed step small enough to run
    inside the engine's CUDA graphs (num_tokens <= `graph_max_tokens`) is timed like a decode step: the
    same graph replay, without the tens of ms of piecewise / eager launches of a large prefill."""
    phase = pl.col("phase").cast(pl.String)
    if "graph_max_tokens" not in df.columns:
        return df.select(phase)["phase"].to_numpy()
    graphed = phase.is_in(PREFILL_LIKE) & (pl.col("num_tokens") <= pl.col("graph_max_tokens")).fill_null(
        False
    )
    return df.select(pl.when(graphed).then(pl.lit("decode")).otherwise(phase).alias("g"))["g"].to_numpy()


def compile_steps(analysis: Analysis, ctx: RunContext) -> pl.DataFrame:
    """The run's compile / JIT steps by `check`'s rule (analyze/slow_steps.py): dp, pp, step and the
    time a step of that phase and size typically takes (`typical_s`, the rule's own estimate)."""
    from ..slow_steps import slow_steps

    frame = analysis.db.con.sql(
        """SELECT dp, pp, tp, step, phase, num_tokens, is_draft, gpu_start_ns, gpu_end_ns, t_start_ns, t_end_ns
           FROM steps WHERE run_id = ?""",
        params=[ctx.run.run_id],
    ).pl()
    rows = []
    for s in slow_steps(frame):
        rows.append(
            {"dp": s.dp, "pp": s.pp, "step": s.step, "typical_s": s.typical_ms / 1e3, "slow_rule": s.rule}
        )
    schema = {
        "dp": pl.Int64,
        "pp": pl.Int64,
        "step": pl.Int64,
        "typical_s": pl.Float64,
        "slow_rule": pl.String,
    }
    return (
        pl.DataFrame(rows, schema=schema)
        .group_by("dp", "pp", "step")
        .agg(pl.col("typical_s").max(), pl.col("slow_rule").first())
    )


def warm_times(df: pl.DataFrame) -> np.ndarray:
    """Measured GPU time per step with each compile / JIT step's time replaced by its phase's typical
    time (`compile_steps`): compilation is host CPU work done once, no GPU model predicts it, and a warm
    run on the target does not repeat it. Every projected view (the baselines too) starts from these."""
    t = df["time_s"].to_numpy().astype(np.float64)
    if "typical_s" not in df.columns:  # a frame not from step_frame: no compile steps marked
        return t
    typical = df["typical_s"].to_numpy().astype(np.float64)
    hit = np.isfinite(typical) & (typical < t)
    return np.where(hit, typical, t)


def run_settings(ctx: RunContext) -> dict[str, Any]:
    """The run's `run_settings` row as a dict (what `view_metrics` needs besides the steps)."""
    return dict(zip([c for c, _ in RUN_SETTINGS_COLUMNS], run_settings_row(ctx), strict=True))


def _fittable(df: pl.DataFrame) -> pl.DataFrame:
    """Steps a roofline can be fitted on: not drafts, not compile / JIT steps, with time, bytes, FLOPs."""
    if "compile_step" not in df.columns:
        df = df.with_columns(compile_step=pl.lit(False))
    return df.filter(
        ~pl.col("is_draft")
        & ~pl.col("compile_step")
        & (pl.col("time_s") > 0)
        & pl.col("bytes_per_gpu").is_finite()
        & pl.col("flops_per_gpu").is_finite()
        & (pl.col("bytes_per_gpu") > 0)
        & (pl.col("flops_per_gpu") > 0)
    )


@functools.cache
def prior_table() -> dict[str, Any]:
    """The bundled priors (data/priors.yaml): {name: {value, source}}."""
    import yaml

    text = resources.files("moecap.analyze.whatif.data").joinpath("priors.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _priors(gpu: GpuSpec, peak: float, dtype: str) -> tuple[float, float, str]:
    """Priors for an efficiency the data cannot identify (data/priors.yaml): η_bw 0.85 (achievable HBM
    bandwidth); η_f the GPU table's measured matmul ceiling (mamf_*) over its dense peak, else 0.8."""
    table = prior_table()
    bw = float(table["eta_bw"]["value"])
    key = "mamf_fp8_tflops" if dtype == "fp8" else "mamf_bf16_tflops"
    mamf = gpu.extra.get(key)
    if isinstance(mamf, (int, float)) and mamf > 0 and peak > 0:
        return bw, min(1.0, mamf * 1e12 / peak), f"FLOP prior = {key} / dense peak of {gpu.name}"
    fl = float(table["eta_flops"]["value"])
    return bw, fl, f"FLOP prior = {fl:g} (the GPU table has no measured matmul ceiling)"


def calibrate(df: pl.DataFrame, ctx: RunContext) -> Calibration:
    """Fit the roofline model per phase (and over all steps) on the measured run."""
    if ctx.gpu is None:
        raise InputError(
            f"run {ctx.run.run_id}: no GPU spec for the measured run ({ctx.gpu_error}); pass --source-gpu"
        )
    peak = peak_flops_of(ctx.gpu, ctx.peak_dtype)
    bw_prior, fl_prior, prior_note = _priors(ctx.gpu, peak, ctx.peak_dtype)
    usable = _fittable(df).with_columns(fit_group=pl.Series(fit_groups(_fittable(df)), dtype=pl.String))
    if usable.height < 3:
        missing = df.filter(~pl.col("bytes_total").is_finite()).height
        why = f" ({missing} steps lack bytes: no expert counts)" if missing else ""
        raise InputError(
            f"run {ctx.run.run_id}: too few steps with bytes, FLOPs and a GPU time to calibrate "
            f"the roofline ({usable.height}){why}"
        )

    def fit(part: pl.DataFrame) -> RooflineFit:
        return fit_roofline(
            part["bytes_per_gpu"].to_numpy(),
            part["flops_per_gpu"].to_numpy(),
            part["time_s"].to_numpy(),
            bandwidth=ctx.gpu.memory_bandwidth,  # type: ignore[union-attr]
            peak_flops=peak,
            eta_bw_prior=bw_prior,
            eta_flops_prior=fl_prior,
        )

    def floored(part: pl.DataFrame) -> RooflineFit:
        # Prefill-like steps outside the CUDA graphs: the host's issue time floors the span (fit_with_floor),
        # the GPU's fixed cost per step is the decode steps' when these steps cannot tell it from the slope.
        if "head_s" not in part.columns:
            return fit(part)
        dec = fits.get("decode")
        return fit_with_floor(
            part["bytes_per_gpu"].to_numpy(),
            part["flops_per_gpu"].to_numpy(),
            part["time_s"].to_numpy(),
            part["head_s"].to_numpy(),
            part["issue_s"].to_numpy() if "issue_s" in part.columns else None,
            bandwidth=ctx.gpu.memory_bandwidth,  # type: ignore[union-attr]
            peak_flops=peak,
            eta_bw_prior=bw_prior,
            eta_flops_prior=fl_prior,
            overhead_prior=dec.overhead_s if dec is not None else None,
        )

    fits = {"all": fit(usable)}
    notes = []
    short = []
    for phase in ("decode", *[p for p in FIT_PHASES if p != "decode"]):
        part = usable.filter(pl.col("fit_group") == phase)
        if part.height >= MIN_PHASE_STEPS:
            fits[phase] = floored(part) if phase in PREFILL_LIKE else fit(part)
        elif part.height:
            short.append((phase, part.height))
    pool = usable.filter(pl.col("fit_group").is_in(PREFILL_LIKE))
    if any(phase in PREFILL_LIKE for phase, _ in short) and pool.height >= 3:
        fits[PREFILL_POOL] = floored(pool)
    for phase, n in short:
        used = PREFILL_POOL if phase in PREFILL_LIKE and PREFILL_POOL in fits else "all"
        notes.append(
            f"{phase}: {n} step(s), fewer than {MIN_PHASE_STEPS}; the fit over "
            + ("prefill and mixed steps" if used == PREFILL_POOL else "all steps")
            + " is used"
        )
    for which, sym, sd_key, prior in (
        ("bandwidth", "η_bw", "eta_bw_data_sd", bw_prior),
        ("FLOP", "η_f", "eta_flops_data_sd", fl_prior),
    ):
        pinned = {name: getattr(f, sd_key) for name, f in fits.items() if getattr(f, sd_key) is not None}
        if pinned:
            alone = ", ".join(
                f"{name} {'nothing' if math.isinf(v) else f'±{v * 100:.0f} %'}" for name, v in pinned.items()
            )
            notes.append(
                f"{which} efficiency not identified by the steps of fit(s) {', '.join(pinned)} (the data alone pin "
                f"{sym} to: {alone}; steps that move about the same {'bytes' if sym == 'η_bw' else 'FLOPs'} make "
                f"it collinear with the per-step overhead): prior {sym} = {prior:.3g} used "
                + (
                    "(achievable HBM bandwidth, analyze/whatif/data/priors.yaml)"
                    if sym == "η_bw"
                    else f"({prior_note})"
                )
                + "; calibrate on several batch sizes (--calibrate-on a sweep) to identify it"
            )
    for which, bound, floor in (
        ("FLOP", "eta_flops_bound", "eta_flops_below_floor"),
        ("bandwidth", "eta_bw_bound", "eta_bw_below_floor"),
    ):
        unidentified = [name for name, f in fits.items() if getattr(f, bound) is not None]
        if unidentified:
            side = "memory" if which == "FLOP" else "compute"
            used_etas = {
                round(f.eta_flops if which == "FLOP" else f.eta_bw, 3)
                for n, f in fits.items()
                if n in unidentified
            }
            notes.append(
                f"{which} efficiency not identified in fit(s) {', '.join(unidentified)} (every step {side}-bound); "
                f"used {', '.join(map(str, sorted(used_etas)))}, the larger of the bound the data implies and the prior"
                + (f" ({prior_note})" if which == "FLOP" else f" (prior {bw_prior:g})")
            )
        low = {name: getattr(f, floor) for name, f in fits.items() if getattr(f, floor) is not None}
        if low:
            fitted = ", ".join(f"{name} {v:.3g}" for name, v in low.items())
            notes.append(
                f"{which} efficiency fitted below the floor {MIN_EFFICIENCY:g} ({fitted}): {which.lower()}s do not "
                "limit these steps (e.g. a launch-bound engine); the prior was used and the rest of the step time "
                "is treated as per-step overhead that does not scale with the GPU"
            )
    for name, f in fits.items():
        if f.host_floor_s is not None:
            notes.append(
                f"{name}: host floor {f.host_floor_s * 1e3:.3g} ms — outside the CUDA graphs the host issues each "
                f"kernel, and a step the GPU starts with its host spans at least that ({f.host_paced} of "
                f"{f.n_steps} calibration steps were paced by it); kept on another GPU, as host time is"
            )
    for name, f in fits.items():
        if f.eta_bw > 1 or f.eta_flops > 1:
            notes.append(
                f"{name}: fitted efficiency above 1 (η_bw {f.eta_bw:.3g}, η_f {f.eta_flops:.3g}): the byte or "
                "FLOP model over-counts what the kernels really move or compute"
            )
    return Calibration(ctx.gpu, ctx.peak_dtype, peak, fits, notes)


def calibration_frame(
    analysis: Analysis,
    ctx: RunContext,
    df: pl.DataFrame,
    spec: CalibrationSpec | None,
    frames: Frames | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The steps to fit `ctx`'s roofline on (see CalibrationSpec), and a description of them for the
    output. `frames`: step frames already built (reused, and filled)."""
    frames = {} if frames is None else frames
    frames.setdefault((id(analysis), ctx.run.run_id), df)

    def frame(a: Analysis, c: RunContext) -> pl.DataFrame:
        key = (id(a), c.run.run_id)
        if key not in frames:
            frames[key] = step_frame(a, c)
        return frames[key]

    runs = [ctx.run.run_id]
    spec = spec or CalibrationSpec()
    if spec.runs is None and not spec.per_run:
        same = [c for c in analysis.contexts if c.run.run_id == ctx.run.run_id or same_config(c, ctx)]
        if len(same) > 1:
            df = pl.concat([frame(analysis, c) for c in same], how="vertical_relaxed")
            runs = [c.run.run_id for c in same]
    elif spec.runs is not None:
        gpu = ctx.gpu.name if ctx.gpu is not None else None
        same = [
            c
            for c in spec.runs.contexts
            if c.run.metadata.model.id == ctx.run.metadata.model.id
            and c.run.metadata.engine.name == ctx.run.metadata.engine.name
            and c.gpu is not None
            and c.gpu.name == gpu
        ]
        if not same:
            raise InputError(
                f"run {ctx.run.run_id}: --calibrate-on holds no run of model {ctx.run.metadata.model.id} "
                f"served by {ctx.run.metadata.engine.name} measured on {gpu}"
            )
        df = pl.concat([frame(spec.runs, c) for c in same], how="vertical_relaxed")
        runs = [c.run.run_id for c in same]
    sizes = sorted(spec.batch_sizes) if spec.batch_sizes else None
    if sizes is not None:
        df = df.filter(pl.col("num_reqs").is_in(sizes))
        if df.height == 0:
            raise InputError(
                f"run {ctx.run.run_id}: no step with {', '.join(map(str, sizes))} requests to calibrate on "
                "(--calibrate-batch-sizes)"
            )
    return df, {"runs": runs, "batch_sizes": sizes, "steps": df.height}


# -- projections -----------------------------------------------------------------------------------
def project_times(df: pl.DataFrame, cal: Calibration, target: GpuSpec, model: str) -> np.ndarray:
    """Per-step GPU time (s) on `target` under `model` (projection | no_change | bandwidth_ratio).

    projection: t_i + R_tgt(i) − R_src(i), R = the phase fit's roofline part max(B/(BW·η_bw),
    F/(P·η_f)); the fitted overhead and each step's residual are kept. Steps that cannot be
    projected (no bytes, no GPU time) keep their measured time. Every model starts from `warm_times`
    (compile / JIT steps at their phase's typical time)."""
    t = warm_times(df)
    B = df["bytes_per_gpu"].to_numpy().astype(np.float64)
    F = df["flops_per_gpu"].to_numpy().astype(np.float64)
    ok = np.isfinite(B) & np.isfinite(F) & (t > 0)
    tgt_peak = peak_flops_of(target, cal.peak_dtype)
    out = t.copy()
    if model == "no_change":
        return out
    if model == "bandwidth_ratio":
        memory_bound = B / cal.gpu.memory_bandwidth >= F / cal.peak_flops
        scale = np.where(
            memory_bound, cal.gpu.memory_bandwidth / target.memory_bandwidth, cal.peak_flops / tgt_peak
        )
        return np.where(ok, t * scale, t)
    if model != "projection":
        raise ValueError(f"unknown what-if model {model!r}")
    # Each step keeps its own residual (measured − model: warm-up, graph capture, GC pauses, noise):
    # only the roofline part the fit attributes to the GPU is swapped for the target's.
    phases = fit_groups(df)
    for phase in np.unique(phases):
        sel = ok & (phases == phase)
        if not sel.any():
            continue
        fit = cal.fit_for(str(phase))
        src = fit.roofline_time(B[sel], F[sel], cal.gpu.memory_bandwidth, cal.peak_flops)
        dst = fit.roofline_time(B[sel], F[sel], target.memory_bandwidth, tgt_peak)
        shifted = t[sel] + (dst - src)
        # A step measured faster than its own roofline part (model over-estimate): scale it instead.
        moved = np.where(shifted > 0, shifted, t[sel] * dst / src)
        # Host floor (steps outside the CUDA graphs, fit_with_floor): a step the host paced keeps its span
        # unless the target's GPU work exceeds it; a GPU-paced one moves, down to its floor (never above
        # its measured span: a faster GPU does not slow a step).
        floor = fit.floor_time(_heads(df)[sel], int(sel.sum()))
        paced = floor > src + fit.overhead_s
        out[sel] = np.where(
            paced, np.maximum(t[sel], dst + fit.overhead_s), np.maximum(moved, np.minimum(floor, t[sel]))
        )
    return out


def _heads(df: pl.DataFrame) -> np.ndarray:
    """Per step, how long the GPU was still busy with earlier steps when its host work began (s; 0 when
    not recorded): what a host floor is reduced by (fit_with_floor)."""
    if "head_s" not in df.columns:
        return np.zeros(df.height)
    return np.nan_to_num(df["head_s"].to_numpy().astype(np.float64))


def model_times(df: pl.DataFrame, cal: Calibration, gpu: GpuSpec) -> np.ndarray:
    """Per-step GPU time (s) on `gpu` from the phase fits alone (no step keeps its measured residual):
    what the calibration predicts for steps it never saw, e.g. a batch size it was not fitted on.
    Steps without bytes and idle steps (no tokens) keep their warm time (`warm_times`)."""
    t = warm_times(df)
    B = df["bytes_per_gpu"].to_numpy().astype(np.float64)
    F = df["flops_per_gpu"].to_numpy().astype(np.float64)
    ok = np.isfinite(B) & np.isfinite(F) & (t > 0) & (df["num_tokens"].to_numpy() > 0)
    peak = peak_flops_of(gpu, cal.peak_dtype)
    phases = fit_groups(df)
    out = t.copy()
    for phase in np.unique(phases):
        sel = ok & (phases == phase)
        if sel.any():
            out[sel] = cal.fit_for(str(phase)).step_time(
                B[sel], F[sel], gpu.memory_bandwidth, peak, _heads(df)[sel]
            )
    return out


def stream_warp(df: pl.DataFrame, gpu_time: np.ndarray) -> TimeWarp:
    """The request-time warp of a view (`_stream_warp`): public for the validation harness."""
    return _stream_warp(df, gpu_time)


HOST_BOUND_SHARE = 0.25
"""Below this share of wall time scaling with the GPU, a run is called host-bound and the projection
is said not to apply on another host. Not 0.5: a CUDA-graph decode step's fixed part (~1.3 ms of a 3 ms
vLLM batch-1 step, 46 % scaling) is GPU-side small kernels, not host; eager HF transformers steps
(1–15 % scaling, ~120 ms of launches per step) are the host-bound case."""


def time_split(df: pl.DataFrame, cal: Calibration) -> dict[str, float] | None:
    """Where the window's wall time goes under the fit: the roofline part (scales with the GPU), the
    rest of the GPU span (fitted overhead and residuals: does not), and host gaps (measured, kept).
    Shares of the summed wall time of the window's counted steps, warm times (compile steps out)."""
    win = df.filter(pl.col("in_window") & pl.col("counted"))
    if win.height == 0:
        return None
    t = warm_times(win)
    wall = _walls(win, t)  # a compile step's wall shrinks with its GPU time: compilation is not a host gap
    B = win["bytes_per_gpu"].to_numpy().astype(np.float64)
    F = win["flops_per_gpu"].to_numpy().astype(np.float64)
    ok = np.isfinite(B) & np.isfinite(F) & (t > 0)
    groups = fit_groups(win)
    roof = np.zeros(len(t))
    for g in np.unique(groups):
        sel = ok & (groups == g)
        if sel.any():
            fit = cal.fit_for(str(g))
            r = fit.roofline_time(B[sel], F[sel], cal.gpu.memory_bandwidth, cal.peak_flops)
            # A step the host paced (fit_with_floor) does not speed up with the GPU.
            paced = fit.floor_time(_heads(win)[sel], int(sel.sum())) > r + fit.overhead_s
            roof[sel] = np.where(paced, 0.0, np.minimum(r, t[sel]))
    busy = np.minimum(np.maximum(t, 0), np.maximum(wall, t))
    total = float(np.sum(np.maximum(wall, t)))
    if total <= 0:
        return None
    return {
        "gpu_scaling_share": float(roof.sum()) / total,
        "overhead_share": float((busy - roof).sum()) / total,
        "host_gap_share": float((np.maximum(wall, t) - busy).sum()) / total,
    }


def _walls(df: pl.DataFrame, gpu_time: np.ndarray) -> np.ndarray:
    """Projected wall time per step: the GPU part scaled, the host gap kept."""
    t = df["time_s"].to_numpy().astype(np.float64)
    wall = df["wall_s"].to_numpy().astype(np.float64)
    busy = np.minimum(np.maximum(t, 0), wall)
    ratio = np.where(t > 0, gpu_time / np.where(t > 0, t, 1), 1.0)
    return busy * ratio + (wall - busy)


@dataclass
class TimeWarp:
    """Maps measured host-clock times (ns) to the projected timeline of one step stream.

    Knots at each step's start and the end of its GPU part: the GPU part stretches with the
    projection, the host gap after it shifts. Times outside the steps shift with the nearest end."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def identity(cls) -> TimeWarp:
        return cls(np.array([0.0, 1.0]), np.array([0.0, 1.0]))

    @classmethod
    def from_steps(cls, df: pl.DataFrame, gpu_time: np.ndarray) -> TimeWarp:
        """Each step's GPU part [start, start + busy] stretches by its projected/measured ratio; the
        rest of the way to the next step's start is kept as measured (so unchanged times give the
        identity, whatever the engine's step boundaries). Under async scheduling a step's GPU part can
        outlast the next step's host start: it is cut there, so the knots stay increasing."""
        t = df["time_s"].to_numpy().astype(np.float64)
        wall = df["wall_s"].to_numpy().astype(np.float64)
        start = df["t_start_ns"].to_numpy().astype(np.float64)
        busy = np.minimum(np.maximum(t, 0), wall)
        ratio = np.where(t > 0, gpu_time / np.where(t > 0, t, 1), 1.0)
        nxt = np.concatenate([start[1:], [start[-1] + wall[-1] * 1e9]])
        nxt = np.maximum(nxt, start)
        busy_end = np.minimum(start + busy * 1e9, nxt)
        x = np.empty(2 * len(t) + 1)
        x[0:-1:2], x[1::2], x[-1] = start, busy_end, nxt[-1]
        scale = np.empty(2 * len(t))
        scale[0::2], scale[1::2] = ratio, 1.0
        y = start[0] + np.concatenate([[0.0], np.cumsum(np.diff(x) * scale)])
        return cls(x, y)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        out = np.interp(v, self.x, self.y)
        before, after = v < self.x[0], v > self.x[-1]
        out[before] = v[before] + (self.y[0] - self.x[0])
        out[after] = v[after] + (self.y[-1] - self.x[-1])
        return out


def warp_requests(requests: pl.DataFrame, warp: TimeWarp) -> pl.DataFrame:
    """The requests table with every timestamp carried through `warp` (list column included)."""

    def w(col: str) -> pl.Series:
        s = requests[col]
        vals = s.to_numpy().astype(np.float64)
        mapped = warp(np.nan_to_num(vals, nan=0.0)).round()
        return pl.Series(col, mapped).cast(pl.Int64).scatter(np.flatnonzero(s.is_null().to_numpy()), None)

    out = requests.with_columns(w("arrival_ns"), w("first_token_ns"), w("finish_ns"))
    if "chunk_times_ns" in requests.columns:
        arr = requests["chunk_times_ns"].to_arrow()
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        mapped = pa.array(warp(flat).round().astype(np.int64))
        rebuilt = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), mapped, mask=arr.is_null())
        out = out.with_columns(pl.Series("chunk_times_ns", rebuilt))
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) or math.isinf(v) else v


@dataclass(frozen=True)
class View:
    """One timeline to compute metrics on: the run's steps taking `gpu_time` on `gpu`, requests
    timed through `warp`."""

    gpu_time: np.ndarray
    gpu: GpuSpec
    warp: TimeWarp


def views_metrics(
    df: pl.DataFrame,
    views: Sequence[View],
    peak_dtype: str,
    requests: pl.DataFrame | None,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Metrics of each view (measured or projected): the step metrics of metrics/steps.py per phase
    over the window (the keys of metrics.json `steps`), the request metrics (metrics.json
    `requests`, timestamps through the view's warp), and decode steps per batch size.
    `settings`: the run's `run_settings` row (last_pp, num_moe_layers). The step metrics of every
    view come from one query (a view's index stands in for the run id)."""
    frames = []
    for i, v in enumerate(views):
        wall = _walls(df, v.gpu_time)
        frames.append(
            df.with_columns(
                time_s=pl.Series(v.gpu_time),
                wall_s=pl.Series(wall),
                host_gap_s=pl.Series(wall - np.minimum(np.maximum(v.gpu_time, 0), wall)),
                gpu_bandwidth=pl.lit(v.gpu.memory_bandwidth, pl.Float64),
                gpu_peak_flops=pl.lit(peak_flops_of(v.gpu, peak_dtype), pl.Float64),
                run_id=pl.lit(str(i)),
            )
        )
    every = pl.concat(frames, how="vertical_relaxed") if frames else df.clear()
    window = every.filter(pl.col("in_window") & pl.col("counted"))
    settings_frame = pl.DataFrame([{**settings, "run_id": str(i)} for i in range(len(views))])
    con = duckdb.connect(config={"threads": 1})  # small frames: a thread pool costs more than it saves
    try:
        con.register("projected", window)
        con.register("projected_settings", settings_frame)
        phases = summary_rows(con, "projected", "projected_settings")
        p50 = quantile_rows(con, "projected", "s.time_s")
    finally:
        con.close()
    by_batch = (
        every.filter(pl.col("counted") & (pl.col("phase") == "decode"))
        .group_by("run_id", "num_reqs")
        .agg(
            steps=pl.len(),
            step_time_s_mean=pl.col("time_s").mean(),
            step_time_s_p50=pl.col("time_s").median(),
            step_wall_s_mean=pl.col("wall_s").mean(),
        )
        .sort("run_id", "num_reqs")
    )
    out = []
    for i, v in enumerate(views):
        mine = phases.get(str(i), {})
        for phase, values in mine.items():
            values["step_time_s_p50_p90_p99"] = p50.get(str(i), {}).get(phase)
        rows = by_batch.filter(pl.col("run_id") == str(i)).drop("run_id").to_dicts()
        view: dict[str, Any] = {"phases": mine, "decode_by_batch_size": rows}
        if requests is not None and requests.height:
            view["requests"] = request_metrics(warp_requests(requests, v.warp))
        out.append(view)
    return out


def view_metrics(
    df: pl.DataFrame,
    gpu_time: np.ndarray,
    gpu: GpuSpec,
    peak_dtype: str,
    requests: pl.DataFrame | None,
    warp: TimeWarp,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """`views_metrics` of one view."""
    return views_metrics(df, [View(gpu_time, gpu, warp)], peak_dtype, requests, settings)[0]


def _stream_warp(df: pl.DataFrame, gpu_time: np.ndarray) -> TimeWarp:
    """The warp of the first (dp, pp) step stream (requests are timed against it)."""
    if df.height == 0:
        return TimeWarp.identity()
    first = df.select("dp", "pp").row(0)
    mask = ((df["dp"] == first[0]) & (df["pp"] == first[1])).to_numpy()
    return TimeWarp.from_steps(df.filter(pl.Series(mask)), gpu_time[mask])


def projected_window_cost(
    gpu: GpuSpec,
    num_gpus: int,
    metrics: dict[str, Any],
    settings: CostSettings,
    power_fraction_of_tdp: float | None,
) -> dict[str, Any]:
    """Cost of the window on `gpu` (cost/section.py `window_cost`): GPU power = the measured run's
    mean power as a fraction of its TDP, times this GPU's TDP (TDP when nothing was measured)."""
    everything = metrics["phases"].get("all")
    if not everything or not everything.get("window_s"):
        return {"error": "no window to charge"}
    fraction = power_fraction_of_tdp if power_fraction_of_tdp is not None else 1.0
    source = (
        f"projected: measured mean power = {fraction:.3g} x TDP of the source GPU, applied to this GPU's TDP"
        if power_fraction_of_tdp is not None
        else "tdp"
    )
    power = None if gpu.tdp_w is None else gpu.tdp_w * fraction
    energy = energy_at_power(float(everything["window_s"]), num_gpus, power, source)
    doc = window_cost(gpu, num_gpus, everything, energy, settings)
    return {
        "model": doc["model"],
        "usd_per_1m_output_tokens": doc.get("usd_per_1m_output_tokens"),
        "usd_per_1m_total_tokens": doc.get("usd_per_1m_total_tokens"),
        "band_usd_per_1m_output_tokens": doc.get("band_usd_per_1m_output_tokens"),
        "gpu_price": doc["constants"].get(
            "gpu_price_usd" if doc["model"] == "ownership" else "usd_per_gpu_hour"
        ),
        "energy_source": energy.source,
        **({"error": doc["error"]} if "error" in doc else {}),
    }


def facade_measured(analysis: Analysis, run_id: str, computed: dict[str, Any]) -> dict[str, Any]:
    """The measured column: the analysis' own figures, read from its façade — per phase the `run_metrics`
    view, the request headline figures `request_summary` — over the view `views_metrics` computed on the
    measured times (by the same definitions), which adds what the façade does not carry (step-time
    quantiles, decode per batch size, request percentiles). So `whatif` never calls a number "measured"
    that `summary` computes differently (issue #19)."""
    rm = analysis.run_metrics().filter(pl.col("run_id") == run_id)
    for row in rm.iter_rows(named=True):
        phase = computed["phases"].get(row["phase"])
        if phase is not None:
            phase.update({k: row[k] for k in phase if k in row})
    req = computed.get("requests")
    summary = analysis.request_summary.filter(pl.col("run_id") == run_id)
    if req is not None and summary.height:
        row = summary.row(0, named=True)
        for key in (
            "requests",
            "succeeded",
            "request_throughput",
            "output_throughput",
            "total_token_throughput",
        ):
            if key in req:
                req[key] = row[key]
        for key, col in (("ttft_s", "ttft_s_mean"), ("tpot_s", "tpot_s_mean"), ("e2e_s", "e2e_s_mean")):
            if isinstance(req.get(key), dict) and "mean" in req[key]:
                req[key]["mean"] = row[col]
    return computed


def facade_cost(analysis: Analysis, run_id: str, cost: dict[str, Any]) -> dict[str, Any]:
    """The measured cost's headline USD per 1M output tokens and band from the façade's `costs` frame (the
    analysis' cost section; the projections' cost is computed the same way on their windows)."""
    row = analysis.costs.filter(pl.col("run_id") == run_id)
    if row.height:
        r = row.row(0, named=True)
        cost["usd_per_1m_output_tokens"] = r["usd_per_1m_output_tokens"]
        if r["band_low"] is not None:
            cost["band_usd_per_1m_output_tokens"] = [r["band_low"], r["band_high"]]
    return cost


def measured_power_fraction(analysis: Analysis, ctx: RunContext) -> float | None:
    run = next((r for r in analysis.document["runs"] if r["run_id"] == ctx.run.run_id), None)
    if run is None or ctx.gpu is None or not ctx.gpu.tdp_w:
        return None
    energy = (run["metrics"].get("cost") or {}).get("energy") or {}
    if energy.get("source") != "measured" or not energy.get("mean_power_w_per_gpu"):
        return None
    return float(energy["mean_power_w_per_gpu"]) / ctx.gpu.tdp_w


def whatif_run(
    analysis: Analysis,
    ctx: RunContext,
    targets: Sequence[GpuSpec],
    settings: CostSettings,
    calibration: CalibrationSpec | None = None,
    frames: Frames | None = None,
) -> dict[str, Any]:
    """The what-if document of one run: calibration, the measured view, and per target GPU the
    projection and both baselines. `frames`: step frames shared between the runs of one call."""
    key = (id(analysis), ctx.run.run_id)
    df = frames[key] if frames and key in frames else step_frame(analysis, ctx)
    own = _fittable(df).height
    if own < 3:
        # Joint calibration could fit other runs' steps, but none of this run's steps could be re-timed.
        missing = df.filter(~pl.col("bytes_total").is_finite()).height
        why = f" ({missing} steps lack bytes: no expert counts)" if missing else ""
        raise InputError(
            f"run {ctx.run.run_id}: too few steps with bytes, FLOPs and a GPU time to calibrate "
            f"the roofline ({own}){why}"
        )
    cal_df, calibrated_on = calibration_frame(analysis, ctx, df, calibration, frames)
    cal = calibrate(cal_df, ctx)
    cal.calibrated_on = calibrated_on
    requests = analysis.db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[ctx.run.run_id]).pl()
    measured_time = df["time_s"].to_numpy().astype(np.float64)
    assert ctx.gpu is not None
    row = run_settings(ctx)
    views = [View(measured_time, ctx.gpu, TimeWarp.identity())]
    for target in targets:
        for model in MODELS:
            gpu_time = project_times(df, cal, target, model)
            views.append(View(gpu_time, target, _stream_warp(df, gpu_time)))
    computed = iter(views_metrics(df, views, ctx.peak_dtype, requests, row))
    measured = facade_measured(analysis, ctx.run.run_id, next(computed))
    power_fraction = measured_power_fraction(analysis, ctx)
    measured["cost"] = projected_window_cost(ctx.gpu, ctx.num_gpus, measured, settings, power_fraction)
    measured["cost"] = facade_cost(analysis, ctx.run.run_id, measured["cost"])
    warnings = []
    unprojectable = df.filter(~pl.col("bytes_per_gpu").is_finite() & (pl.col("time_s") > 0)).height
    if unprojectable:
        warnings.append(f"{unprojectable} step(s) without bytes (no expert counts) keep their measured time")
    compiled = df.filter(pl.col("compile_step"))
    if compiled.height:
        named = ", ".join(
            f"{r['step']} ({r['phase']}, {r['time_s'] * 1e3:.4g} ms, {r['slow_rule'] or 'compile'})"
            for r in compiled.head(5).iter_rows(named=True)
        )
        more = f" and {compiled.height - 5} more" if compiled.height > 5 else ""
        warnings.append(
            f"{compiled.height} compile / JIT or first-use warm-up step(s) (check's rules: step {named}{more}; "
            f"{compiled['time_s'].sum():.3g} s measured) are left out of the fit and take their phase's typical "
            "time in every projected view (compilation and warm-up are host work done once); the measured "
            "column keeps them"
        )
    split = time_split(df, cal)
    if split is not None and split["gpu_scaling_share"] < HOST_BOUND_SHARE:
        cpu = (ctx.run.metadata.extra or {}).get("host_cpu") or {}
        host = f" (recorded host: {cpu.get('model')})" if cpu.get("model") else ""
        warnings.append(
            f"host-bound: only {split['gpu_scaling_share']:.0%} of the window's wall time scales with the GPU "
            f"(per-step overhead {split['overhead_share']:.0%}, host gaps {split['host_gap_share']:.0%}); the "
            f"projection holds the rest constant, which holds only on the same host{host}: on another host "
            "the projection does not apply"
        )
    out_targets: dict[str, Any] = {}
    for target in targets:
        models: dict[str, Any] = {}
        for model in MODELS:
            view = next(computed)
            view["cost"] = projected_window_cost(target, ctx.num_gpus, view, settings, power_fraction)
            models[model] = view
        out_targets[target.name] = {
            "gpu": {
                "name": target.name,
                "memory_bandwidth_bytes_per_s": target.memory_bandwidth,
                "peak_flops_dense": peak_flops_of(target, ctx.peak_dtype),
                "tdp_w": target.tdp_w,
                "source": target.source,
            },
            "models": models,
        }
    md = ctx.run.metadata
    return {
        "run_id": ctx.run.run_id,
        "model": md.model.id,
        "engine": md.engine.name,
        "workload": md.workload,
        "batch_size": (md.workload or {}).get("batch_size") or (md.workload or {}).get("concurrency"),
        "num_gpus": ctx.num_gpus,
        "source_gpu": ctx.gpu.name,
        "window": next(
            (r["window"] for r in analysis.document["runs"] if r["run_id"] == ctx.run.run_id), None
        ),
        "calibration": cal.as_dict(),
        "time_split": split,
        "compile_steps": {"steps": compiled.height, "seconds": float(compiled["time_s"].sum())},
        "measured": measured,
        "targets": out_targets,
        "warnings": warnings + cal.notes,
    }


def run_each(
    contexts: Sequence[RunContext], project: Callable[[RunContext], dict[str, Any]]
) -> list[dict[str, Any]]:
    """`project(ctx)` for each run; a run's InputError becomes {run_id, error} unless every run fails."""
    out: list[dict[str, Any]] = []
    errors: list[InputError] = []
    for ctx in contexts:
        try:
            out.append(project(ctx))
        except InputError as exc:
            errors.append(exc)
            out.append({"run_id": ctx.run.run_id, "error": str(exc)})
    if errors and len(errors) == len(out):
        raise errors[0]
    return out


def whatif(
    analysis: Analysis,
    targets: Sequence[GpuSpec],
    settings: CostSettings,
    calibration: CalibrationSpec | None = None,
) -> dict[str, Any]:
    """What-if document for every run of `analysis` on every GPU of `targets`.

    A run that cannot be projected (no steps, no expert counts, no GPU spec) gets {run_id, error};
    when no run can be, the first error is raised."""
    frames: Frames = {}
    runs = run_each(
        analysis.contexts, lambda ctx: whatif_run(analysis, ctx, targets, settings, calibration, frames)
    )
    return {
        "schema": WHATIF_SCHEMA,
        "assumptions": list(ASSUMPTIONS),
        "models": {
            "projection": "roofline with efficiencies and per-step overhead fitted per phase on the measured "
            "run, jointly with the runs of the same configuration given with it (calibration.calibrated_on)",
            "no_change": "baseline: the measured step times",
            "bandwidth_ratio": "baseline: memory-bound steps (nominal roofline of the source GPU) scaled by the "
            "bandwidth ratio, compute-bound steps by the peak-FLOPs ratio",
        },
        "cost_settings": {"model": settings.model, "layers": list(settings.layers)},
        "runs": runs,
    }
