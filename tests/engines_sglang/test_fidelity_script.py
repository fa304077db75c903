"""benchmarks/gpu/engine_fidelity.py's SGLang offline stage end to end on the CPU (it runs once, in a scarce
GPU lease): `sglang.Engine` is `test_run.FakeEngine` (streaming as the tokenizer manager does) plus the
one-call `generate` and `flush_cache` SGLang's own offline benchmark uses, checked against the real class."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, ClassVar

from test_run import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


class StandInEngine(FakeEngine):
    made: ClassVar[list[StandInEngine]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flushes = 0
        self.generated = 0
        StandInEngine.made.append(self)

    def flush_cache(self) -> None:
        self.flushes += 1

    def generate(
        self, input_ids: list[list[int]], sampling_params: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        self.generated += 1
        return [{"meta_info": {"completion_tokens": int(p["max_new_tokens"])}} for p in sampling_params]


def test_the_offline_stage_shares_one_engine_and_interleaves(sglang_version, tmp_path, monkeypatch):
    import sglang
    from sglang.srt.entrypoints.engine import Engine

    assert {"input_ids", "sampling_params"} <= set(inspect.signature(Engine.generate).parameters)
    assert hasattr(Engine, "flush_cache")
    spec = importlib.util.spec_from_file_location(
        "engine_fidelity", ROOT / "benchmarks/gpu/engine_fidelity.py"
    )
    ef = importlib.util.module_from_spec(spec)
    sys.modules["engine_fidelity"] = ef
    spec.loader.exec_module(ef)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000}
        )
    )
    monkeypatch.setattr(ef, "MODEL", cfg)
    monkeypatch.setattr(ef, "WORKLOADS", {2: (4, 8, 3)})
    monkeypatch.setattr(sglang, "Engine", StandInEngine)
    StandInEngine.made.clear()
    result = ef.sglang_offline("off", 2, 3, tmp_path / "out")
    (engine,) = StandInEngine.made
    assert engine.kwargs["max_running_requests"] == 2 and engine.kwargs["load_format"] == "dummy"
    assert engine.generated == 3 and engine.flushes == 6 and engine.shut
    assert len(result["engine_own_tok_s"]) == len(result["run_tok_s"]) == 3
    assert result["timing"]["warmup_requests"] == 2 and "model_path" not in result["engine_kwargs"]


def test_the_unfused_stage_switches_the_fused_count_off_for_sglangs_processes(
    sglang_version, tmp_path, monkeypatch
):
    import sglang

    from moecap.collect.engines.sglang import fused_count

    spec = importlib.util.spec_from_file_location(
        "engine_fidelity", ROOT / "benchmarks/gpu/engine_fidelity.py"
    )
    ef = importlib.util.module_from_spec(spec)
    sys.modules["engine_fidelity"] = ef
    spec.loader.exec_module(ef)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2}))
    monkeypatch.setattr(ef, "MODEL", cfg)
    monkeypatch.setattr(ef, "WORKLOADS", {2: (4, 8, 3)})
    monkeypatch.setattr(sglang, "Engine", StandInEngine)
    monkeypatch.setenv(fused_count.ENV_FUSED, "1")  # restored (unset) after the test
    seen = {}

    class Seeing(StandInEngine):
        def __init__(self, **kwargs: Any) -> None:
            seen["fused"] = __import__("os").environ.get(fused_count.ENV_FUSED)
            super().__init__(**kwargs)

    monkeypatch.setattr(sglang, "Engine", Seeing)
    ef.sglang_offline("expertsunfused", 2, 1, tmp_path / "out")
    assert seen["fused"] == "0", "set before SGLang spawns its scheduler"
    assert fused_count.enabled() is False
