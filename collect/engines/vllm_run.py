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

`VllmSession` is the same engine held open for many workload points (start once, `run_point` many
times, `stop`), for sweeps and repeated measurements; `run` is one session with one point.

`serve_command(model, vllm_args, …)` is what `moecap-collect serve --engine vllm` runs: vLLM's OpenAI
server (`vllm serve`) in place of this process, with tracing on in every engine process.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
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

from moecap.schemas import (
    EngineInfo,
    ModelInfo,
    MoEInfo,
    RunMetadata,
    new_run_id,
)

from .. import runtime
from ..errors import CollectError
from ..warmup import default_warmup, warmup_prompts
from ..writers import prepare_out_dir
from . import vllm as adapter
from . import vllm_compat as compat
from .offline import (
    RequestRecord,
    closed_loop_workload,
    exec_traced_server,
    model_dir,
    model_id_of,
    parse_engine_flags,
)
from .offline import gpu_sampler as _gpu_sampler
from .offline import load_tokenizer as _tokenizer
from .offline import read_config as _read_config
from .offline import write_client_tables as _write_client_tables
from .tracing_env import tracer_environment

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class VllmRunOptions:
    """One recorded run on vLLM's offline engine."""

    model: str
    """A config.json, a model directory, or a hub id vLLM resolves."""
    dataset: str
    num_prompts: int
    batch_size: int
    out: str
    random_weights: bool = False
    """Build the architecture with random weights (`load_format="dummy"`): no checkpoint needed."""
    dtype: str = "auto"
    max_new_tokens: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    counts: bool = True
    tokenizer: str | None = None
    cuda_graphs: str = "auto"
    """auto | on: vLLM's default (torch.compile + CUDA graphs); off: `enforce_eager=True`."""
    max_batch_tokens: int | None = None
    block_size: int | None = None
    run_id: str | None = None
    dataset_path: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further `EngineArgs` fields (e.g. {"tensor_parallel_size": 2}); `vllm_argv` parses CLI flags into this."""
    strict_engine: bool = False
    gpu_sample_interval_s: float | None = 0.2
    """NVML sampling interval (s) for the `gpu_samples` table during the workload; None or 0: off."""
    warmup: int | None = None
    """Unrecorded warm-up requests of the workload's shapes before the recorded window (None: one
    batch, `warmup.default_warmup`; 0: none)."""
    trace: bool = True
    """False: no plugin in the engine (no steps / experts files), the client tables only: the harness
    measured on its own."""


@dataclass
class VllmRunResult:
    run_id: str
    out: Path
    requests: int
    output_tokens: int
    wall_s: float
    worker_stats: list[dict[str, Any]]
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list, repr=False)
    timing: dict[str, float] = field(default_factory=dict)
    """Start-up delays measured (s): engine_start_s, warmup_s, submit_s (handing every prompt to the
    engine), first_token_s (first submission to the first token back)."""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steps(self) -> int:
        return sum(int(s.get("steps_written", 0)) for s in self.worker_stats if s)


# ---------------------------------------------------------------------------------------------------
# Environment shared with vLLM's processes
# ---------------------------------------------------------------------------------------------------
def plugin_installed() -> bool:
    """True when vLLM's plugin loader will find moecap's entry point (moecap installed, editable or not)."""
    eps = importlib.metadata.entry_points(group=compat.PLUGIN_GROUP)
    return any(ep.value == "moecap.collect.engines.vllm:register" for ep in eps)


def tracing_env(
    out: Path, run_id: str, *, counts: bool, model_id: str, workload: dict[str, Any], strict: bool
) -> dict[str, str]:
    """The variables that turn the plugin on in every vLLM process (they inherit the environment)."""
    return tracer_environment(
        out, run_id, counts=counts, model_id=model_id, workload=workload, strict=strict,
        plugin_allow_list=("VLLM_PLUGINS", "moecap"),
    )  # fmt: skip


def preflight(strict: bool, *, trace: bool = True) -> list[str]:
    """Check vLLM (and the plugin, when tracing) before anything starts; returns warnings (raises
    `CollectError`)."""
    warning = adapter.check_version(strict)
    if trace and not plugin_installed():
        raise CollectError(
            "moecap's vllm.general_plugins entry point is not installed, so vLLM's worker processes would not load "
            "the tracer: install moecap into this environment (pip install -e . or pip install 'moecap[vllm]')"
        )
    return [warning] if warning else []


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
    ns, defaults = parse_engine_flags(
        lambda: (
            parser.parse_args(["--model", "placeholder", *argv]),
            parser.parse_args(["--model", "placeholder"]),
        ),
        "vLLM engine",
        argv,
    )
    out = {}
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model" or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value != getattr(defaults, f.name):
            out[f.name] = value
    return out


# ---------------------------------------------------------------------------------------------------
# The offline run: one engine session, one or more workload points
# ---------------------------------------------------------------------------------------------------
def run(options: VllmRunOptions, *, progress: Callable[[int, int, int], None] | None = None) -> VllmRunResult:
    """Run `options`' workload on vLLM (tracing on unless `options.trace` is False); see the module
    docstring."""
    if options.num_prompts < 1 or options.batch_size < 1:
        raise CollectError("--num-prompts and --batch-size must be at least 1")
    session = VllmSession(options)
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
    timing = {**session.timing, **timing}
    return VllmRunResult(
        run_id=session.run_id,
        out=session.out,
        requests=len(records),
        output_tokens=sum(len(r.output_ids) for r in records),
        wall_s=wall_s,
        worker_stats=stats,
        files=session.files,
        warnings=session.warnings,
        records=records,
        timing=timing,
    )


class VllmSession:
    """One vLLM engine held open for several workload points:

        session = VllmSession(options); session.start()
        records, wall_s, timing = session.run_point(session.prompts("synthetic:256x128", 64))
        session.stop(records=all_records)        # closes the trace, writes requests/outputs, stops vLLM

    The engine's `max_num_seqs` is `options.batch_size` (unless `engine_args` set it): a point whose
    `concurrency` is that limit hands every prompt over at once, as `LLM.generate` does; a lower one is a
    client-side closed loop (a finished request is replaced when `step()` reports it: one client round
    trip per admission). All points share one run id and one trace (one `steps` file per rank)."""

    def __init__(self, options: VllmRunOptions) -> None:
        self.options = options
        self.out = prepare_out_dir(options.out)
        self.warnings = preflight(options.strict_engine, trace=options.trace)
        self.model_id = model_id_of(options.model)
        self.run_id = options.run_id or new_run_id("vllm", self.model_id)
        self.scratch = Path(tempfile.mkdtemp(prefix="moecap-vllm-model-"))
        self.engine: Any = None
        self.meta: RunMetadata | None = None
        self.timing: dict[str, float] = {}
        self.files: list[Path] = []
        self.max_num_seqs = int(options.engine_args.get("max_num_seqs") or options.batch_size)
        self._saved_env: dict[str, str | None] = {}
        self._sampler: Any = None
        self._sampler_cm: Any = None
        self._ids = 0
        o = options
        self._model = model_dir(o.model, o.random_weights, self.scratch / "model")
        config = _read_config(self._model)
        self._vocab = int(
            config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000
        )
        self._tokenizer = _tokenizer(o.tokenizer or (self._model if Path(self._model).is_dir() else None))
        self.workload: dict[str, Any] = {
            "dataset": o.dataset, "batch_size": o.batch_size, "concurrency": o.batch_size,
            "ignore_eos": o.ignore_eos, "seed": o.seed, "sampling": "greedy", "driver": DRIVER,
        }  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(
        self,
        workload: dict[str, Any] | None = None,
        *,
        engine_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """Build the engine (tracing on when `options.trace`); `workload` is the run metadata's (default:
        the options' workload, completed by a `prompts` call made before `start`). `engine_factory(kwargs)` builds the
        `LLMEngine` from `engine_kwargs` instead (a benchmark's `LLM(**kwargs).llm_engine`, so vLLM's own
        `LLM.generate` and this session share one engine); it runs with the tracing environment set."""
        o = self.options
        if workload is not None:
            self.workload = workload
        if o.engine_args.get("max_num_seqs") not in (None, o.batch_size):
            self.warnings.append(
                f"max_num_seqs={o.engine_args['max_num_seqs']} from --engine-args overrides --batch-size "
                f"{o.batch_size} as the engine's concurrency"
            )
        env: dict[str, str] = {}
        if o.trace:
            env = tracing_env(
                self.out, self.run_id, counts=o.counts, model_id=self.model_id, workload=self.workload,
                strict=o.strict_engine,
            )  # fmt: skip
        self._saved_env = {k: os.environ.get(k) for k in (*env, adapter.ENV_TRACE_DIR)}
        if not o.trace:
            os.environ.pop(adapter.ENV_TRACE_DIR, None)  # an inherited MOECAP_TRACE_DIR would trace anyway
        os.environ.update(env)
        text_prompts = self._tokenizer is not None
        engine_args = None if engine_factory else _engine_args(o, self._model, text_prompts=text_prompts)
        if o.trace:
            adapter.register()  # this process too (an in-process engine core), before vLLM loads plugins
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        t0 = time.monotonic()
        try:
            # LLM_CLASS: the defaults `LLM(...)` gets (the bare engine context leaves the step budget at
            # 2,048 tokens, which chunks a 64 x 256-token prefill eight ways).
            if engine_factory is not None:
                self.engine = engine_factory(engine_kwargs(o, self._model, text_prompts))
            else:
                self.engine = LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)
        except BaseException:
            self._restore_env()
            raise
        self.timing["engine_start_s"] = round(time.monotonic() - t0, 3)
        self.meta = _client_metadata(self.engine, self.run_id, self.model_id, o, self.workload, self.warnings)
        self.meta.extra["timing"] = self.timing
        # Power and energy while the workload runs (not while the engine starts), from this process:
        # NVML sees the engine's GPUs by UUID whichever process computes on them.
        self._sampler_cm = _gpu_sampler(self.out, self.meta, o.gpu_sample_interval_s)
        self._sampler = self._sampler_cm.__enter__()

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
            self.workload.update(_workload(self.options, prompts))
        return prompts

    def warmup(self, prompts: Sequence[Any], n: int) -> None:
        """Run `n` requests of `prompts`' shapes (fresh ids) with the tracer paused; not recorded."""
        if n <= 0:
            self.timing["warmup_s"] = 0.0
            return
        warm = warmup_prompts(prompts, n, vocab_size=self._vocab, seed=self.options.seed)
        t0 = time.monotonic()
        if self.options.trace:
            _rpc(self.engine, "pause")
        try:
            self._submit_all(warm, None)
        finally:
            if self.options.trace:
                _rpc(self.engine, "resume")
        self.timing["warmup_s"] = round(time.monotonic() - t0, 3)
        self.timing["warmup_requests"] = n

    def run_point(
        self,
        prompts: Sequence[Any],
        *,
        concurrency: int | None = None,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> tuple[list[RequestRecord], float, dict[str, float]]:
        """Run `prompts` with `concurrency` in flight (default and at most: the engine's `max_num_seqs`).
        Returns (records, wall s from first submission to last token, start-up delays in s)."""
        c = min(concurrency or self.max_num_seqs, self.max_num_seqs)
        if c >= self.max_num_seqs:
            return self._submit_all(prompts, progress)
        return self._closed_loop(prompts, c, progress)

    def stop(self, *, records: Sequence[RequestRecord] = (), write: bool = True) -> list[dict[str, Any]]:
        """Close the trace, stop the engine, write the client tables of `records`; the workers' stats."""
        stats: list[dict[str, Any]] = []
        try:
            if self._sampler_cm is not None:
                self._sampler_cm.__exit__(None, None, None)
                self._sampler_cm = None
            if self.engine is not None and self.options.trace:
                stats = _rpc(self.engine, "close")
        finally:
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    self.engine.engine_core.shutdown()
                self.engine = None
            self._restore_env()
            shutil.rmtree(self.scratch, ignore_errors=True)
        if write and self.meta is not None:
            client = _write_client_tables(self.out, self.meta, list(records), self._tokenizer)
            self.files = sorted(self.out.glob(f"{self.run_id}.dp*.arrow")) + client
        return stats

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}

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

    def _add(self, p: Any, live: dict[str, RequestRecord]) -> None:
        params = self._params(p)
        now = time.monotonic_ns()
        engine_id = self.engine.add_request(p.req_id, {"prompt_token_ids": list(p.token_ids)}, params)
        live[p.req_id] = RequestRecord(
            p.req_id, engine_id if isinstance(engine_id, str) else None, list(p.token_ids), p.sample,
            p.max_new_tokens, now,
        )  # fmt: skip

    def _submit_all(
        self, prompts: Sequence[Any], progress: Callable[[int, int, int], None] | None
    ) -> tuple[list[RequestRecord], float, dict[str, float]]:
        """Every prompt to the engine, then `step()` until all are done (`LLM.generate`'s loop)."""
        live: dict[str, RequestRecord] = {}
        t0 = time.monotonic_ns()
        for p in prompts:
            self._add(p, live)
        t_submitted = time.monotonic_ns()
        done = self._drain(live, len(prompts), progress, None)
        return done, (time.monotonic_ns() - t0) / 1e9, self._delays(t0, t_submitted, done)

    def _closed_loop(
        self, prompts: Sequence[Any], concurrency: int, progress: Callable[[int, int, int], None] | None
    ) -> tuple[list[RequestRecord], float, dict[str, float]]:
        pending = deque(prompts)
        live: dict[str, RequestRecord] = {}
        t0 = time.monotonic_ns()
        while pending and len(live) < concurrency:
            self._add(pending.popleft(), live)
        t_submitted = time.monotonic_ns()

        def refill() -> None:
            if pending:
                self._add(pending.popleft(), live)

        done = self._drain(live, len(prompts), progress, refill)
        return done, (time.monotonic_ns() - t0) / 1e9, self._delays(t0, t_submitted, done)

    def _drain(
        self,
        live: dict[str, RequestRecord],
        total: int,
        progress: Callable[[int, int, int], None] | None,
        on_finish: Callable[[], None] | None,
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
                new = len(completion.token_ids)  # DELTA: this step's tokens only
                if new > 0:
                    if rec.first_token_ns is None:
                        rec.first_token_ns = now
                    rec.chunk_ns.append(now)
                    rec.chunk_tokens.append(new)
                    rec.output_ids.extend(completion.token_ids)
                if rec.cached_tokens is None:
                    rec.cached_tokens = getattr(out, "num_cached_tokens", None)
                if out.finished:
                    rec.finish_ns = now
                    rec.finish_reason = str(completion.finish_reason) if completion.finish_reason else None
                    rec.routed_experts = getattr(completion, "routed_experts", None)
                    done.append(live.pop(out.request_id))
                    tokens += len(rec.output_ids)
                    if progress is not None:
                        progress(len(done), total, tokens)
                    if on_finish is not None:
                        on_finish()
        return done

    @staticmethod
    def _delays(t0: int, t_submitted: int, done: Sequence[RequestRecord]) -> dict[str, float]:
        firsts = [r.first_token_ns for r in done if r.first_token_ns is not None]
        return {
            "submit_s": round((t_submitted - t0) / 1e9, 6),
            "first_token_s": round((min(firsts) - t0) / 1e9, 6) if firsts else float("nan"),
        }


DRIVER = "vllm-offline-engine-admission"
"""The run metadata's `workload.driver`: every prompt handed over at once, vLLM admits up to
`max_num_seqs` (= batch size)."""


def engine_kwargs(options: VllmRunOptions, model: str, text_prompts: bool) -> dict[str, Any]:
    """The `EngineArgs` fields of a run (also `LLM(**kwargs)`'s keyword arguments)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "seed": options.seed,
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(options.dtype, options.dtype),
        "skip_tokenizer_init": not text_prompts and options.tokenizer is None,
        "max_num_seqs": options.batch_size,
        "disable_log_stats": True,  # as `LLM(...)`: no per-step stats in the client
    }
    if options.tokenizer:
        kwargs["tokenizer"] = options.tokenizer
    if options.random_weights:
        kwargs["load_format"] = "dummy"
    if options.cuda_graphs == "off":
        kwargs["enforce_eager"] = True
    if options.max_batch_tokens:
        kwargs["max_num_batched_tokens"] = options.max_batch_tokens
    if options.block_size:
        kwargs["block_size"] = options.block_size
    kwargs.update(options.engine_args)
    return kwargs


def _engine_args(options: VllmRunOptions, model: str, text_prompts: bool) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    try:
        return EngineArgs(**engine_kwargs(options, model, text_prompts))
    except TypeError as exc:
        raise CollectError(f"vLLM engine arguments: {exc}") from None


def _workload(options: VllmRunOptions, prompts: Sequence[Any]) -> dict[str, Any]:
    return closed_loop_workload(
        prompts,
        dataset=options.dataset,
        batch_size=options.batch_size,
        ignore_eos=options.ignore_eos,
        seed=options.seed,
        driver=DRIVER,
    )


def _rpc(engine: Any, command: str) -> list[dict[str, Any]]:
    """Ask every worker's tracer (`Worker.moecap_control`) for its stats, closing its files first."""
    try:
        result = engine.collective_rpc("moecap_control", args=(command,))
    except Exception as exc:
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    return [r for r in result if r is not None] if isinstance(result, list) else [result]


def _client_metadata(
    engine: Any,
    run_id: str,
    model_id: str,
    options: VllmRunOptions,
    workload: dict[str, Any],
    warnings: list[str],
) -> RunMetadata:
    vc = getattr(engine, "vllm_config", None)
    config = compat.model_config_dict(vc) if vc is not None else {}
    extra = runtime.host_facts()
    if warnings:
        extra["warnings"] = warnings
    return RunMetadata(
        run_id=run_id,
        engine=EngineInfo(
            name="vllm", version=compat.installed_version() or "", args=compat.engine_args(vc) if vc else {}
        ),
        model=ModelInfo(
            id=model_id,
            config=config,
            dtypes=compat.dtypes(vc) if vc is not None else {},
            random_weights=options.random_weights,
        ),
        moe=MoEInfo(
            num_experts=compat.config_num_experts(vc) or 0 if vc else 0,
            top_k=compat.config_top_k(vc) or 0 if vc else 0,
        ),
        gpus=runtime.gpu_infos(),
        workload=workload,
        collector_version=runtime.collector_version(),
        extra=extra,
    )


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
    out: str,
    run_id: str | None = None,
    counts: bool = True,
    strict_engine: bool = False,
    random_weights: bool = False,
    exec_fn: Callable[[str, list[str], dict[str, str]], Any] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Replace this process by `vllm serve MODEL ARGS…` with tracing on (returns only when `exec_fn`
    does, i.e. in tests). The run's `steps` / `experts` files appear in `out` per recording rank; the
    workload driver writes `requests` / `outputs` there with the same run id (printed)."""
    out_dir = prepare_out_dir(out)
    warnings = preflight(strict_engine)
    model_id = model_id_of(model)
    run_id = run_id or new_run_id("vllm", model_id)
    args = list(vllm_args)
    target = model
    if random_weights:
        scratch = Path(tempfile.mkdtemp(prefix="moecap-vllm-model-"))
        target = model_dir(model, True, scratch)
        if "--load-format" not in args and not any(a.startswith("--load-format=") for a in args):
            args += ["--load-format", "dummy"]
        if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in args):
            args += ["--served-model-name", model_id]  # not the scratch folder's path
    env = dict(os.environ)
    env.update(
        tracing_env(
            out_dir,
            run_id,
            counts=counts,
            model_id=model_id,
            workload={"driver": "external"},
            strict=strict_engine,
        )
    )
    return exec_traced_server(
        serve_argv(target, args), env, engine="vLLM", run_id=run_id, out_dir=out_dir, warnings=warnings,
        exec_fn=exec_fn,
    )  # fmt: skip
