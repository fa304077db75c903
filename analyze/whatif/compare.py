"""Validation: projections of measured runs against runs of the same workload measured on the target.

Each run of the source traces (e.g. H100) is paired with the run of the compare-to traces (e.g.
H200) that has the same model, engine, dataset and batch size (the workload's `batch_size` or
`concurrency`). For each pair the source run is projected onto the compare run's GPU, and every
metric of the projection and of both baselines is set against the compare run's measured value:
error = predicted / measured − 1. Decode step times are also compared per batch size (number of
requests in the step), which needs no pairing of whole runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from ..analysis import RunContext
from ..cost import CostSettings
from ..document import number_at
from ..errors import InputError
from ..pipeline import Analysis
from ..specs import GpuSpec
from .project import (
    ASSUMPTIONS,
    MODELS,
    WHATIF_SCHEMA,
    CalibrationSpec,
    Frames,
    TimeWarp,
    measured_power_fraction,
    projected_window_cost,
    run_settings,
    step_frame,
    stream_warp,
    view_metrics,
    warm_times,
    whatif_run,
)

#: (label, path into a view's metrics) of the run-level metrics compared.
COMPARED = (
    ("decode step time mean (s)", ("phases", "decode", "step_time_s_mean")),
    ("decode step wall mean (s)", ("phases", "decode", "step_wall_s_mean")),
    ("prefill step time mean (s)", ("phases", "prefill", "step_time_s_mean")),
    ("TPOT mean (s)", ("requests", "tpot_s", "mean")),
    ("TTFT mean (s)", ("requests", "ttft_s", "mean")),
    ("E2E mean (s)", ("requests", "e2e_s", "mean")),
    ("window_output_throughput (tok/s)", ("phases", "all", "window_output_throughput")),
    ("output_throughput (tok/s)", ("requests", "output_throughput")),
    ("decode S-MBU", ("phases", "decode", "s_mbu")),
    ("$ per 1M output tokens", ("cost", "usd_per_1m_output_tokens")),
)


def _error(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return pred / meas - 1


def verdict(errors: dict[str, float | None]) -> dict[str, Any]:
    """Which model came closest (`best`) and the baselines that beat the projection
    (`baselines_beating_projection`: strictly smaller |error|), from errors by model."""
    known = {m: abs(e) for m, e in errors.items() if e is not None}
    if not known:
        return {"best": None, "baselines_beating_projection": []}
    proj = known.get("projection")
    beating = [m for m, e in known.items() if m != "projection" and proj is not None and e < proj]
    return {
        "best": min(known, key=lambda m: (known[m], m != "projection")),
        "baselines_beating_projection": beating,
    }


def workload_key(ctx: RunContext) -> tuple[Any, ...]:
    """What makes two runs 'the same workload': model, engine, dataset, batch size."""
    md = ctx.run.metadata
    wl = md.workload or {}
    return (md.model.id, md.engine.name, wl.get("dataset"), wl.get("batch_size") or wl.get("concurrency"))


def _arg_distance(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many engine arguments differ between two runs."""
    return sum(1 for k in set(a) | set(b) if a.get(k) != b.get(k))


def pair_runs(source: Analysis, other: Analysis) -> tuple[list[tuple[RunContext, RunContext]], list[str]]:
    """Pairs (source run, compare run) of the same workload, and a line per run left unpaired."""
    by_key: dict[tuple[Any, ...], list[RunContext]] = {}
    for ctx in other.contexts:
        by_key.setdefault(workload_key(ctx), []).append(ctx)
    pairs, notes = [], []
    used: set[str] = set()
    for ctx in source.contexts:
        key = workload_key(ctx)
        cands = [c for c in by_key.get(key, []) if c.run.run_id not in used]
        if not cands:
            notes.append(f"{ctx.run.run_id}: no compare-to run with model/engine/dataset/batch size {key}")
            continue
        md = ctx.run.metadata

        # Prefer the same workload, then the closest engine arguments (CUDA graphs on / off matters;
        # a KV block count sized to the GPU's memory does not stop a pairing).
        def rank(c: RunContext, md: Any = md) -> tuple[bool, int]:
            other_md = c.run.metadata
            return other_md.workload != md.workload, _arg_distance(other_md.engine.args, md.engine.args)

        ranked = sorted(cands, key=lambda c: (*rank(c), c.run.run_id))
        chosen = ranked[0]
        ties = [c for c in ranked if rank(c) == rank(chosen)]
        if len(ties) > 1:
            notes.append(
                f"{ctx.run.run_id}: several compare-to runs match {key} equally; using {chosen.run.run_id}"
            )
        elif rank(chosen)[0]:
            notes.append(f"{ctx.run.run_id}: paired with {chosen.run.run_id}, whose workload differs")
        used.add(chosen.run.run_id)
        pairs.append((ctx, chosen))
    notes += [
        f"{c.run.run_id}: compare-to run not paired" for c in other.contexts if c.run.run_id not in used
    ]
    return pairs, notes


def measured_view(
    analysis: Analysis, ctx: RunContext, settings: CostSettings, *, warm: bool = False
) -> dict[str, Any]:
    """A run's metrics on its own GPU, computed exactly as the projections are (same windows,
    same throughput definition), so differences are the model's, not the bookkeeping's.

    warm: its compile / JIT steps (check's rule) at their typical time, as every projected view has
    them — the reference a projection is held to (`warm_times`); without such steps it is the
    measured view. Not called "measured" in any output: metrics.json keeps the compile steps."""
    assert ctx.gpu is not None
    df = step_frame(analysis, ctx)
    requests = analysis.db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[ctx.run.run_id]).pl()
    measured = df["time_s"].to_numpy().astype(np.float64)
    times = warm_times(df) if warm else measured
    warp = TimeWarp.identity() if np.array_equal(times, measured) else stream_warp(df, times)
    view = view_metrics(df, times, ctx.gpu, ctx.peak_dtype, requests, warp, run_settings(ctx))
    view["cost"] = projected_window_cost(
        ctx.gpu, ctx.num_gpus, view, settings, measured_power_fraction(analysis, ctx)
    )
    view["compile_steps"] = int(df["compile_step"].sum())
    return view


def _by_batch(
    measured: dict[str, Any], models: dict[str, Any], calibrated_sizes: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Decode step time per batch size: mean and median (a JIT-compiled first use of a shape is one
    step in twenty at a batch size, so the median says how the steady steps compare). `held_out`
    marks batch sizes the calibration did not see (when it was limited to some)."""
    meas = pl.DataFrame(measured["decode_by_batch_size"] or [], schema_overrides={"num_reqs": pl.Int64})
    if meas.is_empty():
        return []
    rows = []
    for m in meas.to_dicts():
        row: dict[str, Any] = {
            "num_reqs": m["num_reqs"],
            "held_out": calibrated_sizes is not None and m["num_reqs"] not in calibrated_sizes,
            "steps_measured": m["steps"],
            "measured_step_time_s": m["step_time_s_mean"],
            "measured_step_time_p50_s": m.get("step_time_s_p50"),
            "measured_wall_s": m["step_wall_s_mean"],
        }
        for model in MODELS:
            hit = [x for x in models[model]["decode_by_batch_size"] if x["num_reqs"] == m["num_reqs"]]
            if not hit:
                continue
            row[f"{model}_step_time_s"] = hit[0]["step_time_s_mean"]
            row[f"{model}_step_time_p50_s"] = hit[0].get("step_time_s_p50")
            row[f"{model}_wall_s"] = hit[0]["step_wall_s_mean"]
            row[f"{model}_step_time_error"] = _error(hit[0]["step_time_s_mean"], m["step_time_s_mean"])
            row[f"{model}_step_time_p50_error"] = _error(
                hit[0].get("step_time_s_p50"), m.get("step_time_s_p50")
            )
            row[f"{model}_wall_error"] = _error(hit[0]["step_wall_s_mean"], m["step_wall_s_mean"])
            row["steps_projected"] = hit[0]["steps"]
        if "steps_projected" in row:
            rows.append(row)
    return rows


def compare_pair(
    projected_run: dict[str, Any],
    target: str,
    measured: dict[str, Any],
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every COMPARED metric of each model against the target run, plus per batch size. Errors are
    against `reference` (the target's warm view, `measured_view(warm=True)`) when given, else against
    `measured`; each entry keeps both values."""
    models = projected_run["targets"][target]["models"]
    ref_view = reference if reference is not None else measured
    metrics = {}
    for label, path in COMPARED:
        meas = number_at(measured, path)
        ref = number_at(ref_view, path)
        entry: dict[str, Any] = {"measured": meas, "reference": ref}
        for model in MODELS:
            pred = number_at(models[model], path)
            entry[model] = pred
            entry[f"{model}_error"] = _error(pred, ref)
        entry.update(verdict({m: entry[f"{m}_error"] for m in MODELS}))
        metrics[label] = entry
    sizes = (projected_run.get("calibration") or {}).get("calibrated_on", {}).get("batch_sizes")
    return {"metrics": metrics, "decode_by_batch_size": _by_batch(ref_view, models, sizes)}


def _summary(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean absolute error per metric and model over the pairs, and over all batch-size rows."""
    out: dict[str, Any] = {}
    for label, _ in COMPARED:
        entry = {}
        for model in MODELS:
            errs = [c["metrics"][label][f"{model}_error"] for c in comparisons]
            errs = [abs(e) for e in errs if e is not None]
            entry[model] = float(np.mean(errs)) if errs else None
        out[label] = entry
    rows = [r for c in comparisons for r in c["decode_by_batch_size"]]
    beaten: dict[str, list[str]] = {}
    held_out = [r for r in rows if r.get("held_out")]
    groups = [("", rows)] + ([(" (held-out)", held_out)] if held_out else [])
    for suffix, group in groups:
        for label, key in (("", "step_time_error"), (" median", "step_time_p50_error")):
            entry = {}
            for model in MODELS:
                errs = [abs(r[f"{model}_{key}"]) for r in group if r.get(f"{model}_{key}") is not None]
                entry[model] = float(np.mean(errs)) if errs else None
            out[f"decode step time{label} per batch size{suffix}"] = entry
    for label, entry in out.items():
        lost = verdict(entry)["baselines_beating_projection"]
        if lost:
            beaten[label] = lost
    return {
        "mean_abs_error": out,
        "baselines_beating_projection": beaten,
        "pairs": len(comparisons),
        "batch_size_rows": len(rows),
        "held_out_batch_size_rows": len(held_out),
    }


def _host(cpu: Any) -> str:
    return f"{cpu.get('model') or 'unknown CPU'}, {cpu.get('logical_cpus')} CPUs"


def compare_runs(
    source: Analysis,
    other: Analysis,
    settings: CostSettings,
    extra_targets: Sequence[GpuSpec] = (),
    calibration: CalibrationSpec | None = None,
) -> dict[str, Any]:
    """What-if of every source run onto its paired run's GPU (and `extra_targets`), with the
    projection errors against the paired run's measurements."""
    pairs, notes = pair_runs(source, other)
    runs, comparisons = [], []
    frames: Frames = {}
    for src, dst in pairs:
        assert dst.gpu is not None
        targets = [dst.gpu, *[g for g in extra_targets if g.name != dst.gpu.name]]
        try:
            projected = whatif_run(source, src, targets, settings, calibration, frames)
            measured = measured_view(other, dst, settings)
            reference = measured_view(other, dst, settings, warm=True) if measured["compile_steps"] else None
        except InputError as exc:
            if len(pairs) == 1:
                raise
            runs.append({"run_id": src.run.run_id, "error": str(exc)})
            notes.append(f"{src.run.run_id}: not compared ({exc})")
            continue
        comp = compare_pair(projected, dst.gpu.name, measured, reference)
        if reference is not None:
            notes.append(
                f"{dst.run.run_id}: {measured['compile_steps']} compile / JIT or first-use warm-up step(s) (check's rules); the errors are "
                "against its warm reference (those steps at their typical time, as in every projected view), "
                "not against its measured (metrics.json) values, which the table shows too"
            )
        hosts = [(c.run.metadata.extra or {}).get("host_cpu") for c in (src, dst)]
        if all(hosts) and hosts[0] != hosts[1]:
            notes.append(
                f"{src.run.run_id} vs {dst.run.run_id}: the hosts differ ({_host(hosts[0])} vs {_host(hosts[1])}); "
                "host-bound step time moves with the host, which the projection holds constant"
            )
        comparisons.append(
            {
                "source_run": src.run.run_id,
                "compare_run": dst.run.run_id,
                "batch_size": projected["batch_size"],
                "source_gpu": projected["source_gpu"],
                "target_gpu": dst.gpu.name,
                **comp,
                "measured_target": measured,
                **({"reference_target": reference} if reference is not None else {}),
            }
        )
        runs.append(projected)
    comparisons.sort(key=lambda c: (c["batch_size"] is None, c["batch_size"] or 0, c["source_run"]))
    return {
        "schema": WHATIF_SCHEMA,
        "assumptions": list(ASSUMPTIONS),
        "cost_settings": {"model": settings.model, "layers": list(settings.layers)},
        "runs": runs,
        "comparison": {"pairs": comparisons, "summary": _summary(comparisons), "notes": notes},
    }
