"""Validate `moecap-analyze whatif` on concurrency sweeps: calibrate on some batch sizes, test on the others.

    python benchmarks/whatif_validate.py A_DIR [B_DIR] [--json OUT.json]

A_DIR, B_DIR: sweep folders (`moecap-collect sweep`) of the same workload on two GPUs, e.g.
traces/h100-vllm-sweep and traces/h200-vllm-sweep. The runs of each folder are split by concurrency into
two complementary halves (every other concurrency in sorted order: 1, 4, 16, 64 | 2, 8, 32, 128), and
each half calibrates the model that is tested on the other, so every batch size is held out once, batch 1
included.

* Two GPUs (A and B): for each direction (A → B, B → A) and half, the held-out runs of the source GPU are
  projected onto the other GPU with the fit of the calibration half (`compare_runs` with
  `--calibrate-on`), and set against the run of the same concurrency measured there. Baselines: "no
  change" and "bandwidth ratio" (docs/whatif.md).
* One GPU (A only): the calibration half's fit predicts the held-out runs on the same GPU from their bytes
  and FLOPs alone (`model_times`: no step keeps its own measured time), which tests the joint fit across
  batch sizes. Naive baselines there: "nearest" (the measured metrics of the calibrated run whose
  concurrency is nearest, unchanged) and "bytes ratio" (those scaled by the ratio of mean decode bytes per
  step: step time and TPOT by B/B_near, throughput by its inverse times the concurrency ratio).

Per held-out batch size it prints, for the projection and both baselines, the error (predicted / measured
− 1) of: decode step time (mean GPU time of the steady decode steps, `num_reqs` = the concurrency),
prefill step time (mean), TPOT (mean), TTFT (mean) and output token throughput (requests); the measured
reference values are a run's metrics by the same views as `moecap-analyze summary`, with its compile / JIT
steps at their typical time (`reference`). It prints the Markdown table docs/whatif.md carries
(tests/analyze/whatif/test_whatif_validate.py checks they agree).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path
from typing import Any

import polars as pl

from moecap.analyze.analysis import Options
from moecap.analyze.cost import load_cost_settings
from moecap.analyze.document import number_at
from moecap.analyze.pipeline import Analysis, analyze_paths
from moecap.analyze.whatif.compare import compare_runs, measured_view
from moecap.analyze.whatif.project import (
    HOST_BOUND_SHARE,
    CalibrationSpec,
    View,
    calibrate,
    model_times,
    run_settings,
    step_frame,
    stream_warp,
    views_metrics,
)

#: (label, path into a view's metrics, tolerance of issue #21's "Done when").
METRICS = (
    ("decode step time", ("phases", "decode", "step_time_s_mean"), 0.05),
    ("prefill step time", ("phases", "prefill", "step_time_s_mean"), None),
    ("TPOT", ("requests", "tpot_s", "mean"), 0.05),
    ("TTFT", ("requests", "ttft_s", "mean"), 0.10),
    ("output tok/s", ("requests", "output_throughput"), 0.05),
)
CROSS_MODELS = ("projection", "no_change", "bandwidth_ratio")
SAME_MODELS = ("projection", "nearest", "bytes_ratio")


def concurrency(analysis: Analysis, ctx: Any) -> int | None:
    wl = ctx.run.metadata.workload or {}
    c = wl.get("concurrency") or wl.get("batch_size")
    return int(c) if c is not None else None


def run_files(source: str | Path, cache: Path | None = None) -> dict[int, list[str]]:
    """Trace files of each run of a sweep folder (or of the files a glob names), by concurrency (read
    from the run metadata)."""
    path = Path(source)
    found = path.glob("*.arrow") if path.is_dir() else (Path(p) for p in glob.glob(str(source)))
    files = sorted(str(p) for p in found if str(p).endswith(".arrow"))
    if not files:
        raise SystemExit(f"{source}: no .arrow trace files")
    a = analyze_paths(files, Options(window="all"), cache_dir=cache)
    out: dict[int, list[str]] = {}
    # Several runs at one concurrency (a retried sweep point): the latest (run ids start with the time).
    for ctx in sorted(a.contexts, key=lambda c: c.run.run_id):
        c = concurrency(a, ctx)
        if c is None:
            continue
        if c in out:
            print(f"{source}: several runs at concurrency {c}; using {ctx.run.run_id}", file=sys.stderr)
        out[c] = [f for f in files if Path(f).name.startswith(ctx.run.run_id + ".")]
    return out


def halves(sizes: list[int]) -> list[tuple[list[int], list[int]]]:
    """(calibrate on, hold out) pairs: every other concurrency, and the complement."""
    s = sorted(sizes)
    even, odd = s[0::2], s[1::2]
    return [(even, odd), (odd, even)] if odd else [(even, even)]


def _load(files: dict[int, list[str]], sizes: list[int], cache: Path | None) -> Analysis:
    paths = [f for c in sizes for f in files[c]]
    return analyze_paths(paths, Options(), cache_dir=cache)


def _err(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return pred / meas - 1


def _steady_decode(view: dict[str, Any], c: int) -> float | None:
    """Mean decode GPU step time at num_reqs = c (the steady batch of a closed-loop run)."""
    rows = [r for r in view.get("decode_by_batch_size") or [] if r["num_reqs"] == c]
    return rows[0]["step_time_s_mean"] if rows else None


def _value(view: dict[str, Any], label: str, path: tuple[str, ...], c: int) -> float | None:
    return _steady_decode(view, c) if label == "decode step time" else number_at(view, path)


def cross_gpu(
    a_files: dict[int, list[str]], b_files: dict[int, list[str]], names: tuple[str, str], cache: Path | None
) -> list[dict[str, Any]]:
    """Rows of the two-GPU validation, both directions."""
    settings = load_cost_settings()
    rows = []
    for (src_files, dst_files), direction in (((a_files, b_files), names), ((b_files, a_files), names[::-1])):
        common = sorted(set(src_files) & set(dst_files))
        for cal_sizes, held in halves(common):
            cal = _load(src_files, cal_sizes, cache)
            dst = _load(dst_files, held, cache)
            doc = compare_runs(
                _load(src_files, held, cache), dst, settings, calibration=CalibrationSpec(runs=cal)
            )
            by_run = {r["run_id"]: r for r in doc["runs"] if "error" not in r}
            dst_ctx = {ctx.run.run_id: ctx for ctx in dst.contexts}
            for pair in doc["comparison"]["pairs"]:
                c = int(pair["batch_size"])
                run = by_run[pair["source_run"]]
                models = run["targets"][pair["target_gpu"]]["models"]
                ref = reference(dst, dst_ctx[pair["compare_run"]])
                split = run.get("time_split") or {}
                host_bound = split.get("gpu_scaling_share", 1.0) < HOST_BOUND_SHARE
                for label, path, tol in METRICS:
                    meas = _value(ref, label, path, c)
                    preds = {m: _value(models[m], label, path, c) for m in CROSS_MODELS}
                    row = _row(f"{direction[0]} → {direction[1]}", cal_sizes, c, label, tol, meas, preds)
                    rows.append({**row, "host_bound": host_bound})
    return rows


def same_gpu(a_files: dict[int, list[str]], name: str, cache: Path | None) -> list[dict[str, Any]]:
    """Rows of the one-GPU validation: the fit of one half predicts the other half's runs."""
    rows = []
    for cal_sizes, held in halves(sorted(a_files)):
        cal_a = _load(a_files, cal_sizes, cache)
        cal_frames = [step_frame(cal_a, ctx) for ctx in cal_a.contexts]
        cal_views = {}
        for ctx in cal_a.contexts:
            cal_views[concurrency(cal_a, ctx)] = reference(cal_a, ctx)
        held_a = _load(a_files, held, cache)
        for ctx in held_a.contexts:
            c = concurrency(held_a, ctx)
            df = step_frame(held_a, ctx)
            cal = calibrate(pl.concat(cal_frames, how="vertical_relaxed"), ctx)
            assert ctx.gpu is not None
            predicted = model_times(df, cal, ctx.gpu)
            measured = reference(held_a, ctx)
            (model,) = views_metrics(
                df,
                [View(predicted, ctx.gpu, stream_warp(df, predicted))],
                ctx.peak_dtype,
                _requests(held_a, ctx),
                run_settings(ctx),
            )
            near = min(cal_sizes, key=lambda x: (abs(math.log(x / c)), x))
            near_view = cal_views[near]
            ratio = _decode_bytes(df, c) / _decode_bytes(cal_frames[cal_sizes.index(near)], near)
            for label, path, tol in METRICS:
                meas = _value(measured, label, path, c)
                nearest = _value(near_view, label, path, near)
                scaled = None
                if nearest is not None:
                    if label in ("decode step time", "TPOT"):
                        scaled = nearest * ratio
                    elif label == "output tok/s":
                        scaled = nearest * (c / near) / ratio
                    else:
                        scaled = nearest
                preds = {
                    "projection": _value(model, label, path, c),
                    "nearest": nearest,
                    "bytes_ratio": scaled,
                }
                rows.append(_row(f"{name} (same GPU)", cal_sizes, c, label, tol, meas, preds))
    return rows


def _requests(a: Analysis, ctx: Any) -> pl.DataFrame:
    return a.db.con.sql("SELECT * FROM requests WHERE run_id = ?", params=[ctx.run.run_id]).pl()


def reference(a: Analysis, ctx: Any) -> dict[str, Any]:
    """A run's metrics with its compile / JIT steps (check's rule) at their phase's typical time, the
    rest as measured (`measured_view(warm=True)`): what a warm run would have shown, the reference every
    prediction is held to (the predictions leave compilation out too). Equal to the measured metrics of
    a run without such steps."""
    return measured_view(a, ctx, load_cost_settings(), warm=True)


def _decode_bytes(df: pl.DataFrame, c: int) -> float:
    d = df.filter((pl.col("phase") == "decode") & (pl.col("num_reqs") == c))
    return float(d["bytes_per_gpu"].mean())  # type: ignore[arg-type]


def _row(
    direction: str,
    cal_sizes: list[int],
    c: int,
    label: str,
    tol: float | None,
    meas: float | None,
    preds: dict[str, float | None],
) -> dict[str, Any]:
    errors = {m: _err(p, meas) for m, p in preds.items()}
    proj = errors.get("projection")
    baselines = [abs(e) for m, e in errors.items() if m != "projection" and e is not None]
    return {
        "direction": direction,
        "calibrated_on": cal_sizes,
        "batch_size": c,
        "metric": label,
        "measured": meas,
        "predicted": preds,
        "errors": errors,
        "within_target": None if proj is None or tol is None else abs(proj) <= tol,
        "beats_baselines": None if proj is None or not baselines else all(abs(proj) < b for b in baselines),
    }


def _pct(e: float | None) -> str:
    return "—" if e is None else f"{e * 100:+.1f}"


def _fmt(v: float | None, label: str) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if label == "output tok/s" else f"{v * 1e3:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The validation table (errors in %, step times and latencies in ms, throughput in tok/s)."""
    models = [m for m in rows[0]["predicted"]] if rows else []
    head = (
        "| direction | calibrated on | held-out batch | metric | reference | "
        + " | ".join(f"{m.replace('_', ' ')} error %" for m in models)
        + " | target met | beats both baselines |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["measured"] is None:
            continue
        yes = {True: "yes", False: "**no**", None: "—"}
        batch = f"{r['batch_size']} (host-bound)" if r.get("host_bound") else str(r["batch_size"])
        out.append(
            f"| {r['direction']} | {','.join(map(str, r['calibrated_on']))} | {batch} | {r['metric']} | "
            f"{_fmt(r['measured'], r['metric'])} | "
            + " | ".join(_pct(r["errors"][m]) for m in models)
            + f" | {yes[r['within_target']]} | {yes[r['beats_baselines']]} |"
        )
    graded = [r for r in rows if r["within_target"] is not None]
    met = sum(1 for r in graded if r["within_target"])
    beat = [r for r in rows if r["beats_baselines"] is not None]
    won = sum(1 for r in beat if r["beats_baselines"])
    out.append("")
    out.append(
        f"Within target (5 % step time / TPOT / throughput, 10 % TTFT): {met} of {len(graded)} rows; "
        f"projection better than both baselines: {won} of {len(beat)} rows."
    )
    return "\n".join(out) + "\n"


def validate(
    a: str | Path,
    b: str | Path | None = None,
    cache: Path | None = None,
    names: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every row of the validation of sweep A (and B): see the module doc. `names`: how the two sides
    are called in the rows (default: the folders' names)."""
    names = names or (Path(a).name, Path(b).name if b is not None else "")
    a_files = run_files(a, cache)
    if b is None:
        return same_gpu(a_files, names[0], cache)
    return cross_gpu(a_files, run_files(b, cache), names, cache)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("a_dir", help="sweep folder (or a glob of trace files) of GPU A")
    ap.add_argument("b_dir", nargs="?", help="the same workload on GPU B")
    ap.add_argument(
        "--names", help="what to call A and B in the table, e.g. H100,H200 (default: folder names)"
    )
    ap.add_argument("--json", type=Path, help="write every row as JSON")
    ap.add_argument("--cache-dir", type=Path)
    return ap


def rows_for(argv: list[str], cache: Path | None = None) -> list[dict[str, Any]]:
    """The rows the command line `argv` (without the program name) validates; `cache` unless given."""
    args = parser().parse_args(argv)
    names = tuple(args.names.split(",", 1)) if args.names else None
    return validate(args.a_dir, args.b_dir, args.cache_dir or cache, names)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = rows_for(sys.argv[1:] if argv is None else argv)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
