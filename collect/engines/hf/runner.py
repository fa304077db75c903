"""Run a workload on a transformers model with the hf collector and write one run's trace files.

    loaded = load_model("path/to/config.json", random_weights=True, dtype="bf16", device="cuda")
    result = run_workload(loaded, HFRunOptions(dataset="synthetic:1024x256", num_prompts=64, batch_size=64,
                                               out="traces/"))

Two ways of running, both recorded by `HFCollector` with the same row format:
- `mode="cb"` (default): transformers' continuous batching through `init_continuous_batching` (the
  entry point `generate_batch` uses). The workload loop is a closed-loop client: `batch_size` requests
  in flight, a new one submitted whenever one finishes; arrival, first-token and finish times come
  from the engine's own request states (`record_timestamps=True`).
- `mode="generate"`: static batches of `batch_size` prompts, left-padded, through `model.generate`
  (the only way MLA models such as DeepSeek-V2/V3 run in transformers 5.17); token times come from a
  streamer.
"""

from __future__ import annotations

import json
import math
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
    Parallelism,
    RankIdentity,
    RunMetadata,
    new_run_id,
)

from ... import runtime
from ...datasets import load_samples
from ...errors import CollectError
from ...models import shipped_config, shipped_names
from ...workload import Prompt, RequestRecord, make_prompts
from ...writers import RunWriters, prepare_out_dir
from ..base import COMMON_RUN_FLAGS, Progress, RunArgs, RunInterrupted
from ..base import RunResult as EngineRunResult
from .adapter import (
    MLA_MODEL_TYPES,
    HFCollector,
    check_transformers_version,
    dynamic_kv_bytes_per_token_per_layer,
    paged_kv_bytes_per_token_per_layer,
    torch_dtype,
    transformers_version,
)

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CPU_BLOCK_SIZE = 32
CPU_MAX_BATCH_TOKENS = 256


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to run, and what the run metadata says about where it came from."""

    model: Any
    model_id: str
    config: dict[str, Any]
    tokenizer: Any | None
    random_weights: bool
    device: Any
    dtype: Any
    source: str
    """'config' (built from a config.json, random weights) or 'checkpoint' (from_pretrained)."""
    tp_plan: Any = None
    """The tensor-parallel plan the checkpoint was sharded with (None: one process holds the model)."""


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CollectError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, …)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CollectError(f"--device {device}: CUDA is not available on this host")
    return dev


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def _model_id_from_path(path: Path) -> str:
    # The bundled configs are named Org__Name.json (analyze/specs/models); keep the hub-style id.
    stem = path.parent.name if path.name == "config.json" else path.stem
    return stem.replace("__", "/", 1) if "__" in stem else stem


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CollectError(f"--model {str(path)!r}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CollectError(f"--model {str(path)!r}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CollectError(f"--model {str(path)!r}: a config.json must be a JSON object")
    return data


def _config_from_dict(data: dict[str, Any], source: str) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise CollectError(f"{source}: config.json has no model_type")
    if model_type not in CONFIG_MAPPING:
        raise CollectError(
            f"{source}: unknown model type {model_type!r} (transformers {transformers_version()} does not implement it)"
        )
    fields = {k: v for k, v in data.items() if k != "model_type"}
    return CONFIG_MAPPING[model_type](**fields)


def load_model(
    model: str,
    *,
    random_weights: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    attn_implementation: str | None = None,
    tp_plan: str | None = None,
) -> LoadedModel:
    """Load `model` (a config.json, a directory, or a hub id transformers can resolve) onto `device`.

    `random_weights=True` builds the architecture of the config with random weights directly on the
    device (`from_config`), the way runs are made where checkpoints cannot be downloaded.

    `tp_plan` ("auto" or a plan dict) shards a checkpoint over the ranks of a torchrun job with
    transformers' tensor parallelism (`from_pretrained(..., tp_plan=...)`; each rank calls this, and the
    device is the rank's own, so `device` is not used). Random weights cannot be sharded that way: save
    them first (`from_config` + `save_pretrained`, as `benchmarks/gpu/tp_run.py` does).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(model)
    if not path.exists() and (shipped := shipped_config(model)) is not None:
        path = shipped  # a tiny config shipped in moecap/collect/models (e.g. tiny-qwen2-moe)
    tok_source: Path | None = None
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    transformers.logging.set_verbosity_error()
    if tp_plan is not None:
        if random_weights:
            raise CollectError(
                "tensor parallelism (tp_plan) needs a checkpoint; build random weights with from_config, "
                "save_pretrained them, and load that directory"
            )
        kwargs["tp_plan"] = tp_plan

    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        config_path = path if path.is_file() else path / "config.json"
        config = _config_from_dict(_read_config_json(config_path), str(config_path))
        has_weights = path.is_dir() and any(any(path.glob(g)) for g in _WEIGHT_GLOBS)
        tok_source = path if path.is_dir() else path.parent
        model_id = _model_id_from_path(config_path)
        if not random_weights and not has_weights:
            raise CollectError(
                f"--model {model!r} holds no weights (*.safetensors / *.bin); pass --random-weights to build the "
                "architecture with random weights"
            )
        if random_weights:
            with torch.device(dev):
                net = AutoModelForCausalLM.from_config(config, dtype=dt, **kwargs)
            source = "config"
        else:
            try:
                net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, **kwargs)
                net = net if tp_plan is not None else net.to(dev)
            except (OSError, ValueError) as exc:
                raise CollectError(
                    f"--model {model!r}: cannot load the checkpoint ({_first_line(exc)})"
                ) from None
            source = "checkpoint"
    elif path.exists():
        raise CollectError(f"--model {model!r}: a directory without config.json")
    else:
        # A hub-style name: usable only when transformers resolves it offline (a cached snapshot).
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model, local_files_only=random_weights)
        except (OSError, ValueError) as exc:
            if random_weights:
                raise CollectError(
                    f"--model {model!r} is not a local path and transformers cannot resolve it offline; with "
                    f"--random-weights pass a shipped tiny model ({', '.join(shipped_names())}), a config.json path "
                    "(e.g. analyze/specs/models/<Org>__<Name>.json) or a directory holding one"
                ) from None
            raise CollectError(f"--model {model!r}: cannot load ({_first_line(exc)})") from None
        model_id = model
        if random_weights:
            with torch.device(dev):
                net = AutoModelForCausalLM.from_config(config, dtype=dt, **kwargs)
            source = "config"
        else:
            try:
                net = AutoModelForCausalLM.from_pretrained(model, dtype=dt, **kwargs)
                net = net if tp_plan is not None else net.to(dev)
            except (OSError, ValueError) as exc:
                raise CollectError(f"--model {model!r}: cannot load ({_first_line(exc)})") from None
            source = "checkpoint"
    net.eval()
    if tp_plan is not None:
        dev = _local_device(net)
    tok = _load_tokenizer(tokenizer, tok_source)
    config_dict = json.loads(net.config.to_json_string(use_diff=False))
    return LoadedModel(net, model_id, config_dict, tok, random_weights, dev, dt, source, tp_plan)


def _local_device(model: Any) -> Any:
    """The device this rank computes on (a sharded parameter is a DTensor; its local shard says)."""
    import torch

    param = next(model.parameters())
    local = param.to_local() if hasattr(param, "to_local") else param
    if local.device.type == "cuda" and local.device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return local.device


def _load_tokenizer(explicit: str | None, model_dir: Path | None) -> Any | None:
    from transformers import AutoTokenizer

    if explicit:
        try:
            return AutoTokenizer.from_pretrained(explicit)
        except (OSError, ValueError) as exc:
            raise CollectError(f"--tokenizer {explicit!r}: cannot load ({_first_line(exc)})") from None
    if model_dir is not None and any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        try:
            return AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            return None
    return None


def require_psutil_on_cpu() -> None:
    """Refuse a CPU continuous-batching run without psutil, in one line.

    transformers 5.x reads the host's memory with psutil to size the paged KV cache; without it it
    sees 0 bytes available and its generation loop fails (MemoryError), which left a run of 0 steps.
    """
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise CollectError(
            "--engine hf on a CPU: transformers sizes its KV cache with psutil, which is not installed "
            "(pip install psutil; moecap[hf] includes it)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------
@dataclass
class HFRunOptions:
    """One run: the workload, how transformers runs it, and where the trace goes."""

    dataset: str
    num_prompts: int
    batch_size: int
    out: str
    max_new_tokens: int | None = None
    """Output tokens per request; None = the dataset's own (synthetic:<in>x<out>) or 256."""
    ignore_eos: bool = False
    seed: int = 0
    mode: str = "cb"
    counts: bool = True
    cuda_graphs: str = "auto"
    """auto | on | off: transformers' own choice, or forced (continuous batching only)."""
    warmup: bool = True
    max_batch_tokens: int | None = None
    num_blocks: int | None = None
    block_size: int | None = None
    progress: bool = False
    rows_per_batch: int = 256
    flush_interval_s: float = 1.0
    run_id: str | None = None
    dataset_path: str | None = None
    workload_extra: dict[str, Any] = field(default_factory=dict)
    """Further `workload` metadata entries (e.g. a sweep's matrix point under "sweep")."""


@dataclass
class RunResult:
    run_id: str
    paths: dict[str, Path]
    steps: int
    requests: int
    output_tokens: int
    wall_s: float
    """First submission to last finished request."""
    interrupted: bool = False
    metadata: RunMetadata | None = None
    writer_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


class Interrupted(RunInterrupted):
    """Ctrl-C during a run; the trace files written so far are closed and readable."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


class _PerfToMonotonic:
    """Maps transformers' `time.perf_counter()` stamps onto `time.monotonic_ns()`."""

    def __init__(self) -> None:
        self.offset_ns = time.monotonic_ns() - time.perf_counter_ns()

    def __call__(self, t: float) -> int:
        return round(t * 1e9) + self.offset_ns


def _eos_ids(config: Any) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if int(e) >= 0}


def execute_cb(
    model: Any,
    prompts: Sequence[Prompt],
    batch_size: int,
    *,
    ignore_eos: bool = False,
    cuda_graphs: str = "auto",
    warmup: bool = True,
    max_batch_tokens: int | None = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    on_ready: Callable[[Any], None] | None = None,
    on_finished: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Run `prompts` through transformers' continuous batching with `batch_size` in flight.

    `on_ready(manager)` runs after the manager is initialised (and warmed up), before the first
    request; `on_finished(record)` per finished request. Returns (records in finishing order, wall
    seconds from first submission to last finish). On KeyboardInterrupt the manager is hard-stopped
    before the exception propagates.
    """
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    text_config = model.config.get_text_config()
    eos = _eos_ids(text_config)
    gen_config = GenerationConfig(
        max_new_tokens=max(p.max_new_tokens for p in prompts),
        do_sample=False,
        eos_token_id=sorted(eos) if eos else -1,
        pad_token_id=getattr(text_config, "pad_token_id", None) or 0,
    )
    cb_kwargs: dict[str, Any] = {"max_requests_per_batch": int(batch_size)}
    if next(model.parameters()).device.type == "cpu":
        # transformers sizes the paged cache from free memory, and on a CPU that is the host's RAM: with
        # eager/sdpa attention the mask it preallocates ([max_batch_tokens, cache pages]) then runs to tens
        # of GB. Size the cache from the workload instead (what a CPU test or smoke run needs).
        bs = block_size or CPU_BLOCK_SIZE
        longest = max(len(p.token_ids) + p.max_new_tokens for p in prompts)
        num_blocks = num_blocks or (math.ceil(longest / bs) + 1) * int(batch_size) + 1
        block_size = bs
        max_batch_tokens = max_batch_tokens or CPU_MAX_BATCH_TOKENS
    if cuda_graphs != "auto":
        cb_kwargs["use_cuda_graph"] = cuda_graphs == "on"
    for key, value in (
        ("max_batch_tokens", max_batch_tokens),
        ("num_blocks", num_blocks),
        ("block_size", block_size),
    ):
        if value is not None:
            cb_kwargs[key] = int(value)
    cb_config = ContinuousBatchingConfig(**cb_kwargs)
    hints = WorkloadHints(
        max_prompt_length=max(len(p.token_ids) for p in prompts),
        max_generated_length=max(p.max_new_tokens for p in prompts),
        num_requests=len(prompts),
    )
    clock = _PerfToMonotonic()
    with torch.no_grad():
        manager = model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config, workload_hints=hints
        )
    interrupted = False
    records: list[RequestRecord] = []
    try:
        if warmup:
            manager.warmup()
        if on_ready is not None:
            on_ready(manager)
        manager.start()
        queue = deque(prompts)
        in_flight: dict[str, RequestRecord] = {}
        t_first = time.monotonic_ns()
        t_last = t_first

        def submit() -> None:
            p = queue.popleft()
            rec = RequestRecord.of(p, time.monotonic_ns(), engine_req_id=p.req_id)
            in_flight[p.req_id] = rec
            manager.add_request(
                p.token_ids,
                request_id=p.req_id,
                max_new_tokens=p.max_new_tokens,
                record_timestamps=True,
                eos_token_id=-1 if ignore_eos or not eos else None,
            )

        while queue and len(in_flight) < batch_size:
            submit()
        while in_flight:
            result = manager.get_result(timeout=0.1)
            if result is None:
                if not manager.is_running():
                    raise CollectError(
                        "transformers' continuous-batching thread stopped before the workload finished"
                    )
                continue
            if not result.is_finished() or result.request_id not in in_flight:
                continue
            rec = in_flight.pop(result.request_id)
            _fill_cb_record(rec, result, clock, eos, ignore_eos)
            t_last = max(t_last, rec.finish_ns or time.monotonic_ns())
            records.append(rec)
            if on_finished is not None:
                on_finished(rec)
            if queue:
                submit()
        wall_s = (t_last - t_first) / 1e9
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        manager.stop(block=True, timeout=60, hard_stop=interrupted)
        manager.destroy()
    return records, wall_s


def _fill_cb_record(
    rec: RequestRecord, out: Any, clock: _PerfToMonotonic, eos: set[int], ignore_eos: bool
) -> None:
    rec.output_ids = [int(t) for t in out.generated_tokens]
    stamps = [clock(t) for t in (out.timestamps or [])]
    rec.chunk_times_ns = stamps
    rec.chunk_tokens = [1] * len(stamps)
    rec.first_token_ns = stamps[0] if stamps else None
    start, end = out.lifespan
    rec.finish_ns = clock(end) if end and end > 0 else (stamps[-1] if stamps else None)
    if start and start > 0:
        rec.queue_ns = max(0, clock(start) - clock(out.created_time))
    if out.error is not None:
        rec.error = str(out.error)
        rec.finish_reason = "error"
    elif rec.output_ids and not ignore_eos and rec.output_ids[-1] in eos:
        rec.finish_reason = "stop"
    else:
        rec.finish_reason = "length"


class _TimingStreamer:
    """A `generate` streamer that stamps each step's tokens (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times_ns: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times_ns.append(time.monotonic_ns())

    def end(self) -> None:
        pass


def execute_generate(
    model: Any,
    prompts: Sequence[Prompt],
    batch_size: int,
    *,
    ignore_eos: bool = False,
    collector: HFCollector | None = None,
    on_finished: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Run `prompts` as static, left-padded batches of `batch_size` through `model.generate`."""
    import torch

    text_config = model.config.get_text_config()
    eos = _eos_ids(text_config)
    pad = getattr(text_config, "pad_token_id", None)
    pad = int(pad) if pad is not None and pad >= 0 else (min(eos) if eos else 0)
    device = next(model.parameters()).device
    records: list[RequestRecord] = []
    t_first = time.monotonic_ns()
    t_last = t_first
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p.token_ids) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, p in enumerate(chunk):
            ids[b, width - len(p.token_ids) :] = torch.tensor(p.token_ids, dtype=torch.long)
            mask[b, width - len(p.token_ids) :] = 1
        budget = max(p.max_new_tokens for p in chunk)
        if collector is not None:
            collector.label_next_generate([p.req_id for p in chunk])
        streamer = _TimingStreamer()
        arrival = time.monotonic_ns()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=-1 if ignore_eos or not eos else sorted(eos),
                streamer=streamer,
            )
        new = out[:, width:].tolist()
        for b, p in enumerate(chunk):
            tokens = new[b][: p.max_new_tokens]
            reason = "length"
            if not ignore_eos:
                for j, t in enumerate(tokens):
                    if t in eos:
                        tokens, reason = tokens[: j + 1], "stop"
                        break
            times = streamer.times_ns[: len(tokens)]
            rec = RequestRecord.of(p, arrival, engine_req_id=p.req_id)
            rec.first_token_ns = times[0] if times else None
            rec.finish_ns = times[-1] if times else None
            rec.output_ids = [int(t) for t in tokens]
            rec.chunk_times_ns, rec.chunk_tokens = times, [1] * len(times)
            rec.queue_ns, rec.finish_reason = 0, reason
            records.append(rec)
            t_last = max(t_last, rec.finish_ns or arrival)
            if on_finished is not None:
                on_finished(rec)
    return records, (t_last - t_first) / 1e9


# ---------------------------------------------------------------------------------------------------
# A recorded run
# ---------------------------------------------------------------------------------------------------
def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def build_metadata(
    loaded: LoadedModel,
    options: HFRunOptions,
    collector: HFCollector,
    prompts: Sequence[Prompt],
    *,
    engine_args: dict[str, Any],
    kv_bytes: list[int] | None,
    run_id: str | None = None,
    group: runtime.TPGroup | None = None,
) -> RunMetadata:
    """The run's metadata as this process writes it. Under tensor parallelism (`group`) every rank
    names the whole group: parallelism.tp = group size, rank.tp = its rank, gpus and rank.gpu_uuids =
    every rank's GPU (a TP rank's steps stand for all of them)."""
    layout = collector.layout
    if group is not None:
        used = list(group.gpus)
    else:
        gpus = runtime.gpu_infos() if loaded.device.type == "cuda" else []
        used = [g for g in gpus if g.index == (loaded.device.index or 0)] or gpus[:1]
    in_lens = [len(p.token_ids) for p in prompts]
    out_lens = sorted({p.max_new_tokens for p in prompts})
    kv_dtype = _dtype_name(loaded.dtype)
    extra = runtime.host_facts()
    warning = check_transformers_version()
    if warning:
        extra["warnings"] = [warning]
    return RunMetadata(
        run_id=run_id or options.run_id or new_run_id("hf", loaded.model_id),
        engine=EngineInfo(name="hf", version=transformers_version(), args=engine_args),
        model=ModelInfo(
            id=loaded.model_id,
            config=loaded.config,
            dtypes={"weights": kv_dtype, "activations": kv_dtype, "kv_cache": kv_dtype},
            quantization=loaded.config.get("quantization_config"),
            kv_bytes_per_token_per_layer=kv_bytes,
            random_weights=loaded.random_weights,
        ),
        moe=MoEInfo(
            layer_ids=list(layout.layer_ids),
            num_experts=layout.num_experts,
            top_k=layout.top_k,
            counts_available=collector.counts_enabled,
            counts_unavailable_reason=collector.counts_reason,
        ),
        gpus=used,
        parallelism=Parallelism(tp=group.size if group is not None else 1),
        rank=RankIdentity(
            tp=group.rank if group is not None else 0, gpu_uuids=[g.uuid for g in used if g.uuid]
        ),
        workload={
            "dataset": options.dataset,
            "num_prompts": len(prompts),
            "batch_size": options.batch_size,
            "concurrency": options.batch_size,
            "max_new_tokens": out_lens[0] if len(out_lens) == 1 else out_lens,
            "input_tokens": {"min": min(in_lens), "max": max(in_lens), "mean": sum(in_lens) / len(in_lens)},
            "ignore_eos": options.ignore_eos,
            "seed": options.seed,
            "sampling": "greedy",
            "outputs": "text" if loaded.tokenizer is not None else "token_ids_json",
            **options.workload_extra,
        },
        collector_version=runtime.collector_version(),
        extra=extra,
    )


def _cb_engine_args(manager: Any, model: Any, options: HFRunOptions) -> tuple[dict[str, Any], list[int]]:
    cfg = manager.continuous_batching_config
    args: dict[str, Any] = {
        "mode": "continuous_batching",
        "entry_point": "init_continuous_batching",
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "use_cuda_graph": list(cfg.use_cuda_graph)
        if isinstance(cfg.use_cuda_graph, tuple)
        else cfg.use_cuda_graph,
        "use_async_batching": cfg.use_async_batching,
        "max_requests_per_batch": cfg.max_requests_per_batch,
        "block_size": cfg.block_size,
        "warmup": options.warmup,
    }
    kv = paged_kv_bytes_per_token_per_layer(model)
    processor = manager.batch_processor
    if processor is not None:
        cache = processor.cache
        args["max_batch_tokens"] = int(cache.max_batch_tokens)
        args["num_blocks"] = int(cache.num_blocks)
        # What the paged cache really allocated: key + value slot of each layer's group tensor.
        kv = []
        for layer in range(model.config.get_text_config().num_hidden_layers):
            _, j = cache.layer_index_to_group_indices[layer]
            k, v = cache.key_cache[j], cache.value_cache[j]
            kv.append(int(k[0].numel() * k.element_size() + v[0].numel() * v.element_size()))
    return args, kv


def run_workload(
    loaded: LoadedModel,
    options: HFRunOptions,
    *,
    progress: Any | None = None,
) -> RunResult:
    """Run `options`' workload on `loaded` with the collector attached, writing one run into `options.out`.

    `progress(done, total, output_tokens)` is called after each finished request. Raises `Interrupted`
    (a `CollectError`) on Ctrl-C after closing every file.
    """
    if options.mode not in ("cb", "generate"):
        raise CollectError(f"--mode {options.mode!r}: expected cb or generate")
    if options.batch_size < 1 or options.num_prompts < 1:
        raise CollectError("--batch-size and --num-prompts must be at least 1")
    out_dir = prepare_out_dir(options.out)
    model = loaded.model
    text_config = model.config.get_text_config()
    model_type = str(text_config.model_type)
    if options.mode == "cb" and model_type in MLA_MODEL_TYPES:
        raise CollectError(
            f"model type {model_type!r} (MLA) does not run under transformers {transformers_version()}'s continuous "
            "batching (its paged cache is sized from config.head_dim = qk_rope_head_dim); use --mode generate"
        )
    samples = load_samples(
        options.dataset,
        options.num_prompts,
        seed=options.seed,
        vocab_size=int(text_config.vocab_size),
        local_path=options.dataset_path,
        tokenizer=loaded.tokenizer,  # pads <dataset>:<in>x<out> prompts (MoE-CAP's fixed-length tasks)
    )
    prompts = make_prompts(samples, loaded.tokenizer, options.max_new_tokens, int(text_config.vocab_size))
    # Several ranks (torchrun + tensor parallelism): each rank records its own steps/experts files and
    # TP rank 0 alone the requests/outputs; the run id is rank 0's, so every file names one run.
    group = runtime.tp_group(loaded.device)
    run_id = options.run_id or new_run_id("hf", loaded.model_id)
    if group is not None:
        run_id = runtime.broadcast_from_rank0(run_id)
        if options.mode == "cb":
            raise CollectError(
                "continuous batching under tensor parallelism: only TP rank 0 receives results in transformers "
                f"{transformers_version()}, which the closed-loop workload does not handle yet; use --mode generate"
            )

    state: dict[str, Any] = {"writers": None, "done": 0, "tokens": 0, "records": []}

    def sink(row: dict[str, Any], counts: Any) -> None:
        writers = state["writers"]
        if writers is not None:
            writers.step(row, counts)

    collector = HFCollector(model, sink, counts=options.counts)

    def open_writers(engine_args: dict[str, Any], kv: list[int] | None) -> None:
        meta = build_metadata(
            loaded,
            options,
            collector,
            prompts,
            engine_args=engine_args,
            kv_bytes=kv,
            run_id=run_id,
            group=group,
        )
        state["meta"] = meta
        state["writers"] = RunWriters(
            out_dir,
            meta,
            experts=collector.counts_enabled,
            client_tables=group is None or group.rank == 0,
            rows_per_batch=options.rows_per_batch,
            flush_interval_s=options.flush_interval_s,
        )

    def on_finished(rec: RequestRecord) -> None:
        writers = state["writers"]
        if writers.client_tables:
            writers.request(rec.requests_row())
            writers.output(rec.outputs_row(loaded.tokenizer))
        state["done"] += 1
        state["tokens"] += len(rec.output_ids)
        if progress is not None:
            progress(state["done"], len(prompts), state["tokens"])

    interrupted = False
    wall_s = 0.0
    collector.attach()
    try:
        if options.mode == "cb":

            def on_ready(manager: Any) -> None:
                args, kv = _cb_engine_args(manager, model, options)
                open_writers(args, kv)

            _, wall_s = execute_cb(
                model,
                prompts,
                options.batch_size,
                ignore_eos=options.ignore_eos,
                cuda_graphs=options.cuda_graphs,
                warmup=options.warmup,
                max_batch_tokens=options.max_batch_tokens,
                num_blocks=options.num_blocks,
                block_size=options.block_size,
                on_ready=on_ready,
                on_finished=on_finished,
            )
        else:
            kv = dynamic_kv_bytes_per_token_per_layer(model)
            args: dict[str, Any] = {
                "mode": "static_generate",
                "entry_point": "generate",
                "attn_implementation": model.config._attn_implementation,
                "experts_implementation": getattr(model.config, "_experts_implementation", None),
                "padding": "left",
                "cache": "DynamicCache",
            }
            if group is not None:
                # The KV bytes the whole TP group holds (and reads) per token: each rank's cache summed
                # (heads split over ranks add up to one copy; K/V gathered onto every rank count each time).
                per_rank = runtime.gather_from_ranks(kv)
                kv = [int(sum(col)) for col in zip(*per_rank)]
                args.update(
                    tp_size=group.size,
                    tp_plan=loaded.tp_plan,
                    distributed_backend=group.backend,
                    kv_bytes_per_token_per_layer_per_rank=per_rank,
                )
            open_writers(args, kv)
            _, wall_s = execute_generate(
                model,
                prompts,
                options.batch_size,
                ignore_eos=options.ignore_eos,
                collector=collector,
                on_finished=on_finished,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        collector.close()
        writers = state["writers"]
        stats = writers.close() if writers is not None else {}
    meta = state.get("meta")
    result = RunResult(
        run_id=meta.run_id if meta is not None else "",
        paths=writers.paths if writers is not None else {},
        steps=collector.steps_written,
        requests=state["done"],
        output_tokens=state["tokens"],
        wall_s=wall_s,
        interrupted=interrupted,
        metadata=meta,
        writer_stats=stats,
    )
    if interrupted:
        where = (
            f"{result.steps} steps, {result.requests} requests in {out_dir}" if writers else "nothing written"
        )
        raise Interrupted(f"interrupted: the trace files are closed and readable ({where})", result)
    return result


def run(
    options: HFRunOptions,
    *,
    model: str,
    random_weights: bool,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    attn_implementation: str | None = None,
    progress: Any | None = None,
) -> RunResult:
    """Load the model and run one workload (what `moecap-collect run --engine hf` does)."""
    prepare_out_dir(options.out)
    if options.mode == "cb" and resolve_device(device).type == "cpu":
        require_psutil_on_cpu()
    loaded = load_model(
        model,
        random_weights=random_weights,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        attn_implementation=attn_implementation,
    )
    return run_workload(loaded, options, progress=progress)


# ---------------------------------------------------------------------------------------------------
# transformers in the engine registry
# ---------------------------------------------------------------------------------------------------
@dataclass
class HFRun:
    """`run --engine hf`'s options: the workload (`HFRunOptions`) and how to load the model."""

    options: HFRunOptions
    model: str
    random_weights: bool
    dtype: str
    device: str
    tokenizer: str | None
    attn_implementation: str | None


def _memory_error_message(exc: MemoryError, device: str) -> str:
    """One line for a MemoryError of the hf run (transformers refusing its KV cache, or a real OOM)."""
    text = " ".join(str(exc).split()) or "out of memory"
    return (
        f"--engine hf on {device}: out of memory ({text}); try a smaller --model, --batch-size, "
        "--max-batch-tokens or --num-blocks"
    )


class HFEngine:
    """HF transformers' `base.Engine`: in this process, no server, no engine session."""

    name = "hf"
    label = "HF transformers"
    run_flags = COMMON_RUN_FLAGS | {"mode", "device", "num_blocks", "block_size", "attn_implementation"}
    serves = False
    serve_example = ""

    def preflight(self, strict: bool, *, trace: bool = True) -> list[str]:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise CollectError(
                f"--engine hf needs torch and transformers (pip install 'moecap[hf]'): {exc}"
            ) from None
        return []

    def engine_args(self, argv: Sequence[str]) -> dict[str, Any]:
        raise CollectError("--engine-args applies to --engine vllm and sglang, not hf")

    def run_options(self, args: RunArgs) -> HFRun:
        options = HFRunOptions(
            dataset=args.dataset, num_prompts=args.num_prompts, batch_size=args.batch_size, out=str(args.out),
            max_new_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed, mode=args.mode,
            counts=args.counts, cuda_graphs=args.cuda_graphs, warmup=args.warmup != 0,
            max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks, block_size=args.block_size,
            run_id=args.run_id, dataset_path=args.dataset_path,
        )  # fmt: skip
        return HFRun(options, args.model, args.random_weights, args.dtype, args.device, args.tokenizer,
                     args.attn_implementation)  # fmt: skip

    def run(self, hf: HFRun, *, progress: Progress | None = None) -> EngineRunResult:
        import torch

        prepare_out_dir(hf.options.out)  # fail before loading a model
        self.preflight(False)
        if hf.random_weights:
            torch.manual_seed(hf.options.seed)
        try:
            result = run(
                hf.options, model=hf.model, random_weights=hf.random_weights, dtype=hf.dtype, device=hf.device,
                tokenizer=hf.tokenizer, attn_implementation=hf.attn_implementation, progress=progress,
            )  # fmt: skip
        except MemoryError as exc:
            raise CollectError(_memory_error_message(exc, hf.device)) from None
        return EngineRunResult(
            run_id=result.run_id, out=Path(hf.options.out), requests=result.requests,
            output_tokens=result.output_tokens, wall_s=result.wall_s,
            engine_stats=[{"recorder": True, "steps_written": result.steps}], files=list(result.paths.values()),
        )  # fmt: skip

    def session(self, options: Any) -> Any:
        raise CollectError(
            "--engine hf has no engine session (it loads the model per run): use vllm or sglang"
        )

    def serve(self, model: str, argv: Sequence[str], **kw: Any) -> int:
        raise CollectError("serve supports --engine vllm and sglang (transformers has no traced server here)")

    def trace_errors(self, stats: Sequence[dict[str, Any]]) -> list[str]:
        return []


__all__ = [
    "HFEngine",
    "HFRunOptions",
    "Interrupted",
    "LoadedModel",
    "RunResult",
    "execute_cb",
    "execute_generate",
    "load_model",
    "run",
    "run_workload",
]
