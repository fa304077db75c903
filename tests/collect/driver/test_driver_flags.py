"""Bad flag values are one line naming the flag, before any request (and before any file): never a
traceback from httpx or the socket layer, never a silently odd run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moecap.collect.driver import ClientConfig, LoadConfig
from moecap.collect.errors import CollectError

URL = "http://127.0.0.1:8000"
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"api_url": "http://[::1"}, "--api-url 'http://[::1': Invalid IPv6 URL; expected http://host:port[/v1/completions]"),
        ({"api_url": "http://127.0.0.1:99999"}, "--api-url 'http://127.0.0.1:99999': Port out of range 0-65535; expected http://host:port[/v1/completions]"),
        ({"api_url": "http://:8000"}, "--api-url 'http://:8000': no host; expected http://host:port[/v1/completions]"),
        ({"read_timeout_s": NAN}, "--timeout-s must be a number > 0 seconds (got nan)"),
        ({"read_timeout_s": -1.0}, "--timeout-s must be a number > 0 seconds (got -1)"),
        ({"connect_timeout_s": 0.0}, "--connect-timeout-s must be a number > 0 seconds (got 0)"),
        ({"request_timeout_s": 0.0}, "--request-timeout-s must be a number > 0 seconds (got 0)"),
        ({"temperature": NAN}, "--temperature must be a finite number >= 0 (got nan)"),
        ({"temperature": -0.5}, "--temperature must be a finite number >= 0 (got -0.5)"),
        ({"max_tokens": 2**31}, "--max-tokens must be between 1 and 2147483647 (got 2147483648)"),
        ({"max_tokens": 0}, "--max-tokens must be between 1 and 2147483647 (got 0)"),
        ({"headers": {"X-A": "\u00e9"}}, "--header 'X-A': the value must be printable ASCII"),
        ({"headers": {"X-A": "a\r\nInjected: 1"}}, "--header 'X-A': the value must be printable ASCII"),
        ({"headers": {"X A": "b"}}, "--header 'X A': not a valid header name (letters, digits, - and _)"),
    ],
)  # fmt: skip
def test_bad_client_settings_name_the_flag(kwargs, message):
    with pytest.raises(CollectError) as info:
        ClientConfig(**{"api_url": URL, **kwargs})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "--warmup must be >= 0 (got -1)"),
        ({"slo_ttft_s": -0.005}, "--slo-ttft-ms must be a finite number > 0 (got -5)"),
        ({"slo_tpot_s": NAN}, "--slo-tpot-ms must be a finite number > 0 (got nan)"),
        ({"slo_tpot_s": INF}, "--slo-tpot-ms must be a finite number > 0 (got inf)"),
        ({"request_rate": NAN}, "--request-rate must be > 0 (got nan)"),
    ],
)
def test_bad_load_settings_name_the_flag(kwargs, message):
    with pytest.raises(CollectError) as info:
        LoadConfig(**kwargs)
    assert str(info.value) == message


def test_good_edge_values_are_accepted():
    cfg = ClientConfig(
        api_url=URL, read_timeout_s=INF, max_tokens=2**31 - 1, temperature=0.0, headers={"X-A": "b c"}
    )
    assert cfg.base_url == URL
    assert ClientConfig(api_url="http://[::1]:8000/v1/chat/completions").api == "chat"
    assert LoadConfig(warmup=0, request_rate=INF).open_loop


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--header", "X-A: \u00e9"],
            "moecap-collect: error: --header 'X-A': the value must be printable ASCII",
        ),
        (["--num-prompts", "0"], "moecap-collect: error: --num-prompts must be at least 1 (got 0)"),
        (
            ["--warmup-ladder", "8k"],
            "moecap-collect: error: --warmup-ladder '8k': expected auto, off or a number of tokens > 0",
        ),
    ],
)
def test_through_the_cli_one_line_exit_2(args, line, free_port, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from moecap.collect.cli import main; main()", "drive", "--api-url",
         f"http://127.0.0.1:{free_port}", "--dataset", "synthetic:4x2", "--out", str(tmp_path / "t"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == line
    assert not (tmp_path / "t").exists()
