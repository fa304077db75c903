"""Fixtures for the SGLang adapter tests.

Tests that need SGLang's real classes use the `sglang_version` fixture (skipped where SGLang is not
installed, as in the main venv); `.ci/sglang-venv.sh test` runs them against SGLang 0.5.23 and then
0.5.16 (a --target folder on PYTHONPATH) on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HAS_SGLANG = importlib.util.find_spec("sglang") is not None
if HAS_SGLANG:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # SGLang warns at import that GGUF and CUDA kernels need a GPU: true, and irrelevant here.
    warnings.filterwarnings("ignore", module="sglang")


@pytest.fixture(scope="session")
def sglang_version() -> str:
    """The SGLang release under test (`MOECAP_EXPECT_SGLANG` pins it: the CI script checks that the
    0.5.16 folder really shadows 0.5.23)."""
    if not HAS_SGLANG:
        pytest.skip("SGLang is not installed (run .ci/sglang-venv.sh test)")
    import sglang

    version = str(sglang.__version__)
    expected = os.environ.get("MOECAP_EXPECT_SGLANG")
    if expected:
        assert version == expected, (
            f"testing SGLang {version}, expected {expected} (PYTHONPATH overlay broken?)"
        )
    return version


@pytest.fixture
def sgl(sglang_version, monkeypatch, tmp_path):
    """The real SGLang classes, a CPU stand-in for the device, and a clean adapter state."""
    import importlib

    from sglang_objects import Sgl

    from moecap.collect.engines.sglang import compat, fused_count

    # register() patches SGLang's select-experts gatherer class: undo it (and the live-token
    # scalars) after each test.
    gatherer = getattr(importlib.import_module(compat.GATHERER_CLASS[0]), compat.GATHERER_CLASS[1])
    monkeypatch.setattr(gatherer, "on_select_experts", gatherer.on_select_experts)
    monkeypatch.setattr(compat, "_LIVE_TOKENS", {})
    monkeypatch.setattr(compat, "_LIVE_SET", {})
    fused_count.reset_for_tests()
    env = Sgl(monkeypatch, tmp_path)
    yield env
    env.close()
    fused_count.reset_for_tests()
