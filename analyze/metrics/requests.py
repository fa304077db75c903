"""Per-request latency metrics (docs/metrics.md §11) from the `requests` table, client clock.

The formulas are `moecap.schemas.latency` (shared with the collector's driver summary, which may
not import the analyzer); this module feeds them the table's columns and shapes the results as
Polars frames (per request: the `request_metrics` SQL view, the report) and metrics.json's
`requests` object.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from moecap.schemas import latency


def _nan(series: pl.Series) -> np.ndarray:
    return series.cast(pl.Float64).fill_null(np.nan).to_numpy()


def _ok(requests: pl.DataFrame) -> np.ndarray:
    """Succeeded: no error and a first token."""
    return (requests["error"].is_null() & requests["first_token_ns"].is_not_null()).to_numpy()


def _chunks(requests: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flat chunk times, flat chunk tokens, offsets, has_chunks) of the streamed chunk lists; a
    request whose lists are null (or differ in length) has none."""
    n = requests.height
    if "chunk_times_ns" not in requests.columns or "chunk_tokens" not in requests.columns:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(n + 1, np.int64), np.zeros(n, bool)
    times = requests["chunk_times_ns"].to_arrow()
    tokens = requests["chunk_tokens"].to_arrow()
    times = times.combine_chunks() if isinstance(times, pa.ChunkedArray) else times
    tokens = tokens.combine_chunks() if isinstance(tokens, pa.ChunkedArray) else tokens
    lt = pc.fill_null(pc.list_value_length(times), -1).to_numpy(zero_copy_only=False)
    ln = pc.fill_null(pc.list_value_length(tokens), -2).to_numpy(zero_copy_only=False)
    has = lt == ln
    lengths = np.where(has, np.maximum(lt, 0), 0).astype(np.int64)
    flat_t = pc.list_flatten(pc.if_else(pa.array(has), times, pa.nulls(n, times.type)))
    flat_n = pc.list_flatten(pc.if_else(pa.array(has), tokens, pa.nulls(n, tokens.type)))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return (
        flat_t.to_numpy(zero_copy_only=False).astype(np.int64),
        flat_n.to_numpy(zero_copy_only=False).astype(np.int64),
        offsets,
        has,
    )


def request_table(requests: pl.DataFrame) -> pl.DataFrame:
    """The requests with, per request: ok, ttft_s, e2e_s, decode_s, tpot_s, decode_tokens_per_s,
    itl_tokens, itl_mean_s, itl_max_s (null where not defined)."""
    ttft = latency.ttft_s(_nan(requests["arrival_ns"]), _nan(requests["first_token_ns"]))
    e2e = latency.e2e_s(_nan(requests["arrival_ns"]), _nan(requests["finish_ns"]))
    out_n = _nan(requests["output_tokens"])
    tpot = latency.tpot_s(ttft, e2e, out_n)
    t, n, offsets, has = _chunks(requests)
    _, itl_tokens, itl_mean, itl_max = latency.itl_per_request(t, n, offsets)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(tpot > 0, 1.0 / tpot, np.nan)  # decode tokens per second: 1 / TPOT
    cols = {
        "ok": pl.Series(_ok(requests)),
        "ttft_s": pl.Series(ttft),
        "e2e_s": pl.Series(e2e),
        "decode_s": pl.Series(latency.decode_s(ttft, e2e)),
        "tpot_s": pl.Series(tpot),
        "decode_tokens_per_s": pl.Series(rate),
        "itl_tokens": pl.Series(np.where(has, itl_tokens, -1)),
        "itl_mean_s": pl.Series(itl_mean),
        "itl_max_s": pl.Series(itl_max),
    }
    return (
        requests.with_columns(**cols)
        .with_columns(
            pl.col(c).fill_nan(None)
            for c in (
                "ttft_s",
                "e2e_s",
                "decode_s",
                "tpot_s",
                "decode_tokens_per_s",
                "itl_mean_s",
                "itl_max_s",
            )
        )
        .with_columns(itl_tokens=pl.when(pl.col("itl_tokens") >= 0).then(pl.col("itl_tokens")))
    )


def itl_samples(requests: pl.DataFrame) -> np.ndarray:
    """Inter-token latencies in seconds, one per token after each request's first chunk."""
    t, n, offsets, _ = _chunks(requests)
    return latency.itl_per_request(t, n, offsets)[0]


def request_metrics(
    requests: pl.DataFrame, *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
) -> dict[str, Any]:
    """metrics.json `requests`: `latency.request_summary` over the table, plus the first errors."""
    if requests.is_empty():
        return {"requests": 0}
    t, n, offsets, _ = _chunks(requests)
    out = latency.request_summary(
        arrival_ns=_nan(requests["arrival_ns"]),
        first_token_ns=_nan(requests["first_token_ns"]),
        finish_ns=_nan(requests["finish_ns"]),
        output_tokens=_nan(requests["output_tokens"]),
        prompt_tokens=_nan(requests["prompt_tokens"]),
        ok=_ok(requests),
        chunk_times_ns=t,
        chunk_tokens=n,
        chunk_offsets=offsets,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
    )
    errors = sorted({e for e in requests["error"].drop_nulls().to_list()})[:10]
    return {**{k: out[k] for k in ("requests", "succeeded", "failed")}, "errors": errors, **out}
