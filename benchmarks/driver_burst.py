"""Does a burst sent by `drive` reach the server as a burst? (issue #20: drive vs `vllm bench serve` TTFT)

64 streaming requests started at once (closed loop, --batch-size 64) against the scripted loopback server,
which stamps when each request's bytes reached its socket (the kernel's SO_TIMESTAMPNS). Per run: the
spread of those arrivals (last - first) and the mean send delay (server arrival - the client's TTFT
start). Two clients, interleaved, each with cold connections (one warm-up request, as `vllm bench serve`'s
test request) and warm ones (64 warm-up requests: every later wave of a long run):

  drive         drive as shipped (an aiohttp session set up as vllm bench serve's, collect/driver/session.py)
  drive-no-reuse  drive --no-connection-reuse (a new connection per request)
  bench-like    a bare aiohttp session and request loop written as vllm bench serve 0.26's
                (TCPConnector(limit=64, keepalive 60 s), `st` taken before `session.post`, iter_any)
  sglang-like   SGLang 0.5.16 bench_serving's: a new aiohttp session (and connection) for every request

Besides the spread, each run's lead of the first arrival over the second and the median arrival after
the first: a request that finds a connection left open (by drive's server probe or a warm-up) can reach
the server before the others have connected (issue #20, SGLang b64 on the H100).

    python benchmarks/driver_burst.py [--repeats 5] [--burst 64]

A server that receives the burst spread out schedules its first arrivals alone and reports another TTFT
(on the H100, vLLM 0.26.0 b64, drive's former shared httpx pool measured 20.6 % below `vllm bench serve`;
this benchmark then showed it spreading the burst over 159 ms cold / 346 ms warm, docs/decisions.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "collect"))
from loopback import SCRIPTED, start_server  # noqa: E402

MODES = ("drive", "drive-no-reuse", "bench-like", "sglang-like")
SCENARIO = "stream ttft_ms=20 itl_ms=5 tokens=4"


def one_run(url: str, server, mode: str, warm: int, burst: int) -> tuple[float, float, float, float]:
    """(arrival spread ms, mean send delay ms, first arrival's lead over the second ms, median arrival after
    the first ms) of one burst."""
    if mode.startswith("drive"):
        samples = [Sample(f"b{i}", "scripted", prompt=SCENARIO) for i in range(burst)]
        cfg = ClientConfig(api_url=url, max_tokens=4, reuse_connections=mode == "drive")
        res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=burst, warmup=warm)))
        starts = {r.req_id: r.arrival_ns for r in res.records}
    else:
        starts = asyncio.run(bench_like(url, warm, burst, per_request=mode == "sglang-like"))
    arrived = {rid: server.timings(rid)["arrived_ns"] for rid in starts}
    spread = (max(arrived.values()) - min(arrived.values())) / 1e6
    delay = statistics.mean((arrived[rid] - st) / 1e6 for rid, st in starts.items())
    order = sorted(arrived.values())
    lead = (order[1] - order[0]) / 1e6
    after = statistics.median((t - order[0]) / 1e6 for t in order)
    return spread, delay, lead, after


async def bench_like(url: str, warm: int, burst: int, *, per_request: bool = False) -> dict[str, int]:
    """The burst as `vllm bench serve` sends it: its session, `st` before `session.post`; with
    `per_request`, as SGLang's bench_serving: a new session for every request. Request id -> start
    (monotonic ns)."""
    connector = aiohttp.TCPConnector(
        limit=burst, limit_per_host=burst, ttl_dns_cache=300, keepalive_timeout=60, force_close=False
    )
    starts: dict[str, int] = {}
    run = time.monotonic_ns()
    async with aiohttp.ClientSession(
        connector=connector, trust_env=True, timeout=aiohttp.ClientTimeout(total=6 * 60 * 60)
    ) as session:

        async def one(rid: str, record: bool) -> None:
            payload = {"model": "m", "prompt": SCENARIO, "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}}  # fmt: skip
            st = time.monotonic_ns()
            if per_request:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=6 * 60 * 60)) as own:
                    await _post(own, url, payload, rid)
            else:
                await _post(session, url, payload, rid)
            if record:
                starts[rid] = st

        await asyncio.gather(*(one(f"w{run}-{i}", False) for i in range(warm)))
        await asyncio.gather(*(one(f"b{run}-{i}", True) for i in range(burst)))
    return starts


async def _post(session: aiohttp.ClientSession, url: str, payload: dict, rid: str) -> None:
    async with session.post(f"{url}/v1/completions", json=payload, headers={"x-request-id": rid}) as resp:
        async for _ in resp.content.iter_any():
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--burst", type=int, default=64)
    args = ap.parse_args()
    rows: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with start_server(SCRIPTED) as server:
        for rep in range(args.repeats):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for warm in (1, args.burst):
                for mode in order:
                    r = one_run(server.url, server, mode, warm, args.burst)
                    rows.setdefault((mode, warm), []).append(r)
                    print(f"rep {rep} {mode:12s} warm-up {warm:3d}: spread {r[0]:7.1f} ms, send delay {r[1]:7.1f} ms, "
                          f"first's lead {r[2]:6.2f} ms, median after first {r[3]:6.2f} ms", flush=True)  # fmt: skip
    print("\n| client | warm-up requests | arrival spread ms | send delay ms | spread / bench-like "
          "| first's lead over the second ms | median arrival after the first ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for warm in (1, args.burst):
        base = statistics.median(r[0] for r in rows[("bench-like", warm)])
        for mode in MODES:
            med = [statistics.median(r[k] for r in rows[(mode, warm)]) for k in range(4)]
            print(
                f"| {mode} | {warm} | {med[0]:.1f} | {med[1]:.1f} | {med[0] / base:.2f}× | {med[2]:.2f} | {med[3]:.2f} |"
            )


if __name__ == "__main__":
    main()
