"""Shared fixtures."""

from __future__ import annotations

import pytest

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
