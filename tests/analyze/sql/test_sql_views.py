"""The views agree with the trace files (read with pyarrow, summed with numpy/polars) and with metrics.json."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from sql_helpers import BATCH_SIZES, RawRun

from moecap.analyze.metrics.window import IN_WINDOW_SQL
from moecap.analyze.specs import resolve_gpu
from moecap.analyze.sql import Tables, tables

REL = 1e-9


def _close(a: float | None, b: float | None, rel: float = REL) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


def test_step_count_is_the_row_count_pyarrow_reads(t: Tables, raw: dict[str, RawRun]) -> None:
    assert t.sql("SELECT count(*) FROM steps").fetchall()[0][0] == sum(r.steps.height for r in raw.values())
    per_run = dict(t.sql("SELECT run_id, count(*) FROM steps GROUP BY run_id").fetchall())
    assert per_run == {rid: r.steps.height for rid, r in raw.items()}


def test_expert_tokens_per_layer_is_the_numpy_sum_of_the_raw_counts(
    t: Tables, raw: dict[str, RawRun]
) -> None:
    got = t.pl(
        "SELECT run_id, layer, sum(tokens)::BIGINT AS tokens FROM expert_tokens GROUP BY ALL ORDER BY ALL"
    )
    for rid, r in raw.items():
        mine = got.filter(pl.col("run_id") == rid)
        expected = r.counts.sum(axis=(0, 2))
        assert mine["layer"].to_list() == r.layer_ids
        assert mine["tokens"].to_list() == expected.tolist()


def test_expert_tokens_per_layer_and_expert(t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        got = t.pl(
            "SELECT layer, expert, sum(tokens)::BIGINT AS tokens FROM expert_tokens WHERE run_id = ? "
            "GROUP BY ALL ORDER BY ALL",
            [rid],
        )
        assert np.array_equal(
            got["tokens"].to_numpy().reshape(len(r.layer_ids), r.num_experts), r.counts.sum(axis=0)
        )
        totals = t.pl(
            "SELECT layer, expert, sum(tokens)::BIGINT AS tokens FROM expert_totals WHERE run_id = ? "
            "GROUP BY ALL ORDER BY ALL",
            [rid],
        )
        assert totals["tokens"].to_list() == got["tokens"].to_list()


def test_expert_tokens_of_one_step_are_that_steps_counts(t: Tables, raw: dict[str, RawRun]) -> None:
    rid, r = next(iter(raw.items()))
    i = len(r.count_steps) // 2
    got = t.pl(
        "SELECT tokens FROM expert_tokens WHERE run_id = ? AND step = ? ORDER BY layer, expert",
        [rid, int(r.count_steps[i])],
    )
    assert got["tokens"].to_list() == r.counts[i].ravel().tolist()


def test_step_metrics_time_is_the_gpu_span(t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        got = t.pl("SELECT step, time_s, num_tokens FROM step_metrics WHERE run_id = ? ORDER BY step", [rid])
        expected = r.steps.sort("step").select(
            "step", time_s=(pl.col("gpu_end_ns") - pl.col("gpu_start_ns")) / 1e9, num_tokens="num_tokens"
        )
        assert got["step"].to_list() == expected["step"].to_list()
        assert got["num_tokens"].to_list() == expected["num_tokens"].to_list()
        assert np.allclose(got["time_s"].to_numpy(), expected["time_s"].to_numpy(), rtol=1e-12)


@pytest.mark.parametrize("phase", ["all", "decode", "mixed", "prefill"])
def test_step_metrics_over_the_window_give_metrics_json(t: Tables, phase: str) -> None:
    for run in t.document["runs"]:
        rid = run["run_id"]
        doc = run["metrics"]["steps"].get(phase)
        if doc is None:
            continue
        phase_filter = "" if phase == "all" else f"AND phase = '{phase}'"
        s = t.sql(
            f"""SELECT count(*) AS steps, sum(num_tokens)::BIGINT AS tokens,
                       sum(bytes_total) / (any_value(gpu_bandwidth) * sum(time_s * gpus)) AS s_mbu,
                       sum(flops_total) / (any_value(gpu_peak_flops) * sum(time_s * gpus)) AS s_mfu,
                       sum(bytes_total) AS bytes_total, sum(time_s * gpus) AS gpu_seconds
                FROM step_metrics s JOIN run_windows w USING (run_id)
                WHERE run_id = ? AND NOT is_draft AND time_s > 0 AND {IN_WINDOW_SQL} {phase_filter}""",
            [rid],
        ).fetchall()[0]
        assert s[0] == doc["steps"] and s[1] == doc["tokens"]
        assert _close(s[2], doc["s_mbu"]) and _close(s[3], doc["s_mfu"])
        assert _close(s[4], doc["bytes_total"]) and _close(s[5], doc["gpu_seconds"])
        # the same through window_steps, and as run_metrics holds it
        w = t.sql(
            f"SELECT sum(bytes_total) / (any_value(gpu_bandwidth) * sum(time_s * gpus)) FROM window_steps "
            f"WHERE run_id = ? {phase_filter}",
            [rid],
        ).fetchall()[0][0]
        assert _close(w, doc["s_mbu"])
        m = t.sql(
            "SELECT s_mbu, s_mfu, steps FROM run_metrics WHERE run_id = ? AND phase = ?", [rid, phase]
        ).fetchall()
        assert len(m) == 1 and m[0][2] == doc["steps"]
        assert _close(m[0][0], doc["s_mbu"]) and _close(m[0][1], doc["s_mfu"])


def test_window_is_the_steady_state_of_the_raw_steps(t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        bs = int(rid.rsplit("bs", 1)[1])
        steady = r.steps.filter(pl.col("num_reqs") >= math.ceil(0.9 * bs))
        n = t.sql("SELECT count(*) FROM window_steps WHERE run_id = ?", [rid]).fetchall()[0][0]
        assert n == steady.height > 0


def _raw_request_frame(r: RawRun) -> pl.DataFrame:
    return r.requests.with_columns(
        ttft_s=(pl.col("first_token_ns") - pl.col("arrival_ns")) / 1e9,
        e2e_s=(pl.col("finish_ns") - pl.col("arrival_ns")) / 1e9,
    ).with_columns(tpot_s=(pl.col("e2e_s") - pl.col("ttft_s")) / (pl.col("output_tokens") - 1))


def test_request_metrics_are_the_raw_latencies(t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        got = t.pl(
            "SELECT req_id, ttft_s, e2e_s, tpot_s, ok FROM request_metrics WHERE run_id = ? ORDER BY req_id",
            [rid],
        )
        expected = _raw_request_frame(r).sort("req_id")
        assert got["req_id"].to_list() == expected["req_id"].to_list()
        assert got["ok"].all()
        for col in ("ttft_s", "e2e_s", "tpot_s"):
            assert np.allclose(got[col].to_numpy(), expected[col].to_numpy(), rtol=1e-12), col


def test_request_metrics_aggregate_to_metrics_json(t: Tables) -> None:
    for run in t.document["runs"]:
        doc = run["metrics"]["requests"]
        row = t.sql(
            """SELECT count(*), avg(ttft_s), quantile_cont(ttft_s, 0.99), avg(tpot_s), quantile_cont(tpot_s, 0.5),
                      avg(e2e_s), sum(decode_s) / sum(output_tokens - 1),
                      sum(itl_mean_s * itl_tokens) / sum(itl_tokens), sum(itl_tokens)::BIGINT,
                      sum(output_tokens)::BIGINT
               FROM request_metrics WHERE run_id = ? AND ok""",
            [run["run_id"]],
        ).fetchall()[0]
        assert row[0] == doc["succeeded"]
        assert _close(row[1], doc["ttft_s"]["mean"]) and _close(row[2], doc["ttft_s"]["p99"])
        assert _close(row[3], doc["tpot_s"]["mean"]) and _close(row[4], doc["tpot_s"]["p50"])
        assert _close(row[5], doc["e2e_s"]["mean"])
        assert _close(row[6], doc["tpot_token_weighted_s"])
        assert _close(row[7], doc["itl_s"]["mean"]) and row[8] == doc["itl_s"]["n"]
        assert row[9] == doc["output_tokens"]


def test_itl_max_is_the_largest_chunk_gap(t: Tables, raw: dict[str, RawRun]) -> None:
    rid, r = next(iter(raw.items()))
    expected = (
        r.requests.select("req_id", "chunk_times_ns", "chunk_tokens")
        .explode("chunk_times_ns", "chunk_tokens")
        .with_columns(gap=pl.col("chunk_times_ns").diff().over("req_id"))
        .group_by("req_id")
        .agg(itl_max_s=(pl.col("gap") / pl.col("chunk_tokens")).max() / 1e9)
        .sort("req_id")
    )
    got = t.pl("SELECT req_id, itl_max_s FROM request_metrics WHERE run_id = ? ORDER BY req_id", [rid])
    assert np.allclose(got["itl_max_s"].to_numpy(), expected["itl_max_s"].to_numpy(), rtol=1e-12)


def _raw_request_steps(r: RawRun) -> pl.DataFrame:
    """Per request from the raw steps: steps, computed tokens, decode batch size (a step is a decode
    step for a request once the request sampled a token in an earlier step)."""
    ex = (
        r.steps.select("step", "num_reqs", "req_ids", "req_new_tokens", "req_num_logits")
        .explode("req_ids", "req_new_tokens", "req_num_logits")
        .sort("step")
        .with_columns(
            earlier=pl.col("req_num_logits").cast(pl.Int64).cum_sum().over("req_ids")
            - pl.col("req_num_logits")
        )
    )
    return (
        ex.group_by("req_ids")
        .agg(
            steps=pl.len(),
            computed_tokens=pl.col("req_new_tokens").sum(),
            decode_steps=(pl.col("earlier") > 0).sum(),
            decode_batch=pl.col("num_reqs").filter(pl.col("earlier") > 0).mean(),
        )
        .sort("req_ids")
    )


def test_request_steps_are_the_raw_batch_composition(t: Tables, raw: dict[str, RawRun]) -> None:
    for rid, r in raw.items():
        expected = _raw_request_steps(r)
        got = t.pl(
            "SELECT engine_req_id, steps, computed_tokens, decode_steps, decode_batch_reqs_mean "
            "FROM request_steps WHERE run_id = ? ORDER BY engine_req_id",
            [rid],
        )
        assert got["engine_req_id"].to_list() == expected["req_ids"].to_list()
        assert got["steps"].to_list() == expected["steps"].to_list()
        assert got["computed_tokens"].to_list() == expected["computed_tokens"].to_list()
        assert got["decode_steps"].to_list() == expected["decode_steps"].to_list()
        assert np.allclose(got["decode_batch_reqs_mean"].to_numpy(), expected["decode_batch"].to_numpy())
        # every request computed its prompt and all but its last output token
        joined = t.sql(
            "SELECT bool_and(s.computed_tokens = r.prompt_tokens + r.output_tokens - 1) "
            "FROM request_metrics r JOIN request_steps s USING (run_id, engine_req_id) WHERE run_id = ?",
            [rid],
        ).fetchall()[0][0]
        assert joined is True


def test_run_metrics_has_a_row_per_run_and_phase(t: Tables) -> None:
    rows = t.pl("SELECT run_id, phase, batch_size, gpu, retargeted FROM run_metrics ORDER BY run_id, phase")
    expected = sorted((r["run_id"], p) for r in t.document["runs"] for p in r["metrics"]["steps"])
    assert list(zip(rows["run_id"], rows["phase"])) == expected
    assert sorted(set(rows["batch_size"].to_list())) == list(BATCH_SIZES)
    assert rows["retargeted"].to_list() == [False] * rows.height


def test_gpu_retargeting_scales_step_metrics(t: Tables, sql_trace_files, sql_cache) -> None:  # type: ignore[no-untyped-def]
    h200 = resolve_gpu("H200")
    with tables([str(p) for p in sql_trace_files], cache_dir=sql_cache, gpu="H200") as other:
        bw = other.sql("SELECT DISTINCT gpu_bandwidth::DOUBLE FROM step_metrics").fetchall()
        assert bw == [(h200.memory_bandwidth,)]
        for run in other.document["runs"]:
            rid = run["run_id"]
            here = other.sql(
                "SELECT s_mbu, retargeted FROM run_metrics WHERE run_id = ? AND phase = 'all'", [rid]
            ).fetchall()[0]
            assert here == (run["metrics"]["steps"]["all"]["s_mbu"], True)
            original = t.sql(
                "SELECT s_mbu FROM run_metrics WHERE run_id = ? AND phase = 'all'", [rid]
            ).fetchall()[0][0]
            h100_bw = t.sql("SELECT any_value(gpu_bandwidth)::DOUBLE FROM step_metrics").fetchall()[0][0]
            # same bytes and times, another bandwidth: S-MBU scales by the bandwidth ratio
            assert math.isclose(here[0], original * h100_bw / h200.memory_bandwidth, rel_tol=1e-9)
