"""One protocol for every engine `moecap-collect run` and `serve` drive, the one registry that lists them,
and the offline session the vLLM and SGLang runners share.

    engine = get_engine("vllm")
    result = engine.run(engine.run_options(args))                 # `moecap-collect run --engine vllm`
    status = engine.serve(model, argv, out="traces/", ...)        # `moecap-collect serve --engine vllm`
    session = engine.session(engine.run_options(args))            # one engine, many workload points:
    prompts = session.prompts("synthetic:256x128", 64); session.start(); session.warmup(prompts, 64)
    records, wall_s, delays = session.run_point(prompts, concurrency=16)
    session.stop(records=records)

`Engine` (each engine package's `runner.py` implements it):
- `name`, `label`; `run_flags`: the `run` options that apply to it (the command refuses the others and
  groups its help by them); `serves`: whether `serve` supports it; `serve_example`.
- `preflight(strict, trace=True)`: the engine (and the plugin, when tracing) is usable; warnings, or a
  `CollectError` line.
- `engine_args(argv)`: the engine's own CLI flags parsed by its own parser into option fields.
- `run_options(args: RunArgs)`: the command's neutral arguments as the engine's options.
- `run(options, progress=None) -> RunResult`; `session(options) -> OfflineSession` (engines that have one).
- `serve(model, argv, *, out, run_id, counts, strict_engine, random_weights) -> int`: the traced server's
  exit status (vLLM replaces the process instead and does not return).
- `trace_errors(stats)`: lines saying the engine-side tracer failed, from the stats the run collected.

`OfflineSession` is the engine session: built from options (model folder, tokenizer, workload; no engine
yet), `prompts` any number of times, `start` (the engine, with or without tracing), `warmup`, `run_point`
any number of times (all at once up to the engine's own concurrency limit, which is `batch_size`; a lower
`concurrency` is a client closed loop), `stop` (closes the trace, stops the engine, writes `requests` /
`outputs` for the records given). Subclasses supply the engine-specific hooks (`_build`, `_submit`,
`_pause` / `_resume`, `_close_trace`, `_shutdown`, `_metadata`) and `plugin` (an `offline.EnginePlugin`:
the preflight and the tracing environment).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata, new_run_id

from .. import runtime
from ..errors import CollectError
from ..workload import (
    Prompt,
    RequestRecord,
    closed_loop_workload,
    default_warmup,
    make_prompts,
    residue_ladder,
    warmup_prompts,
    write_client_tables,
)
from ..writers import prepare_out_dir
from .offline import EnginePlugin, gpu_sampler, load_tokenizer, model_dir, model_id_of, read_config
from .tracing_env import ENV_TRACE_DIR

Progress = Callable[[int, int, int], None]
"""progress(done requests, total, output tokens so far)."""


class RunInterrupted(CollectError):
    """Ctrl-C during a run; what was written so far is closed and readable (the message says where)."""


# ---------------------------------------------------------------------------------------------------
# What `run` parsed, engine-neutral
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """`moecap-collect run`'s arguments (one name per concept; engines take what applies to them)."""

    model: str
    dataset: str
    num_prompts: int
    batch_size: int
    out: Path
    random_weights: bool = False
    dtype: str = "auto"
    max_tokens: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    counts: bool = True
    tokenizer: str | None = None
    cuda_graphs: str = "auto"
    max_batch_tokens: int | None = None
    block_size: int | None = None
    run_id: str | None = None
    dataset_path: str | None = None
    warmup: int | None = None
    trace: bool = True
    engine_args: str | None = None
    strict_engine: bool = False
    mode: str = "cb"
    device: str = "auto"
    num_blocks: int | None = None
    attn_implementation: str | None = None
    progress: bool = True


COMMON_RUN_FLAGS = frozenset(
    {"model", "dataset", "num_prompts", "batch_size", "out", "random_weights", "dtype", "max_tokens",
     "ignore_eos", "seed", "counts", "tokenizer", "cuda_graphs", "max_batch_tokens", "run_id",
     "dataset_path", "warmup", "progress"}
)  # fmt: skip
"""`run` options every engine takes."""


@dataclass
class OfflineRunOptions:
    """One recorded offline run on an engine with a session (vLLM, SGLang)."""

    model: str
    """A config.json (with `random_weights`), a model directory, or a hub id the engine resolves."""
    dataset: str
    num_prompts: int
    batch_size: int
    """Requests in flight: the engine's own concurrency limit (vLLM `max_num_seqs`, SGLang
    `max_running_requests`) unless `engine_args` sets it."""
    out: str
    random_weights: bool = False
    dtype: str = "auto"
    max_new_tokens: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    counts: bool = True
    tokenizer: str | None = None
    cuda_graphs: str = "auto"
    """auto | on: the engine's default (compile / CUDA graphs); off: eager."""
    max_batch_tokens: int | None = None
    run_id: str | None = None
    dataset_path: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further engine fields (`Engine.engine_args` parses CLI flags into this)."""
    strict_engine: bool = False
    gpu_sample_interval_s: float | None = 0.2
    """NVML sampling interval (s) for the `gpu_samples` table during the workload; None or 0: off."""
    warmup: int | None = None
    """Unrecorded warm-up requests of the workload's shapes before the recorded window (None: one
    batch, `workload.default_warmup`; 0: none)."""
    trace: bool = True
    """False: no plugin in the engine (no steps / experts files), the client tables only: the harness
    measured on its own."""


@dataclass
class RunResult:
    run_id: str
    out: Path
    requests: int
    output_tokens: int
    wall_s: float
    engine_stats: list[dict[str, Any]]
    """What the engine-side tracers said when they closed (one dict per process)."""
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list, repr=False)
    timing: dict[str, float] = field(default_factory=dict)
    """Start-up delays measured (s): engine_start_s, warmup_s, submit_s (handing every prompt to the
    engine), first_token_s (first hand-over to the first token back)."""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steps(self) -> int:
        return sum(int(s.get("steps_written", 0)) for s in self.engine_stats if s and s.get("recorder", True))


# ---------------------------------------------------------------------------------------------------
# The protocol and the registry
# ---------------------------------------------------------------------------------------------------
class Engine(Protocol):
    name: str
    label: str
    run_flags: frozenset[str]
    serves: bool
    serve_example: str

    def preflight(self, strict: bool, *, trace: bool = True) -> list[str]: ...

    def engine_args(self, argv: Sequence[str]) -> dict[str, Any]: ...

    def run_options(self, args: RunArgs) -> Any: ...

    def run(self, options: Any, *, progress: Progress | None = None) -> RunResult: ...

    def session(self, options: Any) -> OfflineSession: ...

    def serve(
        self,
        model: str,
        argv: Sequence[str],
        *,
        out: str,
        run_id: str | None,
        counts: bool,
        strict_engine: bool,
        random_weights: bool,
    ) -> int: ...

    def trace_errors(self, stats: Sequence[dict[str, Any]]) -> list[str]: ...


ENGINES: dict[str, str] = {
    "hf": "moecap.collect.engines.hf.runner:HFEngine",
    "vllm": "moecap.collect.engines.vllm.runner:VllmEngine",
    "sglang": "moecap.collect.engines.sglang.runner:SglangEngine",
}
"""The engines `run` and `serve` know: name -> the class implementing `Engine` (imported on use, so
listing them imports no engine)."""


def get_engine(name: str) -> Engine:
    """The `Engine` called `name`; a one-line `CollectError` for an unknown one."""
    target = ENGINES.get(name)
    if target is None:
        raise CollectError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


# ---------------------------------------------------------------------------------------------------
# The offline session skeleton
# ---------------------------------------------------------------------------------------------------
class OfflineSession:
    """See the module docstring. Subclasses set `engine_name`, `driver`, `limit_arg` and the hooks."""

    engine_name: ClassVar[str] = ""
    driver: ClassVar[str] = ""
    """The run metadata's `workload.driver`."""
    limit_arg: ClassVar[str] = ""
    """The engine field that caps requests in flight (set to `batch_size` unless given)."""
    plugin: ClassVar[EnginePlugin]
    """How the engine loads the tracer (preflight, tracing environment)."""
    stats_dir: Path | None = None
    """Where the engine-side tracers leave their stats, for engines whose tracers cannot be asked (SGLang)."""

    def __init__(self, options: OfflineRunOptions) -> None:
        o = options
        self.options = o
        self.out = prepare_out_dir(o.out)
        self.warnings: list[str] = self._preflight(o.strict_engine, trace=o.trace)
        self.model_id = model_id_of(o.model)
        self.run_id = o.run_id or new_run_id(self.engine_name, self.model_id)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"moecap-{self.engine_name}-"))
        self.engine: Any = None
        self.meta: RunMetadata | None = None
        self.timing: dict[str, float] = {}
        self.files: list[Path] = []
        self.max_in_flight = int(o.engine_args.get(self.limit_arg) or o.batch_size)
        if o.engine_args.get(self.limit_arg) not in (None, o.batch_size):
            self.warnings.append(
                f"{self.limit_arg}={o.engine_args[self.limit_arg]} from --engine-args overrides --batch-size "
                f"{o.batch_size} as the engine's concurrency"
            )
        self._saved_env: dict[str, str | None] = {}
        self._sampler: Any = None
        self._sampler_cm: Any = None
        self._ids = 0
        try:
            self.model = model_dir(o.model, o.random_weights, self.scratch / "model")
            self.config = read_config(self.model)
            text = self.config.get("text_config", {})
            self.vocab = int(self.config.get("vocab_size") or text.get("vocab_size") or 32000)
            self.tokenizer = load_tokenizer(
                o.tokenizer or (self.model if Path(self.model).is_dir() else None)
            )
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self.workload: dict[str, Any] = {
            "dataset": o.dataset, "batch_size": o.batch_size, "concurrency": o.batch_size,
            "ignore_eos": o.ignore_eos, "seed": o.seed, "sampling": "greedy", "driver": self.driver,
        }  # fmt: skip

    # -- engine hooks ---------------------------------------------------------------------------------
    def _preflight(self, strict: bool, *, trace: bool) -> list[str]:
        return self.plugin.preflight(strict, trace=trace)

    def _tracing_env(self) -> dict[str, str]:
        """The variables that turn the plugin on in every engine process."""
        o = self.options
        return self.plugin.env(
            self.out, self.run_id, counts=o.counts, model_id=self.model_id, workload=self.workload,
            strict=o.strict_engine, stats_dir=None if self.stats_dir is None else str(self.stats_dir),
        )  # fmt: skip

    def _build(self, **kwargs: Any) -> Any:
        """The engine (tracing environment already set)."""
        raise NotImplementedError

    def _metadata(self) -> RunMetadata:
        """This process's run metadata (`client_metadata` with the engine's facts)."""
        raise NotImplementedError

    def client_metadata(self, engine: EngineInfo, model: ModelInfo, moe: MoEInfo) -> RunMetadata:
        """The metadata of the client tables: the engine's facts, this host's, the workload, warnings."""
        return client_run_metadata(self.run_id, (engine, model, moe), self.workload, self.warnings)

    def _submit(
        self, prompts: Sequence[Prompt], concurrency: int | None, progress: Progress | None
    ) -> tuple[list[RequestRecord], float]:
        """Run `prompts`: all handed over at once (`concurrency` None) or a closed loop of `concurrency`;
        (records, wall s from the first hand-over to the last token)."""
        raise NotImplementedError

    def _step_budget(self) -> int | None:
        """The most prompt tokens the started engine prefills in one step (None: not known, no ladder)."""
        return None

    def _longest_prompt(self) -> int | None:
        """The longest prompt the started engine takes with one output token (None: not known; the ladder's
        groups then use prompts no longer than the workload's)."""
        return None

    def _pause(self) -> None:
        """Stop recording (the warm-up follows); engines whose tracer skips warm-up ids do nothing."""

    def _resume(self) -> None:
        """Record again."""

    def _close_trace(self) -> list[dict[str, Any]]:
        """Close the engine-side trace files; the tracers' stats."""
        return []

    def _shutdown(self) -> None:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------------
    def prompts(self, dataset: str, num_prompts: int, dataset_path: str | None = None) -> list[Prompt]:
        """`num_prompts` prompts of `dataset` as token ids (request ids unique within the session; the
        first call also completes the run metadata's workload, so call it before `start`)."""
        from ..datasets import load_samples

        samples = load_samples(
            dataset, num_prompts, seed=self.options.seed, vocab_size=self.vocab, local_path=dataset_path
        )
        prompts = make_prompts(samples, self.tokenizer, self.options.max_new_tokens, self.vocab)
        if self._ids:
            for p in prompts:
                p.req_id = f"{p.req_id}.{self._ids}"
        self._ids += 1
        if "num_prompts" not in self.workload:
            o = self.options
            workload = closed_loop_workload(
                prompts,
                dataset=dataset,
                batch_size=o.batch_size,
                ignore_eos=o.ignore_eos,
                seed=o.seed,
                driver=self.driver,
            )
            self.workload.update(workload)
        return prompts

    def start(self, workload: dict[str, Any] | None = None, **build: Any) -> None:
        """Start the engine (tracing on when `options.trace`); `workload` replaces the run metadata's;
        `build` goes to the engine hook (vLLM: `engine_factory`)."""
        o = self.options
        if workload is not None:
            self.workload = workload
        env = self._tracing_env() if o.trace else {}
        self._saved_env = {k: os.environ.get(k) for k in (*env, ENV_TRACE_DIR)}
        if not o.trace:
            os.environ.pop(ENV_TRACE_DIR, None)  # an inherited MOECAP_TRACE_DIR would trace anyway
        os.environ.update(env)
        t0 = time.monotonic()
        try:
            self.engine = self._build(**build)
        except BaseException:
            self._restore_env()
            raise
        self.timing["engine_start_s"] = round(time.monotonic() - t0, 3)
        self.meta = self._metadata()
        self.meta.extra["timing"] = self.timing
        # Power and energy while the workload runs (not while the engine starts), from this process:
        # NVML sees the engine's GPUs by UUID whichever process computes on them.
        self._sampler_cm = gpu_sampler(self.out, self.meta, o.gpu_sample_interval_s)
        self._sampler = self._sampler_cm.__enter__()

    def warmup(self, prompts: Sequence[Prompt], n: int) -> None:
        """Unrecorded: the residue ladder (`workload.residue_ladder`: one step of every token count class
        the run can form — its longest prompt × its requests in flight, never more than `prompts` — when the
        engine tells its step budget), then `n` requests of `prompts`' shapes
        (fresh ids)."""
        if n <= 0:
            self.timing["warmup_s"] = 0.0
            return
        warm = warmup_prompts(prompts, n, vocab_size=self.vocab, seed=self.options.seed)
        budget = self._step_budget()
        ladder = (
            residue_ladder(
                step_budget=budget,
                max_prompt_tokens=max(len(p.token_ids) for p in prompts),
                max_requests=min(self.max_in_flight, len(prompts)),
                vocab_size=self.vocab,
                seed=self.options.seed,
                prompt_cap=self._longest_prompt(),
            )
            if budget and prompts
            else []
        )
        t0 = time.monotonic()
        if self.options.trace:
            self._pause()
        try:
            for group in ladder:
                self._submit(group, None, None)
            t_ladder = time.monotonic()
            self._submit(warm, None, None)
        finally:
            if self.options.trace:
                self._resume()
        self.timing["warmup_s"] = round(time.monotonic() - t0, 3)
        self.timing["warmup_requests"] = n
        self.timing["warmup_ladder_steps"] = len(ladder)
        self.timing["warmup_ladder_s"] = round(t_ladder - t0, 3)

    def run_point(
        self, prompts: Sequence[Prompt], *, concurrency: int | None = None, progress: Progress | None = None
    ) -> tuple[list[RequestRecord], float, dict[str, float]]:
        """Run `prompts` with `concurrency` in flight (default and at most: the engine's limit, every
        prompt handed over at once). Returns (records, wall s, start-up delays in s)."""
        c = min(concurrency or self.max_in_flight, self.max_in_flight)
        records, wall_s = self._submit(prompts, None if c >= self.max_in_flight else c, progress)
        return records, wall_s, start_delays(records)

    def stop(self, *, records: Sequence[RequestRecord] = (), write: bool = True) -> list[dict[str, Any]]:
        """Close the trace, stop the engine, write the client tables of `records`; the tracers' stats."""
        stats: list[dict[str, Any]] = []
        try:
            if self._sampler_cm is not None:
                self._sampler_cm.__exit__(None, None, None)
                self._sampler_cm = None
            if self.engine is not None and self.options.trace:
                stats = self._close_trace()
        finally:
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    self._shutdown()
                self.engine = None
            self._restore_env()
            shutil.rmtree(self.scratch, ignore_errors=True)
        if write and self.meta is not None:
            client = write_client_tables(self.out, self.meta, list(records), self.tokenizer)
            self.files = sorted(self.out.glob(f"{self.run_id}.dp*.arrow")) + client
        return stats

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}


def client_run_metadata(
    run_id: str,
    facts: tuple[EngineInfo, ModelInfo, MoEInfo],
    workload: dict[str, Any],
    warnings: Sequence[str],
) -> RunMetadata:
    """The run metadata of a client's tables: the engine's facts (`engine_facts` of its runner), this
    host's (GPUs, packages), the workload and the warnings."""
    engine, model, moe = facts
    extra = runtime.host_facts()
    if warnings:
        extra["warnings"] = list(warnings)
    return RunMetadata(
        run_id=run_id, engine=engine, model=model, moe=moe, gpus=runtime.gpu_infos(), workload=workload,
        collector_version=runtime.collector_version(), extra=extra,
    )  # fmt: skip


def start_delays(records: Sequence[RequestRecord]) -> dict[str, float]:
    """submit_s: first to last hand-over; first_token_s: first hand-over to the first token (s)."""
    arrivals = [r.arrival_ns for r in records]
    firsts = [r.first_token_ns for r in records if r.first_token_ns is not None]
    if not arrivals:
        return {"submit_s": 0.0, "first_token_s": float("nan")}
    t0 = min(arrivals)
    return {
        "submit_s": round((max(arrivals) - t0) / 1e9, 6),
        "first_token_s": round((min(firsts) - t0) / 1e9, 6) if firsts else float("nan"),
    }


def run_offline(session: OfflineSession, *, progress: Progress | None = None) -> RunResult:
    """One session, one workload point: what `run` does on an engine with a session."""
    o = session.options
    if o.num_prompts < 1 or o.batch_size < 1:
        session.stop(write=False)
        raise CollectError("--num-prompts and --batch-size must be at least 1")
    try:
        prompts = session.prompts(o.dataset, o.num_prompts, o.dataset_path)
        session.start()
        session.warmup(
            prompts, o.warmup if o.warmup is not None else default_warmup(len(prompts), o.batch_size)
        )
        records, wall_s, delays = session.run_point(prompts, progress=progress)
    except BaseException:
        session.stop(write=False)
        raise
    stats = session.stop(records=records)
    return RunResult(
        run_id=session.run_id,
        out=session.out,
        requests=len(records),
        output_tokens=sum(len(r.output_ids) for r in records),
        wall_s=wall_s,
        engine_stats=stats,
        files=session.files,
        warnings=session.warnings,
        records=records,
        timing={**session.timing, **delays},
    )


class SessionEngine:
    """The `Engine` methods of an engine with an `OfflineSession` (vLLM, SGLang); subclasses set
    `session_cls` (whose `plugin` gives `preflight`), `options_cls`, `option_extras` and provide
    `engine_args`, `serve`, `trace_errors` and the descriptive attributes."""

    session_cls: ClassVar[type[OfflineSession]]
    options_cls: ClassVar[type[OfflineRunOptions]]
    option_extras: ClassVar[tuple[str, ...]] = ()
    """`RunArgs` fields the engine's options class adds to the shared ones."""
    serves = True

    def preflight(self, strict: bool, *, trace: bool = True) -> list[str]:
        return self.session_cls.plugin.preflight(strict, trace=trace)

    def engine_args(self, argv: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def run_options(self, args: RunArgs) -> Any:
        import shlex

        extra = self.engine_args(shlex.split(args.engine_args)) if args.engine_args else {}
        return offline_options(
            self.options_cls, args, extra, **{k: getattr(args, k) for k in self.option_extras}
        )

    def run(self, options: Any, *, progress: Progress | None = None) -> RunResult:
        return run_offline(self.session_cls(options), progress=progress)

    def session(self, options: Any) -> OfflineSession:
        return self.session_cls(options)


ENGINE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""`--dtype` short names as the engines spell them (others pass through)."""


def engine_fields(options: OfflineRunOptions, names: dict[str, str]) -> dict[str, Any]:
    """The neutral settings of `options` under an engine's own field names. `names` maps each concept to
    the engine's field: seed, dtype, concurrency (`batch_size`; 0 leaves the engine's default), tokenizer,
    eager (`cuda_graphs="off"`), max_batch_tokens. Random weights are `load_format="dummy"` in both."""
    o = options
    out: dict[str, Any] = {names["seed"]: o.seed, names["dtype"]: ENGINE_DTYPES.get(o.dtype, o.dtype)}
    if o.batch_size > 0:
        out[names["concurrency"]] = o.batch_size
    if o.tokenizer:
        out[names["tokenizer"]] = o.tokenizer
    if o.random_weights:
        out["load_format"] = "dummy"
    if o.cuda_graphs == "off":
        out[names["eager"]] = True
    if o.max_batch_tokens:
        out[names["max_batch_tokens"]] = o.max_batch_tokens
    return out


def offline_options(cls: type, args: RunArgs, engine_args: dict[str, Any], **extra: Any) -> Any:
    """`args` as an `OfflineRunOptions` subclass `cls` (the fields every session engine shares)."""
    return cls(
        model=args.model, dataset=args.dataset, num_prompts=args.num_prompts, batch_size=args.batch_size,
        out=str(args.out), random_weights=args.random_weights, dtype=args.dtype, max_new_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos, seed=args.seed, counts=args.counts, tokenizer=args.tokenizer,
        cuda_graphs=args.cuda_graphs, max_batch_tokens=args.max_batch_tokens, run_id=args.run_id,
        dataset_path=args.dataset_path, engine_args=engine_args, strict_engine=args.strict_engine,
        warmup=args.warmup, trace=args.trace, **extra,
    )  # fmt: skip
