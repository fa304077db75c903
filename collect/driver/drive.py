"""`drive()`: send a workload to an OpenAI-compatible server and record every request.

The library entry point of the workload driver; `moecap-collect drive` and `moecap-collect run` both
call it. Rows go to the writers as each request finishes, so a stop (Ctrl-C, `stop` event) keeps all
finished requests, and in-flight ones are recorded with what had arrived and `finish_reason="abort"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from moecap.schemas import RunMetadata, TraceWriter, trace_file_name

from ..datasets import Sample
from ..errors import CollectError
from ..workload import (
    STEP_BUDGET_ARGS,
    WARMUP_PREFIX,
    WARMUP_SEED_OFFSET,
    RequestRecord,
    ladder_reach,
    positive_int,
    prefill_step_budget,
    prompt_room,
    residue_ladder,
    warmup_sample,
)
from .client import build_request, send_request
from .config import ClientConfig, LoadConfig
from .session import open_session
from .summary import summarize


class RowSink(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, rec: RequestRecord) -> None: ...
    def close(self) -> None: ...


@dataclass
class ServerInfo:
    """What the preflight learned about the server."""

    base_url: str
    models: list[str] = field(default_factory=list)
    engine: str | None = None
    version: str | None = None
    step_budget: int | None = None
    """Most prompt tokens the server prefills in one step (`workload.STEP_BUDGET_ARGS`), as its info
    endpoint tells: SGLang's /server_info (older: /get_server_info), vLLM's /server_info (only with
    VLLM_SERVER_DEV_MODE=1); None: not told."""
    max_prompt_tokens: int | None = None
    """Longest prompt the server accepts (tokens): SGLang's max_req_input_len − 1, else the served model's
    max_model_len − 1 from /v1/models; None: not told."""
    max_requests: int | None = None
    """Most requests the server runs at once (SGLang max_running_requests, vLLM max_num_seqs); None: not told."""


@dataclass
class LadderOutcome:
    """What drive's residue ladder did (`workload.residue_ladder`): `steps` groups sent (one engine step
    each, if the server admits a group together), up to `reach` tokens, in `seconds`; `note` says why it
    was skipped or stopped early (None when it was climbed in full or not asked for)."""

    steps: int = 0
    reach: int = 0
    seconds: float = 0.0
    note: str | None = None
    bound: str = "server"
    """What set `reach`: "workload" (the run's longest token-id prompt or its requests in flight) or
    "server" (what the server can form in a step)."""

    def describe(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "reach_tokens": self.reach,
            "reach_bound": self.bound,
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }


@dataclass
class DriveResult:
    """The outcome of one `drive()` call. `records` are in sample order (requests never sent are absent)."""

    records: list[RequestRecord]
    model: str
    client: ClientConfig
    load: LoadConfig
    server: ServerInfo
    started_ns: int
    finished_ns: int
    interrupted: bool = False
    ladder: LadderOutcome = field(default_factory=LadderOutcome)

    def summary(self) -> dict[str, Any]:
        """Counts, latency percentiles, throughput and (with SLOs) goodput, as the console prints them."""
        return summarize(self.records, slo_ttft_s=self.load.slo_ttft_s, slo_tpot_s=self.load.slo_tpot_s)

    def workload(self) -> dict[str, Any]:
        """The request settings and load, for the run metadata's `workload`."""
        c = self.client
        return {
            "api": c.api,
            "api_url": c.endpoint,
            "model": self.model,
            "stream": c.stream,
            "max_tokens": c.max_tokens,
            "ignore_eos": c.ignore_eos,
            "temperature": c.temperature,
            "continuous_usage": c.continuous_usage,
            "reuse_connections": c.reuse_connections,
            "env_per_request": c.env_per_request,
            "extra_body": c.extra_body,
            "server_engine": self.server.engine,
            "server_version": self.server.version,
            "request_id_prefix": c.request_id_prefix,
            "arrival": c.arrival,
            "interrupted": self.interrupted,
            **self.load.describe(),
            "warmup_ladder_done": self.ladder.describe(),
        }


def open_client_writers(out_dir: str | Path, run: RunMetadata) -> tuple[TraceWriter, TraceWriter]:
    """(requests writer, outputs writer) for `run` in `out_dir`, named by `trace_file_name`."""
    out = Path(out_dir)
    try:
        return (
            TraceWriter(out / trace_file_name(run, "requests"), "requests", run, rows_per_batch=64),
            TraceWriter(out / trace_file_name(run, "outputs"), "outputs", run, rows_per_batch=64),
        )
    except OSError as exc:
        raise CollectError(f"--out {out}: cannot write trace files ({exc.strerror or exc})") from None


async def drive(
    samples: Sequence[Sample],
    client: ClientConfig,
    load: LoadConfig | None = None,
    *,
    requests_writer: RowSink | None = None,
    outputs_writer: RowSink | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    trace_configs: Sequence[aiohttp.TraceConfig] = (),
    on_record: Callable[[RequestRecord], None] | None = None,
    stop_reason: Callable[[], str] | None = None,
    before_measure: Callable[[], Awaitable[Any]] | None = None,
) -> DriveResult:
    """Send every sample to `client`'s endpoint under `load`; write a `requests` and an `outputs` row per
    request as it finishes. Returns the records.

    Raises CollectError before sending anything when the server cannot be reached, or when a sample
    cannot be sent through the chosen API. Per-request failures (HTTP errors, dropped streams, timeouts)
    are recorded in the rows, never raised. Setting `stop` ends the run early: no new requests, in-flight
    ones are cancelled and recorded as aborted, their error saying `stop_reason()` (default
    "interrupted") "before the response was complete". `trace_configs` adds aiohttp trace hooks to the
    session (e.g. a test's delay in the client's send path). `before_measure` is awaited
    after the warm-up, just before the measured requests (e.g. to start a server-side recorder).
    """
    load = load or LoadConfig()
    stop = stop or asyncio.Event()
    samples = list(samples)
    if not samples:
        raise CollectError("no samples to send")
    if client.api == "chat":
        bad = next((s for s in samples if s.prompt is None), None)
        if bad is not None:
            raise CollectError(
                f"sample {bad.sample_id} is token ids; the chat API needs text prompts (use --api completions)"
            )
        templated = next((s for s in samples if s.extra.get("chat_template_applied")), None)
        if templated is not None:
            raise CollectError(
                "prompts already carry a chat template; send them with --api completions, or drop --chat-template"
            )
    limit = load.concurrency if not load.open_loop else load.max_concurrency

    def session_for(reuse: bool) -> aiohttp.ClientSession:
        # As `vllm bench serve`'s session: a connection per request in flight (at most `limit`), kept alive
        # 60 s (session.py says why this matters); reuse False: a new one per request, as SGLang's
        # bench_serving.
        return open_session(
            limit,
            connect_timeout_s=client.connect_timeout_s,
            read_timeout_s=client.read_timeout_s,
            trace_configs=trace_configs,
            reuse=reuse,
            url=client.base_url,
            headers=client.headers,
            env_per_request=client.env_per_request,
        )

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(session_for(client.reuse_connections is not False))
        if client.preflight:
            server = await probe_server(session, client)
        else:
            server = ServerInfo(client.base_url)
        model = client.model or (server.models[0] if server.models else None)
        if model is None:
            raise CollectError(f"--model not given and {client.base_url}/v1/models lists no model")
        cfg = client
        if client.engine == "auto" and server.engine == "sglang":
            cfg = dataclasses.replace(client, engine="sglang")
        if cfg.reuse_connections is None:
            # As the engine's own serving benchmark: SGLang's bench_serving opens a connection per request,
            # `vllm bench serve` keeps them alive (the probe's connection then stays, as its test request's)
            reuse = (server.engine or cfg.engine) != "sglang"
            cfg = dataclasses.replace(cfg, reuse_connections=reuse)
            if not reuse:
                await session.close()
                session = await stack.enter_async_context(session_for(False))
        ladder = LadderOutcome()
        if load.warmup and load.warmup_ladder != "off" and not stop.is_set():
            await _unless_stopped(_climb_ladder(session, cfg, model, samples, load, server, ladder), stop)
        if load.warmup and not stop.is_set():
            await _unless_stopped(_warm_up(session, cfg, model, samples, load.warmup, limit, load.seed), stop)
        if before_measure is not None:
            await before_measure()
        runner = _Runner(session, cfg, model, requests_writer, outputs_writer, progress, stop, on_record)
        if stop_reason is not None:
            runner.stop_reason = stop_reason
        with _long_lived_objects_frozen():
            started = time.monotonic_ns()
            if progress is not None:
                progress.start(len(samples))
            try:
                if load.open_loop:
                    await runner.open_loop(samples, load)
                else:
                    await runner.closed_loop(samples, load.concurrency)
            finally:
                if progress is not None:
                    progress.close()
            finished = time.monotonic_ns()
    records = sorted(runner.records, key=lambda r: r.index)
    return DriveResult(
        records, model, cfg, load, server, started, finished, interrupted=stop.is_set(), ladder=ladder
    )


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """The measured requests run with every object that exists before them (datasets, tokenizer, the
    engine-free client's imports) moved out of the garbage collector's view (`gc.freeze`), so a full
    collection inside the window walks only what the run itself made. Without it one fell inside a burst
    of 64 token-id prompts on this 2-core host: 52 ms, 20 ms into the dispatch, holding every request not
    yet sent (the CLI against `benchmarks/drive_vs_bench_cpu.py`'s emulated engine, traced with gc
    callbacks; docs/decisions.md 2026-12-07). Undone afterwards (`gc.unfreeze`) unless the process had
    frozen objects of its own before (unfreezing would thaw those too)."""
    ours = gc.get_freeze_count() == 0
    gc.freeze()  # no gc.collect() first: in a large process it takes long enough to delay the run itself
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


async def _warm_up(
    session: aiohttp.ClientSession,
    cfg: ClientConfig,
    model: str,
    samples: list[Sample],
    n: int,
    limit: int | None,
    seed: int,
) -> None:
    """`n` unrecorded requests shaped as the first samples (cycled; `workload.warmup_sample`: the prompt
    reordered, so that the prefix cache they fill serves no measured request), at most `limit` at a time."""
    sem = asyncio.Semaphore(limit or n)
    rng = random.Random(seed + WARMUP_SEED_OFFSET)
    shaped = [warmup_sample(samples[i % len(samples)], rng) for i in range(n)]

    async def one(i: int) -> None:
        s = shaped[i]
        # `moecap-warmup-…`: SGLang's tracer under `moecap-collect serve` leaves such passes unrecorded
        warm = RequestRecord(f"{WARMUP_PREFIX}{cfg.request_id_prefix}-{i}", s)
        body, headers, _ = build_request(cfg, s, warm.req_id, model)
        async with sem:
            await send_request(session, cfg, warm, body, headers)

    await asyncio.gather(*(one(i) for i in range(n)))


LADDER_VOCAB_FALLBACK = 1000
"""Ids a ladder prompt draws from (below this) when no token-id sample shows the vocabulary: any served
LLM's vocabulary is larger."""


async def _climb_ladder(
    session: aiohttp.ClientSession,
    cfg: ClientConfig,
    model: str,
    samples: list[Sample],
    load: LoadConfig,
    server: ServerInfo,
    out: LadderOutcome,
) -> None:
    """The residue ladder (`workload.residue_ladder`), unrecorded, before the shaped warm-up: one group of
    fresh token-id prompts (one output token each, not streamed, through the completions API whatever
    `cfg.api`) at a time, each group one request and the next only after it finished, so the server can
    prefill each group in one step of exactly its token count. A group of several prompts (longer than the
    longest prompt) goes as one batched request (`prompt` a list of token-id lists, the OpenAI batch form),
    which the server hands to its scheduler at once; an engine that starts a step as soon as one request
    is in (vLLM's engine core, SGLang's scheduler) may still split it over two steps. A group of one prompt
    cannot be split. Fills `out`; a failed request stops the climb (named in `out.note`)."""
    budget = load.ladder_budget or server.step_budget
    if budget is None:
        out.note = (
            "no residue ladder: the server does not tell its prefill tokens per step"
            + (" (vLLM: only with VLLM_SERVER_DEV_MODE=1)" if server.engine == "vllm" else "")
            + "; pass --warmup-ladder <tokens> (vLLM: its --max-num-batched-tokens)"
        )
        return
    room, server_requests = server.max_prompt_tokens or budget, server.max_requests or budget
    max_prompt, max_requests = _workload_limits(samples, load, room, server_requests)
    out.reach = ladder_reach(step_budget=budget, max_prompt_tokens=max_prompt, max_requests=max_requests)
    server_reach = ladder_reach(step_budget=budget, max_prompt_tokens=room, max_requests=server_requests)
    out.bound = "workload" if out.reach < server_reach else "server"
    known = [max(s.prompt_token_ids) for s in samples if s.prompt_token_ids]
    vocab = max(known) + 1 if known else LADDER_VOCAB_FALLBACK
    groups = residue_ladder(
        step_budget=budget, max_prompt_tokens=max_prompt, max_requests=max_requests, vocab_size=vocab,
        seed=load.seed, prompt_cap=room,
    )  # fmt: skip
    ids_cfg = dataclasses.replace(cfg, api_url=cfg.base_url, api="completions", stream=False)
    t0 = time.monotonic()
    try:
        for group in groups:
            count = sum(len(p.token_ids) for p in group)
            rec = RequestRecord(
                f"{WARMUP_PREFIX}{cfg.request_id_prefix}-ladder-{count}",
                Sample(f"ladder-{count}", "warm-up", prompt_token_ids=group[0].token_ids, max_new_tokens=1),
            )
            body, headers, _ = build_request(ids_cfg, rec.sample, rec.req_id, model)
            if len(group) > 1:  # the OpenAI batch form: one request, its prompts handed over together
                body["prompt"] = [p.token_ids for p in group]
                if "rid" in body:  # SGLang: one id per prompt
                    body["rid"] = [f"{rec.req_id}-{i}" for i in range(len(group))]
            await send_request(session, ids_cfg, rec, body, headers)
            out.steps += 1
            if not rec.ok:
                out.note = f"residue ladder stopped at its {count}-token step: {rec.error}"
                return
    finally:
        out.seconds = time.monotonic() - t0


def _workload_limits(
    samples: list[Sample], load: LoadConfig, room: int, server_requests: int
) -> tuple[int, int]:
    """The longest prompt (tokens) and most requests in flight the ladder climbs for: the run's own — its
    longest token-id prompt, its concurrency (open loop: its `max_concurrency`, else every sample; never
    more than its samples) — within the server's `room` and `server_requests`, as `run`'s warm-up
    (`engines.base`). Text prompts have no token count here (the server tokenizes them, a chat template
    adds its own): the climb then goes to the longest prompt the server takes."""
    in_flight = min(
        (load.max_concurrency or len(samples)) if load.open_loop else load.concurrency, len(samples)
    )
    lengths = [len(s.prompt_token_ids or ()) for s in samples if s.prompt is None]
    longest = max(lengths) if samples and len(lengths) == len(samples) else room
    return min(longest, room), min(max(in_flight, 1), server_requests)


async def probe_server(http: aiohttp.ClientSession, cfg: ClientConfig) -> ServerInfo:
    """GET /v1/models (and the SGLang / vLLM info endpoints): is the server there, what does it serve?

    A server that cannot be reached, or does not answer within the connect timeout (min. 5 s), is a
    CollectError; missing endpoints are not.
    """
    info = ServerInfo(cfg.base_url)
    wait = max(cfg.connect_timeout_s, 5.0)
    probe_timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=wait)
    try:
        async with http.get(cfg.base_url + "/v1/models", headers=cfg.headers, timeout=probe_timeout) as resp:
            status, body = resp.status, await resp.read()
    except aiohttp.ConnectionTimeoutError:
        raise CollectError(
            f"cannot reach the server at {cfg.base_url} (no connection within {cfg.connect_timeout_s:g} s); "
            "is it running, and is --api-url right?"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise CollectError(
            f"cannot reach the server at {cfg.base_url} ({' '.join(str(exc.os_error).split()) or type(exc).__name__}); "
            "is it running, and is --api-url right?"
        ) from None
    except aiohttp.ServerTimeoutError:
        raise CollectError(
            f"the server at {cfg.base_url} accepted the connection but did not answer GET /v1/models within {wait:g} s"
        ) from None
    except aiohttp.ClientError as exc:
        raise CollectError(
            f"the server at {cfg.base_url} failed GET /v1/models: {type(exc).__name__}: {exc}"
        ) from None
    if status == 200:
        doc = _json_or_none(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        if isinstance(data, list):
            info.models = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            info.max_prompt_tokens = prompt_room(_model_card(data, cfg.model).get("max_model_len"))
    elif status in (401, 403):
        raise CollectError(
            f"the server at {cfg.base_url} refused GET /v1/models (HTTP {status}); pass --header 'Authorization: Bearer …'"
        )
    if cfg.engine in ("auto", "sglang"):
        doc = await _get_json(http, cfg, "/get_model_info", probe_timeout)
        if isinstance(doc, dict) and "model_path" in doc:
            info.engine = "sglang"
            # /server_info since SGLang 0.5.x (/get_server_info still answers, logging a deprecation)
            server_info = await _get_json(http, cfg, "/server_info", probe_timeout)
            if not isinstance(server_info, dict):
                server_info = await _get_json(http, cfg, "/get_server_info", probe_timeout)
            if isinstance(server_info, dict):
                if server_info.get("version"):
                    info.version = str(server_info["version"])
                _take_limits(info, sglang_limits(server_info))
    if info.engine is None and cfg.engine in ("auto", "vllm"):
        doc = await _get_json(http, cfg, "/version", probe_timeout)
        if isinstance(doc, dict) and isinstance(doc.get("version"), str):
            info.engine, info.version = "vllm", doc["version"]
            # the dev-mode endpoint (VLLM_SERVER_DEV_MODE=1); absent otherwise
            dev = await _get_json(http, cfg, "/server_info?config_format=json", probe_timeout)
            if isinstance(dev, dict):
                _take_limits(info, vllm_limits(dev))
    if info.engine is None and cfg.engine not in ("auto",):
        info.engine = cfg.engine
    return info


@dataclass(frozen=True)
class ServerLimits:
    """What a server's info endpoint tells about its steps (fields as `ServerInfo`'s; None: not told)."""

    step_budget: int | None = None
    max_requests: int | None = None
    max_prompt_tokens: int | None = None


def sglang_limits(server_info: dict[str, Any]) -> ServerLimits:
    """From SGLang's /server_info body (its resolved `ServerArgs` and scheduler info): the smaller positive
    of chunked_prefill_size and max_prefill_tokens, max_running_requests, and max_req_input_len − 1
    (SGLang refuses a prompt of max_req_input_len tokens)."""
    return ServerLimits(
        step_budget=prefill_step_budget(*(server_info.get(n) for n in STEP_BUDGET_ARGS["sglang"])),
        max_requests=positive_int(server_info.get("max_running_requests")),
        max_prompt_tokens=prompt_room(server_info.get("max_req_input_len")),
    )


def vllm_limits(server_info: dict[str, Any]) -> ServerLimits:
    """From vLLM's dev-mode /server_info?config_format=json body (its `VllmConfig` dumped as JSON):
    scheduler_config's max_num_batched_tokens and max_num_seqs, model_config's max_model_len − 1 (room
    for one output token)."""
    vc = server_info.get("vllm_config")
    sc = vc.get("scheduler_config") if isinstance(vc, dict) else None
    mc = vc.get("model_config") if isinstance(vc, dict) else None
    sc = sc if isinstance(sc, dict) else {}
    return ServerLimits(
        step_budget=prefill_step_budget(*(sc.get(n) for n in STEP_BUDGET_ARGS["vllm"])),
        max_requests=positive_int(sc.get("max_num_seqs")),
        max_prompt_tokens=prompt_room(mc.get("max_model_len")) if isinstance(mc, dict) else None,
    )


def _take_limits(info: ServerInfo, limits: ServerLimits) -> None:
    """Set what `limits` tells on `info` (a value not told keeps what /v1/models said)."""
    for name in ("step_budget", "max_requests", "max_prompt_tokens"):
        if getattr(limits, name) is not None:
            setattr(info, name, getattr(limits, name))


def _model_card(data: list[Any], model: str | None) -> dict[str, Any]:
    """The /v1/models entry of `model` (the first entry when None or not listed); {} when none."""
    cards = [m for m in data if isinstance(m, dict)]
    return next((m for m in cards if m.get("id") == model), cards[0] if cards else {})


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


async def _get_json(
    http: aiohttp.ClientSession, cfg: ClientConfig, path: str, timeout: aiohttp.ClientTimeout
) -> Any:
    try:
        async with http.get(cfg.base_url + path, headers=cfg.headers, timeout=timeout) as resp:
            body = await resp.read()  # also a 404's: an unread body can cost the connection its reuse
            return _json_or_none(body) if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


class _Runner:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        cfg: ClientConfig,
        model: str,
        requests_writer: RowSink | None,
        outputs_writer: RowSink | None,
        progress: Progress | None,
        stop: asyncio.Event,
        on_record: Callable[[RequestRecord], None] | None,
    ) -> None:
        self.session, self.cfg, self.model = session, cfg, model
        self.requests_writer, self.outputs_writer = requests_writer, outputs_writer
        self.progress, self.stop, self.on_record = progress, stop, on_record
        self.records: list[RequestRecord] = []
        self.inflight: set[asyncio.Task[Any]] = set()
        self.stop_reason: Callable[[], str] = lambda: "interrupted"

    async def one(self, index: int, sample: Sample) -> None:
        req_id = f"{self.cfg.request_id_prefix}-{index:06d}"
        body, headers, prompt_sent = build_request(self.cfg, sample, req_id, self.model)
        rec = RequestRecord(req_id, sample, prompt_sent=prompt_sent, index=index)
        try:
            await send_request(self.session, self.cfg, rec, body, headers)
        except asyncio.CancelledError:
            if self.stop.is_set():
                rec.error = f"{self.stop_reason()} before the response was complete"
                self._finish(rec)
                return
            self._finish(rec)
            raise
        self._finish(rec)

    def _finish(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        if self.requests_writer is not None:
            self.requests_writer.write(rec.requests_row())
        if self.outputs_writer is not None:
            self.outputs_writer.write(rec.outputs_row())
        if self.progress is not None:
            self.progress.advance(rec)
        if self.on_record is not None:
            self.on_record(rec)

    async def _watch(self) -> None:
        await self.stop.wait()
        for task in list(self.inflight):
            task.cancel()

    async def closed_loop(self, samples: list[Sample], concurrency: int) -> None:
        queue = deque(enumerate(samples))

        async def worker() -> None:
            while queue and not self.stop.is_set():
                index, sample = queue.popleft()
                await self.one(index, sample)

        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(samples)))]
        self.inflight.update(workers)
        watcher = asyncio.create_task(self._watch())
        try:
            await asyncio.gather(*workers)
        finally:
            watcher.cancel()
            for w in workers:
                w.cancel()

    async def open_loop(self, samples: list[Sample], load: LoadConfig) -> None:
        """One task per request, created on its Poisson schedule (at `inf`: all in one pass of the event
        loop, before any is sent); a task waits for a `max_concurrency` slot before it sends, as
        `vllm bench serve` does, so a full slot delays the request, never the schedule of the others."""
        rate = float(load.request_rate or float("inf"))
        rng = random.Random(load.seed)
        sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        due = 0.0
        watcher = asyncio.create_task(self._watch())
        tasks: list[asyncio.Task[Any]] = []

        async def gated(index: int, sample: Sample) -> None:
            if sem is None:
                await self.one(index, sample)
                return
            async with sem:
                if not self.stop.is_set():
                    await self.one(index, sample)

        try:
            for index, sample in enumerate(samples):
                if index and rate != float("inf"):
                    due += rng.expovariate(rate)
                delay = t0 + due - loop.time()
                if delay > 0 and await _stopped_within(self.stop, delay):
                    break
                if self.stop.is_set():
                    break
                task = asyncio.create_task(gated(index, sample))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
                tasks.append(task)
            # Tasks cancelled while waiting for a slot (a stop) were never sent: not an error.
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, Exception)), None)
            if failure is not None:
                raise failure
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Await `work`, cancelling it when `stop` is set first (a warm-up request is not recorded)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        task.cancel()  # no-op when it finished
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False
