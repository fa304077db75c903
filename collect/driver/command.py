"""`moecap-collect drive` and `moecap-collect import-moecap`: thin typer layers over `drive()` and the
MoE-CAP importer.

    moecap-collect drive --api-url http://127.0.0.1:8000 --model Qwen/Qwen1.5-MoE-A2.7B-Chat \\
        --dataset gsm8k --num-prompts 200 --batch-size 16 --max-tokens 512 --out traces/
    moecap-collect drive --api-url http://127.0.0.1:8000/v1/chat/completions --dataset synthetic:4096x1024 \\
        --request-rate 4 --slo-ttft-ms 2000 --slo-tpot-ms 100 --ignore-eos --out traces/
    moecap-collect import-moecap outputs/vllm/Qwen/Qwen3-30B-A3B --out traces/
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from moecap.schemas import DRIVER_ENGINE, EngineInfo, ModelInfo, MoEInfo, RunMetadata, new_run_id

from ..datasets import DEFAULT_SYSTEM_PROMPT, SAMPLING_MODES, Sample, ids_as_text, load_samples
from ..errors import CollectError
from ..workload import RequestRecord
from .config import APIS, ENGINES, PROMPT_FORMATS, ClientConfig, LoadConfig
from .drive import DriveResult, drive, open_client_writers, probe_server
from .hub import check_hub_access
from .session import open_session
from .summary import format_summary

EXIT_INTERRUPTED = 130


def register(app: typer.Typer) -> None:
    app.command("drive", no_args_is_help=True)(drive_command)
    app.command("import-moecap", no_args_is_help=True)(import_command)


def drive_command(
    api_url: Annotated[
        str,
        typer.Option(
            "--api-url", help="Server base URL, or its /v1/completions or /v1/chat/completions URL."
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="gsm8k | numinamath | longbench_v2 | mmlu_pro | arena_hard | synthetic:<in>x<out> | <dataset>:<in>x<out>.",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model name for the request body (default: the first one the server lists)."
        ),
    ] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts", help="Requests to send.")] = 100,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Closed loop: requests kept in flight (MoE-CAP's batch size).")
    ] = 1,
    request_rate: Annotated[
        float | None,
        typer.Option(
            "--request-rate", help="Open loop: Poisson arrivals at this many requests/s ('inf': all at once)."
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", help="Open loop: at most this many in flight.")
    ] = None,
    api: Annotated[
        str | None,
        typer.Option("--api", help=f"{' | '.join(APIS)} (default: from --api-url, else completions)."),
    ] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", help="Output budget per request (a fixed-length workload's own length wins)."
        ),
    ] = 512,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Generate the full budget (fixed-length runs).")
    ] = False,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Stream tokens (needed for TTFT/ITL).")
    ] = True,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help=f"{' | '.join(ENGINES)}: how the request id reaches the engine (auto probes the server).",
        ),
    ] = "auto",
    dataset_path: Annotated[
        str | None,
        typer.Option(
            "--dataset-path", help="Local copy of the dataset in its hub format (file or snapshot dir)."
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Dataset split (default: the dataset's evaluation split).")
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of the dataset.")] = None,
    sampling: Annotated[
        str, typer.Option("--sampling", help=f"{' | '.join(SAMPLING_MODES)}: which rows.")
    ] = "random",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the row sample and of open-loop arrivals.")
    ] = 0,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer id/path (padding to <in> tokens, --chat-template, --prompt-format text).",
        ),
    ] = None,
    prompt_format: Annotated[
        str,
        typer.Option(
            "--prompt-format",
            help=f"{' | '.join(PROMPT_FORMATS)}: how synthetic:<in>x<out> prompts are sent. ids (auto): as token "
            "ids; text: decoded with --tokenizer, as vllm bench serve --dataset-name random sends them (re-encoded "
            "and fitted to <in> tokens as it does; a BPE tokenizer may still miss by a few, and requests.prompt_tokens "
            "is the server's count).",
        ),
    ] = "auto",
    chat_template: Annotated[
        bool,
        typer.Option(
            "--chat-template",
            help="Apply the tokenizer's chat template (instruct models on the completions API).",
        ),
    ] = False,
    system_prompt: Annotated[
        str | None,
        typer.Option("--system-prompt", help="System message for samples without one ('' for none)."),
    ] = None,
    slo_ttft_ms: Annotated[
        float | None, typer.Option("--slo-ttft-ms", help="Goodput SLO on TTFT, ms (as moecap-analyze).")
    ] = None,
    slo_tpot_ms: Annotated[
        float | None, typer.Option("--slo-tpot-ms", help="Goodput SLO on TPOT, ms (as moecap-analyze).")
    ] = None,
    ttft_slo_ms: Annotated[float | None, typer.Option("--ttft-slo-ms", hidden=True)] = None,
    tpot_slo_ms: Annotated[float | None, typer.Option("--tpot-slo-ms", hidden=True)] = None,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup",
            help="Unrecorded requests shaped as the first samples sent first, --batch-size at a time; their "
            "prompts are reordered so they fill no prefix cache a measured request could use.",
        ),
    ] = 1,
    warmup_ladder: Annotated[
        str,
        typer.Option(
            "--warmup-ladder",
            help="With --warmup, first one step of every token count class the engine's kernels compile for "
            "(the residue ladder, as run's), as one-token token-id prompts: auto = up to the prefill tokens "
            "per step the server tells (SGLang; vLLM only with VLLM_SERVER_DEV_MODE=1), N = up to N tokens "
            "(vLLM: its --max-num-batched-tokens), off.",
        ),
    ] = "auto",
    arrival: Annotated[
        str,
        typer.Option(
            "--arrival",
            help="TTFT's start: request = just before the request is sent, as vllm bench serve; "
            "first-byte = its first byte on the socket (no connection set-up).",
        ),
    ] = "request",
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="Longest wait for any data, first token included.")
    ] = 600.0,
    connect_timeout_s: Annotated[float, typer.Option("--connect-timeout-s")] = 10.0,
    request_timeout_s: Annotated[
        float | None, typer.Option("--request-timeout-s", help="Longest whole request.")
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", help="Retries on connection errors and HTTP 429/502/503/504.")
    ] = 0,
    continuous_usage: Annotated[
        bool,
        typer.Option(
            "--continuous-usage/--no-continuous-usage",
            help="Ask for usage in every chunk (tokens per chunk).",
        ),
    ] = True,
    connection_reuse: Annotated[
        bool | None,
        typer.Option(
            "--connection-reuse/--no-connection-reuse",
            help="Keep connections open between requests, as vllm bench serve; --no-connection-reuse: a new "
            "connection per request, as SGLang's bench_serving (a burst then reaches the server together). "
            "Default: as the server's engine's own benchmark (no reuse for SGLang).",
        ),
    ] = None,
    env_per_request: Annotated[
        bool,
        typer.Option(
            "--env-per-request",
            help="Look up proxies and .netrc for every request, as vllm bench serve's client does (default: "
            "once per run); to reproduce that tool's client cost when comparing TTFT with it.",
        ),
    ] = False,
    extra_body: Annotated[
        str | None, typer.Option("--extra-body", help="JSON object merged into every request body.")
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", help="Extra HTTP header 'Name: value' (repeatable).")
    ] = None,
    batch_recording: Annotated[
        bool,
        typer.Option(
            "--batch-recording",
            help="Control the server's MoE-CAP/ServerlessLLM batch recorder and write a steps table.",
        ),
    ] = False,
    model_config: Annotated[
        Path | None,
        typer.Option(
            "--model-config", help="config.json of the served model (embedded in the run metadata)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the trace files.")] = Path("traces"),
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: generated).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Send a dataset to an OpenAI-compatible server and record requests + outputs tables.

    Example: moecap-collect drive --api-url http://127.0.0.1:8000 --dataset gsm8k --num-prompts 50 --batch-size 8
    """
    if num_prompts < 1:
        raise CollectError(f"--num-prompts must be at least 1 (got {num_prompts})")
    slo_ttft_ms = _one_of(slo_ttft_ms, ttft_slo_ms, "--slo-ttft-ms", "--ttft-slo-ms")
    slo_tpot_ms = _one_of(slo_tpot_ms, tpot_slo_ms, "--slo-tpot-ms", "--tpot-slo-ms")
    body = _json_object(extra_body, "--extra-body")
    headers = _headers(header or [])
    client = ClientConfig(
        api_url=api_url,
        model=model,
        api=api,
        stream=stream,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        temperature=temperature,
        engine=engine,
        continuous_usage=continuous_usage,
        reuse_connections=connection_reuse,
        env_per_request=env_per_request,
        system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt,
        extra_body=body,
        headers=headers,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=timeout_s,
        request_timeout_s=request_timeout_s,
        max_retries=retries,
        arrival=arrival,
    )
    load = LoadConfig(
        concurrency=batch_size,
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        seed=seed,
        warmup=warmup,
        warmup_ladder=warmup_ladder,
        slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1e3,
        slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1e3,
    )
    as_text = _ids_as_text(prompt_format, dataset, tokenizer)
    check_hub_access(
        dataset, dataset_path, tokenizer if (chat_template or _padded(dataset) or as_text) else None
    )
    samples = load_samples(
        dataset,
        num_prompts,
        seed=seed,
        local_path=dataset_path,
        split=split,
        revision=revision,
        sampling=sampling,
        tokenizer=tokenizer,
        chat_template=chat_template,
        system_prompt=system_prompt,
    )
    if as_text:
        samples = ids_as_text(samples, tokenizer, spec=dataset)
        _warn_lengths(samples)
    if len(samples) < num_prompts:
        typer.echo(
            f"moecap-collect: warning: --num-prompts {num_prompts} but dataset {dataset} has "
            f"{len(samples)} rows; sending {len(samples)}",
            err=True,
        )
    config = _model_config(model_config)
    workload = {
        "dataset": dataset,
        "dataset_path": dataset_path,
        "split": split,
        "revision": revision,
        "sampling": sampling,
        "seed": seed,
        "num_prompts": len(samples),
        "num_prompts_requested": num_prompts,
        "chat_template": chat_template,
        "tokenizer": tokenizer,
        "prompt_format": "text" if any(s.prompt is not None for s in samples) else "ids",
        "system_prompt": client.system_prompt,
    }
    stopper = _Stopper()
    result, steps_written = asyncio.run(
        _drive_and_record(
            samples, client, load, out, run_id, config, workload, batch_recording, progress, stopper
        )
    )
    ladder = result.ladder
    if ladder.steps:
        typer.echo(
            f"warm-up: residue ladder of {ladder.steps} steps up to {ladder.reach} tokens (the largest step "
            f"{'this workload' if ladder.bound == 'workload' else 'the server'} can form) in {ladder.seconds:.1f} s",
            err=True,
        )
    if ladder.note:
        typer.echo(f"moecap-collect: note: {ladder.note}", err=True)
    typer.echo(format_summary(result.summary()), err=True)
    for path in steps_written:
        typer.echo(f"wrote {path}", err=True)
    if result.interrupted:
        by = stopper.signal_name or "a stop"
        typer.echo(f"interrupted by {by}: kept {len(result.records)} of {len(samples)} requests", err=True)
        raise typer.Exit(stopper.exit_code)
    if result.records and not any(r.ok for r in result.records):
        typer.echo(
            f"all {len(result.records)} requests failed; first error: {result.records[0].error}", err=True
        )
        raise typer.Exit(1)


async def _drive_and_record(
    samples: list[Any],
    client: ClientConfig,
    load: LoadConfig,
    out: Path,
    run_id: str | None,
    config: dict[str, Any],
    workload: dict[str, Any],
    batch_recording: bool,
    show_progress: bool,
    stopper: _Stopper,
) -> tuple[DriveResult, list[str]]:
    from ..recording import BatchRecorder, write_reference_steps

    # Ask the server first: an unreachable one fails here, before any file is written, and the run
    # metadata gets the model it really serves.
    async with open_session(
        1, connect_timeout_s=client.connect_timeout_s, read_timeout_s=client.read_timeout_s
    ) as http:
        server = await probe_server(http, client)
    model_name = client.model or (server.models[0] if server.models else None)
    if model_name is None:
        raise CollectError(f"--model not given and {client.base_url}/v1/models lists no model")
    client = dataclasses.replace(client, model=model_name)
    engine_name = "http" if batch_recording else DRIVER_ENGINE
    run = RunMetadata(
        run_id=run_id or new_run_id(engine_name, model_name),
        engine=EngineInfo(
            name=engine_name,
            version=server.version or "",
            args={"api_url": client.endpoint, "engine": server.engine or client.engine},
        ),
        model=ModelInfo(id=model_name, config=config),
        workload={**workload, "api": client.api, "api_url": client.endpoint, **load.describe()},
        collector_version=_collector_version(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopper.on_signal, loop, stop, sig)
    recorder = (
        BatchRecorder(
            client.base_url, client.model, headers=client.headers, timeout_s=client.connect_timeout_s
        )
        if batch_recording
        else None
    )
    if recorder is not None:
        await recorder.status()  # a server without the endpoints fails here, before any file is written

    async def start_recording() -> None:
        # after the warm-up: its passes are not recorded
        await recorder.clear()
        await recorder.start()

    req_w, out_w = open_client_writers(out, run)
    progress = _RichProgress() if show_progress else None
    written: list[str] = []
    try:
        result = await drive(
            samples,
            client,
            load,
            requests_writer=req_w,
            outputs_writer=out_w,
            progress=progress,
            stop=stop,
            stop_reason=stopper.reason,
            before_measure=None if recorder is None else start_recording,
        )
    finally:
        req_w.close()
        out_w.close()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    written += [str(req_w.path), str(out_w.path)]
    if recorder is not None:
        records = await recorder.finish()
        steps_run = RunMetadata(
            run_id=run.run_id,
            engine=run.engine,
            model=ModelInfo(id=result.model, config=config),
            moe=MoEInfo(
                counts_available=False,
                counts_unavailable_reason="MoE-CAP batch records carry only expert_activation",
            ),
            workload={**run.workload, **result.workload()},
            collector_version=run.collector_version,
        )
        written += write_reference_steps(
            records, steps_run, out, source=f"batch recording at {client.base_url}"
        )
    return result, written


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop a run cleanly: Ctrl-C and `kill` (a batch scheduler, a timeout, systemd)."""


@dataclass
class _Stopper:
    """Which stop signal ended the run, for the error of in-flight rows and the exit status (128 + n)."""

    signal_name: str | None = None
    exit_code: int = EXIT_INTERRUPTED

    def on_signal(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, sig: signal.Signals) -> None:
        if stop.is_set():  # a second signal: stop waiting for clean-up (the next one ends the process)
            loop.remove_signal_handler(sig)
            return
        self.signal_name = signal.Signals(sig).name
        self.exit_code = 128 + int(sig)
        print(
            f"\nmoecap-collect: {self.signal_name}: stopping (in-flight requests are recorded as aborted); "
            "send it again to force",
            file=sys.stderr,
        )
        stop.set()

    def reason(self) -> str:
        return f"stopped by {self.signal_name}" if self.signal_name else "interrupted"


class _RichProgress:
    """A rich progress bar on stderr: requests done, failures, output tokens."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]drive"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: Any = None
        self._failed = 0
        self._tokens = 0

    def start(self, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("drive", total=total, info="")

    def advance(self, rec: RequestRecord) -> None:
        self._failed += rec.error is not None
        self._tokens += rec.output_token_count or 0
        self._bar.update(self._task, advance=1, info=f"{self._tokens} tokens, {self._failed} failed")

    def close(self) -> None:
        self._bar.stop()


def import_command(
    src: Annotated[
        Path,
        typer.Argument(
            help="A MoE-CAP output folder (metrics*.json, batch_data / detailed_results, inference outputs)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the trace files.")] = Path("traces"),
    model_config: Annotated[
        Path | None,
        typer.Option("--model-config", help="config.json of the model (MoE-CAP folders do not carry it)."),
    ] = None,
) -> None:
    """Convert existing MoE-CAP results into moecap trace files, so they join the leaderboard.

    Example: moecap-collect import-moecap outputs/vllm/Qwen/Qwen3-30B-A3B --out traces/
    """
    from ..recording import import_moecap_dir

    runs = import_moecap_dir(src, out, model_config=_model_config(model_config))
    for run in runs:
        typer.echo(f"{run.run_id}: {len(run.paths)} files ({run.summary})", err=True)
        for p in run.paths:
            typer.echo(f"  wrote {p}", err=True)


def _one_of(value: float | None, old: float | None, flag: str, old_flag: str) -> float | None:
    """The value of a flag that also has an older spelling (kept as a hidden alias)."""
    if value is not None and old is not None and value != old:
        raise CollectError(f"{flag} {value:g} and {old_flag} {old:g} disagree; give {flag} only")
    return value if value is not None else old


def _ids_as_text(prompt_format: str, dataset: str, tokenizer: str | None) -> bool:
    """Whether token-id prompts are to be decoded to text (`--prompt-format`); checked before anything is
    loaded or sent."""
    if prompt_format not in PROMPT_FORMATS:
        raise CollectError(f"--prompt-format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    token_ids = dataset.startswith("synthetic:")
    if prompt_format == "ids" and not token_ids:
        raise CollectError(
            f"--prompt-format ids: dataset {dataset} has text prompts; only synthetic:<in>x<out> prompts are token ids"
        )
    if prompt_format == "text" and token_ids and tokenizer is None:
        raise CollectError(
            "--prompt-format text needs --tokenizer (the served model's tokenizer decodes the token ids)"
        )
    return prompt_format == "text" and token_ids


def _warn_lengths(samples: list[Sample]) -> None:
    """One warning line when some decoded prompts do not re-encode to their token-id length."""
    off = [s for s in samples if s.extra.get("text_tokens") != s.extra.get("token_ids_decoded")]
    if off:
        typer.echo(
            f"moecap-collect: warning: --prompt-format text: {len(off)} of {len(samples)} prompts re-encode to "
            f"another length than their token ids with this tokenizer (e.g. {off[0].extra['text_tokens']} for "
            f"{off[0].extra['token_ids_decoded']}); requests.prompt_tokens records the server's count",
            err=True,
        )


def _padded(dataset: str) -> bool:
    """`<dataset>:<in>x<out>`: prompts padded with the tokenizer."""
    return not dataset.startswith("synthetic:") and ":" in dataset


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise CollectError(f"{flag}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CollectError(f"{flag}: expected a JSON object")
    return obj


def _headers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise CollectError(f"--header {item!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def _model_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = path / "config.json" if path.is_dir() else path
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CollectError(f"--model-config {path}: cannot read a config.json ({exc})") from None
    if not isinstance(doc, dict):
        raise CollectError(f"--model-config {path}: not a JSON object")
    return doc


def _collector_version() -> str:
    from ..runtime import collector_version

    return collector_version()
