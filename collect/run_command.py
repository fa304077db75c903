"""`moecap-collect run` and `moecap-collect serve`: one command each for every engine in the registry
(`engines/base.py`), which supplies what differs. Options are grouped in `--help` by the engines they apply
to, and an option given to an engine it does not apply to is refused in one line."""

from __future__ import annotations

import sys
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from .engines.base import ENGINES, RunArgs, RunInterrupted, get_engine
from .errors import CollectError

_EXAMPLE = """
Example (CPU, seconds: the shipped tiny Qwen2-MoE config with random weights, 8 fixed-length prompts,
4 in flight; tiny-olmoe is the other shipped config, any config.json path or model directory works too):

    moecap-collect run --engine hf --model tiny-qwen2-moe --random-weights --dataset synthetic:128x32 \\
        --num-prompts 8 --batch-size 4 --ignore-eos --device cpu --out traces/

vLLM / SGLang hand every prompt to the engine at once with its concurrency limit set to --batch-size (as
their own offline benchmarks do), after --warmup requests that are not recorded.
"""

EngineName = Enum("EngineName", {name: name for name in ENGINES}, type=str)  # type: ignore[misc]
ServeName = Enum("ServeName", {name: name for name in ENGINES if name != "hf"}, type=str)  # type: ignore[misc]

ALL = "Workload and trace (every engine)"
SERVED = "vllm / sglang"
HF = "hf (transformers in this process)"
HF_VLLM = "hf / vllm"


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
    app.command("run", help=summary + "\n" + _EXAMPLE, cls=_EngineHelp)(run)
    serve_help = (
        "Start an engine's OpenAI-compatible server with per-step tracing on (steps, experts per rank)."
    )
    examples = "".join(get_engine(n).serve_example for n in ENGINES if n != "hf")
    app.command(
        "serve",
        help=serve_help
        + "\n"
        + examples
        + "\nThe server listens on 127.0.0.1 only; pass --host 0.0.0.0 after "
        "MODEL to expose it. Then drive it (moecap-collect drive …) with the same --out.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(serve)


def run(
    engine: EngineName = typer.Option(
        ..., "--engine", help="Serving engine; hf = transformers in this process."
    ),
    model: str = typer.Option(
        ...,
        "--model",
        help="config.json, a model directory, a shipped tiny config (hf: tiny-qwen2-moe, tiny-olmoe), or a hub "
        "id the engine resolves.",
        rich_help_panel=ALL,
    ),
    dataset: str = typer.Option(
        ..., "--dataset", help="synthetic:<in>x<out> or a dataset name (gsm8k, …).", rich_help_panel=ALL
    ),
    num_prompts: int = typer.Option(
        ..., "--num-prompts", min=1, help="Requests to send.", rich_help_panel=ALL
    ),
    batch_size: int = typer.Option(
        ..., "--batch-size", min=1, help="Requests in flight (concurrency).", rich_help_panel=ALL
    ),
    out: Path = typer.Option(
        ..., "--out", help="Directory for the trace files (created if missing).", rich_help_panel=ALL
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Random weights from the config (no download).", rich_help_panel=ALL
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU).", rich_help_panel=ALL
    ),
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        min=1,
        help="Output tokens per request (default: the dataset's, else 256).",
        rich_help_panel=ALL,
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, hidden=True),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Generate exactly --max-tokens tokens.", rich_help_panel=ALL
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the workload sample and the random weights.", rich_help_panel=ALL
    ),
    counts: bool = typer.Option(
        True, "--counts/--no-counts", help="Record per-step expert token counts.", rich_help_panel=ALL
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer for text datasets.", rich_help_panel=ALL
    ),
    cuda_graphs: Graphs = typer.Option(
        Graphs.auto, "--cuda-graphs", help="auto/on: the engine's default; off: eager.", rich_help_panel=ALL
    ),
    max_batch_tokens: int | None = typer.Option(
        None, "--max-batch-tokens", min=1, help="Tokens per forward pass (step budget).", rich_help_panel=ALL
    ),
    warmup: int | None = typer.Option(
        None,
        "--warmup",
        min=0,
        help="Unrecorded warm-up requests of the workload's shapes first, after a residue ladder of one "
        "step per token-count class (vLLM, SGLang; default: one batch; 0: no warm-up at all).",
        rich_help_panel=ALL,
    ),
    no_warmup: bool = typer.Option(False, "--no-warmup", hidden=True, help="Same as --warmup 0."),
    dataset_path: str | None = typer.Option(
        None, "--dataset-path", help="Local copy of a named dataset.", rich_help_panel=ALL
    ),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id (default: time-model-random).", rich_help_panel=ALL
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Progress bar on stderr.", rich_help_panel=ALL
    ),
    trace: bool = typer.Option(
        True,
        "--trace/--no-trace",
        help="Load the tracer into the engine; --no-trace: the same workload without it (client tables only).",
        rich_help_panel=SERVED,
    ),
    engine_args: str | None = typer.Option(
        None,
        "--engine-args",
        help='Further engine flags as one string, e.g. "--tensor-parallel-size 2" (vLLM) or '
        '"--tp-size 2 --mem-fraction-static 0.8" (SGLang); parsed by the engine\'s own parser.',
        rich_help_panel=SERVED,
    ),
    strict_engine: bool = typer.Option(
        False,
        "--strict-engine",
        help="Refuse an engine release outside the tested range.",
        rich_help_panel=SERVED,
    ),
    block_size: int | None = typer.Option(
        None, "--block-size", min=4, help="Tokens per paged KV-cache block.", rich_help_panel=HF_VLLM
    ),
    mode: Mode = typer.Option(
        Mode.cb, "--mode", help="cb = continuous batching; generate = static batches.", rich_help_panel=HF
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=HF),
    num_blocks: int | None = typer.Option(
        None, "--num-blocks", min=1, help="Paged KV-cache blocks.", rich_help_panel=HF
    ),
    attn_implementation: str | None = typer.Option(
        None, "--attn-implementation", help="e.g. sdpa, eager.", rich_help_panel=HF
    ),
) -> None:
    """Run a workload and record it."""
    if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
        raise CollectError("--max-tokens and --max-new-tokens (its old name) disagree: pass one")
    args = RunArgs(
        model=model, dataset=dataset, num_prompts=num_prompts, batch_size=batch_size, out=out,
        random_weights=random_weights, dtype=dtype, max_tokens=max_tokens or max_new_tokens, ignore_eos=ignore_eos,
        seed=seed, counts=counts, tokenizer=tokenizer, cuda_graphs=cuda_graphs.value,
        max_batch_tokens=max_batch_tokens, block_size=block_size, run_id=run_id, dataset_path=dataset_path,
        warmup=0 if no_warmup else warmup, trace=trace, engine_args=engine_args, strict_engine=strict_engine,
        mode=mode.value, device=device, num_blocks=num_blocks, attn_implementation=attn_implementation,
        progress=progress,
    )  # fmt: skip
    chosen = get_engine(engine.value)
    refuse_inapplicable(args, chosen.name, chosen.run_flags)
    options = chosen.run_options(args)
    bar = _Progress(enabled=progress)
    try:
        with bar:
            result = chosen.run(options, progress=bar.update)
    except RunInterrupted as exc:
        typer.echo(f"moecap-collect: {exc}", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("moecap-collect: interrupted", err=True)
        raise typer.Exit(130) from None
    for w in result.warnings:
        typer.echo(f"moecap-collect: warning: {w}", err=True)
    errors = chosen.trace_errors(result.engine_stats)
    if errors:
        raise CollectError(errors[0])
    t = result.timing
    if t:
        typer.echo(
            f"moecap-collect: engine start {t.get('engine_start_s', 0):.1f} s, warm-up {t.get('warmup_s', 0):.1f} s "
            f"({int(t.get('warmup_ladder_steps', 0))} ladder steps, {int(t.get('warmup_requests', 0))} requests), "
            f"prompts handed over in "
            f"{1e3 * t.get('submit_s', 0):.1f} ms, first token after {1e3 * t.get('first_token_s', 0):.1f} ms",
            err=True,
        )
    files = ", ".join(p.name for p in result.files)
    typer.echo(
        f"{result.run_id}: {result.steps} steps, {result.requests} requests, {result.output_tokens} output tokens "
        f"in {result.wall_s:.1f} s ({result.tokens_per_s:.1f} tok/s) -> {result.out}/ [{files}]"
    )


class _EngineHelp(typer.core.TyperCommand):
    """`run --engine X --help` lists only the options that apply to X (`Engine.run_flags`); without
    `--engine`, every option, grouped by the engines it applies to."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["moecap_engine"] = _engine_in(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        applies = _run_flags(ctx.meta.get("moecap_engine"))
        hide = [
            p for p in self.params if applies is not None and p.name in RUN_FIELDS and p.name not in applies
        ]
        for p in hide:
            p.hidden = True
        try:
            super().format_help(ctx, formatter)
        finally:
            for p in hide:
                p.hidden = False


RUN_FIELDS = frozenset(f.name for f in fields(RunArgs))
"""`run` options that are `RunArgs` fields (the ones an engine may not take)."""


def _engine_in(args: list[str]) -> str | None:
    """The value of `--engine` among raw command-line `args`, if any."""
    for i, a in enumerate(args):
        if a == "--engine" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--engine="):
            return a.split("=", 1)[1]
    return None


def _run_flags(engine: str | None) -> frozenset[str] | None:
    """The `RunArgs` fields `engine` takes; None for no engine or an unknown one (help shows all)."""
    if engine not in ENGINES:
        return None
    return get_engine(engine).run_flags


def refuse_inapplicable(args: RunArgs, engine: str, applies: frozenset[str]) -> None:
    """A one-line error naming the options given that `engine` does not take (left at their defaults
    they pass silently)."""
    defaults = RunArgs(model="", dataset="", num_prompts=1, batch_size=1, out=Path())
    given = [
        f.name
        for f in fields(RunArgs)
        if f.name not in applies and getattr(args, f.name) != getattr(defaults, f.name)
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "does" if len(given) == 1 else "do"
        raise CollectError(f"{flags} {verb} not apply to --engine {engine}")


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(
        ..., help="Model (hub id, directory, or a config.json with --random-weights)."
    ),
    engine: ServeName = typer.Option(..., "--engine", help="Serving engine."),
    out: Path = typer.Option(
        ..., "--out", help="Directory for the engine-side trace files (created if missing)."
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id (default: time-model-random)."),
    counts: bool = typer.Option(True, "--counts/--no-counts", help="Record per-step expert token counts."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Random weights (--load-format dummy); MODEL may be a config.json."
    ),
    strict_engine: bool = typer.Option(
        False, "--strict-engine", help="Refuse an engine release outside the tested range (default: warn)."
    ),
) -> None:
    """Start the engine's OpenAI server with tracing on; every argument after MODEL goes to the engine."""
    status = get_engine(engine.value).serve(
        model, bind_loopback(list(ctx.args)), out=str(out), run_id=run_id, counts=counts, strict_engine=strict_engine,
        random_weights=random_weights,
    )  # fmt: skip
    if status:  # a server ended by a signal: the shell's 128 + signal number
        raise typer.Exit(status if status > 0 else 128 - status)


LOOPBACK = "127.0.0.1"


def bind_loopback(engine_args: list[str]) -> list[str]:
    """The engine's flags with `--host 127.0.0.1` added unless they name a host.

    vLLM listens on every interface by default, and neither engine asks for a key: an unauthenticated
    server on the network. `--host 0.0.0.0` (after MODEL) exposes it on purpose."""
    if any(a == "--host" or a.startswith("--host=") for a in engine_args):
        return engine_args
    return [*engine_args, "--host", LOOPBACK]


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
