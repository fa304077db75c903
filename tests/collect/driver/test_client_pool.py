"""The driver's client pool (collect/driver/pool.py): one client, so one connection, per request in flight.

Against the scripted loopback server: a shared httpx pool queued a 64-request burst inside the client
(benchmarks/driver_burst.py measures the spread), so each request borrows a client of its own."""

from __future__ import annotations

import asyncio

import httpx

from moecap.collect.driver.pool import ClientPool


def test_requests_in_flight_at_once_each_get_their_own_client():
    async def go():
        async with ClientPool(timeout=httpx.Timeout(5.0)) as pool:
            held: list[httpx.AsyncClient] = []
            both_in = asyncio.Event()

            async def borrow():
                async with pool.lend() as c:
                    held.append(c)
                    if len(held) == 3:
                        both_in.set()
                    await both_in.wait()

            await asyncio.gather(borrow(), borrow(), borrow())
            assert len({id(c) for c in held}) == 3 and pool.size == 3
            # given back: borrowers reuse them, the most recently returned first, and none is made
            async with pool.lend() as first:
                assert first in held
            async with pool.lend() as again:
                assert again is first
            async with pool.lend() as a, pool.lend() as b, pool.lend() as c:
                assert {id(a), id(b), id(c)} == {id(x) for x in held}
            assert pool.size == 3

    asyncio.run(go())


def test_prefilled_clients_are_lent_before_any_is_made():
    async def go():
        async with ClientPool(timeout=httpx.Timeout(5.0)) as pool:
            pool.prefill(4)
            assert pool.size == 4
            pool.prefill(2)  # never shrinks or adds when enough exist
            assert pool.size == 4
            async with pool.lend(), pool.lend(), pool.lend(), pool.lend():
                pass
            assert pool.size == 4

    asyncio.run(go())


def test_each_client_holds_one_connection_and_requests_reach_the_server(scripted):
    """Two sequential requests through one borrowed client reuse its single kept-alive connection; the
    pool closes every client on exit."""

    async def go():
        pool = ClientPool(timeout=httpx.Timeout(5.0))
        pool.prefill(2)
        async with pool.lend() as c:
            for _ in range(2):
                r = await c.get(scripted.url + "/v1/models")
                assert r.status_code == 200
        clients = list(pool._all)
        await pool.aclose()
        assert pool.size == 0 and all(c.is_closed for c in clients)

    asyncio.run(go())
