"""What the driver sends (ClientConfig) and how fast (LoadConfig)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from ..datasets import DEFAULT_SYSTEM_PROMPT
from ..errors import CollectError

APIS = ("completions", "chat")
ENGINES = ("auto", "vllm", "sglang", "hf", "sllm", "openai")
"""Server kinds; they differ only in how the driver's request id reaches the engine (X-Request-Id header
for all, plus a `rid` body field for SGLang) and in which version endpoint is asked."""

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
        self.base_url = url
        self.api = self.api or "completions"
        if self.api not in APIS:
            raise CollectError(f"--api {self.api!r}: expected one of {', '.join(APIS)}")
        if self.engine not in ENGINES:
            raise CollectError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.max_tokens < 1:
            raise CollectError(f"--max-tokens must be at least 1 (got {self.max_tokens})")
        if self.max_retries < 0:
            raise CollectError(f"--retries must be >= 0 (got {self.max_retries})")

    @property
    def endpoint(self) -> str:
        return self.base_url + _ENDPOINTS[self.api or "completions"]


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
    """Requests sent (and not recorded) before the measured workload, one at a time."""
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise CollectError(f"--batch-size must be at least 1 (got {self.concurrency})")
        if self.request_rate is not None and not self.request_rate > 0:
            raise CollectError(f"--request-rate must be > 0 (got {self.request_rate})")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise CollectError(f"--max-concurrency must be at least 1 (got {self.max_concurrency})")

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
        if self.slo_ttft_s is not None or self.slo_tpot_s is not None:
            out["slo"] = {"ttft_s": self.slo_ttft_s, "tpot_s": self.slo_tpot_s}
        return out
