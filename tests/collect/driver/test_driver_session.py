"""The driver's HTTP session (collect/driver/session.py), set up as `vllm bench serve`'s: at most one
connection per request in flight, kept alive between requests. Against the scripted loopback server, with
aiohttp's own connection hooks counting what the session did."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.errors import CollectError


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


def _ports(scripted, res) -> list[int]:
    return [scripted.timings(r.req_id)["peer_port"] for r in res.records]


def test_without_reuse_every_request_opens_its_own_connection(scripted):
    """--no-connection-reuse (SGLang's bench_serving opens a session per request): the server sees each
    request, the probe's and the warm-up's too, on a connection of its own; with reuse (the default) a
    closed loop of one sends everything over the connection its server probe opened."""
    samples = [Sample(f"n{i}", "scripted", prompt="stream ttft_ms=5 itl_ms=2 tokens=2") for i in range(6)]
    runs = {}
    for reuse in (True, False):
        trace, seen = _counting()
        cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, reuse_connections=reuse)
        res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=1), trace_configs=[trace]))
        assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
        assert res.workload()["reuse_connections"] is reuse
        runs[reuse] = (_ports(scripted, res), seen)
    ports, seen = runs[True]
    # the server probe's GETs (404s for the engine-info ones: their bodies are read, so the connection
    # stays usable), the warm-up and the 6 requests: one connection
    assert len(set(ports)) == 1 and seen["created"] == 1 and seen["reused"] >= 7
    ports, seen = runs[False]
    assert len(set(ports)) == 6 and seen["reused"] == 0 and seen["created"] >= 8


@pytest.fixture(scope="module")
def scripted_sglang():
    """The scripted server answering SGLang's info endpoints (`/get_model_info`, the older `/get_server_info`)."""
    from loopback import SCRIPTED, start_server

    with start_server(SCRIPTED, "--as-sglang") as server:
        yield server


@pytest.mark.parametrize("as_sglang", [True, False])
def test_by_default_connections_follow_the_servers_own_benchmark(scripted, scripted_sglang, as_sglang):
    """No --connection-reuse flag: an SGLang server gets a new connection per request (as its
    bench_serving opens them; the H100 b64 comparison agreed within 1 % that way), any other server one
    kept-alive connection per request in flight (as `vllm bench serve`). An explicit flag wins."""
    server = scripted_sglang if as_sglang else scripted
    samples = [Sample(f"a{i}", "scripted", prompt="stream ttft_ms=5 itl_ms=2 tokens=2") for i in range(6)]
    for reuse, want in ((None, not as_sglang), (True, True), (False, False)):
        trace, seen = _counting()
        cfg = ClientConfig(api_url=server.url, model="m", max_tokens=2, reuse_connections=reuse)
        res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=1), trace_configs=[trace]))
        assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
        assert res.workload()["server_engine"] == ("sglang" if as_sglang else None)
        assert res.workload()["reuse_connections"] is want, (reuse, as_sglang)
        ports = _ports(server, res)
        if want:
            # the probe's connection (kept, as `vllm bench serve` keeps its test request's) carries all
            assert len(set(ports)) == 1 and seen["reused"] >= 7
        else:
            # every measured request on its own connection; decided after the probe, whose keep-alive
            # connection carried its SGLang info GETs after /v1/models (/get_model_info, /server_info and,
            # as this server has none, the older /get_server_info) and was then closed
            assert len(set(ports)) == 6 and seen["reused"] == (3 if reuse is None else 0)


def test_a_server_that_is_not_there_is_one_line_per_request(free_port):
    samples = [Sample("x", "scripted", prompt="stream tokens=1")]
    cfg = ClientConfig(api_url=f"http://127.0.0.1:{free_port}", model="m", preflight=False, max_retries=0)
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=0)))
    (rec,) = res.records
    assert not rec.ok and rec.error.startswith(f"cannot connect to http://127.0.0.1:{free_port}: ")
    assert "\n" not in rec.error and "Traceback" not in rec.error


PROXY_VARS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _seen(scripted, prefix: str) -> list[dict]:
    return [s for s in scripted.get("/_seen") if s["id"].startswith(f"{prefix}-")]


def test_a_proxy_from_the_environment_carries_the_requests(scripted, no_proxy_env):
    """HTTP_PROXY applies as in `vllm bench serve` (looked up once per session, not per request): the
    scripted server, set as the proxy, receives the requests for a host that does not exist in the
    absolute form a proxy gets; NO_PROXY naming that host sends them direct (and they cannot connect)."""
    no_proxy_env.setenv("HTTP_PROXY", scripted.url)
    samples = [Sample(f"p{i}", "scripted", prompt="stream ttft_ms=2 tokens=2") for i in range(3)]
    cfg = ClientConfig(
        api_url="http://proxied.invalid:9", model="m", max_tokens=2, request_id_prefix="viaproxy"
    )
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=2, warmup=0)))
    assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
    assert [s["target"] for s in _seen(scripted, "viaproxy")] == [
        "http://proxied.invalid:9/v1/completions"
    ] * 3
    no_proxy_env.setenv("NO_PROXY", "proxied.invalid")
    cfg = ClientConfig(api_url="http://proxied.invalid:9", model="m", max_tokens=2, preflight=False,
                       request_id_prefix="direct")  # fmt: skip
    res = asyncio.run(drive(samples[:1], cfg, LoadConfig(concurrency=1, warmup=0)))
    (rec,) = res.records
    assert not rec.ok and rec.error.startswith("cannot connect to http://proxied.invalid:9")
    assert _seen(scripted, "direct") == []


def test_netrc_credentials_apply_unless_the_requests_carry_their_own(scripted, no_proxy_env, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login moe password cap\n")
    netrc.chmod(0o600)
    no_proxy_env.setenv("NETRC", str(netrc))
    samples = [Sample("a", "scripted", prompt="stream ttft_ms=2 tokens=2")]
    for prefix, headers in (("netrc", {}), ("ownauth", {"Authorization": "Bearer token-1"})):
        cfg = ClientConfig(
            api_url=scripted.url, model="m", max_tokens=2, headers=headers, request_id_prefix=prefix
        )
        res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=0)))
        assert all(r.ok for r in res.records), [r.error for r in res.records]
    assert [s["authorization"] for s in _seen(scripted, "netrc")] == ["Basic bW9lOmNhcA=="]  # moe:cap
    assert [s["authorization"] for s in _seen(scripted, "ownauth")] == ["Bearer token-1"]


@pytest.fixture
def executor_calls(monkeypatch) -> list[object]:
    """The functions the event loop hands to a worker thread (run_in_executor) while the test runs."""
    calls: list[object] = []
    original = asyncio.BaseEventLoop.run_in_executor

    def counting(self, executor, func, *args):
        calls.append(func)
        return original(self, executor, func, *args)

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counting)
    return calls


def test_sending_a_request_takes_no_thread_hop(scripted, no_proxy_env, executor_calls):
    """A request goes out from the event loop without waiting for a worker thread. `vllm bench serve`'s
    session (aiohttp `trust_env=True`) looks up .netrc and the proxy environment in aiohttp's thread pool for
    every request, two hops each, which held a 64-request burst in the client (driver_burst.py)."""
    samples = [Sample(f"h{i}", "scripted", prompt="stream ttft_ms=2 tokens=2") for i in range(16)]
    cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, preflight=False)
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=16, warmup=0)))
    assert all(r.ok for r in res.records)
    assert executor_calls == []


def test_env_per_request_looks_the_environment_up_per_request_as_vllm_bench_does(
    scripted, no_proxy_env, executor_calls, tmp_path
):
    """--env-per-request reproduces `vllm bench serve`'s client (aiohttp `trust_env=True`): every request
    looks up .netrc and the proxies in a worker thread, so a .netrc written after the session opened
    applies to the requests sent after it (read once, it would not), and the run metadata says so."""
    netrc = tmp_path / "netrc"
    no_proxy_env.setenv("NETRC", str(netrc))  # no file yet: no credentials when the session opens
    samples = [Sample(f"e{i}", "scripted", prompt="stream ttft_ms=2 tokens=2") for i in range(4)]

    def write_netrc(rec) -> None:
        netrc.write_text("machine 127.0.0.1 login moe password cap\n")
        netrc.chmod(0o600)

    for per_request in (False, True):
        netrc.unlink(missing_ok=True)
        executor_calls.clear()
        prefix = f"envper{int(per_request)}"
        cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, preflight=False,
                           env_per_request=per_request, request_id_prefix=prefix)  # fmt: skip
        res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=0), on_record=write_netrc))
        assert all(r.ok for r in res.records), [r.error for r in res.records if not r.ok]
        assert res.workload()["env_per_request"] is per_request
        seen = [s["authorization"] for s in _seen(scripted, prefix)]
        if per_request:
            assert len(executor_calls) >= len(samples)
            assert seen == [None] + ["Basic bW9lOmNhcA=="] * 3  # moe:cap, from the second request on
        else:
            assert executor_calls == []
            assert seen == [None] * 4


def test_env_per_request_with_own_authorization_and_a_netrc_entry_is_one_clear_error(
    scripted, no_proxy_env, tmp_path
):
    """aiohttp (trust_env) raises on every request that carries an Authorization header when .netrc also
    has the host; drive says so once, before sending anything, instead of failing each request."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login moe password cap\n")
    netrc.chmod(0o600)
    no_proxy_env.setenv("NETRC", str(netrc))
    samples = [Sample("x", "scripted", prompt="stream ttft_ms=2 tokens=2")]
    cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, env_per_request=True,
                       headers={"Authorization": "Bearer t"}, request_id_prefix="envauth")  # fmt: skip
    with pytest.raises(CollectError, match=r"^--env-per-request: .netrc has credentials for 127.0.0.1"):
        asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=0)))
    assert _seen(scripted, "envauth") == []


def test_the_measured_requests_run_with_the_older_objects_frozen(scripted):
    """A full garbage collection inside a burst held every request not yet sent (52 ms on a 2-core host,
    64 token-id prompts); drive runs its measured requests with the objects made before them frozen out of
    the collector's view (`gc.freeze`), and thaws them after."""
    import gc

    assert gc.get_freeze_count() == 0
    during: list[int] = []
    samples = [Sample(f"g{i}", "scripted", prompt="stream ttft_ms=2 tokens=2") for i in range(4)]
    cfg = ClientConfig(api_url=scripted.url, model="m", max_tokens=2, preflight=False)
    res = asyncio.run(
        drive(
            samples,
            cfg,
            LoadConfig(concurrency=2, warmup=1),
            on_record=lambda rec: during.append(gc.get_freeze_count()),
        )
    )
    assert all(r.ok for r in res.records) and len(during) == 4
    assert min(during) > 1000  # the interpreter's and the test's objects, at least
    assert gc.get_freeze_count() == 0
