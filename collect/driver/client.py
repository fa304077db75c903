"""One request against an OpenAI-compatible server: the body sent, and the facts recorded about it.

Timestamps are `time.monotonic_ns()` taken the moment bytes arrive, before any parsing, so every
server-sent event that a read completed shares that read's time. A chunk "carries tokens" when its
usage counter grew (servers that send usage in every chunk), or else when it lists logprobs / token ids,
or else when it carries text (then it counts as one token); the source used is recorded per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..datasets import Sample, chat_messages
from ..workload import RequestRecord
from .config import ClientConfig
from .events import MAX_COUNT, BadEvent, Choice, Usage, one_line, parse_event
from .session import FIRST_BYTE_KEY
from .sse import SSEDecoder

RETRY_STATUSES = frozenset({429, 502, 503, 504})


def build_request(
    cfg: ClientConfig, sample: Sample, req_id: str, model: str
) -> tuple[dict[str, Any], dict[str, str], str]:
    """(JSON body, headers, prompt as recorded) for one sample."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": int(sample.max_new_tokens or cfg.max_tokens),
        "temperature": cfg.temperature,
        "stream": cfg.stream,
    }
    if cfg.api == "chat":
        messages = chat_messages(sample, cfg.system_prompt or None)
        body["messages"] = messages
        prompt_sent = json.dumps(messages, ensure_ascii=False)
    elif sample.prompt is not None:
        body["prompt"] = sample.prompt
        prompt_sent = sample.prompt
    else:
        body["prompt"] = list(sample.prompt_token_ids or [])
        prompt_sent = sample.prompt_text
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.stream:
        opts: dict[str, Any] = {"include_usage": True}
        if cfg.continuous_usage:
            opts["continuous_usage_stats"] = True
        body["stream_options"] = opts
    if cfg.engine == "sglang":
        body["rid"] = req_id
    body.update(cfg.extra_body)
    headers = {"X-Request-Id": req_id, **cfg.headers}
    return body, headers, prompt_sent


def _now() -> int:
    return time.monotonic_ns()


def error_message(body: bytes) -> str:
    """The message of an error response body (OpenAI, vLLM, FastAPI shapes), one line, bounded."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err.get("msg") or text)
        elif isinstance(err, str):
            text = err
        elif "detail" in doc:
            text = str(doc["detail"])
    return one_line(text)


async def send_request(
    http: aiohttp.ClientSession,
    cfg: ClientConfig,
    rec: RequestRecord,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """Send one request (with retries) and fill `rec`. Never raises except CancelledError; every other
    failure ends up in `rec.error` with whatever arrived before it."""
    attempt = 0
    while True:
        rec.reset_attempt()
        rec.retries = attempt
        retry = False
        try:
            if cfg.request_timeout_s is not None:
                retry = await asyncio.wait_for(_attempt(http, cfg, rec, body, headers), cfg.request_timeout_s)
            else:
                retry = await _attempt(http, cfg, rec, body, headers)
        except asyncio.TimeoutError:
            rec.error = f"request exceeded --request-timeout-s {cfg.request_timeout_s:g} s"
            rec.finish_ns = rec.finish_ns or _now()
        except asyncio.CancelledError:
            rec.error = rec.error or "interrupted before the response was complete"
            rec.finish_reason = rec.finish_reason or "abort"
            rec.finish_ns = rec.finish_ns or _now()
            _finalize_counts(rec)
            raise
        if retry and attempt < cfg.max_retries:
            attempt += 1
            await asyncio.sleep(min(cfg.retry_backoff_s * 2 ** (attempt - 1), 30.0))
            continue
        _finalize_counts(rec)
        return


def _apply_usage(rec: RequestRecord, usage: Usage) -> None:
    if usage.prompt_tokens is not None:
        rec.prompt_tokens = usage.prompt_tokens
    if usage.completion_tokens is not None:
        rec.output_tokens = usage.completion_tokens
    if usage.cached_tokens is not None:
        rec.cached_prompt_tokens = usage.cached_tokens


def _finalize_counts(rec: RequestRecord) -> None:
    if rec.output_tokens is None and rec.chunk_tokens:
        total = int(sum(rec.chunk_tokens))
        if total > MAX_COUNT:
            rec.error = rec.error or f"{total} output tokens counted in the stream: more than 2^31 - 1"
        else:
            rec.output_tokens = total
    if rec.prompt_tokens is None and rec.sample.prompt is None and rec.sample.prompt_token_ids is not None:
        rec.prompt_tokens = len(rec.sample.prompt_token_ids)


async def _attempt(
    http: aiohttp.ClientSession,
    cfg: ClientConfig,
    rec: RequestRecord,
    body: dict[str, Any],
    headers: dict[str, str],
) -> bool:
    """One HTTP attempt; True when it failed in a way worth retrying (nothing was generated)."""
    state = _StreamState()
    trace_ctx = {FIRST_BYTE_KEY: rec} if cfg.arrival == "first-byte" else None
    # Arrival (TTFT's start) = just before the request is handed to the HTTP client, as `vllm bench
    # serve` times it (`st = time.perf_counter()` before `session.post`): connection set-up, body
    # encoding and the client's own send path count, as they do for any client of the server. With
    # --arrival first-byte the session's trace hook stamps it again when the first byte goes out.
    rec.arrival_ns = _now()
    try:
        async with http.post(cfg.endpoint, json=body, headers=headers, trace_request_ctx=trace_ctx) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                raw = await _read_bounded(resp)
                rec.finish_ns = _now()
                rec.error = f"HTTP {resp.status}: {error_message(raw) or resp.reason or ''}"
                rec.finish_reason = "error"
                return resp.status in RETRY_STATUSES
            ctype = resp.headers.get("content-type", "")
            if cfg.stream and "json" not in ctype:
                await _read_stream(resp, rec, state)
            else:
                await _read_whole(resp, rec)
    except aiohttp.ConnectionTimeoutError:
        rec.finish_ns = _now()
        rec.error = f"cannot connect to {cfg.base_url}: no connection within --connect-timeout-s {cfg.connect_timeout_s:g} s"
        return True
    except aiohttp.ClientConnectorError as exc:
        rec.finish_ns = _now()
        rec.error = f"cannot connect to {cfg.base_url}: {_exc_text(exc.os_error)}"
        return True
    except aiohttp.SocketTimeoutError:
        rec.finish_ns = _now()
        if rec.first_token_ns is None:
            rec.error = f"no first token within --timeout-s {cfg.read_timeout_s:g} s"
        else:
            rec.error = f"stream stalled for more than --timeout-s {cfg.read_timeout_s:g} s after {len(rec.chunk_times_ns)} chunks"
        return False
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        rec.finish_ns = state.last_ns or _now()
        if state.bytes_seen == 0 and rec.http_status is None:
            rec.error = f"server closed the connection without a response: {_exc_text(exc)}"
            return True
        rec.error = f"stream dropped after {len(rec.chunk_times_ns)} chunks: {_exc_text(exc)}"
        return False
    except aiohttp.ClientError as exc:
        rec.finish_ns = _now()
        rec.error = f"{type(exc).__name__}: {_exc_text(exc)}"
        return False
    return False


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int = 64 * 1024) -> bytes:
    out = bytearray()
    async for chunk in resp.content.iter_any():
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out)


MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Largest streamed event (or whole response) read; a server sending more without an event boundary is
refused rather than buffered without bound."""


@dataclass
class _StreamState:
    bytes_seen: int = 0
    last_ns: int | None = None
    usage_counter: int | None = None
    done: bool = False
    malformed: int = 0
    first_malformed: str = ""


async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, state: _StreamState) -> None:
    decoder = SSEDecoder()
    async for raw in resp.content.iter_any():
        t = _now()
        state.bytes_seen += len(raw)
        state.last_ns = t
        for data in decoder.feed(raw):
            _event(data, t, rec, state)
        if decoder.pending_bytes > MAX_EVENT_BYTES:
            rec.finish_ns = t
            rec.error = f"stream event larger than {MAX_EVENT_BYTES // 2**20} MiB after {len(rec.chunk_times_ns)} chunks"
            rec.finish_reason = rec.finish_reason or "error"
            return
    for data in decoder.flush():
        _event(data, state.last_ns or _now(), rec, state)
    rec.finish_ns = state.last_ns or _now()
    if rec.error is None and state.malformed:
        rec.error = f"{state.malformed} malformed stream event(s); first: {state.first_malformed}"
        rec.finish_reason = rec.finish_reason or "error"
    if rec.error is None and not state.done and rec.finish_reason is None:
        rec.error = f"stream ended early (no finish_reason, no [DONE]) after {len(rec.chunk_times_ns)} chunks"


def _event(data: str, t: int, rec: RequestRecord, state: _StreamState) -> None:
    """Account one streamed event. A malformed one (not JSON, or a field of the wrong type) is skipped
    and counted; the request then ends with an error naming the first."""
    if data.strip() == "[DONE]":
        state.done = True
        return
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        lines = [ln for ln in data.split("\n") if ln.strip()]
        if len(lines) > 1:
            for ln in lines:  # servers that forget the blank line between events
                _event(ln, t, rec, state)
            return
        _malformed(state, repr(data[:80]))
        return
    try:
        ev = parse_event(obj)
    except BadEvent as exc:
        _malformed(state, str(exc))
        return
    if ev.error is not None:
        rec.error = f"server error in stream: {ev.error}"
        rec.finish_reason = rec.finish_reason or "error"
        return
    if rec.engine_req_id is None and ev.id is not None:
        rec.engine_req_id = ev.id
    counter_delta = None
    if ev.usage is not None:
        _apply_usage(rec, ev.usage)
        if ev.choice is not None and ev.usage.completion_tokens is not None:
            counter_delta = ev.usage.completion_tokens - (state.usage_counter or 0)
            state.usage_counter = ev.usage.completion_tokens
    choice = ev.choice
    if choice is None:
        return
    if choice.finish_reason:
        rec.finish_reason = choice.finish_reason
    if choice.text:
        rec.text.append(choice.text)
    if choice.reasoning:
        rec.reasoning.append(choice.reasoning)
    has_text = bool(choice.text or choice.reasoning)
    n, source = _tokens_in(choice, counter_delta, has_text)
    if n > 0 or has_text:
        if rec.first_token_ns is None:
            rec.first_token_ns = t
        rec.chunk_times_ns.append(t)
        rec.chunk_tokens.append(n)
        rec.token_source = rec.token_source or source


def _malformed(state: _StreamState, reason: str) -> None:
    if not state.malformed:
        state.first_malformed = reason
    state.malformed += 1


def _tokens_in(choice: Choice, counter_delta: int | None, has_text: bool) -> tuple[int, str]:
    if counter_delta is not None:
        return max(counter_delta, 0), "usage"
    if choice.listed_tokens is not None and choice.listed_source is not None:
        return choice.listed_tokens, choice.listed_source
    return (1 if has_text else 0), "events"


async def _read_whole(resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
    """A server that answered with one JSON document (stream off, or a server that does not stream)."""
    raw = await _read_bounded(resp, MAX_EVENT_BYTES + 1)
    t = _now()
    rec.finish_ns = t
    rec.streamed = False
    rec.finish_reason = "error"  # until the response proves good
    if len(raw) > MAX_EVENT_BYTES:
        rec.error = f"response larger than {MAX_EVENT_BYTES // 2**20} MiB"
        return
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        rec.error = f"malformed JSON response: {raw[:80]!r}"
        return
    try:
        ev = parse_event(obj, whole=True)
    except BadEvent as exc:
        rec.error = f"malformed response: {exc}"
        return
    if ev.error is not None:
        rec.error = f"server error: {ev.error}"
        return
    rec.engine_req_id = ev.id
    if ev.usage is not None:
        _apply_usage(rec, ev.usage)
    if ev.choice is None:
        rec.error = "response without choices"
        return
    choice = ev.choice
    rec.text = [choice.text] if choice.text else []
    rec.reasoning = [choice.reasoning] if choice.reasoning else []
    rec.finish_reason = choice.finish_reason
    # The client sees every token at once: the first token arrives with the last.
    has_text = bool(choice.text or choice.reasoning)
    n = rec.output_tokens if rec.output_tokens is not None else (1 if has_text else 0)
    if n > 0 or has_text:
        rec.first_token_ns = t
        rec.chunk_times_ns = [t]
        rec.chunk_tokens = [n]
        rec.token_source = "response"
