"""Run-level values the reference publishes next to the continuous metrics (metrics.md section 5).

Restated from `openai_api_profile.run_async` and its helpers (`_client_prefill_records`,
`_mean_server_request_ttft`, `_prefill_step_totals`). They are computed from the raw records with their
own filters, so they can differ from the section-4 values (defects 7.14, 7.15). Client-side request
timings are not part of the records; where the reference falls back to them we use "unavailable"
(its value when no request succeeded: 0 for the simple TTFT / TPOT means).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import BoolArray, FloatArray, PrefillArrays, RecordArrays
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

#: The reference never trims more than this many leading passes as warm-up.
_MAX_TRIM = 4


def _client_prefill(passes: PrefillArrays, n_client_requests: int) -> BoolArray:
    """Mask over the prefill passes (`_client_prefill_records`): drop passes with seq_lens_sum <= 10; then,
    if their batch sizes sum past the client request count, drop up to 4 leading batch-1 passes shorter
    than 1000 tokens, but only if that lands the sum exactly on the count."""
    with np.errstate(invalid="ignore"):
        client = ~(~passes.seq_null & (passes.seq_lens_sum <= 10))
    if n_client_requests <= 0:
        return client
    # int(batch_size or 0): null (and NaN, which the reference cannot convert) -> 0, toward zero.
    rows_each = np.trunc(np.nan_to_num(passes.batch_size, nan=0.0))
    rows = int(rows_each[client].sum())
    head = np.flatnonzero(client)[:_MAX_TRIM]
    dropped = 0
    for i in head:
        seq = 0.0 if passes.seq_null[i] else passes.seq_lens_sum[i]
        if not (rows > n_client_requests and passes.batch_size[i] == 1 and seq < 1000):
            break
        rows -= int(rows_each[i])
        dropped += 1
    if dropped and rows == n_client_requests:
        client = client.copy()
        client[head[:dropped]] = False
    return client


class _Subset:
    """Records selected by a mask, with what repeated means over them need computed once."""

    def __init__(self, mask: BoolArray) -> None:
        self.mask = mask
        self.n = int(np.count_nonzero(mask))
        self._weight: FloatArray | None = None

    @property
    def weight(self) -> FloatArray:
        """The mask as 0.0 / 1.0 (built on first use: an empty subset never needs it)."""
        if self._weight is None:
            self._weight = self.mask.astype(np.float64)
        return self._weight

    def mean_nonneg(self, values: FloatArray) -> float | None:
        """Mean of the values >= 0 (nulls are NaN here, and NaN >= 0 is False, as in Python)."""
        if self.n == 0:
            return None
        total = float(np.einsum("i,i->", values, self.weight))
        if np.isfinite(total) and values.min(initial=0.0) >= 0:
            return total / self.n  # every value is a number >= 0: nothing to filter
        with np.errstate(invalid="ignore"):
            use = self.mask & (values >= 0)
        n = int(np.count_nonzero(use))
        return float(np.where(use, values, 0.0).sum()) / n if n else None


def _durations(passes: PrefillArrays) -> tuple[FloatArray, BoolArray]:
    """A pass's duration as the runner reads it: `latency`, else `ttft` (file-shape traces)."""
    return np.where(passes.latency_null, passes.ttft, passes.latency), passes.latency_null & passes.ttft_null


def _server_request_ttft(arr: RecordArrays) -> float | None:
    """`_mean_server_request_ttft`: per request, the summed latencies of the prefill passes carrying it;
    key req_id, else req_pool_idx, else skipped; the accumulator is reset when the request completes.
    No activation filter; a pass without a duration is skipped."""
    e = arr.entries
    if e.n == 0:
        return None
    duration, missing = _durations(arr.prefill_passes)
    keyed = e.server_keyed & ~missing[e.prefill_pos]
    # The usual case: every entry is keyed and its pass has a duration (no subset to gather).
    entry = np.arange(e.n) if keyed.all() else np.flatnonzero(keyed)  # in record / entry order
    subset = len(entry) < e.n
    last = np.flatnonzero(e.is_last_chunk[entry] if subset else e.is_last_chunk)
    n = len(last)
    if n == 0:
        return None
    # Every entry up to a request's final completed chunk belongs to one of its completed accumulations;
    # entries after it were never completed.
    gid = e.server_requests.gid[entry] if subset else e.server_requests.gid
    final_last = np.full(e.server_requests.count, -1, dtype=np.int64)
    np.maximum.at(final_last, gid[last], entry[last])
    counted = entry <= final_last[gid]
    passes = e.prefill_pos[entry] if subset else e.prefill_pos
    return float(duration[passes[counted]].sum()) / n


def _prefill_step_totals(passes: PrefillArrays, client: BoolArray) -> tuple[int | None, float | None]:
    """Sums of scheduled_tokens (tokens) and pass durations (s) over the client prefill passes; each None
    unless every counted pass carries the field."""
    if not client.any():
        return None, None
    forwarded = None
    if not (client & (passes.scheduled_null | np.isnan(passes.scheduled_tokens))).any():
        forwarded = int(np.trunc(passes.scheduled_tokens[client]).sum())
    duration, missing = _durations(passes)
    elapsed = None if (client & missing).any() else float(duration[client].sum())
    return forwarded, elapsed


def run_level_values(
    arr: RecordArrays,
    *,
    continuous: dict[str, Any] | None,
    gpu: str | None,
    num_gpus: Any,
    num_requests: int | None,
    total_time_s: float | None,
) -> dict[str, Any]:
    """The run-level values under the oracle's names. `continuous` is the section-4 result or None when
    the reference raised there (then cost is None and the TTFT / TPOT fallbacks see no values).

    Units: seconds for latencies / e2e_s, requests/s, USD for cost, tokens for prefill_forwarded_tokens.
    `num_requests` / `total_time_s` None: e2e_s, request_per_s and cost are None and no warm-up trim.
    """
    pp = arr.prefill_passes
    client = _client_prefill(pp, num_requests or 0)
    client_passes = _Subset(client)
    sums = arr.decode.run_level
    if sums is not None:
        decode_latency = _mean(sums.latency, sums.n_latency)
        decode_activation = _mean(sums.activation, sums.n_activation)
        decode_batch = _mean(sums.batch, sums.n_batch)
    else:
        decode_subset = _Subset(arr.decode_like)
        decode_latency = decode_subset.mean_nonneg(arr.latency)
        decode_activation = decode_subset.mean_nonneg(arr.activation)
        decode_batch = decode_subset.mean_nonneg(arr.batch_size)

    server_ttft = _server_request_ttft(arr)
    section4_ttft = continuous.get("ttft") if continuous else None
    section4_tpot = continuous.get("tpot") if continuous else None
    forwarded, elapsed = _prefill_step_totals(pp, client)

    e2e_s: float | None = None
    request_per_s: float | None = None
    if total_time_s is not None and num_requests is not None:
        e2e_s = total_time_s / max(num_requests, 1)
        request_per_s = num_requests / total_time_s if total_time_s > 0 else 0.0
    cost = None
    if continuous is not None and total_time_s is not None and is_number(num_gpus):
        cost = reference_cost(total_time_s, gpu, num_gpus)

    def or_zero(value: float | None) -> float:
        return 0 if value is None else value

    return {
        "cost": cost,
        "e2e_s": e2e_s,
        "request_per_s": request_per_s,
        "server_request_ttft": server_ttft,
        # The reference's `server ttft, else section-4 ttft or client ttft or None`.
        "published_ttft": server_ttft if server_ttft is not None else (section4_ttft or None),
        "prefill_pass_latency_s": client_passes.mean_nonneg(pp.latency),
        "published_tpot": decode_latency if decode_latency is not None else (section4_tpot or 0),
        "prefill_forwarded_tokens": forwarded,
        "prefill_step_elapsed_s": elapsed,
        "avg_expert_activation_prefill": or_zero(client_passes.mean_nonneg(pp.activation)),
        "avg_expert_activation_decode": or_zero(decode_activation),
        "prefill_avg_batch_size": or_zero(client_passes.mean_nonneg(pp.batch_size)),
        "decode_avg_batch_size": or_zero(decode_batch),
    }


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None
