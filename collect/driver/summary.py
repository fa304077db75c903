"""The console summary of a driven run: counts, latency percentiles, throughput and goodput.

The formulas are `moecap.schemas.latency` (docs/metrics.md §11), the same functions the analyzer's
`request_metrics` runs over the trace files (which stay the source of truth): the collector never
imports the analyzer, and the figures printed here are the analyzer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moecap.schemas import latency

from ..workload import RequestRecord


def _nan(value: int | None) -> float:
    return np.nan if value is None else float(value)


def summarize(
    records: Sequence[RequestRecord], *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
) -> dict[str, Any]:
    """Counts, errors, and `moecap.schemas.latency.request_summary` over the records."""
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"requests": len(records), "succeeded": len(ok), "failed": len(records) - len(ok)}
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    if not records:
        return out
    lengths = [
        len(r.chunk_times_ns or []) if len(r.chunk_times_ns or []) == len(r.chunk_tokens or []) else 0
        for r in records
    ]
    summary = latency.request_summary(
        arrival_ns=[float(r.arrival_ns) for r in records],
        first_token_ns=[_nan(r.first_token_ns) for r in records],
        finish_ns=[_nan(r.finish_ns) for r in records],
        output_tokens=[r.output_token_count or 0 for r in records],
        prompt_tokens=[r.prompt_token_count or 0 for r in records],
        ok=[r.ok for r in records],
        chunk_times_ns=[t for r, k in zip(records, lengths) if k for t in r.chunk_times_ns],
        chunk_tokens=[n for r, k in zip(records, lengths) if k for n in r.chunk_tokens],
        chunk_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
    )
    out.update({k: v for k, v in summary.items() if k not in out})
    out["streamed"] = all(r.streamed for r in ok) if ok else None
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
        rate = summary.get("output_throughput")
        lines.append(
            f"output {summary['output_tokens']} tokens in {summary['makespan_s'] or 0:.2f} s"
            + (
                f" (output_throughput {rate:.1f} tok/s, request_throughput {summary['request_throughput']:.2f} req/s)"
                if rate
                else ""
            )
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
