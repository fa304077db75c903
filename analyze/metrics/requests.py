"""Per-request latency metrics (metrics.md §8.7) from the `requests` table, client clock.

TTFT = first token − arrival; E2E = finish − arrival; TPOT = (E2E − TTFT) / (output tokens − 1),
null for a single output token; ITL = gap between token-carrying chunks / tokens in the later chunk
(one sample per token). Times in seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

_Q = (0.5, 0.9, 0.99)


def request_table(requests: pl.DataFrame) -> pl.DataFrame:
    """One row per request with ttft_s, e2e_s, tpot_s, ok (no error and a first token)."""
    return requests.with_columns(
        ttft_s=(pl.col("first_token_ns") - pl.col("arrival_ns")) / 1e9,
        e2e_s=(pl.col("finish_ns") - pl.col("arrival_ns")) / 1e9,
    ).with_columns(
        tpot_s=pl.when(pl.col("output_tokens") > 1)
        .then((pl.col("e2e_s") - pl.col("ttft_s")) / (pl.col("output_tokens") - 1))
        .otherwise(None),
        ok=pl.col("error").is_null() & pl.col("first_token_ns").is_not_null(),
    )


def itl_samples(requests: pl.DataFrame) -> np.ndarray:
    """Inter-token latencies in seconds, one per token after each request's first chunk."""
    df = requests.select("req_id", "chunk_times_ns", "chunk_tokens").drop_nulls()
    if df.is_empty():
        return np.array([])
    ex = df.explode("chunk_times_ns", "chunk_tokens").with_columns(
        gap=pl.col("chunk_times_ns").diff().over("req_id"),
    )
    ex = ex.filter(pl.col("gap").is_not_null() & (pl.col("chunk_tokens") > 0))
    per_token = (ex["gap"] / ex["chunk_tokens"] / 1e9).to_numpy()
    reps = ex["chunk_tokens"].to_numpy().astype(np.int64)
    return np.repeat(per_token, reps)


def _scalar(value: Any) -> float:
    """A polars scalar aggregate as a float (polars types them as any Python scalar)."""
    return float(value)


def _dist(values: np.ndarray | pl.Series) -> dict[str, Any]:
    arr = np.asarray(
        values.drop_nulls().to_numpy() if isinstance(values, pl.Series) else values, dtype=np.float64
    )
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    q = np.quantile(arr, _Q)
    return {
        "mean": float(arr.mean()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "n": int(arr.size),
    }


def request_metrics(
    requests: pl.DataFrame, *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
) -> dict[str, Any]:
    """Summary over requests: distributions (mean over requests, p50/p90/p99), token-weighted TPOT,
    throughput over the requests' makespan, errors, and goodput when SLOs are given."""
    if requests.is_empty():
        return {"requests": 0}
    t = request_table(requests)
    ok = t.filter(pl.col("ok"))
    makespan: float | None = None
    if ok.height:
        makespan = (_scalar(ok["finish_ns"].max()) - _scalar(t["arrival_ns"].min())) / 1e9
    decode = ok.filter(pl.col("output_tokens") > 1)
    weighted = None
    if decode.height:
        weighted = _scalar((decode["e2e_s"] - decode["ttft_s"]).sum()) / _scalar(
            (decode["output_tokens"] - 1).sum()
        )
    out: dict[str, Any] = {
        "requests": t.height,
        "succeeded": ok.height,
        "failed": t.height - ok.height,
        "errors": sorted({e for e in t["error"].drop_nulls().to_list()})[:10],
        "ttft_s": _dist(ok["ttft_s"]),
        "tpot_s": _dist(ok["tpot_s"]),
        "tpot_token_weighted_s": weighted,
        "itl_s": _dist(itl_samples(ok)),
        "e2e_s": _dist(ok["e2e_s"]),
        "output_tokens": int(ok["output_tokens"].sum() or 0),
        "prompt_tokens": int(ok["prompt_tokens"].sum() or 0),
        "makespan_s": makespan,
        "requests_per_s": ok.height / makespan if makespan else None,
        "output_tokens_per_s": _scalar(ok["output_tokens"].sum() or 0) / makespan if makespan else None,
    }
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = ok
        if slo_ttft_s is not None:
            good = good.filter(pl.col("ttft_s") <= slo_ttft_s)
        if slo_tpot_s is not None:
            good = good.filter(pl.col("tpot_s").is_null() | (pl.col("tpot_s") <= slo_tpot_s))
        out["goodput"] = {
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "good_requests": good.height,
            "good_requests_per_s": good.height / makespan if makespan else None,
            "fraction": good.height / t.height,
        }
    return out
