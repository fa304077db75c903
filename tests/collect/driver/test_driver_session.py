"""The driver's HTTP session (collect/driver/session.py), set up as `vllm bench serve`'s: at most one
connection per request in flight, kept alive between requests. Against the scripted loopback server, with
aiohttp's own connection hooks counting what the session did."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive


def _counting() -> tuple[aiohttp.TraceConfig, dict[str, int]]:
    seen = {"created": 0, "reused": 0}

    async def created(*_: object) -> None:
        seen["created"] += 1

    async def reused(*_: object) -> None:
        seen["reused"] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(created)
    trace.on_connection_reuseconn.append(reused)
    return trace, seen


@pytest.mark.parametrize("concurrency", [1, 4])
def test_connections_are_one_per_request_in_flight_and_kept_alive(scripted, concurrency):
    trace, seen = _counting()
    samples = [Sample(f"k{i}", "scripted", prompt="stream ttft_ms=5 itl_ms=2 tokens=2") for i in range(12)]
    cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, preflight=False)
    res = asyncio.run(
        drive(samples, cfg, LoadConfig(concurrency=concurrency, warmup=1), trace_configs=[trace])
    )
    assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
    # 13 requests (one warm-up): never more connections than requests in flight, every other one reused
    assert 1 <= seen["created"] <= concurrency
    assert seen["created"] + seen["reused"] == 13


def test_a_server_that_is_not_there_is_one_line_per_request(free_port):
    samples = [Sample("x", "scripted", prompt="stream tokens=1")]
    cfg = ClientConfig(api_url=f"http://127.0.0.1:{free_port}", model="m", preflight=False, max_retries=0)
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=0)))
    (rec,) = res.records
    assert not rec.ok and rec.error.startswith(f"cannot connect to http://127.0.0.1:{free_port}: ")
    assert "\n" not in rec.error and "Traceback" not in rec.error
