"""Run a workload on SGLang's offline engine with the moecap plugin on, leaving one complete run in `out`;
and the command line of SGLang's OpenAI server with tracing on.

    result = run(SglangRunOptions(model="analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json", random_weights=True,
                                  dataset="synthetic:256x64", num_prompts=64, batch_size=64, out="traces/"))

The engine's scheduler processes write `steps` / `experts` (one pair per recording rank, through the
plugin in `sglang.py`); this process writes the client side, `requests` and `outputs`, under the same
run id. Work reaches SGLang the way its own offline benchmark (`bench_offline_throughput`: one
`Engine.generate` over every prompt) hands it over: `max_running_requests = batch_size`, and every prompt
is submitted at once through `sglang.Engine.async_generate(input_ids=…, rid=…, stream=True)` on the
engine's own event loop; SGLang's scheduler admits a waiting request the moment a slot frees. Before the
recorded window, `warmup` requests of the workload's shapes (fresh ids, request ids starting with
`warmup.WARMUP_PREFIX`, whose passes the tracer skips) take the one-off compilation. Our request ids are
SGLang's `rid`s, so `steps.req_ids` join `requests.req_id`.

What the driver measures (host monotonic ns, in this process): `arrival_ns` just before
`async_generate` is called; every streamed chunk's arrival (`chunk_times_ns`) with the tokens it added
(`chunk_tokens`, from `meta_info.completion_tokens`: a chunk may carry several tokens); the first chunk
with a token is `first_token_ns`, the last `finish_ns`. The times are when SGLang's tokenizer manager
handed the chunk to us (after the scheduler -> detokenizer -> tokenizer hops), not GPU times; the GPU
span of every pass is in `steps`. `cached_prompt_tokens` is `meta_info.cached_tokens`.

`SglangSession` (a `base.OfflineSession`) holds one engine for many workload points; `SglangEngine` is
SGLang's entry in the engine registry (`base.ENGINES`).

`serve_command(model, sglang_args, …)` is what `moecap-collect serve --engine sglang` runs:
`python -m sglang.launch_server --model-path MODEL ARGS…` in place of this process, with tracing on in
every scheduler process. Both add `--expert-distribution-recorder-mode stat` (the adapter reads that
recorder's per-pass buffer) with a one-slot buffer (`--expert-distribution-recorder-buffer-size 1`: the
adapter reads each pass itself; SGLang's own buffer would only cost memory), unless the user chose a
mode, counts are off, or EPLB is on (EPLB rebalances from that buffer: SGLang's default size stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata

from ...errors import CollectError
from ...workload import STEP_BUDGET_ARGS, Prompt, RequestRecord, prefill_step_budget, prompt_room
from ..base import COMMON_RUN_FLAGS, OfflineRunOptions, OfflineSession, Progress, SessionEngine, engine_fields
from ..offline import EnginePlugin, has_flag, model_id_of, parse_engine_flags, supervise_traced_server
from . import adapter, compat

ENTRY_POINT = "moecap.collect.engines.sglang:register"
MODE_FLAG = "--expert-distribution-recorder-mode"
BUFFER_FLAG = "--expert-distribution-recorder-buffer-size"


@dataclass
class SglangRunOptions(OfflineRunOptions):
    """One recorded run on SGLang's offline engine (`engine_args`: further `ServerArgs` fields, e.g.
    {"tp_size": 2}; `sglang_argv` parses CLI flags into them; `max_batch_tokens` is SGLang's
    `chunked_prefill_size`)."""

    flush_wait_s: float = 10.0
    """After the workload: how long to wait for the schedulers to write their last steps (SGLang's
    shutdown kills them; the adapter's idle flusher writes finished passes within ~0.5 s)."""


# ---------------------------------------------------------------------------------------------------
# Environment and arguments shared with SGLang's processes
# ---------------------------------------------------------------------------------------------------
PLUGIN = EnginePlugin(
    label="SGLang", extra="sglang", group=compat.PLUGIN_GROUP, entry_point=ENTRY_POINT,
    allow_list=("SGLANG_PLUGINS", compat.PLUGIN_NAME), check_version=adapter.check_version,
)  # fmt: skip
tracing_env = PLUGIN.env
"""The variables that turn the plugin on in every SGLang process (they inherit the environment)."""
plugin_installed = PLUGIN.installed
"""True when SGLang's `load_plugins()` will find moecap's entry point (moecap installed, editable or not)."""
preflight = PLUGIN.preflight
"""Check SGLang (and the plugin, when tracing) before anything starts; returns warnings (raises
`CollectError`)."""


def recorder_args(args: Sequence[str], *, counts: bool) -> list[str]:
    """The recorder flags to add to SGLang's `args` for expert counts (see the module docstring)."""
    if not counts or has_flag(args, MODE_FLAG):
        return []
    extra = [MODE_FLAG, compat.RECORDER_MODE]
    if not has_flag(args, BUFFER_FLAG) and not has_flag(args, "--enable-eplb"):
        extra += [BUFFER_FLAG, "1"]
    return extra


def recorder_kwargs(engine_args: dict[str, Any], *, counts: bool) -> dict[str, Any]:
    """`recorder_args` for `sglang.Engine(**kwargs)`."""
    if not counts or engine_args.get("expert_distribution_recorder_mode"):
        return {}
    out: dict[str, Any] = {"expert_distribution_recorder_mode": compat.RECORDER_MODE}
    if engine_args.get("expert_distribution_recorder_buffer_size") is None and not engine_args.get(
        "enable_eplb"
    ):
        out["expert_distribution_recorder_buffer_size"] = 1
    return out


def sglang_argv(argv: Sequence[str]) -> dict[str, Any]:
    """SGLang server flags (`--tp-size 2 --enable-ep-moe …`) as `ServerArgs` fields that differ from the
    defaults, parsed by SGLang's own parser."""
    if not argv:
        return {}
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="moecap-collect run --engine sglang", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    fields = compat.server_arg_names(ServerArgs) or None
    return parse_engine_flags(parser, "--model-path", argv, "SGLang server", fields)


# ---------------------------------------------------------------------------------------------------
# The offline run: one engine session, one or more workload points
# ---------------------------------------------------------------------------------------------------
class SglangSession(OfflineSession):
    """One `sglang.Engine` held open for several workload points (`base.OfflineSession`)."""

    engine_name = "sglang"
    driver = "sglang-offline-engine-admission"
    limit_arg = "max_running_requests"
    plugin = PLUGIN
    options: SglangRunOptions

    def __init__(self, options: SglangRunOptions) -> None:
        super().__init__(options)
        self.stats_dir = self.scratch / "stats"
        self.kwargs = engine_kwargs(options, self.model, tokenizer=self.tokenizer is not None)

    def _build(self) -> Any:
        import sglang

        try:
            return sglang.Engine(**self.kwargs)
        except TypeError as exc:
            raise CollectError(f"SGLang engine arguments: {exc}") from None

    def _metadata(self) -> RunMetadata:
        return self.client_metadata(*engine_facts(self.config, self.kwargs, self.options))

    def _step_budget(self) -> int | None:
        return step_budget(self.engine)

    def _longest_prompt(self) -> int | None:
        return longest_prompt(self.engine)

    def _submit(
        self, prompts: Sequence[Prompt], concurrency: int | None, progress: Progress | None
    ) -> tuple[list[RequestRecord], float]:
        # Warm-up requests need no pause: the tracer skips passes whose first request id says warm-up.
        return drive(self.engine, prompts, self.options, progress, concurrency=concurrency)

    def _close_trace(self) -> list[dict[str, Any]]:
        # Before SGLang's shutdown SIGKILLs the schedulers: let them write the last passes, then close.
        wait_for_tracers(self.stats_dir, self.options.flush_wait_s)
        stats, problems = adapter.request_close(self.stats_dir, self.options.flush_wait_s)
        self.warnings.extend(problems)
        return stats

    def _shutdown(self) -> None:
        self.engine.shutdown()


FIELDS = {
    "seed": "random_seed", "dtype": "dtype", "concurrency": "max_running_requests", "tokenizer": "tokenizer_path",
    "eager": "disable_cuda_graph", "max_batch_tokens": "chunked_prefill_size",
}  # fmt: skip
"""The run's neutral settings as `ServerArgs` fields (`base.engine_fields`)."""


def engine_kwargs(options: SglangRunOptions, model: str, *, tokenizer: bool) -> dict[str, Any]:
    """The `sglang.Engine(**kwargs)` of a run (ServerArgs field names)."""
    kwargs: dict[str, Any] = {
        "model_path": model,
        "skip_tokenizer_init": not tokenizer,
        "log_level": "error",
        **engine_fields(options, FIELDS),
    }
    kwargs.update(options.engine_args)
    kwargs.update(recorder_kwargs(kwargs, counts=options.counts and options.trace))
    return kwargs


def drive(
    engine: Any,
    prompts: Sequence[Any],
    options: SglangRunOptions,
    progress: Any = None,
    *,
    concurrency: int | None = None,
) -> tuple[list[RequestRecord], float]:
    """`prompts` on the engine's own event loop (`Engine.loop`, where its tokenizer manager runs): all at
    once (`concurrency` None; SGLang admits them), or a closed loop of `concurrency` in flight."""
    loop = getattr(engine, "loop", None)
    coro = _closed_loop(engine, prompts, options, progress, concurrency)
    if loop is None:
        return asyncio.run(coro)
    return loop.run_until_complete(coro)


async def _closed_loop(engine: Any, prompts: Any, options: Any, progress: Any, concurrency: Any) -> Any:
    """`drive` on the running loop: `concurrency` requests in flight over `prompts` (None: all of them;
    token ids, greedy); see the module docstring."""
    pending = deque(prompts)
    done: list[RequestRecord] = []
    tokens = 0
    t_first = time.monotonic_ns()

    async def one(p: Any) -> RequestRecord:
        params = {"max_new_tokens": p.max_new_tokens, "ignore_eos": options.ignore_eos, "temperature": 0.0}
        rec = RequestRecord.of(p, time.monotonic_ns(), engine_req_id=p.req_id)
        stream = await engine.async_generate(
            input_ids=list(p.token_ids), sampling_params=params, stream=True, rid=p.req_id
        )
        async for chunk in stream:
            now = time.monotonic_ns()
            meta = chunk.get("meta_info") or {}
            ids = [int(x) for x in chunk.get("output_ids") or []]
            total = meta.get("completion_tokens")
            if not isinstance(total, int):
                total = len(ids)  # cumulative output_ids (SGLang's default streaming)
            if total > len(rec.output_ids):
                new = total - len(rec.output_ids)
                # Cumulative chunks repeat every id; incremental ones (--incremental-streaming-output)
                # carry the new ids only.
                rec.output_ids = ids if len(ids) == total else rec.output_ids + ids[-new:]
                rec.first_token_ns = rec.first_token_ns or now
                rec.chunk_times_ns.append(now)
                rec.chunk_tokens.append(new)
            if isinstance(meta.get("cached_tokens"), int):
                rec.cached_prompt_tokens = meta["cached_tokens"]
            reason = meta.get("finish_reason")
            if reason is not None:
                rec.finish_reason = str(reason.get("type")) if isinstance(reason, dict) else str(reason)
        rec.finish_ns = time.monotonic_ns() if not rec.chunk_times_ns else rec.chunk_times_ns[-1]
        return rec

    async def worker() -> None:
        nonlocal tokens
        while pending:
            rec = await one(pending.popleft())
            done.append(rec)
            tokens += len(rec.output_ids)
            if progress is not None:
                progress(len(done), len(prompts), tokens)

    await asyncio.gather(*(worker() for _ in range(min(concurrency or len(prompts), len(prompts)))))
    return done, (time.monotonic_ns() - t_first) / 1e9


def wait_for_tracers(stats_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """The schedulers' tracer stats once every recorded pass is written (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    stats: list[dict[str, Any]] = []
    while True:
        stats = []
        for p in sorted(stats_dir.glob("sglang-tracer-*.json")):
            with contextlib.suppress(OSError, ValueError):
                stats.append(json.loads(p.read_text()))
        recorders = [s for s in stats if s.get("recorder")]
        settled = recorders and all(
            s.get("steps_written", 0) >= s.get("steps_recorded", 0) and not s.get("in_flight")
            for s in recorders
        )
        if settled or time.monotonic() >= deadline:
            return stats
        time.sleep(0.25)


def step_budget(engine: Any) -> int | None:
    """The engine's prompt tokens per prefill step: the smaller of its resolved `chunked_prefill_size`
    (-1: chunking off) and `max_prefill_tokens` (`Engine.server_args`; None if unknown)."""
    sa = getattr(engine, "server_args", None)
    return prefill_step_budget(*(getattr(sa, name, None) for name in STEP_BUDGET_ARGS["sglang"]))


def longest_prompt(engine: Any) -> int | None:
    """The longest prompt the engine takes: its scheduler's `max_req_input_len` − 1 (SGLang refuses a
    prompt of that length; the engine's tokenizer manager holds it once the scheduler is up); None if
    unknown."""
    return prompt_room(getattr(getattr(engine, "tokenizer_manager", None), "max_req_input_len", None))


def engine_facts(
    config: dict[str, Any], kwargs: dict[str, Any], options: SglangRunOptions
) -> tuple[Any, ...]:
    """(EngineInfo, ModelInfo, MoEInfo) of an offline SGLang run, from its config and engine kwargs."""
    args = json.loads(json.dumps({k: v for k, v in kwargs.items() if k != "model_path"}, default=str))
    experts = config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts")
    return (
        EngineInfo(name="sglang", version=compat.installed_version() or "", args=args),
        ModelInfo(id=model_id_of(options.model), config=config, random_weights=options.random_weights),
        MoEInfo(num_experts=int(experts or 0), top_k=int(config.get("num_experts_per_tok") or 0)),
    )


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------
def serve_argv(model: str, sglang_args: Sequence[str]) -> list[str]:
    """The command line of SGLang's OpenAI server (`python -m sglang.launch_server --model-path MODEL ARGS…`)."""
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, *sglang_args]


def serve_command(
    model: str,
    sglang_args: Sequence[str],
    *,
    close_wait_s: float = 10.0,
    start_fn: Callable[[list[str], dict[str, str], Callable[[], list[str]]], int] | None = None,
    **serve: Any,
) -> int:
    """Run SGLang's server with tracing on until it stops; returns its exit status. `serve`:
    `EnginePlugin.server`'s options (out, run_id, counts, strict_engine, random_weights). The run's
    `steps` / `experts` files appear in `out` per recording rank; the workload driver (`moecap-collect
    drive`) writes `requests` / `outputs` there with the same run id (printed).

    SGLang's shutdown SIGKILLs its schedulers, so the server runs under a supervisor: a stop signal
    (Ctrl-C, SIGTERM) first asks every recording scheduler to close its files (`request_close`, at most
    `close_wait_s`), then reaches the server. `start_fn(argv, env, before_stop)` stands in for the
    supervisor in tests."""
    stats_dir = Path(tempfile.mkdtemp(prefix="moecap-sglang-stats-"))
    try:
        server = PLUGIN.server("sglang", model, sglang_args, stats_dir=str(stats_dir), **serve)
    except BaseException:
        shutil.rmtree(stats_dir, ignore_errors=True)  # a refused plan or preflight leaves nothing behind
        raise
    plan = server.plan

    def before_stop() -> list[str]:
        return adapter.request_close(stats_dir, close_wait_s)[1]

    argv = serve_argv(plan.target, plan.args + recorder_args(plan.args, counts=server.counts))
    if start_fn is not None:
        return start_fn(argv, server.env, before_stop)
    return supervise_traced_server(
        argv, server.env, engine="SGLang", run_id=plan.run_id, out_dir=plan.out_dir, warnings=server.warnings,
        before_stop=before_stop,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# SGLang in the engine registry
# ---------------------------------------------------------------------------------------------------
class SglangEngine(SessionEngine):
    """SGLang's `base.Engine`."""

    name = "sglang"
    label = "SGLang"
    run_flags = COMMON_RUN_FLAGS | {"engine_args", "strict_engine", "trace"}
    session_cls = SglangSession
    options_cls = SglangRunOptions
    option_extras = ()
    serve_example = """
Example (SGLang's own flags after the model; the server runs under moecap's supervisor, so Ctrl-C closes
the trace files before SGLang's shutdown kills its schedulers):

    moecap-collect serve --engine sglang --out traces/ Qwen/Qwen1.5-MoE-A2.7B --tp-size 2
"""

    def engine_args(self, argv: Sequence[str]) -> dict[str, Any]:
        return sglang_argv(argv)

    def serve(self, model: str, argv: Sequence[str], **kw: Any) -> int:
        return serve_command(model, argv, **kw)

    def trace_errors(self, stats: Sequence[dict[str, Any]]) -> list[str]:
        return [f"the SGLang schedulers' tracer stopped ({e})" for s in stats for e in s.get("errors") or []]


run = SglangEngine().run
"""Run `options`' workload on SGLang (tracing on unless `options.trace` is False): one session, one
workload point (`base.run_offline`); see the module docstring."""


__all__ = ["SglangEngine", "SglangRunOptions", "SglangSession", "plugin_installed", "run", "serve_command"]
