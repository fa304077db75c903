"""The driver's HTTP session: aiohttp, set up as `vllm bench serve` 0.26 sets up its own (one connection per
request in flight, kept alive 60 s), so both tools put the same load on a server and pay the same client
cost per streamed chunk — except for proxies and .netrc, which are looked up once per session here.
bench's session (`trust_env=True`) looks both up on every request in aiohttp's thread pool (two thread
hops before the request can go out): on a 2-core host that held a 64-request burst in the client for
27 ms more (send delay 35 vs 8.6 ms, the first request 11 ms ahead of the others at the server;
`benchmarks/driver_burst.py`, 2026-12-07). SGLang's `bench_serving` does not read the environment at all.

Why aiohttp and not httpx (docs/decisions.md, 2026-12-07): one shared httpx pool spread a 64-request
burst over 55–560 ms (httpcore re-scans its pool for every waiting request); and httpx costs 83–105 µs of
client CPU per streamed chunk against aiohttp's 24–30 µs, which at 64 streams × one chunk per ~13 ms
decode step delays first-token stamps behind other streams' chunks. Measured in
`benchmarks/driver_burst.py` and `benchmarks/drive_vs_bench_cpu.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import helpers
from yarl import URL

from ..errors import CollectError

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


def from_environment(url: str, *, authorization: bool = False) -> dict[str, Any]:
    """What `trust_env=True` would make aiohttp use for requests to `url`, looked up once: the proxy from
    HTTP(S)_PROXY / ALL_PROXY unless NO_PROXY names the host (`proxy`, `proxy_auth`), and the host's
    credentials in .netrc (a default Authorization header) unless the requests carry their own
    (`authorization`). Empty when neither applies."""
    target = URL(url)
    found: dict[str, Any] = {}
    with contextlib.suppress(LookupError):
        found["proxy"], found["proxy_auth"] = helpers.get_env_proxy_for_url(target)
    if target.host is not None and not authorization:
        with contextlib.suppress(LookupError):
            creds = helpers.basicauth_from_netrc(helpers.netrc_from_env(), target.host)
            found["headers"] = {"Authorization": creds.encode()}
    return found


def open_session(
    limit: int | None,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    trace_configs: Sequence[aiohttp.TraceConfig] = (),
    reuse: bool = True,
    url: str | None = None,
    headers: dict[str, str] | None = None,
    env_per_request: bool = False,
) -> aiohttp.ClientSession:
    """A session with at most `limit` connections (None or 0: unbounded), each kept alive 60 s; with
    `reuse` False, each closed after its request (a new connection per request, `Connection: close`).

    `connect_timeout_s` bounds the TCP (and TLS) connect; `read_timeout_s` every wait for data (the first
    token included). Proxies and .netrc credentials from the environment apply to `url`'s host, as in `vllm
    bench serve`, looked up once here (`from_environment`) rather than per request; `headers` are the
    requests' own (an Authorization header among them wins over .netrc). With `env_per_request` aiohttp looks
    them up for every request instead (`trust_env=True`, `vllm bench serve`'s cost); aiohttp then refuses a
    request carrying its own Authorization header where .netrc also has the host, so that is refused here,
    once. Call inside a running event loop; close it (`async with`)."""
    first_byte = aiohttp.TraceConfig()
    first_byte.on_request_headers_sent.append(_stamp_first_byte)
    # aiohttp refuses a keep-alive timeout on a connector that closes every connection.
    keep: dict[str, Any] = {"keepalive_timeout": 60} if reuse else {"force_close": True}
    connector = aiohttp.TCPConnector(limit=limit or 0, limit_per_host=limit or 0, ttl_dns_cache=300, **keep)
    own_auth = any(k.lower() == "authorization" for k in headers or {})
    if env_per_request and own_auth and url and "headers" in from_environment(url):
        raise CollectError(
            f"--env-per-request: .netrc has credentials for {URL(url).host} and the requests carry an "
            "Authorization header; aiohttp refuses both on one request (drop the header or the .netrc entry)"
        )
    environment = from_environment(url, authorization=own_auth) if url and not env_per_request else {}
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=env_per_request,  # else the environment is read once, above, not in a thread per request
        **environment,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s),
        trace_configs=[first_byte, *trace_configs],
    )
