"""Per-request latency and request-throughput formulas (docs/metrics.md §11), client clock.

The one definition of TTFT, E2E, TPOT, ITL, their distributions, goodput and the request-level
throughputs (named as `vllm bench serve` names them). It lives beside the trace format because the
collector's driver prints these figures at the end of a run and must not import the analyzer; the
analyzer's `request_metrics` (metrics.json, the `request_metrics` SQL view, the report, `whatif`)
calls the same functions. Pure numpy over column arrays; times in ns in, seconds out.

* TTFT = first token − arrival; E2E = finish − arrival (requests that succeeded).
* TPOT = (E2E − TTFT) / (output tokens − 1); NaN (no sample) for a one-token output.
* ITL: each streamed chunk after a request's first, its gap to the previous chunk / tokens in it,
  one sample per token.
* request_throughput = succeeded requests / duration; output_throughput = output tokens / duration;
  total_token_throughput = (prompt + output tokens) / duration; duration (`makespan_s`) = first
  arrival to last successful finish.
* goodput: requests that succeeded with TTFT ≤ SLO and TPOT ≤ SLO (no TPOT passes), per second of
  the duration; `fraction` of all requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)


def _f(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def ttft_s(arrival_ns: Any, first_token_ns: Any) -> np.ndarray:
    """Time to first token, s (NaN where there is no first token)."""
    return (_f(first_token_ns) - _f(arrival_ns)) / 1e9


def e2e_s(arrival_ns: Any, finish_ns: Any) -> np.ndarray:
    """End-to-end latency, s."""
    return (_f(finish_ns) - _f(arrival_ns)) / 1e9


def decode_s(ttft: np.ndarray, e2e: np.ndarray) -> np.ndarray:
    """Decode time, s: E2E − TTFT (first token to finish)."""
    return e2e - ttft


def tpot_s(ttft: np.ndarray, e2e: np.ndarray, output_tokens: Any) -> np.ndarray:
    """Time per output token after the first, s: decode time / (output tokens − 1); NaN for ≤ 1 token."""
    n = _f(output_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, decode_s(ttft, e2e) / (n - 1), np.nan)


def itl_per_request(
    chunk_times_ns: Any, chunk_tokens: Any, offsets: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inter-token latency over flat chunk lists (`offsets`: R + 1 list boundaries).

    Returns (samples_s: one per token, itl_tokens per request, itl_mean_s per request (NaN where
    none), itl_max_s per request (NaN where none))."""
    t = np.asarray(chunk_times_ns, dtype=np.int64)
    n = np.asarray(chunk_tokens, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    r = len(o) - 1
    lengths = np.diff(o)
    req = np.repeat(np.arange(r), lengths)
    first = np.zeros(len(t), dtype=bool)
    first[o[:-1][lengths > 0]] = True
    gaps = np.diff(t, prepend=t[:1]) if len(t) else np.empty(0, np.int64)
    valid = ~first & (n > 0)
    per_token = np.zeros(len(t))
    per_token[valid] = gaps[valid] / n[valid] / 1e9
    samples = np.repeat(per_token[valid], n[valid])
    tokens = np.bincount(req[valid], weights=n[valid], minlength=r)
    gap_sum = np.bincount(req[valid], weights=gaps[valid], minlength=r)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(tokens > 0, gap_sum / 1e9 / tokens, np.nan)
    peak = np.full(r, -np.inf)
    np.maximum.at(peak, req[valid], per_token[valid])
    peak[np.isinf(peak)] = np.nan
    return samples, tokens.astype(np.int64), mean, peak


def distribution(values: Any) -> dict[str, Any]:
    """{mean, p50, p90, p99, n} over the non-NaN values (linear-interpolated percentiles)."""
    arr = _f(values)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    q = np.quantile(arr, QUANTILES)
    return {
        "mean": float(arr.mean()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "n": int(arr.size),
    }


def request_summary(
    *,
    arrival_ns: Any,
    first_token_ns: Any,
    finish_ns: Any,
    output_tokens: Any,
    prompt_tokens: Any,
    ok: Any,
    chunk_times_ns: Any,
    chunk_tokens: Any,
    chunk_offsets: Any,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> dict[str, Any]:
    """Every request-level figure of a run (metrics.json `requests`): counts, distributions of TTFT,
    TPOT, ITL and E2E, token-weighted TPOT, duration, the throughput family and goodput (with SLOs).

    One entry per request in each array; missing times NaN; `ok`: succeeded (no error, a first token)."""
    ok = np.asarray(ok, dtype=bool)
    arrival = _f(arrival_ns)
    ttft = ttft_s(arrival_ns, first_token_ns)[ok]
    e2e = e2e_s(arrival_ns, finish_ns)[ok]
    out_n = np.nan_to_num(_f(output_tokens))[ok]
    prompt_n = np.nan_to_num(_f(prompt_tokens))[ok]
    tpot = tpot_s(ttft, e2e, out_n)
    offsets = np.asarray(chunk_offsets, dtype=np.int64)
    keep = np.repeat(ok, np.diff(offsets))
    kept_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[ok])])
    itl, _, _, _ = itl_per_request(
        np.asarray(chunk_times_ns)[keep], np.asarray(chunk_tokens)[keep], kept_offsets
    )
    makespan = None
    if ok.any():
        makespan = (float(np.nanmax(_f(finish_ns)[ok])) - float(np.nanmin(arrival))) / 1e9
    decode = out_n > 1
    weighted = float(decode_s(ttft, e2e)[decode].sum() / (out_n[decode] - 1).sum()) if decode.any() else None
    total_out = int(out_n.sum())
    total_prompt = int(prompt_n.sum())
    out: dict[str, Any] = {
        "requests": len(ok),
        "succeeded": int(ok.sum()),
        "failed": int(len(ok) - ok.sum()),
        "ttft_s": distribution(ttft),
        "tpot_s": distribution(tpot),
        "tpot_token_weighted_s": weighted,
        "itl_s": distribution(itl),
        "e2e_s": distribution(e2e),
        "output_tokens": total_out,
        "prompt_tokens": total_prompt,
        "makespan_s": makespan,
        "request_throughput": int(ok.sum()) / makespan if makespan else None,
        "output_throughput": total_out / makespan if makespan else None,
        "total_token_throughput": (total_out + total_prompt) / makespan if makespan else None,
    }
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = np.ones(len(ttft), dtype=bool)
        if slo_ttft_s is not None:
            good &= ttft <= slo_ttft_s
        if slo_tpot_s is not None:
            good &= np.isnan(tpot) | (tpot <= slo_tpot_s)
        n_good = int(good.sum())
        out["goodput"] = {
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "good_requests": n_good,
            "good_requests_per_s": n_good / makespan if makespan else None,
            "fraction": n_good / len(ok) if len(ok) else None,
        }
    return out
