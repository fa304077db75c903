"""Fixtures shared by the collector tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "datasets"
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tinyhf import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def scripted():
    """The scripted OpenAI-compatible server (driver/scripted_server.py), one per test module."""
    from loopback import SCRIPTED, start_server

    with start_server(SCRIPTED) as server:
        yield server


@pytest.fixture
def free_port() -> int:
    """A loopback port with nothing listening on it."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def datasets_dir() -> Path:
    """Small local copies of the benchmark datasets in their hub formats."""
    return DATA
