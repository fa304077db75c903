"""What the driver sends (ClientConfig) and how fast (LoadConfig)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yarl

from ..datasets import DEFAULT_SYSTEM_PROMPT
from ..errors import CollectError

APIS = ("completions", "chat")
ENGINES = ("auto", "vllm", "sglang", "hf", "sllm", "openai")
"""Server kinds; they differ only in how the driver's request id reaches the engine (X-Request-Id header
for all, plus a `rid` body field for SGLang) and in which version endpoint is asked."""

ARRIVALS = ("request", "first-byte")
"""When `arrival_ns` is stamped (`ClientConfig.arrival`)."""

PROMPT_FORMATS = ("auto", "ids", "text")
"""How token-id prompts (`synthetic:<in>x<out>`) are sent: `ids` as token ids (`auto`, the default, does
so); `text` decoded with the served model's tokenizer, as `vllm bench serve --dataset-name random` sends
its prompts, so the server tokenizes them as it does that benchmark's. Text datasets are sent as text."""

_ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class ClientConfig:
    """One OpenAI-compatible endpoint and the request body the driver builds for every sample.

    Times in seconds. `read_timeout_s` bounds every wait for data (the first token included);
    `request_timeout_s` (optional) bounds a whole request.
    """

    api_url: str
    """Server base URL (http://127.0.0.1:8000) or a full endpoint URL (…/v1/completions, …/v1/chat/completions)."""
    model: str | None = None
    """Model name sent in the body; None = the first model the server lists at /v1/models."""
    api: str | None = None
    """completions | chat; None = from the endpoint URL, else completions."""
    stream: bool = True
    max_tokens: int = 512
    """Default output budget (a sample's own max_new_tokens wins)."""
    ignore_eos: bool = False
    temperature: float = 0.0
    engine: str = "auto"
    continuous_usage: bool = True
    """Ask for usage in every streamed chunk (stream_options.continuous_usage_stats; vLLM, SGLang), so the
    driver knows how many tokens each chunk carried."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System message for chat requests of samples without their own (None or "": none)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    request_timeout_s: float | None = None
    max_retries: int = 0
    """Retries after a connection failure or an HTTP 429/502/503/504, before any token arrived."""
    retry_backoff_s: float = 0.5
    request_id_prefix: str = field(default_factory=lambda: secrets.token_hex(4))
    preflight: bool = True
    """Check that the server answers (GET /v1/models) before sending the workload."""
    reuse_connections: bool | None = None
    """Keep connections open between requests (True, as `vllm bench serve`), or open a new connection for
    every request (False, as SGLang's `bench_serving`, a session per request: each request pays its TCP
    connect, and a burst reaches the server together rather than behind a request that found a connection
    already open, the server probe's or a warm-up's). None: as the server's engine's own serving benchmark
    does, False for an SGLang server and True otherwise (decided after the probe; `DriveResult.client`
    holds the choice)."""
    env_per_request: bool = False
    """Look up proxies and .netrc for every request, in aiohttp's thread pool (`trust_env=True`, as `vllm bench
    serve` does), rather than once per session: reproduces that tool's client cost (session.py), for
    telling a difference in TTFT between the two apart from the server's."""
    arrival: str = "request"
    """When a request's `arrival_ns` (TTFT's start) is taken: `request`, just before the HTTP client is
    asked to send it (as `vllm bench serve` and SGLang's `bench_serving` do); `first-byte`, when its first
    byte is written to the socket (leaves out connection set-up and the client's send path)."""

    def __post_init__(self) -> None:
        url = self.api_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise CollectError(f"--api-url {self.api_url!r}: expected http://host:port[/v1/completions]")
        for api, suffix in _ENDPOINTS.items():
            if url.endswith(suffix):
                if self.api is not None and self.api != api:
                    raise CollectError(
                        f"--api {self.api} contradicts the endpoint in --api-url {self.api_url}"
                    )
                self.api = api
                url = url[: -len(suffix)]
                break
        if url.endswith("/v1"):
            url = url[:-3]
        _check_url(self.api_url, url)
        self.base_url = url
        self.api = self.api or "completions"
        if self.api not in APIS:
            raise CollectError(f"--api {self.api!r}: expected one of {', '.join(APIS)}")
        if self.arrival not in ARRIVALS:
            raise CollectError(f"--arrival {self.arrival!r}: expected one of {', '.join(ARRIVALS)}")
        if self.engine not in ENGINES:
            raise CollectError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not 1 <= self.max_tokens <= MAX_TOKENS:
            raise CollectError(f"--max-tokens must be between 1 and {MAX_TOKENS} (got {self.max_tokens})")
        if self.max_retries < 0:
            raise CollectError(f"--retries must be >= 0 (got {self.max_retries})")
        _check_seconds("--connect-timeout-s", self.connect_timeout_s)
        _check_seconds("--timeout-s", self.read_timeout_s)
        if self.request_timeout_s is not None:
            _check_seconds("--request-timeout-s", self.request_timeout_s)
        _check_seconds("--retry-backoff-s", self.retry_backoff_s, zero_ok=True)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise CollectError(f"--temperature must be a finite number >= 0 (got {self.temperature:g})")
        for name, value in self.headers.items():
            check_header(name, value)

    @property
    def endpoint(self) -> str:
        return self.base_url + _ENDPOINTS[self.api or "completions"]


MAX_TOKENS = 2**31 - 1
"""Largest output budget (token counts are int32 in the trace files)."""

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_url(given: str, url: str) -> None:
    """A base URL the HTTP client can connect to: a host, and a port in range."""
    expected = "expected http://host:port[/v1/completions]"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port out of range
        if parts.hostname:
            yarl.URL(url)  # what aiohttp will parse
    except ValueError as exc:
        raise CollectError(f"--api-url {given!r}: {exc}; {expected}") from None
    if not parts.hostname:
        raise CollectError(f"--api-url {given!r}: no host; {expected}")


def _check_seconds(flag: str, value: float, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if math.isnan(value) or not ok:
        raise CollectError(f"{flag} must be a number {'>=' if zero_ok else '>'} 0 seconds (got {value:g})")


def check_header(name: str, value: str) -> None:
    """An HTTP header the server can receive: a token name, a printable-ASCII value (no line breaks)."""
    if not name or any(ch not in _TCHAR for ch in name):
        raise CollectError(f"--header {name!r}: not a valid header name (letters, digits, - and _)")
    if any(not (ch == "\t" or " " <= ch <= "~") for ch in value):
        raise CollectError(f"--header {name!r}: the value must be printable ASCII")


@dataclass
class LoadConfig:
    """How requests are issued.

    Closed loop (default): `concurrency` requests in flight, a new one as soon as one finishes (MoE-CAP's
    batch size). Open loop: `request_rate` requests/s with exponential (Poisson) gaps drawn from `seed`,
    `float("inf")` for all at once, at most `max_concurrency` in flight (None = unbounded).
    """

    concurrency: int = 1
    request_rate: float | None = None
    max_concurrency: int | None = None
    seed: int = 0
    warmup: int = 0
    """Requests sent (and not recorded) before the measured workload, at most the load's concurrency at a
    time."""
    warmup_ladder: str = "off"
    """With a warm-up, first the residue ladder (`workload.residue_ladder`: one step of every token count
    class the engine's kernels compile for): `auto`, up to the prefill tokens per step the server tells
    (SGLang; vLLM in dev mode); a number of tokens, up to that; `off`, none."""
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def __post_init__(self) -> None:
        self.warmup_ladder = str(self.warmup_ladder).strip().lower()
        if self.warmup_ladder not in ("auto", "off") and not (
            self.warmup_ladder.isdigit() and int(self.warmup_ladder) > 0
        ):
            raise CollectError(
                f"--warmup-ladder {self.warmup_ladder!r}: expected auto, off or a number of tokens > 0"
            )
        if self.concurrency < 1:
            raise CollectError(f"--batch-size must be at least 1 (got {self.concurrency})")
        if self.request_rate is not None and not self.request_rate > 0:
            raise CollectError(f"--request-rate must be > 0 (got {self.request_rate})")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise CollectError(f"--max-concurrency must be at least 1 (got {self.max_concurrency})")
        if self.warmup < 0:
            raise CollectError(f"--warmup must be >= 0 (got {self.warmup})")
        for flag, slo in (("--slo-ttft-ms", self.slo_ttft_s), ("--slo-tpot-ms", self.slo_tpot_s)):
            if slo is not None and not (math.isfinite(slo) and slo > 0):
                raise CollectError(f"{flag} must be a finite number > 0 (got {slo * 1e3:g})")

    @property
    def ladder_budget(self) -> int | None:
        """The step budget `--warmup-ladder` gives (tokens); None for auto and off."""
        return int(self.warmup_ladder) if self.warmup_ladder.isdigit() else None

    @property
    def open_loop(self) -> bool:
        return self.request_rate is not None

    def describe(self) -> dict[str, Any]:
        """The load as recorded in the run's workload metadata."""
        if self.open_loop:
            out: dict[str, Any] = {
                "mode": "open_loop",
                "request_rate": None if self.request_rate == float("inf") else self.request_rate,
                "arrivals": "all_at_once" if self.request_rate == float("inf") else "poisson",
                "max_concurrency": self.max_concurrency,
                "seed": self.seed,
            }
        else:
            out = {"mode": "closed_loop", "concurrency": self.concurrency}
        out["warmup_requests"] = self.warmup
        out["warmup_ladder"] = self.warmup_ladder if self.warmup else "off"
        if self.slo_ttft_s is not None or self.slo_tpot_s is not None:
            out["slo"] = {"ttft_s": self.slo_ttft_s, "tpot_s": self.slo_tpot_s}
        return out
