"""A sweep's vLLM session: one offline `LLMEngine` per engine config, one run per point.

The engine starts with the moecap plugin on (as `moecap-collect run --engine vllm` does) and the
in-process engine core (deterministic scheduling, as the GPU validation's `sweep` stage). Between
points the workers' tracers are turned over to the next run by a callable `collective_rpc`
(`_begin_run` / `_end_run` below): the previous run's `steps` / `experts` files are closed, the warm-up
runs while tracing is closed (not recorded), the prefix cache is reset (so a point never reuses the
previous point's prompts), and the point's run id and workload go into the tracer's settings before
its first step. The client side (`requests`, `outputs`, `gpu_samples`) is written here per point.

When the engines' own session API lands (collect/engines/<engine>/), the run turnover belongs there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CollectError
from .matrix import EngineConfig, Point
from .session import PointInterrupted, PointResult

WARMUP_MAX_TOKENS = 16
"""Output tokens per warm-up request: enough decode steps to run the batch's graphs, little time."""
WARMUP_SEED_OFFSET = 1_000_003
"""Warm-up prompts are sampled with seed + this, so they share no prefix with the point's prompts."""


def _tracer_of(obj: Any) -> Any:
    # collective_rpc hands a callable the worker wrapper (or the worker); the tracer lives on the Worker.
    for candidate in (obj, getattr(obj, "worker", None)):
        found = getattr(candidate, "__dict__", {}).get("_moecap_tracer")
        if found is not None:
            return found
    return None


def _end_run(obj: Any) -> dict[str, Any] | None:
    """Worker side: close the current run's files (tracing stays off until `_begin_run`)."""
    tracer = _tracer_of(obj)
    if tracer is None:
        return None
    tracer.close()
    return tracer.stats()


def _begin_run(obj: Any, run_id: str, workload: dict[str, Any]) -> dict[str, Any] | None:
    """Worker side: the next steps belong to run `run_id` (its files open at its first step)."""
    tracer = _tracer_of(obj)
    if tracer is None:
        return None
    tracer.close()
    tracer.settings = dataclasses.replace(tracer.settings, run_id=run_id, workload=dict(workload))
    tracer.metadata = None
    tracer.steps_written = 0
    tracer._closed = False
    return tracer.stats()


def _preflight(engine_args: dict[str, Any]) -> list[str]:
    """The engine release check; the plugin's entry point is needed only where vLLM runs workers in
    other processes (several GPUs, or the multiprocess engine core): a single in-process worker is
    patched by `register()` in this process (e.g. a checkout on PYTHONPATH, benchmarks/gpu/env.sh)."""
    from ..engines.vllm import adapter
    from ..engines.vllm import runner as vllm_run

    warning = adapter.check_version(False)
    workers = 1
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        workers *= int(engine_args.get(key) or 1)
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0"
    if (workers > 1 or not in_process) and not vllm_run.plugin_installed():
        vllm_run.preflight(False)  # raises: the entry point is missing
    return [warning] if warning else []


class VllmSession:
    """vLLM's offline engine, started once per `EngineConfig`."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.config: EngineConfig | None = None
        self.out: Path | None = None
        self.scratch: Path | None = None
        self.tokenizer: Any = None
        self.vocab = 32000
        self.model_id = ""
        self.warnings: list[str] = []
        self._saved_env: dict[str, str | None] = {}
        self._ladder_reach = 0
        """Step sizes up to this many tokens have had their residue ladder on this engine."""

    def start(self, config: EngineConfig, out: Path) -> None:
        from ..engines.offline import load_tokenizer, model_dir, model_id_of, read_config
        from ..engines.vllm import adapter
        from ..engines.vllm import runner as vllm_run

        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise CollectError(
                f"engine vllm needs vLLM installed (pip install 'moecap[vllm]'): {exc}"
            ) from None
        self.config, self.out = config, out
        extra = vllm_run.vllm_argv(shlex.split(config.engine_args)) if config.engine_args else {}
        self.warnings = _preflight(extra)
        self.model_id = model_id_of(config.model)
        self.scratch = Path(tempfile.mkdtemp(prefix="moecap-sweep-model-"))
        model = model_dir(config.model, config.random_weights, self.scratch / "model")
        cfg = read_config(model)
        self.vocab = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 32000)
        self.tokenizer = load_tokenizer(config.tokenizer or (model if Path(model).is_dir() else None))
        self.options = vllm_run.VllmRunOptions(
            model=config.model,
            dataset="",
            num_prompts=1,
            batch_size=0,  # no max_num_seqs from here: --engine-args sets it, else vLLM's default
            out=str(out),
            random_weights=config.random_weights,
            dtype=config.dtype,
            seed=config.seed,
            counts=config.counts,
            tokenizer=config.tokenizer,
            cuda_graphs=config.cuda_graphs,
            engine_args=extra,
        )
        engine_args = vllm_run._engine_args(
            vllm_run.engine_kwargs(self.options, model, text_prompts=self.tokenizer is not None)
        )
        env = vllm_run.tracing_env(
            out,
            "sweep-engine-start",
            counts=config.counts,
            model_id=self.model_id,
            workload={},
            strict=False,
        )
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        adapter.register()
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        # LLM_CLASS: the defaults `LLM(...)` gets; the bare engine context caps a step at 2,048 tokens
        # (issue #20: `run` measured 0.76x of LLM.generate with it).
        self.engine = LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)
        self._rpc(_end_run)  # nothing is recorded until the first point begins its run

    def _rpc(self, fn: Any, *args: Any) -> list[dict[str, Any]]:
        result = self.engine.collective_rpc(fn, args=args)
        return [r for r in result if r is not None] if isinstance(result, list) else [result]

    def _prompts(self, point: Point, seed: int, n: int, max_new_tokens: int | None) -> list[Any]:
        from ..datasets import load_samples
        from ..workload import make_prompts

        samples = load_samples(
            point.task,
            n,
            seed=seed,
            vocab_size=self.vocab,
            local_path=point.dataset_path,
            tokenizer=self.tokenizer,
        )
        return make_prompts(samples, self.tokenizer, max_new_tokens, self.vocab)

    def _submit(self, prompts: list[Any], options: Any, concurrency: int) -> tuple[list[Any], float]:
        """`run`'s own submission (`engines/vllm_run.VllmSession`) on this engine: every prompt at once
        when the engine's `max_num_seqs` is the point's batch size, a closed loop of `concurrency` below it."""
        from ..engines.vllm import runner as vllm_run

        submitter = object.__new__(vllm_run.VllmSession)
        submitter.engine, submitter.options = self.engine, options
        limit = int(self.options.engine_args.get("max_num_seqs") or 0)
        return submitter._submit(prompts, None if limit and concurrency >= limit else concurrency, None)

    def _ladder(self, prompts: list[Any], options: Any, batch_size: int, seed: int) -> None:
        """The residue ladder's groups above `_ladder_reach`, each handed over alone."""
        from ..engines.vllm.runner import longest_prompt, step_budget
        from ..workload import ladder_reach, residue_ladder

        budget = step_budget(self.engine)
        if not budget or not prompts:
            return
        limits = dict(
            step_budget=budget,
            max_prompt_tokens=max(len(p.token_ids) for p in prompts),
            max_requests=batch_size,
        )
        cap = longest_prompt(self.engine)
        for group in residue_ladder(
            **limits, vocab_size=self.vocab, seed=seed, covered=self._ladder_reach, prompt_cap=cap
        ):
            self._submit(group, options, len(group))
        self._ladder_reach = max(self._ladder_reach, ladder_reach(**limits))

    def run_point(self, point: Point, run_id: str, workload_extra: dict[str, Any]) -> PointResult:
        from ..engines.base import client_run_metadata
        from ..engines.offline import gpu_sampler
        from ..engines.vllm import runner as vllm_run
        from ..workload import closed_loop_workload, write_client_tables

        assert self.engine is not None and self.config is not None and self.out is not None
        seed = self.config.seed
        prompts = self._prompts(point, seed, point.num_prompts, point.max_new_tokens)
        options = dataclasses.replace(
            self.options,
            dataset=point.task,
            num_prompts=point.num_prompts,
            batch_size=point.batch_size,
            ignore_eos=point.ignore_eos,
            max_new_tokens=point.max_new_tokens,
            run_id=run_id,
        )
        workload = closed_loop_workload(
            prompts,
            dataset=point.task,
            batch_size=point.batch_size,
            ignore_eos=point.ignore_eos,
            seed=seed,
            driver="vllm-offline-closed-loop",
        )
        workload.update(workload_extra)
        # Warm-up, not recorded (tracing is closed between points): the residue ladder for the step sizes
        # this point can form beyond what earlier points' ladders covered (workload.residue_ladder says
        # why), then one wave at the point's batch size.
        self._ladder(prompts, options, point.batch_size, seed)
        warm = self._prompts(point, seed + WARMUP_SEED_OFFSET, point.batch_size, WARMUP_MAX_TOKENS)
        self._submit(warm, options, point.batch_size)
        with contextlib.suppress(Exception):
            self.engine.reset_prefix_cache()
        self._rpc(_begin_run, run_id, workload)
        meta = client_run_metadata(
            run_id, vllm_run.engine_facts(self.engine, options), workload, self.warnings
        )
        try:
            with gpu_sampler(self.out, meta, options.gpu_sample_interval_s):
                records, wall_s = self._submit(prompts, options, point.batch_size)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self._rpc(_end_run)
            raise PointInterrupted(f"interrupted: run {run_id}'s engine files are closed") from None
        stats = self._rpc(_end_run)
        errors = [s["error"] for s in stats if s and "error" in s]
        if errors:
            raise CollectError(f"the vLLM workers' tracer did not answer ({errors[0]})")
        write_client_tables(self.out, meta, records, self.tokenizer)
        return PointResult(
            run_id=run_id,
            requests=len(records),
            output_tokens=sum(len(r.output_ids) for r in records),
            steps=sum(int(s.get("steps_written", 0)) for s in stats if s),
            wall_s=wall_s,
        )

    def stop(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self._rpc(_end_run)
            with contextlib.suppress(Exception):
                self.engine.engine_core.shutdown()
            self.engine = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
