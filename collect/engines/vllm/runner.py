"""Run a workload on vLLM's offline engine with the moecap plugin on, leaving one complete run in `out`.

    result = run(VllmRunOptions(model="analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json", random_weights=True,
                                dataset="synthetic:256x64", num_prompts=64, batch_size=64, out="traces/"))

The engine's workers write `steps` / `experts` (one pair per recording rank, through the plugin in
`vllm.py`); this process writes the client side, `requests` and `outputs`, under the same run id.

Work reaches the engine the way vLLM's own throughput tool (`LLM.generate`, `vllm bench throughput`)
hands it over: the engine is built with `LLM`'s usage context (so it gets `LLM`'s defaults: on an H100,
16,384 batched tokens per step where the bare engine default is 2,048), with `max_num_seqs =
batch_size`, and every prompt is added before the first `step()`; vLLM's scheduler admits a waiting
request the moment a slot frees, with no client round trip in between. Before the recorded window,
`warmup` requests of the workload's shapes (fresh token ids) run with the tracer paused, so one-off
kernel compilation (Triton JIT of the MoE kernel for new shapes) lands outside it. Our request ids are
given to vLLM (which appends a random suffix for its own id, recorded in `requests.engine_req_id`, so
`steps.req_ids` join). Token times are the host times at which `step()` returned each request's new
tokens (`RequestOutputKind.DELTA`: only the new tokens travel). `arrival_ns` is when the request was
handed to the engine, so a request's TTFT includes its wait for a free slot, as in vLLM's own tool.

`VllmSession` (a `base.OfflineSession`) is the same engine held open for many workload points (start
once, `run_point` many times, `stop`), for sweeps and repeated measurements; `run` is one session with
one point. `VllmEngine` is vLLM's entry in the engine registry (`base.ENGINES`).

`serve_command(model, vllm_args, …)` is what `moecap-collect serve --engine vllm` runs: vLLM's OpenAI
server (`vllm serve`) in place of this process, with tracing on in every engine process.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata

from ...errors import CollectError
from ...workload import STEP_BUDGET_ARGS, Prompt, RequestRecord, prefill_step_budget, prompt_room
from ..base import COMMON_RUN_FLAGS, OfflineRunOptions, OfflineSession, Progress, SessionEngine, engine_fields
from ..offline import EnginePlugin, exec_traced_server, model_id_of, parse_engine_flags
from . import adapter, compat

ENTRY_POINT = "moecap.collect.engines.vllm:register"


@dataclass
class VllmRunOptions(OfflineRunOptions):
    """One recorded run on vLLM's offline engine (`engine_args`: further `EngineArgs` fields, e.g.
    {"tensor_parallel_size": 2}; `vllm_argv` parses CLI flags into them)."""

    block_size: int | None = None


# ---------------------------------------------------------------------------------------------------
# The plugin in vLLM's processes
# ---------------------------------------------------------------------------------------------------
PLUGIN = EnginePlugin(
    label="vLLM", extra="vllm", group=compat.PLUGIN_GROUP, entry_point=ENTRY_POINT,
    allow_list=("VLLM_PLUGINS", "moecap"), check_version=adapter.check_version,
)  # fmt: skip
tracing_env = PLUGIN.env
"""The variables that turn the plugin on in every vLLM process (they inherit the environment)."""
plugin_installed = PLUGIN.installed
"""True when vLLM's plugin loader will find moecap's entry point (moecap installed, editable or not)."""
preflight = PLUGIN.preflight
"""Check vLLM (and the plugin, when tracing) before anything starts; returns warnings (raises
`CollectError`)."""


def vllm_argv(argv: Sequence[str]) -> dict[str, Any]:
    """vLLM CLI engine flags (`--tensor-parallel-size 2 --enable-expert-parallel …`) as `EngineArgs` fields
    that differ from the defaults, parsed by vLLM's own parser."""
    if not argv:
        return {}
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # pragma: no cover - older releases
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef,attr-defined]

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="moecap-collect run --engine vllm"))
    fields = [f.name for f in dataclasses.fields(EngineArgs)]
    return parse_engine_flags(parser, "--model", argv, "vLLM engine", fields)


# ---------------------------------------------------------------------------------------------------
# The offline run: one engine session, one or more workload points
# ---------------------------------------------------------------------------------------------------
class VllmSession(OfflineSession):
    """One vLLM engine held open for several workload points (`base.OfflineSession`). `start` takes an
    `engine_factory(kwargs)` building the `LLMEngine` from `engine_kwargs` instead (a benchmark's
    `LLM(**kwargs).llm_engine`, so vLLM's own `LLM.generate` and this session share one engine)."""

    engine_name = "vllm"
    driver = "vllm-offline-engine-admission"
    limit_arg = "max_num_seqs"
    options: VllmRunOptions

    plugin = PLUGIN

    def _build(self, engine_factory: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        kwargs = engine_kwargs(self.options, self.model, text_prompts=self.tokenizer is not None)
        if self.options.trace:
            adapter.register()  # this process too (an in-process engine core), before vLLM loads plugins
        if engine_factory is not None:
            return engine_factory(kwargs)
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        # LLM_CLASS: the defaults `LLM(...)` gets (the bare engine context leaves the step budget at 2,048
        # tokens, which chunks a 64 x 256-token prefill eight ways).
        return LLMEngine.from_engine_args(_engine_args(kwargs), usage_context=UsageContext.LLM_CLASS)

    def _metadata(self) -> RunMetadata:
        return self.client_metadata(*engine_facts(self.engine, self.options))

    def _step_budget(self) -> int | None:
        return step_budget(self.engine)

    def _longest_prompt(self) -> int | None:
        return longest_prompt(self.engine)

    def _pause(self) -> None:
        _rpc(self.engine, "pause")

    def _resume(self) -> None:
        _rpc(self.engine, "resume")

    def _close_trace(self) -> list[dict[str, Any]]:
        return _rpc(self.engine, "close")

    def _shutdown(self) -> None:
        self.engine.engine_core.shutdown()

    # -- submission -----------------------------------------------------------------------------------
    def _params(self, p: Any) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=p.max_new_tokens,
            ignore_eos=self.options.ignore_eos,
            temperature=0.0,
            seed=self.options.seed,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def _add(self, p: Prompt, live: dict[str, RequestRecord]) -> None:
        params = self._params(p)
        now = time.monotonic_ns()
        engine_id = self.engine.add_request(p.req_id, {"prompt_token_ids": list(p.token_ids)}, params)
        live[p.req_id] = RequestRecord.of(p, now, engine_id if isinstance(engine_id, str) else None)

    def _submit(
        self, prompts: Sequence[Prompt], concurrency: int | None, progress: Progress | None
    ) -> tuple[list[RequestRecord], float]:
        """Every prompt to the engine, then `step()` until all are done (`LLM.generate`'s loop); or, with a
        `concurrency`, a closed loop replacing each finished request."""
        pending = deque(prompts)
        live: dict[str, RequestRecord] = {}
        t0 = time.monotonic_ns()
        while pending and (concurrency is None or len(live) < concurrency):
            self._add(pending.popleft(), live)

        def refill() -> None:
            if pending:
                self._add(pending.popleft(), live)

        done = self._drain(live, len(prompts), progress, refill)
        return done, (time.monotonic_ns() - t0) / 1e9

    def _drain(
        self,
        live: dict[str, RequestRecord],
        total: int,
        progress: Progress | None,
        on_finish: Callable[[], None],
    ) -> list[RequestRecord]:
        engine = self.engine
        done: list[RequestRecord] = []
        tokens = 0
        while live:
            outputs = engine.step()
            now = time.monotonic_ns()
            for out in outputs:
                rec = live.get(out.request_id)
                if rec is None or not out.outputs:
                    continue
                completion = out.outputs[0]
                rec.add_tokens(now, completion.token_ids)  # DELTA: this step's tokens only
                if rec.cached_prompt_tokens is None:
                    rec.cached_prompt_tokens = getattr(out, "num_cached_tokens", None)
                if out.finished:
                    rec.finish_ns = now
                    rec.finish_reason = str(completion.finish_reason) if completion.finish_reason else None
                    rec.routed_experts = getattr(completion, "routed_experts", None)
                    done.append(live.pop(out.request_id))
                    tokens += len(rec.output_ids)
                    if progress is not None:
                        progress(len(done), total, tokens)
                    on_finish()
        return done


FIELDS = {
    "seed": "seed", "dtype": "dtype", "concurrency": "max_num_seqs", "tokenizer": "tokenizer",
    "eager": "enforce_eager", "max_batch_tokens": "max_num_batched_tokens",
}  # fmt: skip
"""The run's neutral settings as `EngineArgs` fields (`base.engine_fields`)."""


def engine_kwargs(options: VllmRunOptions, model: str, text_prompts: bool) -> dict[str, Any]:
    """The `EngineArgs` fields of a run (also `LLM(**kwargs)`'s keyword arguments)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "skip_tokenizer_init": not text_prompts and options.tokenizer is None,
        "disable_log_stats": True,  # as `LLM(...)`: no per-step stats in the client
        **engine_fields(options, FIELDS),
    }
    if options.block_size:
        kwargs["block_size"] = options.block_size
    kwargs.update(options.engine_args)
    return kwargs


def _engine_args(kwargs: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    try:
        return EngineArgs(**kwargs)
    except TypeError as exc:
        raise CollectError(f"vLLM engine arguments: {exc}") from None


def _rpc(engine: Any, command: str) -> list[dict[str, Any]]:
    """Ask every worker's tracer (`Worker.moecap_control`) for its stats, closing its files first."""
    try:
        result = engine.collective_rpc("moecap_control", args=(command,))
    except Exception as exc:
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    return [r for r in result if r is not None] if isinstance(result, list) else [result]


def step_budget(engine: Any) -> int | None:
    """The engine's prompt tokens per step (`scheduler_config.max_num_batched_tokens`; None if unknown)."""
    sc = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
    return prefill_step_budget(*(getattr(sc, name, None) for name in STEP_BUDGET_ARGS["vllm"]))


def longest_prompt(engine: Any) -> int | None:
    """The longest prompt the engine takes with one output token: `model_config.max_model_len` − 1 (vLLM
    checks at start-up that one sequence of that length fits its KV cache); None if unknown."""
    mc = getattr(getattr(engine, "vllm_config", None), "model_config", None)
    return prompt_room(getattr(mc, "max_model_len", None))


def engine_facts(engine: Any, options: VllmRunOptions) -> tuple[Any, ...]:
    """(EngineInfo, ModelInfo, MoEInfo) of an offline vLLM run, from the engine's `vllm_config`."""
    vc = getattr(engine, "vllm_config", None)
    return (
        EngineInfo(name="vllm", version=compat.installed_version() or "", args=compat.engine_args(vc) if vc else {}),
        ModelInfo(
            id=model_id_of(options.model), config=compat.model_config_dict(vc) if vc is not None else {},
            dtypes=compat.dtypes(vc) if vc is not None else {}, random_weights=options.random_weights,
        ),
        MoEInfo(
            num_experts=compat.config_num_experts(vc) or 0 if vc else 0,
            top_k=compat.config_top_k(vc) or 0 if vc else 0,
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------
def serve_argv(model: str, vllm_args: Sequence[str]) -> list[str]:
    """The command line of vLLM's OpenAI server for `model` (`vllm serve MODEL ARGS…`)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *vllm_args]


def serve_command(
    model: str,
    vllm_args: Sequence[str],
    *,
    exec_fn: Callable[[str, list[str], dict[str, str]], Any] | None = None,
    **serve: Any,
) -> tuple[list[str], dict[str, str]]:
    """Replace this process by `vllm serve MODEL ARGS…` with tracing on (returns only when `exec_fn`
    does, i.e. in tests); `serve`: `EnginePlugin.server`'s options (out, run_id, counts, strict_engine,
    random_weights). The run's `steps` / `experts` files appear in `out` per recording rank; the workload
    driver writes `requests` / `outputs` there with the same run id (printed)."""
    server = PLUGIN.server("vllm", model, vllm_args, **serve)
    plan = server.plan
    return exec_traced_server(
        serve_argv(plan.target, plan.args), server.env, engine="vLLM", run_id=plan.run_id, out_dir=plan.out_dir,
        warnings=server.warnings, exec_fn=exec_fn,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# vLLM in the engine registry
# ---------------------------------------------------------------------------------------------------
class VllmEngine(SessionEngine):
    """vLLM's `base.Engine`."""

    name = "vllm"
    label = "vLLM"
    run_flags = COMMON_RUN_FLAGS | {"block_size", "engine_args", "strict_engine", "trace"}
    session_cls = VllmSession
    options_cls = VllmRunOptions
    option_extras = ("block_size",)
    serve_example = """
Example (an H100; vLLM's own flags after the model):

    moecap-collect serve --engine vllm --out traces/ Qwen/Qwen1.5-MoE-A2.7B --max-num-seqs 64

Random weights from a config.json (no checkpoint download):

    moecap-collect serve --engine vllm --out traces/ --random-weights \\
        analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json --skip-tokenizer-init
"""

    def engine_args(self, argv: Sequence[str]) -> dict[str, Any]:
        return vllm_argv(argv)

    def serve(self, model: str, argv: Sequence[str], **kw: Any) -> int:
        serve_command(model, argv, **kw)
        return 0

    def trace_errors(self, stats: Sequence[dict[str, Any]]) -> list[str]:
        return [
            f"the vLLM workers' tracer did not answer ({s['error']})" for s in stats if s and "error" in s
        ]


run = VllmEngine().run
"""Run `options`' workload on vLLM (tracing on unless `options.trace` is False): one session, one
workload point (`base.run_offline`); see the module docstring."""


__all__ = ["VllmEngine", "VllmRunOptions", "VllmSession", "plugin_installed", "run", "serve_command"]
