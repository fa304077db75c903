"""Every documented example query runs on the sample traces, and its result matches a computation made
straight from the trace files (pyarrow + polars/numpy), or metrics.json for the run-level ones."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import polars as pl
import pytest
from sql_helpers import RawRun

from moecap.analyze.sql import EXAMPLES, Example, Tables

Check = Callable[[pl.DataFrame, Tables, dict[str, RawRun]], None]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


def _close(a: object, b: object, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-12)  # type: ignore[arg-type]


def _all_steps(raw: dict[str, RawRun]) -> pl.DataFrame:
    return pl.concat(
        [
            r.steps.with_columns(
                run_id=pl.lit(rid), time_s=(pl.col("gpu_end_ns") - pl.col("gpu_start_ns")) / 1e9
            )
            for rid, r in raw.items()
        ]
    )


def _imbalance(r: RawRun) -> pl.DataFrame:
    """Per step: mean over layers of max/mean expert load (layers with tokens), from the raw counts."""
    c = r.counts.astype(np.float64)
    tokens = c.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(tokens > 0, c.max(axis=2) / (tokens / r.num_experts), np.nan)
    return pl.DataFrame({"step": r.count_steps, "imbalance": np.nanmean(ratio, axis=1)})


@check("steps_per_phase")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    expected = (
        _all_steps(raw)
        .group_by("run_id", "phase")
        .agg(steps=pl.len(), tokens=pl.col("num_tokens").sum(), batch_mean=pl.col("num_reqs").mean())
        .sort("run_id", "phase")
    )
    assert got["steps"].to_list() == expected["steps"].to_list()
    assert got["tokens"].to_list() == expected["tokens"].to_list()
    assert np.allclose(got["batch_mean"].to_numpy(), expected["batch_mean"].to_numpy())
    assert got["steps"].sum() == sum(r.steps.height for r in raw.values())


@check("tokens_per_layer")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        mine = got.filter(pl.col("run_id") == rid)
        assert mine["routed_tokens"].to_list() == r.counts.sum(axis=(0, 2)).tolist()
        assert mine["experts_used"].to_list() == (r.counts.sum(axis=0) > 0).sum(axis=1).tolist()


@check("top_experts_per_layer")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        totals = r.counts.sum(axis=0)  # [layers, experts]
        mine = got.filter(pl.col("run_id") == rid)
        assert mine.height == 3 * len(r.layer_ids)
        for li, layer in enumerate(r.layer_ids):
            order = sorted(range(r.num_experts), key=lambda e: (-totals[li, e], e))[:3]
            rows = mine.filter(pl.col("layer") == layer).sort("rank")
            assert rows["expert"].to_list() == order
            assert rows["tokens"].to_list() == [int(totals[li, e]) for e in order]
            assert np.allclose(
                rows["share"].to_numpy(), [round(totals[li, e] / totals[li].sum(), 4) for e in order]
            )


def _raw_decode_batch(r: RawRun) -> pl.DataFrame:
    ex = (
        r.steps.select("step", "num_reqs", "req_ids", "req_num_logits")
        .explode("req_ids", "req_num_logits")
        .sort("step")
        .with_columns(
            earlier=pl.col("req_num_logits").cast(pl.Int64).cum_sum().over("req_ids")
            - pl.col("req_num_logits")
        )
    )
    return ex.filter(pl.col("earlier") > 0).group_by("req_ids").agg(decode_batch=pl.col("num_reqs").mean())


@check("tpot_by_batch_size")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        req = r.requests.with_columns(
            tpot_s=(
                (pl.col("finish_ns") - pl.col("arrival_ns")) / 1e9
                - (pl.col("first_token_ns") - pl.col("arrival_ns")) / 1e9
            )
            / (pl.col("output_tokens") - 1)
        ).join(_raw_decode_batch(r), left_on="req_id", right_on="req_ids")
        expected = (
            req.with_columns(bs=pl.col("decode_batch").round(0))
            .group_by("bs")
            .agg(
                n=pl.len(),
                mean=pl.col("tpot_s").mean() * 1e3,
                p50=pl.col("tpot_s").quantile(0.5, "linear") * 1e3,
                p90=pl.col("tpot_s").quantile(0.9, "linear") * 1e3,
            )
            .sort("bs")
        )
        mine = got.filter(pl.col("run_id") == rid)
        assert mine["decode_batch_size"].to_list() == expected["bs"].to_list()
        assert mine["requests"].to_list() == expected["n"].to_list()
        for a, b in (("tpot_ms_mean", "mean"), ("tpot_ms_p50", "p50"), ("tpot_ms_p90", "p90")):
            assert np.allclose(mine[a].to_numpy(), expected[b].to_numpy(), rtol=1e-9), a
        assert mine["requests"].sum() == r.requests.height


@check("decode_step_time_by_batch_size")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    expected = (
        _all_steps(raw)
        .filter(pl.col("phase") == "decode")
        .group_by("run_id", "num_reqs")
        .agg(
            n=pl.len(), mean=pl.col("time_s").mean() * 1e3, p90=pl.col("time_s").quantile(0.9, "linear") * 1e3
        )
        .sort("run_id", "num_reqs")
    )
    assert got["batch_size"].to_list() == expected["num_reqs"].to_list()
    assert got["steps"].to_list() == expected["n"].to_list()
    assert np.allclose(got["step_ms_mean"].to_numpy(), expected["mean"].to_numpy(), rtol=1e-9)
    assert np.allclose(got["step_ms_p90"].to_numpy(), expected["p90"].to_numpy(), rtol=1e-9)
    s_mbu = (
        t.lazy("step_metrics")
        .filter((pl.col("phase") == "decode") & (pl.col("num_tokens") > 0))  # idle steps have no S-MBU
        .group_by("run_id", "num_reqs")
        .agg(
            s=pl.col("bytes_total").sum()
            / (pl.col("gpu_bandwidth").cast(pl.Float64).first() * (pl.col("time_s") * pl.col("gpus")).sum())
        )
        .sort("run_id", "num_reqs")
        .collect()
    )
    assert np.allclose(got["s_mbu"].to_numpy(), s_mbu["s"].to_numpy(), rtol=1e-9)


@check("slowest_steps")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    steps = _all_steps(raw).sort(["time_s", "run_id", "step"], descending=[True, False, False]).head(10)
    assert list(zip(got["run_id"], got["step"])) == list(zip(steps["run_id"], steps["step"]))
    assert np.allclose(got["time_ms"].to_numpy(), steps["time_s"].to_numpy() * 1e3, rtol=1e-12)
    for row, exp in zip(got.iter_rows(named=True), steps.iter_rows(named=True)):
        new = exp["req_new_tokens"]
        assert row["num_reqs"] == exp["num_reqs"] == len(new)
        assert row["prompt_chunk_reqs"] == sum(1 for n in new if n > 1)
        assert row["prompt_chunk_tokens"] == sum(n for n in new if n > 1)
        assert row["single_token_reqs"] == sum(1 for n in new if n == 1)
        assert row["longest_prefix"] == max(exp["req_prefix_lens"])
        assert row["context_tokens"] == sum(p + n for p, n in zip(exp["req_prefix_lens"], new))
        imb = _imbalance(raw[exp["run_id"]]).filter(pl.col("step") == exp["step"])["imbalance"][0]
        assert _close(row["imbalance_mean"], imb)


@check("imbalance_vs_step_time")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    assert got.height > 0
    for rid, r in raw.items():
        decode = (
            r.steps.filter(pl.col("phase") == "decode")
            .select("step", "num_reqs", time_s=(pl.col("gpu_end_ns") - pl.col("gpu_start_ns")) / 1e9)
            .join(_imbalance(r), on="step")
        )
        mine = got.filter(pl.col("run_id") == rid)
        groups = [(bs, g) for (bs,), g in decode.group_by(["num_reqs"]) if g.height >= 3]
        assert sorted(bs for bs, _ in groups) == mine["batch_size"].to_list()
        for bs, g in groups:
            row = mine.filter(pl.col("batch_size") == bs).row(0, named=True)
            assert row["steps"] == g.height
            assert _close(row["imbalance_mean"], g["imbalance"].mean())
            assert _close(row["step_ms_mean"], g["time_s"].mean() * 1e3)
            assert _close(
                row["corr_imbalance_time"], np.corrcoef(g["imbalance"], g["time_s"])[0, 1], rel=1e-6
            )


@check("smbu_over_window")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    n = 0
    for run in t.document["runs"]:
        for phase, doc in run["metrics"]["steps"].items():
            row = got.filter((pl.col("run_id") == run["run_id"]) & (pl.col("phase") == phase)).row(
                0, named=True
            )
            assert row["steps"] == doc["steps"]
            assert _close(row["s_mbu"], doc["s_mbu"]) and _close(row["s_mfu"], doc["s_mfu"])
            n += 1
    assert n == got.height


@check("time_accounting")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    # host gap: GPU idle from a step's GPU end to the next step's GPU start (0 after the last step)
    steps = (
        _all_steps(raw)
        .sort("run_id", "step")
        .with_columns(next_start=pl.col("gpu_start_ns").shift(-1).over("run_id"))
        .with_columns(
            gap=((pl.col("next_start") - pl.col("gpu_end_ns")).clip(lower_bound=0) / 1e9).fill_null(0.0)
        )
        .with_columns(wall_s=pl.col("time_s") + pl.col("gap"))
    )
    expected = (
        steps.group_by("run_id", "phase")
        .agg(n=pl.len(), busy=pl.col("time_s").sum(), gap=pl.col("gap").sum(), wall=pl.col("wall_s").sum())
        .sort("run_id", "phase")
    )
    assert got["steps"].to_list() == expected["n"].to_list()
    for a, b in (("gpu_busy_s", "busy"), ("host_gap_s", "gap"), ("wall_s", "wall")):
        assert np.allclose(got[a].to_numpy(), expected[b].to_numpy(), rtol=1e-9), a


@check("latency_percentiles")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        req = r.requests.with_columns(
            ttft=(pl.col("first_token_ns") - pl.col("arrival_ns")) / 1e9,
            e2e=(pl.col("finish_ns") - pl.col("arrival_ns")) / 1e9,
        ).with_columns(tpot=(pl.col("e2e") - pl.col("ttft")) / (pl.col("output_tokens") - 1))
        row = got.filter(pl.col("run_id") == rid).row(0, named=True)
        assert row["requests"] == req.height
        assert row["output_tokens"] == req["output_tokens"].sum()
        assert _close(row["ttft_s_mean"], req["ttft"].mean())
        assert _close(row["ttft_s_p99"], req["ttft"].quantile(0.99, "linear"))
        assert _close(row["tpot_s_mean"], req["tpot"].mean())
        assert _close(row["tpot_s_p99"], req["tpot"].quantile(0.99, "linear"))
        assert _close(row["e2e_s_mean"], req["e2e"].mean())


@check("compare_runs")
def _(got: pl.DataFrame, t: Tables, raw: dict[str, RawRun]) -> None:
    assert got.height == len(raw)
    for row in got.iter_rows(named=True):
        run = next(r for r in t.document["runs"] if r["run_id"] == row["run_id"])
        doc = run["metrics"]["steps"]["all"]
        assert row["batch_size"] == run["workload"]["batch_size"]
        assert row["steps"] == doc["steps"]
        assert _close(row["s_mbu"], doc["s_mbu"]) and _close(row["s_mfu"], doc["s_mfu"])
        assert _close(row["step_ms_mean"], doc["step_time_s_mean"] * 1e3)
        assert _close(row["window_output_throughput"], doc["window_output_throughput"])
    assert got["batch_size"].to_list() == sorted(got["batch_size"].to_list())


def test_every_example_has_an_independent_check() -> None:
    assert sorted(CHECKS) == sorted(e.name for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_example_query(example: Example, t: Tables, raw: dict[str, RawRun]) -> None:
    got = t.pl(example.sql)
    assert got.height > 0
    CHECKS[example.name](got, t, raw)
