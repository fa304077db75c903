"""`moecap-collect sweep --engine sglang` against SGLang's real classes (ServerArgs, the engine flags'
parser, the registry's `SglangEngine`), with `sglang.Engine` replaced by test_run's `FakeEngine` (its
async API is checked against the real `Engine` there): each point is exactly the `run --engine sglang`
of its command line — the same engine arguments (`max_running_requests` = the point's batch size), the
same requests in the same order (warm-up first), every prompt handed over at once, the same workload
metadata but for the `sweep` entry —; a re-run starts no engine; a failing point is recorded and the
others are not lost; Ctrl-C asks the schedulers to close their files before the engine is shut down.

Run with `.ci/sglang-venv.sh test` (SGLang 0.5.23 and 0.5.16); skipped where SGLang is not installed."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from test_run import FakeEngine

from moecap.collect.engines.sglang import adapter
from moecap.collect.engines.sglang import runner as sglang_run
from moecap.collect.sweep import build_spec, expand, run_sweep
from moecap.collect.sweep.sglang_session import point_run_argv
from moecap.collect.workload import WARMUP_PREFIX
from moecap.schemas import open_traces

ENGINE_ARGS = "--mem-fraction-static 0.8 --context-length 2048"


class Engines:
    """`sglang.Engine` for the test: FakeEngines, and the order of trace closes and shutdowns."""

    def __init__(self, fail_at: int | None = None, interrupt_at: int | None = None) -> None:
        self.made: list[FakeEngine] = []
        self.events: list[str] = []
        self.fail_at, self.interrupt_at = fail_at, interrupt_at

    def __call__(self, **kwargs: Any) -> FakeEngine:
        bs = kwargs.get("max_running_requests")
        if bs == self.fail_at:
            raise RuntimeError("CUDA out of memory (stand-in)")
        events, interrupt = self.events, bs == self.interrupt_at

        class Engine(FakeEngine):
            async def _stream(self, rid: str, ids: list[int], n: int) -> Any:
                async for chunk in super()._stream(rid, ids, n):
                    if interrupt and not rid.startswith(WARMUP_PREFIX):
                        raise KeyboardInterrupt  # Ctrl-C during the recorded window
                    yield chunk

            def shutdown(self) -> None:
                events.append("shutdown")
                super().shutdown()

        self.made.append(Engine(**kwargs))
        return self.made[-1]


@pytest.fixture
def engines(sglang_version, monkeypatch):
    import sglang

    def install(**kw: Any) -> Engines:
        made = Engines(**kw)
        monkeypatch.setattr(sglang, "Engine", made)

        def request_close(stats_dir: Any, timeout_s: float) -> tuple[list, list]:
            made.events.append("close")  # what makes the schedulers close their files
            return [], []

        monkeypatch.setattr(adapter, "request_close", request_close)
        monkeypatch.setattr(sglang_run, "wait_for_tracers", lambda stats_dir, timeout_s: [])
        return made

    monkeypatch.delenv(adapter.ENV_TRACE_DIR, raising=False)
    return install


def _config(tmp_path: Path) -> str:
    cfg = tmp_path / "tiny-moe.json"
    cfg.write_text(
        json.dumps(
            {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000}
        )
    )
    return str(cfg)


def _points(tmp_path: Path, sizes=(1, 2, 4)):
    spec = build_spec(
        {"engines": ["sglang"], "models": [_config(tmp_path)], "random_weights": True, "dtype": "bf16",
         "tasks": ["synthetic:6x3"], "batch_sizes": list(sizes), "waves": 2, "engine_args": ENGINE_ARGS,
         "name": "test-sglang-sweep"}
    )  # fmt: skip
    return expand(spec)


def _state(out: Path) -> dict[str, Any]:
    return json.loads((out / "sweep.json").read_text())["points"]


def _calls(engine: FakeEngine) -> list[tuple[str, list[int], dict[str, Any]]]:
    return [(c["rid"], c["input_ids"], c["sampling_params"]) for c in engine.calls]


def test_each_point_is_the_run_of_its_command_line(engines, tmp_path):
    from typer.testing import CliRunner

    from moecap.collect import cli

    made = engines()
    points = _points(tmp_path)
    out = tmp_path / "sweep"
    outcome = run_sweep(points, out, name="test-sglang-sweep", log=lambda _: None)
    assert outcome.complete and len(outcome.recorded) == 3
    assert len(made.made) == 3  # one engine per point
    assert made.events == ["close", "shutdown"] * 3  # each closed before SGLang's shutdown kills it
    state = _state(out)
    traces = open_traces([out], strict=True)
    assert not traces.errors and len(traces.runs) == 3
    cli._register()
    for p, sweep_engine in zip(points, list(made.made), strict=True):
        entry = state[p.key]
        assert entry["status"] == "done"
        run_id = entry["run_id"]
        # named as the vLLM sweep names its points: <UTC stamp>-<engine>-<slug>-<4 hex>
        assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-sglang-{re.escape(p.slug)}-[0-9a-f]{{4}}", run_id)
        # (the stand-in has no scheduler, so no steps / experts files)
        assert entry["attempts"][-1]["files"] == [
            f"{run_id}.client.outputs.arrow",
            f"{run_id}.client.requests.arrow",
        ]
        kwargs = sweep_engine.kwargs
        assert kwargs["max_running_requests"] == p.batch_size  # the point's batch size, in SGLang
        assert (kwargs["mem_fraction_static"], kwargs["context_length"]) == (0.8, 2048)  # SGLang's parser
        assert sweep_engine.max_in_flight == 2 * p.batch_size  # every prompt handed over at once
        # The same point recorded by `run`, from the command line the sweep keeps in its state:
        command = entry["attempts"][-1]["summary"]["run_command"]
        assert command == shlex.join(point_run_argv(p.config, p, run_id, out))
        before = len(made.made)
        res = CliRunner().invoke(
            cli.app,
            [*shlex.split(command)[1:-4], "--run-id", f"run-{p.batch_size}",
             "--out", str(tmp_path / "run"), "--no-progress"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        (run_engine,) = made.made[before:]
        drop = {"model_path"}  # the engine's scratch copy of the config: a fresh folder per engine
        assert {k: v for k, v in run_engine.kwargs.items() if k not in drop} == {
            k: v for k, v in kwargs.items() if k not in drop
        }
        assert _calls(run_engine) == _calls(sweep_engine)  # same requests, ids, order, warm-up first
        assert run_engine.max_in_flight == sweep_engine.max_in_flight
        warm = [c for c in sweep_engine.calls if c["rid"].startswith(WARMUP_PREFIX)]
        assert len(warm) == p.batch_size and sweep_engine.calls[: p.batch_size] == warm
        ran = open_traces([tmp_path / "run"], strict=True).runs[f"run-{p.batch_size}"].metadata
        swept = traces.runs[run_id].metadata
        sweep_entry = swept.workload.pop("sweep")
        assert swept.workload == ran.workload
        assert sweep_entry == {"name": "test-sglang-sweep", "point": p.key, "task": "synthetic:6x3",
                               "batch_size": p.batch_size, "repeat": 0, "engine_args": ENGINE_ARGS}  # fmt: skip
        assert swept.workload["driver"] == "sglang-offline-engine-admission"
        assert swept.workload["concurrency"] == swept.workload["batch_size"] == p.batch_size
        assert swept.engine.args == ran.engine.args and "model_path" not in swept.engine.args


def test_a_rerun_starts_no_engine_and_a_new_batch_size_records_only_itself(engines, tmp_path):
    made = engines()
    out = tmp_path / "sweep"
    assert run_sweep(_points(tmp_path, (1, 2)), out, log=lambda _: None).complete
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")}
    again = run_sweep(_points(tmp_path, (1, 2)), out, log=lambda _: None)
    assert again.recorded == [] and len(again.skipped) == 2 and len(made.made) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")} == files
    more = run_sweep(_points(tmp_path, (1, 2, 8)), out, log=lambda _: None)
    assert len(more.recorded) == 1 and made.made[-1].kwargs["max_running_requests"] == 8


def test_a_point_whose_engine_fails_is_recorded_and_the_others_are_kept(engines, tmp_path):
    made = engines(fail_at=2)
    out = tmp_path / "sweep"
    points = _points(tmp_path)
    outcome = run_sweep(points, out, log=lambda _: None)
    (bad,) = [p for p in points if p.batch_size == 2]
    assert outcome.failed == {bad.key: "RuntimeError: CUDA out of memory (stand-in)"}
    assert sorted(outcome.recorded) == sorted(p.key for p in points if p is not bad)
    state = _state(out)
    assert {state[p.key]["point"]["batch_size"]: state[p.key]["status"] for p in points} == {
        1: "done", 2: "failed", 4: "done",
    }  # fmt: skip
    assert len(open_traces([out], strict=True).runs) == 2
    # the failed point alone is recorded by the next run
    made.fail_at = None
    again = run_sweep(points, out, log=lambda _: None)
    assert again.recorded == [bad.key] and len(again.skipped) == 2


def test_ctrl_c_closes_the_trace_before_shutdown_and_a_rerun_records_the_rest(engines, tmp_path):
    made = engines(interrupt_at=2)
    out = tmp_path / "sweep"
    points = _points(tmp_path)
    outcome = run_sweep(points, out, log=lambda _: None)
    by_bs = {p.batch_size: p.key for p in points}
    assert outcome.stopped and outcome.interrupted == by_bs[2]
    assert outcome.recorded == [by_bs[1]] and outcome.not_run == [by_bs[4]]
    assert made.events == ["close", "shutdown", "close", "shutdown"]  # the interrupted engine too
    state = _state(out)
    assert [state[by_bs[c]]["status"] for c in (1, 2, 4)] == ["done", "interrupted", "pending"]
    assert state[by_bs[2]]["reason"] == "interrupted (Ctrl-C / SIGTERM); files closed"
    (run,) = open_traces([out], strict=True).runs.values()  # the interrupted point left nothing half
    assert run.metadata.workload["sweep"]["batch_size"] == 1
    made.interrupt_at = None
    again = run_sweep(points, out, log=lambda _: None)
    assert sorted(again.recorded) == sorted([by_bs[2], by_bs[4]]) and again.skipped == [by_bs[1]]
    assert len(_state(out)[by_bs[2]]["attempts"]) == 2
