"""The vLLM session's run hand-over between points, on the real patched `vllm.v1.worker.gpu_worker.Worker`
on the CPU (the vLLM adapter tests' toy model runner and scheduler): one worker, several runs, each
run's files closed and holding only its own steps; warm-up between points is not recorded.

Runs where vLLM is installed (`.ci/vllm-venv.sh`'s venv: `$(bash .ci/vllm-venv.sh) -m pytest
tests/collect/sweep/test_sweep_vllm_session.py`, or the GPU machine); skipped in the main venv."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # not imported here: the conftest below goes first
    pytest.skip("vLLM is not installed", allow_module_level=True)

ENGINES_VLLM = Path(__file__).resolve().parents[2] / "engines_vllm"
sys.path.insert(0, str(ENGINES_VLLM))
# The adapter tests' conftest picks vLLM's CPU platform before vLLM reads it; load it under its own name.
_spec = importlib.util.spec_from_file_location("moecap_engines_vllm_conftest", ENGINES_VLLM / "conftest.py")
assert _spec is not None and _spec.loader is not None
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))

from vllm_objects import (  # noqa: E402
    FakeRunner,
    ToyScheduler,
    init_vllm,
    kv_cache_config,
    make_model,
    make_worker,
    write_tiny_config,
)

from moecap.collect.engines.vllm import adapter  # noqa: E402
from moecap.collect.sweep.vllm_session import _begin_run, _end_run  # noqa: E402
from moecap.schemas import open_traces  # noqa: E402


def _drive(worker, scheduler, max_steps=200):
    step = 0
    while not scheduler.done() and step < max_steps:
        so, _ = scheduler.step()
        if worker.execute_model(so) is None:
            worker.sample_tokens(None)
        step += 1


def test_one_engine_records_one_closed_run_per_point(tmp_path, monkeypatch):
    from vllm.v1.worker.gpu_worker import Worker

    out = tmp_path / "sweep"
    monkeypatch.setenv(adapter.ENV_TRACE_DIR, str(out))
    monkeypatch.setenv(adapter.ENV_RUN_ID, "20261206T000000Z-vllm-engine-start")
    monkeypatch.setenv(adapter.ENV_MODEL_ID, "tiny/qwen2-moe")
    monkeypatch.setenv(adapter.ENV_WORKLOAD, "{}")
    adapter.patch_worker_class(Worker)
    try:
        (tmp_path / "tiny").mkdir()
        env = init_vllm(write_tiny_config(tmp_path / "tiny"))
        worker = make_worker(env, FakeRunner(make_model()))
        worker.load_model()
        worker.initialize_from_config(kv_cache_config())
        _end_run(worker)  # the engine is up; nothing recorded before the first point
        runs = ["20261206T000001Z-vllm-tiny-c1-r0-aaaa", "20261206T000002Z-vllm-tiny-c2-r0-bbbb"]
        for i, run_id in enumerate(runs):
            warm = ToyScheduler(32, seed=100 + i)
            warm.add(f"warm{i}", 4, 2)
            _drive(worker, warm)  # the warm-up between points: tracing is closed
            stats = _begin_run(worker, run_id, {"batch_size": i + 1, "sweep": {"point": f"p{i}"}})
            assert stats is not None and stats["steps_written"] == 0
            sched = ToyScheduler(32, seed=i)
            for j in range(i + 1):
                sched.add(f"{run_id[-4:]}-{j}", 5 + j, 3)
            _drive(worker, sched)
            end = _end_run(worker)
            assert end is not None and end["steps_written"] > 0
        worker.shutdown()
    finally:
        adapter.unpatch_worker_class(Worker)

    traces = open_traces([out])
    assert not traces.errors
    assert sorted(traces.runs) == runs  # no run for the engine start
    for i, run_id in enumerate(runs):
        run = traces.runs[run_id]
        assert sorted(f.table_kind for f in run.files) == ["experts", "steps"]
        assert all(f.complete for f in run.files)
        assert run.metadata.workload == {"batch_size": i + 1, "sweep": {"point": f"p{i}"}}
        steps = run.tables("steps")[0].table.to_pylist()
        ids = {rid for r in steps for rid in r["req_ids"]}
        assert ids == {f"{run_id[-4:]}-{j}" for j in range(i + 1)}  # its own requests, no warm-up
    assert json.loads(json.dumps(traces.runs[runs[1]].metadata.workload))["sweep"]["point"] == "p1"
