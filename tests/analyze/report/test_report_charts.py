"""Chart functions on small hand-made frames: the specs carry the expected encodings and data,
missing cost/accuracy are handled as documented, and large frames cannot produce huge specs."""

from __future__ import annotations

import csv
import io
import json
import math

import altair as alt
import numpy as np
import polars as pl
import pytest

from moecap.analyze.report import charts as C


def _data(spec: dict) -> list[dict]:
    """Every inline dataset of a spec as rows (top-level datasets, inline `values`, CSV text)."""
    rows: list[dict] = []
    for values in spec.get("datasets", {}).values():
        rows += list(csv.DictReader(io.StringIO(values))) if isinstance(values, str) else values
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "values" in data:
                values = data["values"]
                if isinstance(values, str):
                    rows += list(csv.DictReader(io.StringIO(values)))
                else:
                    rows += values
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return rows


def _encodings(spec: dict) -> list[dict]:
    out = []
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "encoding" in node:
                out.append(node["encoding"])
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return out


def _fields(spec: dict) -> set[tuple[str, str]]:
    return {
        (ch, enc[ch]["field"])
        for enc in _encodings(spec)
        for ch in enc
        if isinstance(enc[ch], dict) and "field" in enc[ch]
    }


def _shares(phases=("prefill", "decode"), layers=3, experts=4) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for ph in phases:
        for layer in range(layers):
            tokens = rng.integers(0, 50, experts)
            for e in range(experts):
                rows.append({"phase": ph, "layer": layer, "expert": e, "tokens": int(tokens[e])})
    df = pl.DataFrame(rows)
    return df.with_columns(share=pl.col("tokens") / pl.col("tokens").sum().over("phase", "layer"))


def test_heatmap_encodes_layer_by_expert_share_per_phase_and_marks_the_hottest():
    shares = _shares()
    spec = C.expert_heatmap(shares).to_dict()
    assert spec["facet"]["row"]["field"] == "phase"
    assert {("x", "expert"), ("y", "layer"), ("color", "share")} <= _fields(spec)
    rows = _data(spec)
    assert len(rows) == shares.height
    hottest = {(r["phase"], r["layer"], r["expert"]) for r in rows if r["hottest"]}
    expected = {
        (r["phase"], r["layer"], r["expert"])
        for r in shares.filter(pl.col("share") == pl.col("share").max().over("phase", "layer")).iter_rows(
            named=True
        )
    }
    assert hottest == expected and len(hottest) == 6  # one per (phase, layer)
    assert "1/4" in json.dumps(spec["title"])  # the even-routing scale is stated


def test_heatmap_keeps_the_hottest_experts_when_too_large_and_says_so():
    shares = _shares(phases=("decode",), layers=10, experts=50)
    spec = C.expert_heatmap(shares, max_cells=100).to_dict()
    rows = _data(spec)
    kept = {int(r["expert"]) for r in rows}
    assert len(kept) == 10
    totals = shares.group_by("expert").agg(pl.col("share").sum()).sort("share", descending=True)
    assert kept == set(totals["expert"].head(10).to_list())
    assert "showing the 10 experts with the most tokens of 50" in json.dumps(spec["title"])


def test_a_deepseek_sized_heatmap_stays_small():
    """256 experts x 58 layers x 3 phases: CSV inline data keeps the spec under 2 MB."""
    shares = _shares(phases=("prefill", "mixed", "decode"), layers=58, experts=256)
    text = json.dumps(C.expert_heatmap(shares).to_dict())
    assert len(text) < 2_000_000
    assert '"type": "csv"' in text


def test_inline_data_is_json_when_short_csv_when_long_and_nan_becomes_null():
    short = C.inline_data(pl.DataFrame({"a": [1.0, math.nan], "b": ["x", "y"]}))
    assert short.to_dict()["values"] == [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}]
    long = C.inline_data(
        pl.DataFrame(
            {"a": np.arange(C.CSV_ABOVE_ROWS + 1, dtype=float), "b": ['x,"y'] * (C.CSV_ABOVE_ROWS + 1)}
        )
    )
    d = long.to_dict()
    assert d["format"] == {"type": "csv", "parse": {"a": "number"}}
    parsed = list(csv.DictReader(io.StringIO(d["values"])))
    assert len(parsed) == C.CSV_ABOVE_ROWS + 1 and parsed[0]["b"] == 'x,"y'


def test_frames_too_large_or_missing_columns_are_refused():
    big = pl.DataFrame({"phase": ["decode"] * (C.MAX_ROWS + 1), "layer": 0, "imbalance": 1.0})
    with pytest.raises(C.ChartDataError, match="aggregate"):
        C.layer_imbalance(big)
    with pytest.raises(C.ChartDataError, match="lacks column"):
        C.layer_imbalance(pl.DataFrame({"phase": ["decode"], "layer": [0]}))


def test_charts_accept_pandas_and_dicts():
    pd = pytest.importorskip("pandas")
    frame = {"phase": ["decode", "decode"], "layer": [0, 1], "imbalance": [1.5, 2.0]}
    a = C.layer_imbalance(frame).to_dict()
    b = C.layer_imbalance(pd.DataFrame(frame)).to_dict()
    assert _data(a) == _data(b) and len(_data(a)) == 3  # 2 rows + the even-load rule


def _steps() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "phase": ["prefill", "prefill", "decode", "decode"],
            "tokens": [512.0, 1024.0, 8.0, 16.0],
            "steps": [3, 2, 40, 40],
            "time_ms": [30.0, 55.0, 9.0, 9.5],
            "time_ms_p10": [28.0, 50.0, 8.5, 9.0],
            "time_ms_p90": [33.0, 60.0, 9.5, 10.0],
            "memory_bound_ms": [9.0, 9.5, 8.0, 8.1],
            "compute_bound_ms": [20.0, 41.0, 0.3, 0.6],
            "active_experts_per_layer": [58.0, 60.0, 20.0, 31.0],
        }
    )


def test_step_time_chart_draws_measured_points_and_both_roofline_bounds():
    spec = C.step_time_vs_tokens(_steps()).to_dict()
    assert spec["facet"]["field"] == "phase"
    folds = [t for layer in spec["spec"]["layer"] for t in layer.get("transform", []) if "fold" in t]
    assert folds[0]["fold"] == ["roofline_ms", "memory_bound_ms", "compute_bound_ms"]
    rows = _data(spec)
    assert [r["roofline_ms"] for r in rows] == [20.0, 41.0, 8.0, 8.1]  # max(memory, compute) per batch
    assert {("y", "time_ms"), ("y", "bound_ms"), ("x", "tokens")} <= _fields(spec)


def test_activated_experts_chart_has_the_uniform_routing_curve():
    spec = C.activated_experts_vs_tokens(_steps(), num_experts=60, top_k=4).to_dict()
    curve = [r for r in _data(spec) if "uniform" in r]
    assert curve and all(0 < r["uniform"] <= 60 for r in curve)
    first = min(curve, key=lambda r: r["tokens"])
    assert first["uniform"] == pytest.approx(60 * (1 - (1 - 4 / 60) ** first["tokens"]), rel=1e-4)
    assert ("y", "active_experts_per_layer") in _fields(spec)


def test_timeline_charts_fold_their_series():
    tl = pl.DataFrame(
        {
            "t_start_s": [0.0, 1.0],
            "t_end_s": [1.0, 2.0],
            "s_mbu": [0.5, None],
            "s_mfu": [0.1, 0.2],
            "in_window": [0.0, 1.0],
            "busy_ms_per_step": [5.0, 6.0],
            "host_gap_ms_per_step": [1.0, 4.0],
        }
    )
    util = C.utilisation_over_time(tl).to_dict()
    assert any(
        t.get("fold") == ["s_mbu", "s_mfu"] for layer in util["layer"] for t in layer.get("transform", [])
    )
    acct = C.time_accounting(tl).to_dict()
    # One bar per bin from its start to its end, busy from 0 and the gap stacked on it (by hand).
    rows = [r for d in acct["datasets"].values() for r in d]
    got = sorted((r["t_start_s"], r["t_end_s"], r["part"], r["lo"], r["hi"]) for r in rows)
    assert got == [
        (0.0, 1.0, "GPU busy", 0.0, 5.0),
        (0.0, 1.0, "host gap", 5.0, 6.0),
        (1.0, 2.0, "GPU busy", 0.0, 6.0),
        (1.0, 2.0, "host gap", 6.0, 10.0),
    ]
    assert acct["encoding"]["x2"]["field"] == "t_end_s" and acct["encoding"]["y2"]["field"] == "lo"
    assert "GPU busy 69%" in json.dumps(acct["title"])  # 11 / (11 + 5)


def _runs(**overrides) -> pl.DataFrame:
    base = {
        "run": ["a", "b", "c"],
        "cost_usd_per_m_output_tokens": [1.0, 2.0, 4.0],
        "accuracy": [0.8, 0.4, 0.6],
        "ttft_ms": [100.0, 50.0, 200.0],
        "tpot_ms": [10.0, 20.0, 5.0],
        "window_output_throughput": [500.0, 1000.0, 250.0],
    }
    base.update(overrides)
    return pl.DataFrame(base, schema_overrides={k: pl.Float64 for k in base if k != "run"})


def test_radar_scores_are_relative_to_the_best_run():
    geometry, notes = C.radar_frame(_runs())
    assert notes == []
    pts = geometry.filter(pl.col("kind") == "run").unique(["series", "axis"])
    score = {(r["series"], r["axis"]): r["score"] for r in pts.iter_rows(named=True)}
    assert score[("a", "cost")] == 1.0 and score[("c", "cost")] == pytest.approx(0.25)  # lower is better
    assert score[("b", "throughput")] == 1.0 and score[("c", "throughput")] == pytest.approx(0.25)
    assert score[("b", "accuracy")] == pytest.approx(0.5)  # 0.4 / 0.8
    # Polygons are closed: first vertex repeated.
    a = geometry.filter((pl.col("kind") == "run") & (pl.col("series") == "a")).sort("order")
    assert a.height == 6 and (a["x"][0], a["y"][0]) == (a["x"][-1], a["y"][-1])
    spec = C.cap_radar(_runs()).to_dict()
    assert "best / value where lower is better" in json.dumps(spec["title"])


def test_radar_shows_na_axes_and_leaves_out_runs_missing_a_figure():
    runs = _runs(cost_usd_per_m_output_tokens=[None, None, None], accuracy=[0.8, None, 0.6])
    geometry, notes = C.radar_frame(runs)
    labels = geometry.filter(pl.col("kind") == "label")["text"].to_list()
    assert "cost\nn/a" in labels
    assert notes == ["n/a (no run has it): cost", "left out b (no accuracy)"]
    assert set(geometry.filter(pl.col("kind") == "run")["series"].unique()) == {"a", "c"}
    assert "left out b (no accuracy)" in json.dumps(C.cap_radar(runs).to_dict()["title"])


def test_pareto_front_marks_only_undominated_runs():
    runs = _runs(
        run=["a", "b", "c", "d"],
        cost_usd_per_m_output_tokens=[1.0, 2.0, 3.0, None],
        window_output_throughput=[100.0, 300.0, 200.0, 50.0],
        accuracy=[0.1] * 4,
        ttft_ms=[1.0] * 4,
        tpot_ms=[1.0] * 4,
    )
    pts, notes, _, _ = C.pareto_points(runs, "cost")
    front = dict(zip(pts["run"].to_list(), pts["on_front"].to_list()))
    assert front == {"a": True, "b": True, "c": False}  # c: b is faster and cheaper
    assert notes == ["left out d (no cost or throughput)"]
    spec = C.pareto_front(runs, "cost").to_dict()
    assert {("x", "x"), ("y", "y"), ("color", "group")} <= _fields(spec)
    tpot = C.pareto_front(runs, "tpot").to_dict()
    assert "TPOT" in json.dumps(tpot["title"]) and len([r for r in _data(tpot) if "run" in r]) == 4


def test_latency_and_throughput_charts_encode_their_frames():
    lat = pl.DataFrame(
        {"run": ["a"] * 3, "metric": ["TTFT", "TPOT", "ITL"], "value_ms": [1.0, 2.0, 3.0], "cdf": [1.0] * 3}
    )
    spec = C.latency_cdf(lat).to_dict()
    assert [p["title"] for p in spec["hconcat"]] == ["TTFT", "TPOT", "ITL"]  # one panel per metric
    assert {("x", "value_ms"), ("y", "cdf"), ("color", "group"), ("detail", "run")} <= _fields(spec)
    tp = pl.DataFrame(
        {
            "run": ["a", "a"],
            "kind": ["steps", "run"],
            "batch_size": [4, 4],
            "window_output_throughput": [10.0, 12.0],
        }
    )
    spec = C.throughput_vs_batch(tp).to_dict()
    assert {("x", "batch_size"), ("y", "window_output_throughput")} <= _fields(spec)
    assert len(_data(spec)) == 2


def test_expert_load_chart_is_a_heat_strip_relative_to_even_routing():
    load = pl.DataFrame(
        {
            "step_start": [0, 10, 0, 10],
            "step_end": [9, 19, 9, 19],
            "expert_label": ["L1 E2", "L1 E2", "L0 E5", "L0 E5"],
            "share": [0.5, 0.25, 0.1, None],
            "tokens": [5, 2, 1, 0],
        }
    )
    spec = C.expert_load_over_time(load, num_experts=10).to_dict()
    assert spec["mark"]["type"] == "rect"
    assert spec["encoding"]["y"]["sort"] == ["L1 E2", "L0 E5"]
    assert spec["encoding"]["color"]["field"] == "load"
    assert [r["load"] for r in _data(spec)] == [5.0, 2.5, 1.0, None]


def test_every_chart_is_a_valid_vega_lite_spec():
    """Altair validates against the Vega-Lite schema on to_dict()."""
    charts = [
        C.expert_heatmap(_shares()),
        C.layer_imbalance(pl.DataFrame({"phase": ["decode"], "layer": [0], "imbalance": [1.2]})),
        C.activated_experts_vs_tokens(_steps(), num_experts=60, top_k=4),
        C.step_time_vs_tokens(_steps()),
        C.cap_radar(_runs()),
        C.pareto_front(_runs()),
    ]
    for chart in charts:
        assert isinstance(chart, alt.TopLevelMixin)
        assert chart.to_dict(validate=True)["$schema"].startswith(
            "https://vega.github.io/schema/vega-lite/v6"
        )


def test_radar_becomes_one_panel_per_run_beyond_the_overlay_limit():
    n = C.RADAR_OVERLAY_MAX + 1
    runs = _runs(
        run=[f"r{i}" for i in range(n)],
        cost_usd_per_m_output_tokens=[1.0 + i for i in range(n)],
        accuracy=[None] * n,
        ttft_ms=[10.0] * n,
        tpot_ms=[5.0 + i for i in range(n)],
        window_output_throughput=[100.0 * (i + 1) for i in range(n)],
    )
    spec = C.cap_radar(runs).to_dict()
    assert spec["facet"]["field"] == "panel" and spec["columns"] == 4
    rows = _data(spec)
    assert {r["panel"] for r in rows} == {f"r{i}" for i in range(n)}
    # Each panel has its own grid and exactly its own run's polygon.
    for i in range(n):
        mine = [r for r in rows if r["panel"] == f"r{i}"]
        assert {r["series"] for r in mine if r["kind"] == "run"} == {f"r{i}"}
        assert sum(r["kind"] == "ring" for r in mine) == 4 * 6
    labels = {r["text"] for r in rows if r["kind"] == "label"}
    assert labels == {"cost", "accuracy n/a", "TTFT", "TPOT", "throughput"}
    assert C.cap_radar(runs.head(C.RADAR_OVERLAY_MAX)).to_dict().get("facet") is None
