"""The driver's HTTP session: aiohttp, set up as `vllm bench serve` 0.26 sets up its own (one connection per
request in flight, kept alive 60 s), so both tools put the same load on a server and pay the same client
cost per streamed chunk.

Why aiohttp and not httpx (docs/decisions.md, 2026-12-07): one shared httpx pool spread a 64-request
burst over 55–560 ms (httpcore re-scans its pool for every waiting request); and httpx costs 83–105 µs of
client CPU per streamed chunk against aiohttp's 24–30 µs, which at 64 streams × one chunk per ~13 ms
decode step delays first-token stamps behind other streams' chunks. Measured in
`benchmarks/driver_burst.py` and `benchmarks/drive_vs_bench_cpu.py`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp

FIRST_BYTE_KEY = "moecap_first_byte"
"""Key of a request's `trace_request_ctx` holding the record whose `arrival_ns` is stamped when the
request's first byte is handed to the socket (`--arrival first-byte`)."""


async def _stamp_first_byte(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    # aiohttp calls this just before the request line and headers are written to the socket: connection
    # set-up and waiting for a free connection are over (the server's view of the arrival).
    request_ctx: Any = ctx.trace_request_ctx
    if isinstance(request_ctx, dict) and (rec := request_ctx.get(FIRST_BYTE_KEY)) is not None:
        rec.arrival_ns = time.monotonic_ns()


def open_session(
    limit: int | None,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    trace_configs: Sequence[aiohttp.TraceConfig] = (),
) -> aiohttp.ClientSession:
    """A session with at most `limit` connections (None or 0: unbounded), each kept alive 60 s.

    `connect_timeout_s` bounds the TCP (and TLS) connect; `read_timeout_s` every wait for data (the first
    token included). Proxies from the environment apply, as in `vllm bench serve`. Call inside a running
    event loop; close it (`async with`)."""
    first_byte = aiohttp.TraceConfig()
    first_byte.on_request_headers_sent.append(_stamp_first_byte)
    connector = aiohttp.TCPConnector(
        limit=limit or 0,
        limit_per_host=limit or 0,
        keepalive_timeout=60,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=True,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s),
        trace_configs=[first_byte, *trace_configs],
    )
