"""Run-level values the reference publishes next to the continuous metrics (metrics.md section 5).

Restated from `openai_api_profile.run_async` and its helpers (`_client_prefill_records`,
`_mean_server_request_ttft`, `_prefill_step_totals`). They are computed from the raw records with their
own filters, so they can differ from the section-4 values (defects 7.14, 7.15). Client-side request
timings are not part of the records; where the reference falls back to them we use "unavailable"
(its value when no request succeeded: 0 for the simple TTFT / TPOT means).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from .continuous import is_number
from .cost import reference_cost

RUN_LEVEL_KEYS = (
    "cost",
    "e2e_s",
    "request_per_s",
    "server_request_ttft",
    "published_ttft",
    "prefill_pass_latency_s",
    "published_tpot",
    "prefill_forwarded_tokens",
    "prefill_step_elapsed_s",
    "avg_expert_activation_prefill",
    "avg_expert_activation_decode",
    "prefill_avg_batch_size",
    "decode_avg_batch_size",
)

_DECODE_MODES = ("decode", "decoding", "mixed")
#: The reference never trims more than this many leading passes as warm-up.
_MAX_TRIM = 4


def _nonneg(expr: pl.Expr) -> pl.Expr:
    """expr >= 0 the way Python compares: null and NaN are excluded."""
    return expr.is_not_null() & expr.is_not_nan() & (expr >= 0)


def _client_prefill_rows(frame: pl.DataFrame, n_client_requests: int) -> pl.DataFrame:
    """Prefill passes minus warm-up (`_client_prefill_records`): drop passes with seq_lens_sum <= 10; then,
    if their batch sizes sum past the client request count, drop up to 4 leading batch-1 passes shorter
    than 1000 tokens, but only if that lands the sum exactly on the count."""
    seq = pl.col("seq_lens_sum")
    passes = frame.filter((pl.col("forward_mode") == "prefill") & ~(seq.is_not_null() & (seq <= 10)))
    if n_client_requests <= 0 or passes.height == 0:
        return passes
    # int(batch_size or 0): null -> 0, truncated toward zero.
    rows_of = pl.col("batch_size").fill_null(0).fill_nan(0).cast(pl.Int64, strict=False).fill_null(0)
    rows = int(passes.select(rows_of.sum()).item())
    head = passes.head(_MAX_TRIM).select(
        rows_of.alias("rows"), pl.col("batch_size"), pl.col("seq_lens_sum").fill_null(0)
    )
    dropped = 0
    for n_rows, bsz, seq_len in head.iter_rows():
        if not (rows > n_client_requests and bsz == 1 and seq_len < 1000):
            break
        rows -= n_rows
        dropped += 1
    return passes.slice(dropped) if rows == n_client_requests else passes


def _mean_nonneg(frame: pl.DataFrame, column: str) -> float | None:
    values = frame.select(pl.col(column).filter(_nonneg(pl.col(column))))
    if values.height == 0:
        return None
    mean: float = values.select(pl.col(column).sum() / pl.len()).item()
    return mean


def _server_request_ttft(frame: pl.DataFrame) -> float | None:
    """`_mean_server_request_ttft`: per request, the summed latencies of the prefill passes carrying it;
    key req_id, else req_pool_idx, else skipped; the accumulator is reset when the request completes."""
    seq = pl.col("seq_lens_sum")
    info = pl.col("per_req_info")
    field = info.struct.field
    duration = pl.coalesce(pl.col("latency"), pl.col("ttft"))
    entries = (
        frame.lazy()
        .filter(
            (pl.col("forward_mode") == "prefill")
            & ~(seq.is_not_null() & (seq <= 10))
            & (info.list.len().fill_null(0) > 0)
            & duration.is_not_null()
        )
        .select(duration.alias("duration"), info)
        .explode("per_req_info")
        .select(
            pl.when(field("req_id").is_not_null())
            .then(pl.concat_str(pl.lit("id:"), field("req_id")))
            .otherwise(pl.concat_str(pl.lit("pool:"), field("req_pool_idx").cast(pl.String)))
            .alias("key"),
            pl.col("duration"),
            field("is_last_chunk").fill_null(False).alias("last"),
        )
        .filter(pl.col("key").is_not_null())
        # Completions before this entry, per key: a new accumulation starts after each last chunk.
        .with_columns(
            (pl.col("last").cast(pl.Int64).cum_sum() - pl.col("last").cast(pl.Int64)).over("key").alias("seg")
        )
        .group_by("key", "seg")
        .agg(pl.col("duration").sum(), pl.col("last").any())
        .filter(pl.col("last"))
        .select(pl.col("duration").sum().alias("total"), pl.len().alias("n"))
        .collect()
    )
    n = int(entries["n"][0])
    if n == 0:
        return None
    mean: float = entries["total"][0] / n
    return mean


def _prefill_step_totals(client: pl.DataFrame) -> tuple[int | None, float | None]:
    """Sums of scheduled_tokens (tokens) and pass durations (s) over the client prefill passes; each None
    unless every counted pass carries the field."""
    if client.height == 0:
        return None, None
    sched = pl.col("scheduled_tokens")
    duration = pl.coalesce(pl.col("latency"), pl.col("ttft"))
    row = client.select(
        (sched.is_null() | sched.is_nan()).any().alias("sched_missing"),
        sched.cast(pl.Int64, strict=False).sum().alias("sched"),
        duration.is_null().any().alias("dur_missing"),
        duration.sum().alias("dur"),
    ).row(0, named=True)
    forwarded = None if row["sched_missing"] else int(row["sched"])
    elapsed = None if row["dur_missing"] else float(row["dur"])
    return forwarded, elapsed


def run_level_values(
    frame: pl.DataFrame,
    *,
    continuous: dict[str, Any] | None,
    gpu: str | None,
    num_gpus: Any,
    num_requests: int | None,
    total_time_s: float | None,
) -> dict[str, Any]:
    """The run-level values under the oracle's names, from a frame with the metric columns
    (`records.normalize_frame`). `continuous` is the section-4 result or None when
    the reference raised there (then cost is None and the TTFT / TPOT fallbacks see no values).

    Units: seconds for latencies / e2e_s, requests/s, USD for cost, tokens for prefill_forwarded_tokens.
    `num_requests` / `total_time_s` None: e2e_s, request_per_s and cost are None and no warm-up trim.
    """
    client = _client_prefill_rows(frame, num_requests or 0)
    decode = frame.filter(pl.col("forward_mode").is_in(_DECODE_MODES))

    server_ttft = _server_request_ttft(frame)
    section4_ttft = continuous.get("ttft") if continuous else None
    section4_tpot = continuous.get("tpot") if continuous else None
    decode_latency = _mean_nonneg(decode, "latency")
    forwarded, elapsed = _prefill_step_totals(client)

    if total_time_s is None or num_requests is None:
        e2e_s = request_per_s = None
    else:
        e2e_s = total_time_s / max(num_requests, 1)
        request_per_s = num_requests / total_time_s if total_time_s > 0 else 0.0
    cost = None
    if continuous is not None and total_time_s is not None and is_number(num_gpus):
        cost = reference_cost(total_time_s, gpu, num_gpus)

    return {
        "cost": cost,
        "e2e_s": e2e_s,
        "request_per_s": request_per_s,
        "server_request_ttft": server_ttft,
        # The reference's `server ttft, else section-4 ttft or client ttft or None`.
        "published_ttft": server_ttft if server_ttft is not None else (section4_ttft or None),
        "prefill_pass_latency_s": _mean_nonneg(client, "latency"),
        "published_tpot": decode_latency if decode_latency is not None else (section4_tpot or 0),
        "prefill_forwarded_tokens": forwarded,
        "prefill_step_elapsed_s": elapsed,
        "avg_expert_activation_prefill": _or_zero(_mean_nonneg(client, "expert_activation")),
        "avg_expert_activation_decode": _or_zero(_mean_nonneg(decode, "expert_activation")),
        "prefill_avg_batch_size": _or_zero(_mean_nonneg(client, "batch_size")),
        "decode_avg_batch_size": _or_zero(_mean_nonneg(decode, "batch_size")),
    }


def _or_zero(value: float | None) -> float:
    return 0 if value is None else value
