"""Run a workload on vLLM's offline engine with the moecap plugin on, leaving one complete run in `out`.

    result = run(VllmRunOptions(model="analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json", random_weights=True,
                                dataset="synthetic:256x64", num_prompts=64, batch_size=64, out="traces/"))

The engine's workers write `steps` / `experts` (one pair per recording rank, through the plugin in
`vllm.py`); this process writes the client side, `requests` and `outputs`, under the same run id. The
workload loop is a closed loop over `LLMEngine.add_request` / `step()`: `batch_size` requests in flight,
a new one submitted whenever one finishes, with our request ids (vLLM appends a random suffix for its
own id, which `requests.engine_req_id` records, so `steps.req_ids` join). Token times are the host times
at which `step()` returned each request's new tokens.

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


def preflight(strict: bool) -> list[str]:
    """Check vLLM and the plugin before anything starts; returns warnings (raises `CollectError`)."""
    warning = adapter.check_version(strict)
    if not plugin_installed():
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
# The offline run
# ---------------------------------------------------------------------------------------------------
def run(options: VllmRunOptions, *, progress: Callable[[int, int, int], None] | None = None) -> VllmRunResult:
    """Run `options`' workload on vLLM with tracing on; see the module docstring."""
    if options.num_prompts < 1 or options.batch_size < 1:
        raise CollectError("--num-prompts and --batch-size must be at least 1")
    out = prepare_out_dir(options.out)
    warnings = preflight(options.strict_engine)
    model_id = model_id_of(options.model)
    run_id = options.run_id or new_run_id("vllm", model_id)
    scratch = Path(tempfile.mkdtemp(prefix="moecap-vllm-model-"))
    try:
        return _run(options, out, run_id, model_id, scratch, warnings, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _engine_args(options: VllmRunOptions, model: str, text_prompts: bool) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    kwargs: dict[str, Any] = {
        "model": model,
        "seed": options.seed,
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(options.dtype, options.dtype),
        "skip_tokenizer_init": not text_prompts and options.tokenizer is None,
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
    try:
        return EngineArgs(**kwargs)
    except TypeError as exc:
        raise CollectError(f"vLLM engine arguments: {exc}") from None


def _workload(options: VllmRunOptions, prompts: Sequence[Any]) -> dict[str, Any]:
    return closed_loop_workload(
        prompts,
        dataset=options.dataset,
        batch_size=options.batch_size,
        ignore_eos=options.ignore_eos,
        seed=options.seed,
        driver="vllm-offline-closed-loop",
    )


def _run(
    options: VllmRunOptions,
    out: Path,
    run_id: str,
    model_id: str,
    scratch: Path,
    warnings: list[str],
    progress: Callable[[int, int, int], None] | None,
) -> VllmRunResult:
    from ..datasets import load_samples
    from .hf_runner import make_prompts

    model = model_dir(options.model, options.random_weights, scratch / "model")
    config = _read_config(model)
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000)
    tokenizer = _tokenizer(options.tokenizer or (model if Path(model).is_dir() else None))
    samples = load_samples(
        options.dataset,
        options.num_prompts,
        seed=options.seed,
        vocab_size=vocab,
        local_path=options.dataset_path,
    )
    prompts = make_prompts(samples, tokenizer, options.max_new_tokens, vocab)
    workload = _workload(options, prompts)
    env = tracing_env(
        out, run_id, counts=options.counts, model_id=model_id, workload=workload, strict=options.strict_engine
    )
    engine_args = _engine_args(options, model, text_prompts=tokenizer is not None)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    engine = None
    try:
        adapter.register()  # this process too (an in-process engine core), before vLLM loads plugins
        from vllm import SamplingParams
        from vllm.v1.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_engine_args(engine_args)
        meta = _client_metadata(engine, run_id, model_id, options, workload, warnings)
        # Power and energy while the workload runs (not while the engine starts), from this process:
        # NVML sees the engine's GPUs by UUID whichever process computes on them.
        with _gpu_sampler(out, meta, options.gpu_sample_interval_s):
            records, wall_s = _closed_loop(engine, prompts, options, SamplingParams, progress)
        stats = _rpc(engine, "close")
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.engine_core.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    files = _write_client_tables(out, meta, records, tokenizer)
    engine_files = sorted(out.glob(f"{run_id}.dp*.arrow"))
    return VllmRunResult(
        run_id=run_id,
        out=out,
        requests=len(records),
        output_tokens=sum(len(r.output_ids) for r in records),
        wall_s=wall_s,
        worker_stats=stats,
        files=engine_files + files,
        warnings=warnings,
        records=records,
    )


def _closed_loop(
    engine: Any, prompts: Sequence[Any], options: VllmRunOptions, sampling_params: Any, progress: Any
) -> tuple[list[RequestRecord], float]:
    pending = deque(prompts)
    live: dict[str, RequestRecord] = {}
    done: list[RequestRecord] = []
    tokens = 0
    t_first = time.monotonic_ns()

    def submit() -> None:
        p = pending.popleft()
        params = sampling_params(
            max_tokens=p.max_new_tokens,
            ignore_eos=options.ignore_eos,
            temperature=0.0,
            seed=options.seed,
            detokenize=False,
        )
        now = time.monotonic_ns()
        engine_id = engine.add_request(p.req_id, {"prompt_token_ids": list(p.token_ids)}, params)
        live[p.req_id] = RequestRecord(
            p.req_id,
            engine_id if isinstance(engine_id, str) else None,
            list(p.token_ids),
            p.sample,
            p.max_new_tokens,
            now,
        )

    while pending and len(live) < options.batch_size:
        submit()
    while live:
        outputs = engine.step()
        now = time.monotonic_ns()
        for out in outputs:
            rec = live.get(out.request_id)
            if rec is None or not out.outputs:
                continue
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            new = len(ids) - len(rec.output_ids)
            if new > 0:
                rec.first_token_ns = rec.first_token_ns or now
                rec.chunk_ns.append(now)
                rec.chunk_tokens.append(new)
                rec.output_ids = ids
            if rec.cached_tokens is None:
                rec.cached_tokens = getattr(out, "num_cached_tokens", None)
            if out.finished:
                rec.finish_ns = now
                rec.finish_reason = str(completion.finish_reason) if completion.finish_reason else None
                rec.routed_experts = getattr(completion, "routed_experts", None)
                done.append(live.pop(out.request_id))
                tokens += len(rec.output_ids)
                if progress is not None:
                    progress(len(done), len(prompts), tokens)
                if pending:
                    submit()
    return done, (time.monotonic_ns() - t_first) / 1e9


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
