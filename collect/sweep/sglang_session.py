"""A sweep's SGLang session: every point is exactly `moecap-collect run --engine sglang` with the point's
settings, one `sglang.Engine` per point.

Why not one engine for every point of a config (as the vLLM session does):
- `run` enforces a point's batch size in SGLang's scheduler, at engine start: `max_running_requests =
  --batch-size`, every prompt handed over at once, SGLang admitting a waiting request the moment a slot
  frees (`runner.py`). A client closed loop on an engine started at the largest batch size is a
  different workload (a freed slot waits for the client's next hand-over; TTFT no longer includes the
  wait in SGLang's queue), and `max_running_requests` cannot change on a running engine (SGLang's
  `set_internal_state` refuses it).
- The schedulers' tracer (`adapter.py`) records one run per scheduler process: its run id, output folder
  and workload come from the environment at start, and once closed it stays closed. Nothing reaches it
  between points but `CLOSE_SIGNAL`.

So a point builds the `RunArgs` its `run` command line would (`point_run_args`), turns them into options
with the registry's own `SglangEngine.run_options` and runs them through `base.run_offline` — the
function `run` calls — on a `SglangSession` whose only difference is the `workload.sweep` entry of the
run metadata. The engine start (~40-120 s on an H100) is paid per point; the sweep stays resumable and
a stop closes the point's files first (`run_offline` stops the session, whose `_close_trace` asks every
recording scheduler to close before SGLang's shutdown kills them).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..engines.base import RunArgs, run_offline
from ..engines.sglang.runner import PLUGIN, SglangEngine, SglangRunOptions, SglangSession
from ..errors import CollectError
from ..workload import Prompt
from .matrix import EngineConfig, Point
from .session import PointInterrupted, PointResult


def point_run_args(config: EngineConfig, point: Point, run_id: str, out: Path) -> RunArgs:
    """The `RunArgs` of `moecap-collect run --engine sglang` recording `point` as run `run_id` in `out`
    (the command line: --model, --random-weights, --dtype, --dataset TASK, --num-prompts, --batch-size,
    --max-tokens, --ignore-eos, --seed, --tokenizer, --cuda-graphs, --max-batch-tokens, --dataset-path,
    --engine-args, --run-id, --out; --no-counts when counts are off)."""
    return RunArgs(
        model=config.model,
        dataset=point.task,
        num_prompts=point.num_prompts,
        batch_size=point.batch_size,
        out=out,
        random_weights=config.random_weights,
        dtype=config.dtype,
        max_tokens=point.max_new_tokens,
        ignore_eos=point.ignore_eos,
        seed=config.seed,
        counts=config.counts,
        tokenizer=config.tokenizer,
        cuda_graphs=config.cuda_graphs,
        max_batch_tokens=point.max_batch_tokens,
        run_id=run_id,
        dataset_path=point.dataset_path,
        engine_args=config.engine_args or None,
        progress=False,
    )


def point_run_argv(config: EngineConfig, point: Point, run_id: str, out: Path) -> list[str]:
    """The `moecap-collect run` command line of `point_run_args` (kept in the point's state summary, so a
    point can be re-recorded alone; tests check the `run` command parses it into the sweep's options)."""
    argv = ["moecap-collect", "run", "--engine", "sglang", "--model", config.model]
    if config.random_weights:
        argv.append("--random-weights")
    argv += ["--dtype", config.dtype, "--dataset", point.task, "--num-prompts", str(point.num_prompts)]
    argv += ["--batch-size", str(point.batch_size), "--seed", str(config.seed)]
    argv += ["--cuda-graphs", config.cuda_graphs]
    if point.max_new_tokens is not None:
        argv += ["--max-tokens", str(point.max_new_tokens)]
    if point.ignore_eos:
        argv.append("--ignore-eos")
    if not config.counts:
        argv.append("--no-counts")
    for flag, value in (
        ("--tokenizer", config.tokenizer),
        ("--max-batch-tokens", point.max_batch_tokens),
        ("--dataset-path", point.dataset_path),
        ("--engine-args", config.engine_args or None),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return [*argv, "--run-id", run_id, "--out", str(out)]


class SglangSweepSession:
    """`EngineSession` over SGLang: `start` checks SGLang and the plugin once per config; `run_point`
    starts, warms up, records and stops one engine (see the module docstring)."""

    engine_per_point = True
    """The sweep loop says so in its log instead of "engine ready"."""

    def __init__(self) -> None:
        self.config: EngineConfig | None = None
        self.out: Path | None = None
        self.warnings: list[str] = []

    def start(self, config: EngineConfig, out: Path) -> None:
        self.config, self.out = config, out
        self.warnings = PLUGIN.preflight(False, trace=True)  # raises a one-line CollectError

    def run_point(self, point: Point, run_id: str, workload_extra: dict[str, Any]) -> PointResult:
        assert self.config is not None and self.out is not None
        engine = SglangEngine()
        options = engine.run_options(point_run_args(self.config, point, run_id, self.out))
        session = _PointSession(options, workload_extra)
        try:
            result = run_offline(session)  # stops the engine (trace closed first) on any error
        except KeyboardInterrupt:
            raise PointInterrupted(f"interrupted: run {run_id}'s engine files are closed") from None
        errors = engine.trace_errors(result.engine_stats)
        if errors:
            raise CollectError(errors[0])
        extra: dict[str, Any] = {
            k: v for k, v in result.timing.items() if k in ("engine_start_s", "warmup_s")
        }
        extra["run_command"] = shlex.join(point_run_argv(self.config, point, run_id, self.out))
        if result.warnings:
            extra["warnings"] = list(result.warnings)
        return PointResult(
            run_id=result.run_id,
            requests=result.requests,
            output_tokens=result.output_tokens,
            steps=result.steps,
            wall_s=result.wall_s,
            extra=extra,
        )

    def stop(self) -> None:
        """Nothing held between points (each point's engine is stopped when the point ends)."""


class _PointSession(SglangSession):
    """`run`'s SGLang session with the point's `workload.sweep` entry in every file's metadata."""

    def __init__(self, options: SglangRunOptions, workload_extra: dict[str, Any]) -> None:
        super().__init__(options)
        self.workload_extra = dict(workload_extra)

    def prompts(self, dataset: str, num_prompts: int, dataset_path: str | None = None) -> list[Prompt]:
        out = super().prompts(dataset, num_prompts, dataset_path)
        self.workload.update(self.workload_extra)  # after the workload's own fields, before `start`
        return out
