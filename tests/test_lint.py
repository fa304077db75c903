"""House checks run with the tests (so CI runs them): ruff lint + format, mypy on schemas/ and analyze/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint():
    r = _run("ruff", "check", ".")
    assert r.returncode == 0, r.stdout[-4000:]


def test_ruff_format():
    r = _run("ruff", "format", "--check", ".")
    assert r.returncode == 0, r.stdout[-4000:]


@pytest.mark.slow
def test_mypy_schemas_and_analyze():
    r = _run("mypy", "schemas", "analyze")
    assert r.returncode == 0, r.stdout[-4000:]
