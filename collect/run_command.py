"""`moecap-collect run`: record one run of a workload on an engine (today: HF transformers, in-process)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from .errors import CollectError

_EXAMPLE = """
Example (CPU, seconds: the shipped tiny Qwen2-MoE config with random weights, 8 fixed-length prompts,
4 in flight; tiny-olmoe is the other shipped config, any config.json path or model directory works too):

    moecap-collect run --engine hf --model tiny-qwen2-moe --random-weights --dataset synthetic:128x32 \\
        --num-prompts 8 --batch-size 4 --ignore-eos --device cpu --out traces/
"""


class Engine(str, Enum):
    hf = "hf"
    vllm = "vllm"
    sglang = "sglang"


class Mode(str, Enum):
    cb = "cb"
    generate = "generate"


class Graphs(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


def register(app: typer.Typer) -> None:
    # typer turns an app with a single command into that command; a root callback keeps `run` a
    # sub-command (as the CLI's other sub-commands will be) whatever else is registered.
    if app.registered_callback is None:
        app.callback()(_root)
    summary = "Run a workload on an engine and write its trace files (steps, experts, requests, outputs)."
    app.command("run", help=summary + "\n" + _EXAMPLE)(run)


def run(
    engine: Engine = typer.Option(..., "--engine", help="Serving engine; hf = transformers in this process."),
    model: str = typer.Option(
        ...,
        "--model",
        help="config.json, a model directory, a shipped tiny config (tiny-qwen2-moe, tiny-olmoe), "
        "or a hub id transformers resolves.",
    ),
    dataset: str = typer.Option(..., "--dataset", help="synthetic:<in>x<out> or a dataset name (gsm8k, …)."),
    num_prompts: int = typer.Option(..., "--num-prompts", min=1, help="Requests to send."),
    batch_size: int = typer.Option(..., "--batch-size", min=1, help="Requests in flight (concurrency)."),
    out: Path = typer.Option(..., "--out", help="Directory for the trace files (created if missing)."),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Build the architecture from its config with random weights (no download).",
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Output tokens per request (default: the dataset's, else 256)."
    ),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly --max-new-tokens tokens."),
    seed: int = typer.Option(0, "--seed", help="Seed for the workload sample and the random weights."),
    mode: Mode = typer.Option(Mode.cb, "--mode", help="cb = continuous batching; generate = static batches."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    counts: bool = typer.Option(True, "--counts/--no-counts", help="Record per-step expert token counts."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer path for text datasets."),
    cuda_graphs: Graphs = typer.Option(Graphs.auto, "--cuda-graphs", help="Continuous batching CUDA graphs."),
    warmup: int | None = typer.Option(
        None,
        "--warmup",
        min=0,
        help="Unrecorded warm-up requests of the workload's shapes before the recorded window "
        "(default: one batch; 0: none). hf: any N > 0 lets transformers warm up / capture graphs.",
    ),
    no_warmup: bool = typer.Option(False, "--no-warmup", hidden=True, help="Same as --warmup 0."),
    trace: bool = typer.Option(
        True,
        "--trace/--no-trace",
        help="vllm/sglang: load the tracer into the engine; --no-trace runs the same workload without it "
        "(client tables only), to measure the harness alone.",
    ),
    max_batch_tokens: int | None = typer.Option(
        None, "--max-batch-tokens", min=1, help="Tokens per forward pass."
    ),
    num_blocks: int | None = typer.Option(None, "--num-blocks", min=1, help="Paged KV-cache blocks."),
    block_size: int | None = typer.Option(
        None, "--block-size", min=4, help="Tokens per paged KV-cache block."
    ),
    attn_implementation: str | None = typer.Option(None, "--attn-implementation", help="e.g. sdpa, eager."),
    dataset_path: str | None = typer.Option(None, "--dataset-path", help="Local copy of a named dataset."),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id (default: time-model-random)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    engine_args: str | None = typer.Option(
        None,
        "--engine-args",
        help='vllm/sglang: further engine flags as one string, e.g. "--tensor-parallel-size 2" (vLLM) '
        'or "--tp-size 2 --mem-fraction-static 0.8" (SGLang); parsed by the engine\'s own parser.',
    ),
    strict_engine: bool = typer.Option(
        False, "--strict-engine", help="vllm/sglang: refuse an engine release outside the supported range."
    ),
) -> None:
    """Run a workload and record it."""
    if no_warmup:
        warmup = 0
    if engine is Engine.vllm:  # vLLM's offline engine, in its own module (collect/engines/vllm_cli.py)
        from .engines.vllm_cli import run_from_cli

        return run_from_cli(
            model=model, dataset=dataset, num_prompts=num_prompts, batch_size=batch_size, out=out,
            random_weights=random_weights, dtype=dtype, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
            seed=seed, counts=counts, tokenizer=tokenizer, cuda_graphs=cuda_graphs.value,
            max_batch_tokens=max_batch_tokens, block_size=block_size, run_id=run_id, dataset_path=dataset_path,
            engine_args=engine_args, strict_engine=strict_engine, warmup=warmup, trace=trace,
        )  # fmt: skip
    if engine is Engine.sglang:  # SGLang's offline engine, in its own module (collect/engines/sglang_cli.py)
        from .engines.sglang_cli import run_from_cli as run_sglang

        return run_sglang(
            model=model, dataset=dataset, num_prompts=num_prompts, batch_size=batch_size, out=out,
            random_weights=random_weights, dtype=dtype, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
            seed=seed, counts=counts, tokenizer=tokenizer, cuda_graphs=cuda_graphs.value,
            max_batch_tokens=max_batch_tokens, run_id=run_id, dataset_path=dataset_path,
            engine_args=engine_args, strict_engine=strict_engine, warmup=warmup, trace=trace,
        )  # fmt: skip
    if engine_args or strict_engine:
        raise CollectError("--engine-args and --strict-engine apply to --engine vllm and sglang, not hf")
    from .writers import prepare_out_dir

    prepare_out_dir(out)  # fail before loading a model
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise CollectError(
            f"--engine hf needs torch and transformers (pip install 'moecap[hf]'): {exc}"
        ) from None
    from .engines.hf_runner import HFRunOptions, Interrupted
    from .engines.hf_runner import run as run_hf

    if random_weights:
        torch.manual_seed(seed)
    options = HFRunOptions(
        dataset=dataset,
        num_prompts=num_prompts,
        batch_size=batch_size,
        out=str(out),
        max_new_tokens=max_new_tokens,
        ignore_eos=ignore_eos,
        seed=seed,
        mode=mode.value,
        counts=counts,
        cuda_graphs=cuda_graphs.value,
        warmup=warmup != 0,
        max_batch_tokens=max_batch_tokens,
        num_blocks=num_blocks,
        block_size=block_size,
        run_id=run_id,
        dataset_path=dataset_path,
    )
    bar = _Progress(enabled=progress)
    try:
        with bar:
            result = run_hf(
                options,
                model=model,
                random_weights=random_weights,
                dtype=dtype,
                device=device,
                tokenizer=tokenizer,
                attn_implementation=attn_implementation,
                progress=bar.update,
            )
    except Interrupted as exc:
        typer.echo(f"moecap-collect: {exc}", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("moecap-collect: interrupted before any trace was written", err=True)
        raise typer.Exit(130) from None
    except MemoryError as exc:
        raise CollectError(_memory_error_message(exc, device)) from None
    files = ", ".join(p.name for p in result.paths.values())
    typer.echo(
        f"{result.run_id}: {result.steps} steps, {result.requests} requests, {result.output_tokens} output tokens "
        f"in {result.wall_s:.1f} s ({result.tokens_per_s:.1f} tok/s) -> {out}/ [{files}]"
    )


def _memory_error_message(exc: MemoryError, device: str) -> str:
    """One line for a MemoryError of the hf run (transformers refusing its KV cache, or a real OOM)."""
    text = " ".join(str(exc).split()) or "out of memory"
    return (
        f"--engine hf on {device}: out of memory ({text}); try a smaller --model, --batch-size, "
        "--max-batch-tokens or --num-blocks"
    )


def _root() -> None:
    """Record per-step traces of an MoE serving engine and a workload."""


class _Progress:
    """A rich progress bar on stderr, updated per finished request."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("requests"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[tokens]} tokens"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
        return self

    def update(self, done: int, total: int, tokens: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("run", total=total, tokens=0)
        self._bar.update(self._task, completed=done, tokens=tokens)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
