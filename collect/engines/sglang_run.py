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
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata, new_run_id

from .. import runtime
from ..errors import CollectError
from ..warmup import default_warmup, warmup_prompts
from ..writers import prepare_out_dir
from . import sglang as adapter
from . import sglang_compat as compat
from .offline import (
    RequestRecord,
    closed_loop_workload,
    gpu_sampler,
    load_tokenizer,
    model_dir,
    model_id_of,
    parse_engine_flags,
    read_config,
    supervise_traced_server,
    write_client_tables,
)
from .tracing_env import tracer_environment

DEFAULT_MAX_NEW_TOKENS = 256
ENTRY_POINT = "moecap.collect.engines.sglang:register"
MODE_FLAG = "--expert-distribution-recorder-mode"
BUFFER_FLAG = "--expert-distribution-recorder-buffer-size"


@dataclass
class SglangRunOptions:
    """One recorded run on SGLang's offline engine."""

    model: str
    """A config.json (with `random_weights`), a model directory, or a hub id SGLang resolves."""
    dataset: str
    num_prompts: int
    batch_size: int
    out: str
    random_weights: bool = False
    """Random weights (`load_format="dummy"`): no checkpoint needed."""
    dtype: str = "auto"
    max_new_tokens: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    counts: bool = True
    tokenizer: str | None = None
    cuda_graphs: str = "auto"
    """auto | on: SGLang's default (CUDA graphs for decode); off: `disable_cuda_graph=True`."""
    max_batch_tokens: int | None = None
    """SGLang's `chunked_prefill_size`."""
    run_id: str | None = None
    dataset_path: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further `ServerArgs` fields (e.g. {"tp_size": 2}); `sglang_argv` parses CLI flags into this."""
    strict_engine: bool = False
    gpu_sample_interval_s: float | None = 0.2
    """NVML sampling interval (s) for the `gpu_samples` table during the workload; None or 0: off."""
    warmup: int | None = None
    """Unrecorded warm-up requests of the workload's shapes before the recorded window (None: one
    batch; 0: none)."""
    trace: bool = True
    """False: no plugin in the engine (no steps / experts files), the client tables only."""
    flush_wait_s: float = 10.0
    """After the workload: how long to wait for the schedulers to write their last steps (SGLang's
    shutdown kills them; the adapter's idle flusher writes finished passes within ~0.5 s)."""


@dataclass
class SglangRunResult:
    run_id: str
    out: Path
    requests: int
    output_tokens: int
    wall_s: float
    tracer_stats: list[dict[str, Any]]
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list, repr=False)
    timing: dict[str, float] = field(default_factory=dict)
    """Start-up delays measured (s): engine_start_s, warmup_s, submit_s, first_token_s."""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steps(self) -> int:
        return sum(int(s.get("steps_written", 0)) for s in self.tracer_stats if s.get("recorder"))


# ---------------------------------------------------------------------------------------------------
# Environment and arguments shared with SGLang's processes
# ---------------------------------------------------------------------------------------------------
def plugin_installed() -> bool:
    """True when SGLang's `load_plugins()` will find moecap's entry point (moecap installed, editable or not)."""
    eps = importlib.metadata.entry_points(group=compat.PLUGIN_GROUP)
    return any(ep.value == ENTRY_POINT for ep in eps)


def preflight(strict: bool, *, trace: bool = True) -> list[str]:
    """Check SGLang (and the plugin, when tracing) before anything starts; returns warnings (raises
    `CollectError`)."""
    warning = adapter.check_version(strict)
    if trace and not plugin_installed():
        raise CollectError(
            "moecap's sglang.srt.plugins entry point is not installed, so SGLang's scheduler processes would not "
            "load the tracer: install moecap into this environment (pip install -e . or pip install 'moecap[sglang]')"
        )
    return [warning] if warning else []


def tracing_env(
    out: Path,
    run_id: str,
    *,
    counts: bool,
    model_id: str,
    workload: dict[str, Any],
    strict: bool,
    stats_dir: str | None = None,
) -> dict[str, str]:
    """The variables that turn the plugin on in every SGLang process (they inherit the environment)."""
    return tracer_environment(
        out, run_id, counts=counts, model_id=model_id, workload=workload, strict=strict,
        stats_dir=stats_dir, plugin_allow_list=("SGLANG_PLUGINS", compat.PLUGIN_NAME),
    )  # fmt: skip


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def recorder_args(args: Sequence[str], *, counts: bool) -> list[str]:
    """The recorder flags to add to SGLang's `args` for expert counts (see the module docstring)."""
    if not counts or _has_flag(args, MODE_FLAG):
        return []
    extra = [MODE_FLAG, compat.RECORDER_MODE]
    if not _has_flag(args, BUFFER_FLAG) and not _has_flag(args, "--enable-eplb"):
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
    ns, defaults = parse_engine_flags(
        lambda: (
            parser.parse_args(["--model-path", "placeholder", *argv]),
            parser.parse_args(["--model-path", "placeholder"]),
        ),
        "SGLang server",
        argv,
    )
    names = set(compat.server_arg_names(ServerArgs)) or set(vars(ns))
    return {
        k: v
        for k, v in vars(ns).items()
        if k in names and k != "model_path" and v != getattr(defaults, k, None)
    }


# ---------------------------------------------------------------------------------------------------
# The offline run: one engine session, one or more workload points
# ---------------------------------------------------------------------------------------------------
def run(
    options: SglangRunOptions, *, progress: Callable[[int, int, int], None] | None = None
) -> SglangRunResult:
    """Run `options`' workload on SGLang (tracing on unless `options.trace` is False); see the module
    docstring."""
    if options.num_prompts < 1 or options.batch_size < 1:
        raise CollectError("--num-prompts and --batch-size must be at least 1")
    session = SglangSession(options)
    try:
        prompts = session.prompts(options.dataset, options.num_prompts, options.dataset_path)
        session.start()
        n_warm = (
            options.warmup if options.warmup is not None else default_warmup(len(prompts), options.batch_size)
        )
        session.warmup(prompts, n_warm)
        records, wall_s, timing = session.run_point(prompts, progress=progress)
    except BaseException:
        session.stop(write=False)
        raise
    stats = session.stop(records=records)
    return SglangRunResult(
        run_id=session.run_id,
        out=session.out,
        requests=len(records),
        output_tokens=sum(len(r.output_ids) for r in records),
        wall_s=wall_s,
        tracer_stats=stats,
        files=session.files,
        warnings=session.warnings,
        records=records,
        timing={**session.timing, **timing},
    )


class SglangSession:
    """One `sglang.Engine` held open for several workload points (start once, `run_point` many times,
    `stop`); see `vllm_run.VllmSession`, whose shape this follows. The engine's `max_running_requests`
    is `options.batch_size` (unless `engine_args` set it)."""

    def __init__(self, options: SglangRunOptions) -> None:
        self.options = options
        self.out = prepare_out_dir(options.out)
        self.warnings = preflight(options.strict_engine, trace=options.trace)
        self.model_id = model_id_of(options.model)
        self.run_id = options.run_id or new_run_id("sglang", self.model_id)
        self.scratch = Path(tempfile.mkdtemp(prefix="moecap-sglang-"))
        self.stats_dir = self.scratch / "stats"
        self.engine: Any = None
        self.meta: RunMetadata | None = None
        self.timing: dict[str, float] = {}
        self.files: list[Path] = []
        self.max_running = int(options.engine_args.get("max_running_requests") or options.batch_size)
        self._saved_env: dict[str, str | None] = {}
        self._sampler_cm: Any = None
        self._ids = 0
        o = options
        self._model = model_dir(o.model, o.random_weights, self.scratch / "model")
        self._config = read_config(self._model)
        cfg = self._config
        self._vocab = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 32000)
        self._tokenizer = load_tokenizer(o.tokenizer or (self._model if Path(self._model).is_dir() else None))
        self.workload = {
            "dataset": o.dataset, "batch_size": o.batch_size, "concurrency": o.batch_size,
            "ignore_eos": o.ignore_eos, "seed": o.seed, "sampling": "greedy", "driver": DRIVER,
        }  # fmt: skip

    def start(self, workload: dict[str, Any] | None = None) -> None:
        """Start the engine (tracing on when `options.trace`); `workload` is the run metadata's (default:
        the options' workload, completed by a `prompts` call made before `start`)."""
        o = self.options
        if workload is not None:
            self.workload = workload
        if o.engine_args.get("max_running_requests") not in (None, o.batch_size):
            self.warnings.append(
                f"max_running_requests={o.engine_args['max_running_requests']} from --engine-args overrides "
                f"--batch-size {o.batch_size} as the engine's concurrency"
            )
        env: dict[str, str] = {}
        if o.trace:
            env = tracing_env(
                self.out, self.run_id, counts=o.counts, model_id=self.model_id, workload=self.workload,
                strict=o.strict_engine, stats_dir=str(self.stats_dir),
            )  # fmt: skip
        self._saved_env = {k: os.environ.get(k) for k in (*env, adapter.ENV_TRACE_DIR)}
        if not o.trace:
            os.environ.pop(adapter.ENV_TRACE_DIR, None)
        os.environ.update(env)
        self.kwargs = engine_kwargs(o, self._model, tokenizer=self._tokenizer is not None)
        t0 = time.monotonic()
        try:
            import sglang

            try:
                self.engine = sglang.Engine(**self.kwargs)
            except TypeError as exc:
                raise CollectError(f"SGLang engine arguments: {exc}") from None
        except BaseException:
            self._restore_env()
            raise
        self.timing["engine_start_s"] = round(time.monotonic() - t0, 3)
        self.meta = client_metadata(
            self.run_id, self.model_id, self._config, self.kwargs, o, self.workload, self.warnings
        )
        self.meta.extra["timing"] = self.timing
        self._sampler_cm = gpu_sampler(self.out, self.meta, o.gpu_sample_interval_s)
        self._sampler_cm.__enter__()

    def prompts(self, dataset: str, num_prompts: int, dataset_path: str | None = None) -> list[Any]:
        """`num_prompts` prompts of `dataset` as token ids (request ids unique within the session)."""
        from ..datasets import load_samples
        from .hf_runner import make_prompts

        samples = load_samples(
            dataset, num_prompts, seed=self.options.seed, vocab_size=self._vocab, local_path=dataset_path
        )
        prompts = make_prompts(samples, self._tokenizer, self.options.max_new_tokens, self._vocab)
        if self._ids:
            for p in prompts:
                p.req_id = f"{p.req_id}.{self._ids}"
        self._ids += 1
        if "num_prompts" not in self.workload:
            workload = closed_loop_workload(
                prompts, dataset=dataset, batch_size=self.options.batch_size,
                ignore_eos=self.options.ignore_eos, seed=self.options.seed, driver=DRIVER,
            )  # fmt: skip
            self.workload.update(workload)
        return prompts

    def warmup(self, prompts: Sequence[Any], n: int) -> None:
        """`n` requests of `prompts`' shapes (fresh ids); the tracer skips them by their id prefix."""
        if n <= 0:
            self.timing["warmup_s"] = 0.0
            return
        warm = warmup_prompts(prompts, n, vocab_size=self._vocab, seed=self.options.seed)
        t0 = time.monotonic()
        drive(self.engine, warm, self.options, None)
        self.timing["warmup_s"] = round(time.monotonic() - t0, 3)
        self.timing["warmup_requests"] = n

    def run_point(
        self,
        prompts: Sequence[Any],
        *,
        concurrency: int | None = None,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> tuple[list[RequestRecord], float, dict[str, float]]:
        """Run `prompts` with `concurrency` in flight (default and at most: `max_running_requests`:
        every prompt handed over at once). Returns (records, wall s, start-up delays in s)."""
        c = min(concurrency or self.max_running, self.max_running)
        records, wall_s = drive(
            self.engine, prompts, self.options, progress, concurrency=None if c >= self.max_running else c
        )
        firsts = [r.first_token_ns for r in records if r.first_token_ns is not None]
        arrivals = [r.arrival_ns for r in records]
        delays = {
            "submit_s": round((max(arrivals) - min(arrivals)) / 1e9, 6) if arrivals else 0.0,
            "first_token_s": round((min(firsts) - min(arrivals)) / 1e9, 6) if firsts else float("nan"),
        }
        return records, wall_s, delays

    def stop(self, *, records: Sequence[RequestRecord] = (), write: bool = True) -> list[dict[str, Any]]:
        """Close the trace (before SGLang's shutdown SIGKILLs the schedulers), stop the engine, write the
        client tables of `records`; the schedulers' tracer stats."""
        stats: list[dict[str, Any]] = []
        try:
            if self._sampler_cm is not None:
                self._sampler_cm.__exit__(None, None, None)
                self._sampler_cm = None
            if self.engine is not None and self.options.trace:
                wait_for_tracers(self.stats_dir, self.options.flush_wait_s)
                stats, problems = adapter.request_close(self.stats_dir, self.options.flush_wait_s)
                self.warnings.extend(problems)
        finally:
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    self.engine.shutdown()
                self.engine = None
            self._restore_env()
            shutil.rmtree(self.scratch, ignore_errors=True)
        if write and self.meta is not None:
            client = write_client_tables(self.out, self.meta, list(records), self._tokenizer)
            self.files = sorted(self.out.glob(f"{self.run_id}.dp*.arrow")) + client
        return stats

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}


DRIVER = "sglang-offline-engine-admission"
"""The run metadata's `workload.driver`: every prompt handed over at once, SGLang admits up to
`max_running_requests` (= batch size)."""


def engine_kwargs(options: SglangRunOptions, model: str, *, tokenizer: bool) -> dict[str, Any]:
    """The `sglang.Engine(**kwargs)` of a run (ServerArgs field names)."""
    kwargs: dict[str, Any] = {
        "model_path": model,
        "random_seed": options.seed,
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(options.dtype, options.dtype),
        "skip_tokenizer_init": not tokenizer,
        "log_level": "error",
        "max_running_requests": options.batch_size,
    }
    if options.tokenizer:
        kwargs["tokenizer_path"] = options.tokenizer
    if options.random_weights:
        kwargs["load_format"] = "dummy"
    if options.cuda_graphs == "off":
        kwargs["disable_cuda_graph"] = True
    if options.max_batch_tokens:
        kwargs["chunked_prefill_size"] = options.max_batch_tokens
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
    coro = closed_loop(engine, prompts, options, progress, concurrency=concurrency)
    if loop is None:
        return asyncio.run(coro)
    return loop.run_until_complete(coro)


async def closed_loop(
    engine: Any,
    prompts: Sequence[Any],
    options: SglangRunOptions,
    progress: Any = None,
    *,
    concurrency: int | None = None,
) -> tuple[list[RequestRecord], float]:
    """`concurrency` requests in flight over `prompts` (default: all of them; token ids, greedy); see the
    module docstring."""
    pending = deque(prompts)
    done: list[RequestRecord] = []
    tokens = 0
    t_first = time.monotonic_ns()

    async def one(p: Any) -> RequestRecord:
        params = {"max_new_tokens": p.max_new_tokens, "ignore_eos": options.ignore_eos, "temperature": 0.0}
        rec = RequestRecord(
            p.req_id, p.req_id, list(p.token_ids), p.sample, p.max_new_tokens, time.monotonic_ns()
        )
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
                rec.chunk_ns.append(now)
                rec.chunk_tokens.append(new)
            if isinstance(meta.get("cached_tokens"), int):
                rec.cached_tokens = meta["cached_tokens"]
            reason = meta.get("finish_reason")
            if reason is not None:
                rec.finish_reason = str(reason.get("type")) if isinstance(reason, dict) else str(reason)
        rec.finish_ns = time.monotonic_ns() if not rec.chunk_ns else rec.chunk_ns[-1]
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


def client_metadata(
    run_id: str,
    model_id: str,
    config: dict[str, Any],
    kwargs: dict[str, Any],
    options: SglangRunOptions,
    workload: dict[str, Any],
    warnings: list[str],
) -> RunMetadata:
    extra = runtime.host_facts()
    if warnings:
        extra["warnings"] = warnings
    args = json.loads(json.dumps({k: v for k, v in kwargs.items() if k != "model_path"}, default=str))
    experts = config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts")
    return RunMetadata(
        run_id=run_id,
        engine=EngineInfo(name="sglang", version=compat.installed_version() or "", args=args),
        model=ModelInfo(id=model_id, config=config, random_weights=options.random_weights),
        moe=MoEInfo(num_experts=int(experts or 0), top_k=int(config.get("num_experts_per_tok") or 0)),
        gpus=runtime.gpu_infos(),
        workload=workload,
        collector_version=runtime.collector_version(),
        extra=extra,
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
    out: str,
    run_id: str | None = None,
    counts: bool = True,
    strict_engine: bool = False,
    random_weights: bool = False,
    close_wait_s: float = 10.0,
    start_fn: Callable[[list[str], dict[str, str], Callable[[], list[str]]], int] | None = None,
) -> int:
    """Run SGLang's server with tracing on until it stops; returns its exit status. The run's `steps` /
    `experts` files appear in `out` per recording rank; the workload driver (`moecap-collect drive`)
    writes `requests` / `outputs` there with the same run id (printed).

    SGLang's shutdown SIGKILLs its schedulers, so the server runs under a supervisor: a stop signal
    (Ctrl-C, SIGTERM) first asks every recording scheduler to close its files (`request_close`, at most
    `close_wait_s`), then reaches the server. `start_fn(argv, env, before_stop)` stands in for the
    supervisor in tests."""
    out_dir = prepare_out_dir(out)
    warnings = preflight(strict_engine)
    model_id = model_id_of(model)
    run_id = run_id or new_run_id("sglang", model_id)
    args = list(sglang_args)
    target = model
    if random_weights:
        target = model_dir(model, True, Path(tempfile.mkdtemp(prefix="moecap-sglang-model-")))
        if not _has_flag(args, "--load-format"):
            args += ["--load-format", "dummy"]
        if not _has_flag(args, "--served-model-name"):
            args += ["--served-model-name", model_id]  # not the scratch folder's path
    args += recorder_args(args, counts=counts)
    stats_dir = Path(tempfile.mkdtemp(prefix="moecap-sglang-stats-"))
    env = dict(os.environ)
    env.update(
        tracing_env(
            out_dir,
            run_id,
            counts=counts,
            model_id=model_id,
            workload={"driver": "external"},
            strict=strict_engine,
            stats_dir=str(stats_dir),
        )
    )

    def before_stop() -> list[str]:
        return adapter.request_close(stats_dir, close_wait_s)[1]

    argv = serve_argv(target, args)
    if start_fn is not None:
        return start_fn(argv, env, before_stop)
    return supervise_traced_server(
        argv, env, engine="SGLang", run_id=run_id, out_dir=out_dir, warnings=warnings, before_stop=before_stop
    )
