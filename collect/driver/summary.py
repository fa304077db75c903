"""The console summary of a driven run: counts, latency percentiles, throughput and goodput.

These are the definitions of metrics.md §8.7 (the analyzer's `request_metrics` computes the same from the
trace files, which stay the source of truth): TTFT = first token − arrival, E2E = finish − arrival,
TPOT = (E2E − TTFT) / (output tokens − 1), ITL = chunk gap / tokens in the later chunk; goodput =
requests meeting both SLOs per second of makespan (first arrival to last successful finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .client import RequestRecord


def _dist(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    p50, p90, p99 = np.quantile(arr, (0.5, 0.9, 0.99))
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "n": int(arr.size),
    }


def itl_seconds(rec: RequestRecord) -> np.ndarray:
    """One inter-token latency per token after the first chunk: chunk gap / tokens in that chunk."""
    t = np.asarray(rec.chunk_times_ns, dtype=np.int64)
    n = np.asarray(rec.chunk_tokens, dtype=np.int64)
    if t.size < 2:
        return np.empty(0)
    gaps, toks = np.diff(t), n[1:]
    keep = toks > 0
    return np.repeat(gaps[keep] / toks[keep] / 1e9, toks[keep])


def tpot_seconds(rec: RequestRecord) -> float | None:
    if rec.first_token_ns is None or rec.finish_ns is None or not rec.output_tokens or rec.output_tokens < 2:
        return None
    return (rec.finish_ns - rec.first_token_ns) / 1e9 / (rec.output_tokens - 1)


def summarize(
    records: Sequence[RequestRecord], *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"requests": len(records), "succeeded": len(ok), "failed": len(records) - len(ok)}
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    if not records:
        return out
    # ok requests have a first token; a finish time is set on every path that ends a request.
    ttft = [((r.first_token_ns or 0) - r.arrival_ns) / 1e9 for r in ok]
    e2e = [((r.finish_ns or r.arrival_ns) - r.arrival_ns) / 1e9 for r in ok]
    tpots = [t for t in (tpot_seconds(r) for r in ok) if t is not None]
    itl = np.concatenate([itl_seconds(r) for r in ok]) if ok else np.empty(0)
    makespan = None
    if ok:
        makespan = (max(r.finish_ns or r.arrival_ns for r in ok) - min(r.arrival_ns for r in records)) / 1e9
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    out.update(
        ttft_s=_dist(ttft),
        tpot_s=_dist(tpots),
        itl_s=_dist(itl),
        e2e_s=_dist(e2e),
        output_tokens=out_tokens,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        makespan_s=makespan,
        requests_per_s=len(ok) / makespan if makespan else None,
        output_tokens_per_s=out_tokens / makespan if makespan else None,
        streamed=all(r.streamed for r in ok) if ok else None,
    )
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = 0
        for r, t in zip(ok, ttft):
            tp = tpot_seconds(r)
            if (slo_ttft_s is None or t <= slo_ttft_s) and (
                slo_tpot_s is None or tp is None or tp <= slo_tpot_s
            ):
                good += 1
        out["goodput"] = {
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "good_requests": good,
            "good_requests_per_s": good / makespan if makespan else None,
            "fraction": good / len(records),
        }
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines for the console."""

    def ms(d: dict[str, Any], key: str = "p50") -> str:
        v = d.get(key) if d else None
        return "-" if v is None else f"{v * 1e3:.1f} ms"

    lines = [f"requests: {summary['requests']} ({summary['succeeded']} ok, {summary['failed']} failed)"]
    if summary.get("ttft_s"):
        lines.append(
            f"TTFT p50 {ms(summary['ttft_s'])} p99 {ms(summary['ttft_s'], 'p99')} · "
            f"TPOT p50 {ms(summary['tpot_s'])} · ITL p50 {ms(summary['itl_s'])} · E2E p50 {ms(summary['e2e_s'])}"
        )
        rate = summary.get("output_tokens_per_s")
        lines.append(
            f"output {summary['output_tokens']} tokens in {summary['makespan_s'] or 0:.2f} s"
            + (f" ({rate:.1f} tok/s, {summary['requests_per_s']:.2f} req/s)" if rate else "")
        )
        if summary.get("streamed") is False:
            lines.append("note: the server did not stream; TTFT equals E2E")
    if "goodput" in summary:
        g = summary["goodput"]
        per_s = g["good_requests_per_s"]
        lines.append(
            f"goodput: {g['good_requests']} requests within SLO ({g['fraction']:.0%})"
            + (f", {per_s:.2f} req/s" if per_s is not None else "")
        )
    for err, n in (summary.get("errors") or {}).items():
        lines.append(f"error ×{n}: {err}")
    return "\n".join(lines)
