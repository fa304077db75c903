"""HTTP clients of one connection each, lent one per request in flight.

Why not one `httpx.AsyncClient` with a pool of N connections: httpcore's pool re-scans its connections
for every waiting request on every event, so a burst queues inside the client. Measured on loopback
(2-core host, httpx 0.28, 64 streaming requests started at once, the server stamping each arrival):
one shared client spread the burst's arrivals over 55–66 ms with a cold pool and over 530–560 ms with
64 kept-alive connections; `vllm bench serve`'s aiohttp session over 8–14 ms; one client per request in
flight over 4–22 ms. A serving benchmark whose burst arrives spread out measures another workload (the
engine schedules the first arrivals alone), so the driver lends each request its own client.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx


class ClientPool:
    """Idle clients on a stack (the most recently used first: its connection is the one kept alive);
    a request borrows one for its whole life and gives it back. `prefill` clients are made up front, so
    that making them (≈ 0.75 ms each, with the shared TLS context) is not inside a measured burst."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        keepalive_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._limits = httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=keepalive_s
        )
        self._transport = transport
        # One TLS context for all: httpx builds one per client otherwise (≈ 20 ms each: the CA bundle).
        self._tls = ssl.create_default_context()
        self._idle: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []

    def _make(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            timeout=self._timeout, limits=self._limits, transport=self._transport, verify=self._tls
        )
        self._all.append(client)
        return client

    def prefill(self, n: int) -> None:
        """Have at least `n` clients made (idle ones count)."""
        while len(self._all) < n:
            self._idle.append(self._make())

    @property
    def size(self) -> int:
        """Clients made so far: those prefilled, or the most requests in flight at once if more."""
        return len(self._all)

    @contextlib.asynccontextmanager
    async def lend(self) -> AsyncIterator[httpx.AsyncClient]:
        client = self._idle.pop() if self._idle else self._make()
        try:
            yield client
        finally:
            self._idle.append(client)

    async def aclose(self) -> None:
        clients, self._all, self._idle = self._all, [], []
        if self._transport is not None:  # shared: close it once, after the clients let go of it
            clients = clients[:1]
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
