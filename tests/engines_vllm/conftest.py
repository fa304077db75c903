"""Fixtures for the vLLM adapter tests.

Tests that need vLLM's real classes start with `pytest.importorskip("vllm")`: in the main venv (no
vLLM) they are skipped; `.ci/vllm-venv.sh test` runs them against vLLM 0.33.0 and then 0.26.0 on the
CPU (`VLLM_TARGET_DEVICE=cpu`: the CUDA wheel's Python classes import without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if HAS_VLLM:
    # Before anything imports vLLM: pick the CPU platform and keep the hub offline. (Only where vLLM is
    # installed, so the main suite's environment is left alone.)
    for key, value in {
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": "ERROR",
    }.items():
        os.environ.setdefault(key, value)


def _use_cpu_platform() -> None:
    """vLLM 0.26 has no VLLM_TARGET_DEVICE switch: resolve its platform to the CPU one before any vLLM
    module reads `current_platform` at import time."""
    try:
        import vllm.platforms as platforms
    except ImportError:
        return
    current = getattr(platforms, "_current_platform", None)
    if current is None or not getattr(current, "device_type", ""):
        from vllm.platforms.cpu import CpuPlatform

        platforms._current_platform = CpuPlatform()


if HAS_VLLM:
    _use_cpu_platform()


@pytest.fixture(scope="session")
def vllm_version() -> str:
    """The vLLM release under test (`MOECAP_EXPECT_VLLM` pins it: the CI script checks that the
    0.26.0 folder really shadows 0.33.0)."""
    vllm = pytest.importorskip("vllm")
    version = str(vllm.__version__)
    expected = os.environ.get("MOECAP_EXPECT_VLLM")
    if expected:
        assert version == expected, (
            f"testing vLLM {version}, expected {expected} (PYTHONPATH overlay broken?)"
        )
    return version


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory) -> Path:
    """A tiny Qwen1.5-MoE-shaped config.json (3 decoder layers, layer 1 dense, 8 experts, top-2)."""
    from vllm_objects import write_tiny_config

    return write_tiny_config(tmp_path_factory.mktemp("tiny-qwen2-moe"))


@pytest.fixture(scope="session")
def vllm_env(vllm_version, tiny_config_dir):
    """A real `VllmConfig` for the tiny model and vLLM's process groups initialised on gloo (world 1),
    so the real `Worker` methods run their own bodies on the CPU."""
    from vllm_objects import init_vllm

    return init_vllm(tiny_config_dir)
