"""A server traced by `moecap-collect serve` and driven by `moecap-collect drive`: two processes write one
run. The driver's tables carry `engine.name` "client" and the model as the server lists it (here a
scratch folder's path); they join the engine's files by run id, and the driver's closed-loop
concurrency sets the steady-state window (the server's own files cannot know the workload)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecap.analyze.analysis import Options
from moecap.analyze.pipeline import analyze_paths
from moecap.schemas import (
    DRIVER_ENGINE,
    EngineInfo,
    ModelInfo,
    MoEInfo,
    RunMetadata,
    TraceWriter,
    trace_file_name,
)

ROOT = Path(__file__).resolve().parents[2]
MS = 1_000_000
RUN_ID = "20261204T000000Z-sglang-Qwen1.5-MoE-A2.7B-0001"


def _engine_meta() -> RunMetadata:
    config = json.loads((ROOT / "analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json").read_text())
    return RunMetadata(
        run_id=RUN_ID,
        engine=EngineInfo(name="sglang", version="0.5.16"),
        model=ModelInfo(id="Qwen/Qwen1.5-MoE-A2.7B", config=config),
        moe=MoEInfo(layer_ids=list(range(24)), num_experts=60, top_k=4),
        workload={"driver": "external"},  # what `serve` knows
    )


def _write_server_steps(out: Path) -> None:
    meta = _engine_meta()
    with TraceWriter(out / trace_file_name(meta, "steps"), "steps", meta) as w:
        w.write({"step": 0, "t_start_ns": 0, "t_end_ns": 10 * MS, "phase": "prefill", "is_draft": False,
                 "num_reqs": 2, "num_tokens": 8, "req_ids": ["r0", "r1"], "req_prefix_lens": [0, 0],
                 "req_new_tokens": [4, 4]})  # fmt: skip
        for i in range(1, 4):
            w.write({"step": i, "t_start_ns": 10 * i * MS, "t_end_ns": (10 * i + 5) * MS, "phase": "decode",
                     "is_draft": False, "num_reqs": 2, "num_tokens": 2, "req_ids": ["r0", "r1"],
                     "req_prefix_lens": [3 + i, 3 + i], "req_new_tokens": [1, 1]})  # fmt: skip
        w.write({"step": 4, "t_start_ns": 40 * MS, "t_end_ns": 41 * MS, "phase": "decode", "is_draft": False,
                 "num_reqs": 1, "num_tokens": 1, "req_ids": ["r0"], "req_prefix_lens": [7],
                 "req_new_tokens": [1]})  # fmt: skip


def _write_driver_requests(out: Path) -> None:
    meta = RunMetadata(
        run_id=RUN_ID,
        engine=EngineInfo(name=DRIVER_ENGINE, version="0.5.16"),
        model=ModelInfo(id="/tmp/moecap-sglang-model-qqypsnta", config={}),
        workload={"mode": "closed_loop", "concurrency": 2},
    )
    with TraceWriter(out / trace_file_name(meta, "requests"), "requests", meta) as w:
        for req_id, finish in (("r0", 41 * MS), ("r1", 35 * MS)):
            w.write({"req_id": req_id, "engine_req_id": req_id, "sample_id": "s", "arrival_ns": 0,
                     "first_token_ns": 10 * MS, "finish_ns": finish, "prompt_tokens": 4, "output_tokens": 4,
                     "cached_prompt_tokens": 0, "chunk_times_ns": [10 * MS], "chunk_tokens": [4],
                     "queue_ns": None, "preemptions": 0, "finish_reason": "length", "error": None,
                     "retries": 0})  # fmt: skip


@pytest.mark.parametrize("with_driver", [True, False])
def test_driver_tables_join_and_set_the_steady_window(tmp_path, with_driver):
    _write_server_steps(tmp_path)
    if with_driver:
        _write_driver_requests(tmp_path)
    doc = analyze_paths([tmp_path], Options(gpu="H200"), cache_dir=tmp_path / "cache").document
    (run,) = doc["runs"]
    assert run["model"] == "Qwen/Qwen1.5-MoE-A2.7B"  # the engine's files describe the run
    if with_driver:
        # 90 % of 2 in flight -> steps with >= 2 requests: steps 0-3, not step 4 (1 request).
        assert run["window"]["kind"] == "steady" and run["window"]["min_requests"] == 2
        join = run["metrics"]["requests"]["client_engine_join"]
        assert join["requests"] == 2 and join["joined"] == 2
        assert sorted(f["table"] for f in run["files"]) == ["requests", "steps"]
    else:
        assert run["window"]["kind"] == "all"
        assert "no target concurrency" in run["window"]["description"]
