"""benchmarks/gpu/engine_fidelity.py's vLLM offline stage end to end on the CPU (it runs once, in a scarce
GPU lease): `LLM` is a stand-in whose engine schedules like vLLM's (`test_session.ScriptedEngine`), so the
stage's own code — one engine shared by `LLM.generate` and `run`'s session, interleaved repeats, prefix cache
reset, medians, the JSON it writes — is what is checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

pytest.importorskip("vllm")

from test_session import ScriptedEngine
from vllm_objects import init_vllm, write_tiny_config

from moecap.collect.engines.vllm import adapter

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "engine_fidelity", ROOT / "benchmarks/gpu/engine_fidelity.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_fidelity"] = module
    spec.loader.exec_module(module)
    return module


class StandInLLM:
    """`vllm.LLM(**kwargs)`: `llm_engine`, `generate(prompts, params, use_tqdm=)`, `reset_prefix_cache()`."""

    made: ClassVar[list[StandInLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.llm_engine = ScriptedEngine(kwargs["max_num_seqs"])
        config = init_vllm(Path(kwargs["model"])).config  # vLLM's real VllmConfig of the model folder
        config.scheduler_config.max_num_seqs = kwargs["max_num_seqs"]
        self.llm_engine.vllm_config = config
        self.resets = 0
        self.generated = 0
        StandInLLM.made.append(self)

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> list[Any]:
        engine = self.llm_engine
        for i, p in enumerate(prompts):
            engine.add_request(f"llm-{self.generated}-{i}", p, params)
        self.generated += 1
        got: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)]) for ids in got.values()]


@pytest.mark.parametrize("mode", ["off", "experts"])
def test_the_offline_stage_shares_one_engine_and_interleaves(tmp_path, monkeypatch, mode):
    import vllm

    ef = _script()
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.setattr(ef, "MODEL", write_tiny_config(folder) / "config.json")
    monkeypatch.setattr(ef, "WORKLOADS", {2: (4, 8, 3)})
    monkeypatch.setattr(vllm, "LLM", StandInLLM)
    StandInLLM.made.clear()
    result = ef.vllm_offline(mode, 2, 3, tmp_path / "out")
    adapter._reset_for_tests()
    (llm,) = StandInLLM.made
    assert llm.kwargs["max_num_seqs"] == 2 and llm.kwargs["load_format"] == "dummy"
    assert llm.kwargs["disable_log_stats"] is True and llm.kwargs["skip_tokenizer_init"] is True
    assert llm.generated == 3 and llm.resets == 6  # the cache reset before each of 3 + 3 timed calls
    assert len(result["engine_own_tok_s"]) == len(result["run_tok_s"]) == 3
    assert result["run_over_engine_own"] == pytest.approx(
        result["run_median"] / result["engine_own_median"], rel=1e-3
    )
    assert result["scheduler"]["max_num_seqs"] == 2 and result["timing"]["warmup_requests"] == 2
    assert result["engine_kwargs"]["max_num_seqs"] == 2 and "model" not in result["engine_kwargs"]
    assert llm.llm_engine.max_running == 2
    assert ("shutdown", None) in llm.llm_engine.events
    rpcs = [cmd for kind, cmd in llm.llm_engine.events if kind == "rpc"]
    assert rpcs == ([] if mode == "off" else ["pause", "resume", "close"])
