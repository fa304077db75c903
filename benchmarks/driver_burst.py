"""Does a burst sent by `drive` reach the server as a burst? (issue #20: drive vs `vllm bench serve` TTFT)

64 streaming requests started at once (closed loop, --batch-size 64) against the scripted loopback server,
which stamps when each request's bytes reached its socket (the kernel's SO_TIMESTAMPNS). Per run: the
spread of those arrivals (last - first) and the mean send delay (server arrival - the driver's TTFT
start). Two ways of holding connections, interleaved, each with a cold pool (one warm-up request, as
`vllm bench serve`'s test request) and a warm one (64 warm-up requests: every later wave of a long run):

  per-request   drive as shipped: one httpx client (one connection) lent to each request in flight
  shared-pool   one httpx connection pool for all requests (drive before 2026-12-07; passed here as a
                shared transport)

    python benchmarks/driver_burst.py [--repeats 5] [--burst 64]

A server that receives the burst spread out schedules its first arrivals alone and reports another TTFT
(on the H100, vLLM 0.26.0 b64, the shared pool measured 20.6 % below `vllm bench serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import httpx

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "collect"))
from loopback import SCRIPTED, start_server  # noqa: E402

MODES = ("per-request", "shared-pool")


def one_run(url: str, server, mode: str, warm: int, burst: int) -> tuple[float, float]:
    """(arrival spread ms, mean send delay ms) of one burst."""
    transport = None
    if mode == "shared-pool":
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst, keepalive_expiry=60.0)
        transport = httpx.AsyncHTTPTransport(limits=limits)
    samples = [
        Sample(f"b{i}", "scripted", prompt="stream ttft_ms=20 itl_ms=5 tokens=4") for i in range(burst)
    ]
    res = asyncio.run(
        drive(
            samples,
            ClientConfig(api_url=url, max_tokens=4),
            LoadConfig(concurrency=burst, warmup=warm),
            transport=transport,
        )
    )
    arrived = {r.req_id: server.timings(r.req_id)["arrived_ns"] for r in res.records}
    spread = (max(arrived.values()) - min(arrived.values())) / 1e6
    delay = statistics.mean((arrived[r.req_id] - r.arrival_ns) / 1e6 for r in res.records)
    return spread, delay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--burst", type=int, default=64)
    args = ap.parse_args()
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with start_server(SCRIPTED) as server:
        for rep in range(args.repeats):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for warm in (1, args.burst):
                for mode in order:
                    r = one_run(server.url, server, mode, warm, args.burst)
                    rows.setdefault((mode, warm), []).append(r)
                    print(f"rep {rep} {mode:12s} warm-up {warm:3d}: spread {r[0]:7.1f} ms, send delay {r[1]:7.1f} ms",
                          flush=True)  # fmt: skip
    print(
        "\n| pool | warm-up requests | arrival spread ms (median) | send delay ms (median) | spread / per-request |"
    )
    print("|---|---|---|---|---|")
    for warm in (1, args.burst):
        base = statistics.median(s for s, _ in rows[("per-request", warm)])
        for mode in MODES:
            spread = statistics.median(s for s, _ in rows[(mode, warm)])
            delay = statistics.median(d for _, d in rows[(mode, warm)])
            print(f"| {mode} | {warm} | {spread:.1f} | {delay:.1f} | {spread / base:.2f}× |")


if __name__ == "__main__":
    main()
