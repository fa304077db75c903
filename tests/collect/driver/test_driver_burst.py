"""A burst of requests measured as the engines' own serving benchmarks measure it (`vllm bench serve`,
SGLang's `bench_serving`): TTFT starts just before the request is handed to the HTTP client, and every
request of a burst is in flight at once.

Against the scripted loopback server (its own process; one monotonic clock on this host). The server's
`barrier` scenario holds each request until all of the burst are open at the same time, so a driver that
sent fewer at once would leave it waiting (the server then says it timed out).

The time between "the client asks to send" and "the first byte is on the socket" (connection set-up,
waiting for a connection, the client's own send path) cannot be made long on loopback on purpose; an
aiohttp trace hook that waits a fixed time when the request starts (aiohttp awaits it before it
connects) stands in for it, so the two ways of stamping the arrival differ by a known amount.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.errors import CollectError

BURST = 64
TTFT_MS = 80.0
SLOW_SEND_MS = 150.0


def slow_send(delay_s: float) -> aiohttp.TraceConfig:
    """Trace hooks under which every request reaches the socket `delay_s` after the client is handed it."""

    async def wait(*_: object) -> None:
        await asyncio.sleep(delay_s)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(wait)
    return trace


def _burst(scripted, load: LoadConfig) -> tuple[list, dict]:
    group = uuid.uuid4().hex[:8]
    scenario = f"barrier n={BURST} group={group} wait_s=30 ttft_ms={TTFT_MS:g} itl_ms=5 tokens=3"
    samples = [Sample(f"b{i}", "scripted", prompt=scenario) for i in range(BURST)]
    res = asyncio.run(drive(samples, ClientConfig(api_url=scripted.url, max_tokens=3), load))
    return res.records, scripted.get("/_released")


@pytest.mark.parametrize(
    "load",
    [
        LoadConfig(concurrency=BURST),  # closed loop, --batch-size 64
        LoadConfig(
            request_rate=float("inf"), max_concurrency=BURST
        ),  # as vllm bench serve --max-concurrency 64
    ],
    ids=["closed-loop", "open-loop-inf"],
)
def test_a_burst_of_64_is_in_flight_together(scripted, load):
    records, released = _burst(scripted, load)
    assert len(records) == BURST and all(r.ok for r in records), [r.error for r in records if not r.ok]
    for r in records:
        seen = released[r.req_id]
        assert seen["timed_out"] is False and seen["open"] == BURST, seen
        # sent before the server let the burst go, and its first token came after it
        assert r.arrival_ns < seen["t_ns"] < r.first_token_ns
        assert (r.first_token_ns - seen["t_ns"]) / 1e6 >= TTFT_MS - 1.0


def test_ttft_starts_just_before_the_request_is_sent(scripted):
    scenario = f"stream ttft_ms={TTFT_MS:g} itl_ms=5 tokens=3"
    samples = [Sample(f"t{i}", "scripted", prompt=scenario) for i in range(4)]

    def run(**arrival: str):
        cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=3, preflight=False, **arrival)
        res = asyncio.run(
            drive(samples, cfg, LoadConfig(concurrency=4), trace_configs=[slow_send(SLOW_SEND_MS / 1e3)])
        )
        assert all(r.ok for r in res.records)
        return [(r, scripted.timings(r.req_id)) for r in res.records]

    for r, server in run():  # the default: arrival="request"
        ttft_ms = (r.first_token_ns - r.arrival_ns) / 1e6
        # the client's send path counts: the server got the request at least SLOW_SEND_MS later
        assert (server["arrived_ns"] - r.arrival_ns) / 1e6 >= SLOW_SEND_MS
        assert ttft_ms >= SLOW_SEND_MS + TTFT_MS
        # causality: the server waits TTFT_MS after the request arrived before it sends the first chunk
        # (its own chunk stamp is taken after the write returns, so the client may read the chunk first)
        assert r.first_token_ns >= server["arrived_ns"] + TTFT_MS * 1e6
    for r, server in run(arrival="first-byte"):  # the server's view
        ttft_ms = (r.first_token_ns - r.arrival_ns) / 1e6
        assert 0 <= (server["arrived_ns"] - r.arrival_ns) / 1e6 < SLOW_SEND_MS / 3
        assert TTFT_MS <= ttft_ms < TTFT_MS + SLOW_SEND_MS / 3


def test_the_arrival_setting_is_checked_and_recorded(scripted):
    with pytest.raises(CollectError, match="--arrival 'headers': expected one of request, first-byte"):
        ClientConfig(api_url=scripted.url, arrival="headers")
    res = asyncio.run(
        drive([Sample("w", "scripted", prompt="stream tokens=2")], ClientConfig(api_url=scripted.url))
    )
    assert res.workload()["arrival"] == "request"
