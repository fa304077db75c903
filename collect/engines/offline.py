"""What every offline engine run shares (vLLM's `vllm_run.py`, SGLang's `sglang_run.py`): the model argument
(a hub id, a folder, or a lone config.json for random weights), the tokenizer, the client-side record of one
request, the `requests` / `outputs` tables written from those records, and the GPU telemetry sampler that
runs while the workload does. Engine-neutral: no engine is imported here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import RunMetadata, TraceWriter, trace_file_name

from ..errors import CollectError


@dataclass
class RequestRecord:
    req_id: str
    engine_id: str | None
    prompt_ids: list[int]
    sample: Any
    max_new_tokens: int
    arrival_ns: int
    first_token_ns: int | None = None
    finish_ns: int | None = None
    output_ids: list[int] = field(default_factory=list)
    chunk_ns: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    cached_tokens: int | None = None
    finish_reason: str | None = None
    routed_experts: Any = None
    """The engine's own per-token routing ([tokens, layers, top_k]) where it returns one (vLLM's
    `enable_return_routed_experts`)."""


def model_id_of(model: str) -> str:
    path = Path(model)
    stem = (
        path.parent.name
        if path.name == "config.json"
        else (path.stem if path.suffix == ".json" else path.name)
    )
    if path.exists():
        return stem.replace("__", "/", 1) if "__" in stem else stem
    return model


def model_dir(model: str, random_weights: bool, scratch: Path) -> str:
    """What an engine's model argument needs: a directory holding config.json (a lone config.json is
    copied into `scratch`), or the hub id as given."""
    path = Path(model)
    if path.is_file():
        if not random_weights:
            raise CollectError(f"--model {model!r} is a config.json without weights: pass --random-weights")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CollectError(f"--model {model!r}: not a readable config.json ({exc})") from None
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "config.json").write_text(json.dumps(config))
        return str(scratch)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CollectError(f"--model {model!r}: a directory without config.json")
        return str(path)
    return model


def read_config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
    return {}


def load_tokenizer(source: str | None) -> Any | None:
    if source is None:
        return None
    path = Path(source)
    if path.is_dir() and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CollectError(f"--tokenizer {source!r}: cannot load ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def gpu_sampler(out: Path, meta: RunMetadata, interval_s: float | None) -> Any:
    """An NVML sampler writing the run's `gpu_samples` file for the duration of the block; absent (no
    file) without NVML or when `interval_s` is falsy."""
    if not interval_s:
        yield None
        return
    from ..telemetry import GpuSampler

    sampler = GpuSampler(out / trace_file_name(meta, "gpu_samples"), meta, interval_s=interval_s)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def write_client_tables(
    out: Path, meta: RunMetadata, records: list[RequestRecord], tokenizer: Any
) -> list[Path]:
    paths = []
    requests = TraceWriter(out / trace_file_name(meta, "requests"), "requests", meta)
    outputs = TraceWriter(out / trace_file_name(meta, "outputs"), "outputs", meta)
    for rec in sorted(records, key=lambda r: r.arrival_ns):
        requests.write(
            {
                "req_id": rec.req_id,
                "engine_req_id": rec.engine_id,
                "sample_id": rec.sample.sample_id,
                "arrival_ns": rec.arrival_ns,
                "first_token_ns": rec.first_token_ns,
                "finish_ns": rec.finish_ns,
                "prompt_tokens": len(rec.prompt_ids),
                "output_tokens": len(rec.output_ids),
                "cached_prompt_tokens": rec.cached_tokens,
                "chunk_times_ns": rec.chunk_ns or None,
                "chunk_tokens": rec.chunk_tokens or None,
                "queue_ns": None,
                "preemptions": None,
                "finish_reason": rec.finish_reason,
                "error": None,
                "retries": 0,
            }
        )
        text = tokenizer.decode(rec.output_ids, skip_special_tokens=True) if tokenizer is not None else None
        outputs.write(
            {
                "req_id": rec.req_id,
                "sample_id": rec.sample.sample_id,
                "dataset": rec.sample.dataset,
                "prompt": rec.sample.prompt_text,
                "output": text if text is not None else json.dumps(rec.output_ids, separators=(",", ":")),
                "reference": rec.sample.reference,
            }
        )
    for w in (requests, outputs):
        w.close()
        paths.append(w.path)
    return paths


def closed_loop_workload(
    prompts: Sequence[Any], *, dataset: str, batch_size: int, ignore_eos: bool, seed: int, driver: str
) -> dict[str, Any]:
    """The run metadata's `workload` of a closed loop with `batch_size` requests in flight, greedy."""
    lens = [len(p.token_ids) for p in prompts]
    outs = sorted({p.max_new_tokens for p in prompts})
    return {
        "dataset": dataset,
        "num_prompts": len(prompts),
        "batch_size": batch_size,
        "concurrency": batch_size,
        "max_new_tokens": outs[0] if len(outs) == 1 else outs,
        "input_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)},
        "ignore_eos": ignore_eos,
        "seed": seed,
        "sampling": "greedy",
        "driver": driver,
    }


def exec_traced_server(
    argv: list[str],
    env: dict[str, str],
    *,
    engine: str,
    run_id: str,
    out_dir: Path,
    warnings: Sequence[str],
    exec_fn: Callable[[str, list[str], dict[str, str]], Any] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Print the run id and warnings, then replace this process by the engine's server (`exec_fn`
    stands in for `os.execvpe` in tests; then the argv and env are returned)."""
    for w in warnings:
        print(f"moecap-collect: warning: {w}", file=sys.stderr)
    print(
        f"moecap-collect: run {run_id}: tracing {engine} into {out_dir}/ ({shlex.join(argv[2:])})",
        file=sys.stderr,
    )
    sys.stderr.flush()
    (exec_fn or os.execvpe)(argv[0], argv, env)
    return argv, env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals a supervised server is stopped with (Ctrl-C, `kill`, a closed terminal)."""


def supervise_traced_server(
    argv: list[str],
    env: dict[str, str],
    *,
    engine: str,
    run_id: str,
    out_dir: Path,
    warnings: Sequence[str],
    before_stop: Callable[[], Sequence[str]],
) -> int:
    """Run the engine's server as a child and return its exit status; a stop signal to this process
    first runs `before_stop()` (e.g. ask the engine's workers to close their trace files, returning one
    warning line per problem), then reaches the server. For engines whose shutdown SIGKILLs the workers
    that hold the trace files open.

    The server runs in its own session, so a terminal's Ctrl-C reaches this process only and the
    server hears it after `before_stop`; a second stop signal is passed on at once."""
    for w in warnings:
        print(f"moecap-collect: warning: {w}", file=sys.stderr)
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    print(
        f"moecap-collect: run {run_id}: tracing {engine} (server pid {child.pid}) into {out_dir}/ "
        f"({shlex.join(argv[2:])})",
        file=sys.stderr,
    )
    sys.stderr.flush()
    stopping: list[int] = []

    def on_stop(signum: int, frame: Any) -> None:
        first = not stopping
        stopping.append(signum)
        if first:
            print(f"moecap-collect: stopping {engine}: closing the trace files first", file=sys.stderr)
            for line in before_stop():
                print(f"moecap-collect: warning: {line}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_stop) for s in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child.poll() is None:  # this process is leaving on an exception: do not orphan the server
            child.terminate()


def parse_engine_flags(parse: Callable[[], Any], what: str, argv: Sequence[str]) -> Any:
    """`parse()` (an engine's argparse over `argv`) with argparse's usage dump kept off stderr: a flag
    the engine rejects becomes one `CollectError` line naming the flags and argparse's reason."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse()
    except (SystemExit, Exception) as exc:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else str(exc) or type(exc).__name__
        raise CollectError(f"cannot parse {what} flags {shlex.join(argv)!r}: {reason}") from None
