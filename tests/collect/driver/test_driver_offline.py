"""Offline, a hub dataset or tokenizer id fails at once with one line (the hub libraries alone retry for
25-40 s first); a cached one still loads; local copies and synthetic workloads never ask the hub.

The hub is pointed (HF_ENDPOINT) at a loopback port where nothing listens, or at the scripted loopback
server for a hub that answers; HF_HOME is an empty folder unless a test fills the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moecap.collect.driver import hub
from moecap.collect.errors import CollectError

CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def hub_env(monkeypatch, tmp_path, free_port):
    """No proxy, no declared offline mode, an empty cache, a hub endpoint where nothing listens."""
    for var in PROXIES:
        monkeypatch.delenv(var, raising=False)
    for var in hub.OFFLINE_VARS:
        monkeypatch.setenv(var, "0")  # restored by monkeypatch, whatever the code under test sets
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port}")
    return tmp_path / "hf"


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    return proc, time.monotonic() - t0


def test_unreachable_hub_is_one_line_at_once(hub_env, scripted, tmp_path, free_port):
    proc, wall = _cli("drive", "--api-url", scripted.url, "--dataset", "gsm8k", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"moecap-collect: error: dataset gsm8k (openai/gsm8k): the hub cannot be reached "
        f"(127.0.0.1:{free_port}: Connection refused) and it is not cached; pass a local copy with --dataset-path"
    ]
    assert wall < 10  # a whole process start included; the hub libraries alone took 25-40 s
    assert not (tmp_path / "t").exists()  # nothing written


def test_the_check_itself_takes_under_two_seconds(hub_env):
    t0 = time.monotonic()
    with pytest.raises(CollectError, match="the hub cannot be reached"):
        hub.check_hub_access("longbench_v2", None, None)
    assert time.monotonic() - t0 < 2


def test_declared_offline_mode_without_a_cache(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CollectError) as info:
        hub.check_hub_access("mmlu_pro:512x64", None, None)
    assert str(info.value) == (
        "dataset mmlu_pro (TIGER-Lab/MMLU-Pro): HF_HUB_OFFLINE is set and it is not in the local cache; "
        "pass a local copy with --dataset-path"
    )


def test_a_tokenizer_id_is_checked_too(hub_env, scripted, tmp_path, free_port):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    proc, _ = _cli(
        "drive", "--api-url", scripted.url, "--dataset", "gsm8k", "--dataset-path", str(data),
        "--chat-template", "--tokenizer", "org/some-tokenizer", "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"moecap-collect: error: tokenizer 'org/some-tokenizer': the hub cannot be reached "
        f"(127.0.0.1:{free_port}: Connection refused) and it is not cached; pass a local tokenizer folder"
    )


def test_a_cached_dataset_is_read_from_the_cache_without_retries(hub_env):
    (hub_env / "hub" / "datasets--openai--gsm8k").mkdir(parents=True)
    hub.check_hub_access("gsm8k", None, None)  # no error: the cache may serve it
    # ... and the hub libraries are told not to try the network first
    assert {os.environ[v] for v in hub.OFFLINE_VARS} == {"1"}


def test_a_reachable_hub_passes(hub_env, monkeypatch, scripted):
    monkeypatch.setenv("HF_ENDPOINT", scripted.url)  # something that accepts connections
    hub.check_hub_access("gsm8k", None, "org/tok")
    assert {os.environ[v] for v in hub.OFFLINE_VARS} == {"0"}


@pytest.mark.parametrize(
    ("dataset", "path", "tokenizer"),
    [("synthetic:8x4", None, None), ("gsm8k", "local/copy", None), ("gsm9k", None, None)],
)
def test_what_needs_no_hub_is_not_checked(hub_env, tmp_path, dataset, path, tokenizer):
    hub.check_hub_access(dataset, path, tokenizer)  # no error although the hub is down
    hub.check_hub_access("synthetic:8x4", None, str(tmp_path))  # a local tokenizer folder


def test_the_probe_goes_to_the_proxy_when_one_is_set(hub_env, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.probe_target() == ("proxy.example", 3128)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("HF_ENDPOINT")
    assert hub.probe_target() == ("huggingface.co", 443)
