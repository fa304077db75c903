"""Telling many runs apart: execution modes from recorded engine arguments, distinct colours,
labels without "#n", and cross-run axes that are clipped, logarithmic or start at 0 as stated."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moecap.analyze.report import charts as C
from moecap.analyze.report.groups import execution_mode, palette, run_groups, run_labels


@pytest.mark.parametrize(
    ("engine", "args", "mode"),
    [
        ("vllm", {"enforce_eager": False, "cudagraph_mode": "FULL_AND_PIECEWISE"}, "CUDA graphs"),
        ("vllm", {"enforce_eager": True}, "eager"),
        ("sglang", {"disable_cuda_graph": False}, "CUDA graphs"),
        ("sglang", {"disable_cuda_graph": True}, "eager"),
        ("hf", {"use_cuda_graph": [True, True]}, "CUDA graphs"),
        ("hf", {"use_cuda_graph": [False, False]}, "eager"),
        ("hf", {}, "eager"),  # transformers' default
        ("vllm", {}, "?"),  # the trace does not say
    ],
)
def test_execution_mode_from_engine_args(engine, args, mode):
    assert execution_mode(engine, args) == mode


@pytest.mark.parametrize("n", [1, 10, 11, 20, 21, 27, 60])
def test_palette_never_repeats(n):
    colours = palette(n)
    assert len(colours) == n == len(set(colours))
    assert all(len(c) == 7 and c.startswith("#") for c in colours)


def _rows():
    """`info_rows(analysis)` of four runs (the façade's `run_info` columns)."""

    def run(rid, bs, dataset="synthetic:1024x128"):
        return {
            "run_id": rid,
            "model": "Qwen/Qwen1.5-MoE-A2.7B",
            "engine": "hf",
            "gpu": "H100-SXM-80GB",
            "num_gpus": 1,
            "batch_size": bs,
            "dataset": dataset,
        }

    return [run("eager16", 16), run("graphs16", 16), run("eager16b", 16), run("eager1", 1)]


def test_labels_name_the_mode_and_fall_back_to_the_run_id_not_a_number():
    modes = {"eager16": "eager", "graphs16": "CUDA graphs", "eager16b": "eager", "eager1": "eager"}
    labels = run_labels(_rows(), modes)
    assert labels["graphs16"] == "Qwen1.5-MoE-A2.7B · hf · H100-SXM-80GB×1 · CUDA graphs · bs 16"
    assert labels["eager1"] == "Qwen1.5-MoE-A2.7B · hf · H100-SXM-80GB×1 · eager · bs 1"
    # Two eager bs-16 runs on the same dataset: told apart by their ids.
    assert labels["eager16"].endswith("· eager16") and labels["eager16b"].endswith("· eager16b")
    assert len(set(labels.values())) == 4 and not any("#" in v for v in labels.values())
    groups = run_groups(_rows(), modes)
    assert len(set(groups.values())) == 2  # eager and graphs, whatever the batch size


def test_latency_axes_end_at_p99_and_say_so_and_go_log_over_decades():
    rng = np.random.default_rng(0)
    rows = []
    for run, scale in (("fast", 5.0), ("slow", 140.0)):
        values = np.sort([*rng.uniform(scale, scale * 1.2, 99).tolist(), 8000.0])  # one huge tail
        for i, v in enumerate(values):
            rows.append({"run": run, "metric": "ITL", "value_ms": float(v), "cdf": (i + 1) / len(values)})
    spec = C.latency_cdf(pl.DataFrame(rows)).to_dict()
    x = spec["hconcat"][0]["encoding"]["x"]["scale"]
    p99 = float(np.quantile([r["value_ms"] for r in rows], 0.99))
    assert x["type"] == "log" and x["domain"][1] == pytest.approx(p99) and x["domain"][0] > 0
    assert any("clipped: ITL at" in line for line in spec["title"]["subtitle"])
    assert spec["hconcat"][0]["mark"]["clip"] is True


def test_pareto_axes_never_go_below_zero_and_bands_are_cut_at_zero():
    runs = pl.DataFrame(
        {
            "run": ["a", "b", "c"],
            "window_output_throughput": [100.0, 120.0, 150.0],
            "cost_usd_per_m_output_tokens": [1.0, 1.5, 2.0],
            "cost_band_low": [-2.0, 0.5, 1.0],
            "cost_band_high": [3.0, 2.0, 3.0],
        }
    )
    spec = C.pareto_front(runs, "cost").to_dict()
    scales = [
        layer["encoding"]["y"].get("scale", {})
        for layer in spec["layer"]
        if "scale" in layer["encoding"].get("y", {})
    ]
    assert scales and all(s.get("domainMin") == 0 and s.get("zero") is True for s in scales)
    values = [v for d in spec["datasets"].values() for v in d]
    assert min(v["y_low"] for v in values) == 0.0


def test_radar_small_multiples_share_a_log_scale_when_runs_span_decades():
    n = C.RADAR_OVERLAY_MAX + 2
    runs = pl.DataFrame(
        {
            "run": [f"r{i}" for i in range(n)],
            "cost_usd_per_m_output_tokens": [0.2] + [20.0] * (n - 1),  # 100x apart
            "accuracy": [None] * n,
            "ttft_ms": [10.0] * n,
            "tpot_ms": [5.0] + [150.0] * (n - 1),
            "window_output_throughput": [3000.0] + [8.0] * (n - 1),
        }
    )
    spec = C.cap_radar(runs).to_dict()
    assert "rings one decade apart (log scale" in " ".join(spec["title"]["subtitle"])
    geometry, _ = C.radar_frame(runs, log_decades=3)
    slow = geometry.filter(
        (pl.col("kind") == "run") & (pl.col("series") == "r1") & (pl.col("axis") == "throughput")
    )
    # 8 / 3000 = 10^-2.57: radius 1 - 2.57 / 3 = 0.14, not a dot at the centre (linear: 0.003).
    radius = float((slow["x"] ** 2 + slow["y"] ** 2).sqrt()[0])
    assert radius == pytest.approx(1 + np.log10(8 / 3000) / 3, rel=1e-6) and slow["score"][
        0
    ] == pytest.approx(8 / 3000)
    assert spec["facet"]["header"]["labelExpr"] == "split(datum.label, ' · ')"  # titles wrap, never cut


def test_whatif_chart_is_a_log_dot_plot_when_values_span_decades():
    frame = pl.DataFrame(
        {
            "run": ["hf", "hf", "sglang", "sglang"],
            "gpu": ["H100", "H200", "H100", "H200"],
            "model": ["measured", "projection", "measured", "projection"],
            "window_output_throughput": [8.0, 12.0, 2000.0, 2600.0],
        }
    )
    spec = C.whatif_projection(frame, "window_output_throughput", "tok/s").to_dict()
    first = spec["layer"][0]
    assert first["mark"]["type"] == "circle" and first["encoding"]["x"]["scale"]["type"] == "log"
    linear = C.whatif_projection(
        frame.filter(pl.col("run") == "sglang"), "window_output_throughput"
    ).to_dict()
    assert linear["layer"][0]["mark"]["type"] == "bar"
