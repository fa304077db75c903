"""Closed-loop concurrency, open-loop Poisson arrivals, goodput and a clean stop."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.errors import CollectError


def _max_overlap(records) -> int:
    events = sorted([(r.arrival_ns, 1) for r in records] + [(r.finish_ns, -1) for r in records])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_closed_loop_keeps_batch_size_requests_in_flight(scripted):
    samples = [Sample(f"s{i}", "d", prompt="stream ttft_ms=60 itl_ms=10 tokens=3") for i in range(9)]
    res = asyncio.run(
        drive(samples, ClientConfig(api_url=scripted.url, max_tokens=3), LoadConfig(concurrency=3))
    )
    assert [r.index for r in res.records] == list(range(9)) and all(r.ok for r in res.records)
    assert _max_overlap(res.records) == 3
    starts = sorted(r.arrival_ns for r in res.records)
    # three waves of three: the 4th request starts only when one of the first three finished
    first_finish = min(r.finish_ns for r in res.records)
    assert starts[3] >= first_finish
    assert res.workload()["mode"] == "closed_loop" and res.workload()["concurrency"] == 3


def test_open_loop_poisson_arrivals_follow_the_seeded_schedule(scripted):
    rate, n, seed = 25.0, 12, 7
    samples = [Sample(f"s{i}", "d", prompt="stream ttft_ms=5 tokens=2") for i in range(n)]
    res = asyncio.run(
        drive(
            samples,
            ClientConfig(api_url=scripted.url, max_tokens=2),
            LoadConfig(request_rate=rate, seed=seed),
        )
    )
    rng = random.Random(seed)
    expected = np.cumsum([0.0] + [rng.expovariate(rate) for _ in range(n - 1)])
    arrivals = np.array([r.arrival_ns for r in res.records], dtype=np.int64)
    got = (arrivals - arrivals[0]) / 1e9
    assert np.median(np.abs(got - expected)) < 0.005, (got, expected)
    assert np.all(np.abs(got - expected) < 0.05)
    desc = res.workload()
    assert (desc["mode"], desc["arrivals"], desc["request_rate"], desc["seed"]) == (
        "open_loop",
        "poisson",
        rate,
        seed,
    )


def test_open_loop_cap_and_all_at_once(scripted):
    samples = [Sample(f"s{i}", "d", prompt="stream ttft_ms=80 tokens=2") for i in range(6)]
    capped = asyncio.run(
        drive(
            samples,
            ClientConfig(api_url=scripted.url, max_tokens=2),
            LoadConfig(request_rate=float("inf"), max_concurrency=2),
        )
    )
    assert _max_overlap(capped.records) == 2 and all(r.ok for r in capped.records)
    burst = asyncio.run(
        drive(
            samples, ClientConfig(api_url=scripted.url, max_tokens=2), LoadConfig(request_rate=float("inf"))
        )
    )
    assert _max_overlap(burst.records) == 6
    assert burst.workload()["arrivals"] == "all_at_once"


def test_goodput_against_ttft_and_tpot_slos(scripted):
    samples = [Sample("fast", "d", prompt="stream ttft_ms=5 itl_ms=5 tokens=4")] * 3 + [
        Sample("slow-first", "d", prompt="stream ttft_ms=250 itl_ms=5 tokens=4"),
        Sample("slow-decode", "d", prompt="stream ttft_ms=5 itl_ms=120 tokens=3"),
        Sample("broken", "d", prompt="http500"),
    ]
    load = LoadConfig(request_rate=50.0, slo_ttft_s=0.15, slo_tpot_s=0.06)
    res = asyncio.run(drive(samples, ClientConfig(api_url=scripted.url, max_tokens=4), load))
    s = res.summary()
    assert (s["requests"], s["succeeded"], s["failed"]) == (6, 5, 1)
    g = s["goodput"]
    assert g["good_requests"] == 3 and g["fraction"] == pytest.approx(0.5)
    assert g["good_requests_per_s"] == pytest.approx(3 / s["makespan_s"])
    assert res.workload()["slo"] == {"ttft_s": 0.15, "tpot_s": 0.06}
    assert s["errors"] == {"HTTP 500: internal failure in the scripted engine": 1}


def test_stop_keeps_finished_requests_and_records_in_flight_ones_as_aborted(scripted):
    samples = [Sample("quick", "d", prompt="stream ttft_ms=5 tokens=2")] + [
        Sample(f"long{i}", "d", prompt="stream ttft_ms=5 itl_ms=100 tokens=40") for i in range(5)
    ]
    written = []

    class Sink:
        def write(self, row):
            written.append(row)

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        return await drive(
            samples,
            ClientConfig(api_url=scripted.url, max_tokens=40),
            LoadConfig(concurrency=2),
            requests_writer=Sink(),
            stop=stop,
        )

    res = asyncio.run(asyncio.wait_for(main(), 10))
    assert res.interrupted
    quick, *rest = res.records
    assert quick.ok
    # two long requests were in flight at the stop (one slot ran "quick", then the next long one)
    aborted = [r for r in rest if r.finish_reason == "abort"]
    assert len(aborted) == 2 and all(
        r.error == "interrupted before the response was complete" for r in aborted
    )
    assert all(len(r.chunk_times_ns) >= 2 for r in aborted)  # the tokens that arrived are kept
    assert len(res.records) == 3  # the other three were never sent
    assert {w["req_id"] for w in written} == {r.req_id for r in res.records}


def test_bad_load_settings():
    with pytest.raises(CollectError, match="--batch-size must be at least 1"):
        LoadConfig(concurrency=0)
    with pytest.raises(CollectError, match="--request-rate must be > 0"):
        LoadConfig(request_rate=0)
