"""The workload driver: an async client of OpenAI-compatible completions / chat-completions servers.

    result = await drive(samples, ClientConfig(api_url=..., model=...), LoadConfig(concurrency=16),
                         requests_writer=..., outputs_writer=...)

`moecap-collect drive` is the CLI over it (command.py); `moecap-collect run` calls `drive()` against the
engine it started. See docs/driver.md.
"""

from __future__ import annotations

from ..workload import RequestRecord
from .client import build_request
from .config import APIS, ENGINES, ClientConfig, LoadConfig
from .drive import DriveResult, ServerInfo, drive, open_client_writers, probe_server
from .sse import SSEDecoder
from .summary import format_summary, summarize

__all__ = [
    "APIS",
    "ENGINES",
    "ClientConfig",
    "DriveResult",
    "LoadConfig",
    "RequestRecord",
    "SSEDecoder",
    "ServerInfo",
    "build_request",
    "drive",
    "format_summary",
    "open_client_writers",
    "probe_server",
    "summarize",
]
