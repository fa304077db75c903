"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The synthetic-trace generator lives with the benchmarks (it is also their data source).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata


@pytest.fixture
def run_meta() -> RunMetadata:
    """A small run's metadata (Qwen1.5-MoE-shaped expert layout)."""
    return RunMetadata(
        run_id="20261124T000000Z-hf-test-0000",
        engine=EngineInfo(name="hf", version="5.17.0"),
        model=ModelInfo(id="Qwen/Qwen1.5-MoE-A2.7B", config={"model_type": "qwen2_moe"}),
        moe=MoEInfo(layer_ids=list(range(24)), num_experts=60, top_k=4),
    )


@pytest.fixture
def synthetic_run(tmp_path):
    """A small simulated run (steps, experts, requests, outputs) and its ground truth."""
    from synthetic_traces import SimConfig, simulate_run

    out = tmp_path / "trace"
    truth = simulate_run(out, SimConfig())
    return out, truth
