"""`moecap-collect serve --engine vllm MODEL [vLLM args…]`, and the vLLM branch of `moecap-collect run`.

A thin layer: arguments in, `vllm_run.serve_command` / `vllm_run.run` called, one line out.
"""

from __future__ import annotations

import shlex
from enum import Enum
from pathlib import Path

import typer

from ..errors import CollectError
from .sglang_cli import SERVE_EXAMPLE as SGLANG_SERVE_EXAMPLE

_SERVE_EXAMPLE = """
Example (an H100; vLLM's own flags after the model):

    moecap-collect serve --engine vllm --out traces/ Qwen/Qwen1.5-MoE-A2.7B --max-num-seqs 64

Random weights from a config.json (no checkpoint download):

    moecap-collect serve --engine vllm --out traces/ --random-weights \\
        analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json --skip-tokenizer-init

The server listens on 127.0.0.1 only; pass --host 0.0.0.0 after MODEL to expose it.

Then drive it (moecap-collect drive …) with the same --out: every engine rank writes
<run_id>.dp<d>-pp<p>-tp0.steps.arrow / .experts.arrow there.
"""


LOOPBACK = "127.0.0.1"


def bind_loopback(engine_args: list[str]) -> list[str]:
    """The engine's flags with `--host 127.0.0.1` added unless they name a host.

    vLLM listens on every interface by default, and neither engine asks for a key: an unauthenticated
    server on the network. `--host 0.0.0.0` (after MODEL) exposes it on purpose."""
    if any(a == "--host" or a.startswith("--host=") for a in engine_args):
        return engine_args
    return [*engine_args, "--host", LOOPBACK]


class ServeEngine(str, Enum):
    vllm = "vllm"
    sglang = "sglang"


def register(app: typer.Typer) -> None:
    summary = "Start an engine's OpenAI-compatible server with per-step tracing on (steps, experts per rank)."
    app.command(
        "serve",
        help=summary + "\n" + _SERVE_EXAMPLE + SGLANG_SERVE_EXAMPLE,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(serve)


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(
        ..., help="Model (hub id, directory, or a config.json with --random-weights)."
    ),
    engine: ServeEngine = typer.Option(..., "--engine", help="Serving engine (vllm | sglang)."),
    out: Path = typer.Option(
        ..., "--out", help="Directory for the engine-side trace files (created if missing)."
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id (default: time-model-random)."),
    counts: bool = typer.Option(True, "--counts/--no-counts", help="Record per-step expert token counts."),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Random weights (--load-format dummy); MODEL may be a config.json.",
    ),
    strict_engine: bool = typer.Option(
        False, "--strict-engine", help="Refuse an engine release outside the tested range (default: warn)."
    ),
) -> None:
    """Start the engine's OpenAI server with tracing on; every argument after MODEL goes to the engine."""
    engine_args = bind_loopback(list(ctx.args))
    if engine is ServeEngine.sglang:  # SGLang's server, in its own module (collect/engines/sglang_cli.py)
        from .sglang_cli import serve_from_cli

        return serve_from_cli(
            model, engine_args, out=out, run_id=run_id, counts=counts, strict_engine=strict_engine,
            random_weights=random_weights,
        )  # fmt: skip
    from .vllm_run import serve_command

    serve_command(
        model,
        engine_args,
        out=str(out),
        run_id=run_id,
        counts=counts,
        strict_engine=strict_engine,
        random_weights=random_weights,
    )


def run_from_cli(
    *,
    model: str,
    dataset: str,
    num_prompts: int,
    batch_size: int,
    out: Path,
    random_weights: bool = False,
    dtype: str = "auto",
    max_new_tokens: int | None = None,
    ignore_eos: bool = False,
    seed: int = 0,
    counts: bool = True,
    tokenizer: str | None = None,
    cuda_graphs: str = "auto",
    max_batch_tokens: int | None = None,
    block_size: int | None = None,
    run_id: str | None = None,
    dataset_path: str | None = None,
    engine_args: str | None = None,
    strict_engine: bool = False,
    warmup: int | None = None,
    trace: bool = True,
) -> None:
    """`moecap-collect run --engine vllm …`: the run command hands its options here.

    `engine_args`: further vLLM engine flags as one string, e.g. "--tensor-parallel-size 2"."""
    from .vllm_run import VllmRunOptions, run, vllm_argv

    extra = vllm_argv(shlex.split(engine_args)) if engine_args else {}
    options = VllmRunOptions(
        model=model,
        dataset=dataset,
        num_prompts=num_prompts,
        batch_size=batch_size,
        out=str(out),
        random_weights=random_weights,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        ignore_eos=ignore_eos,
        seed=seed,
        counts=counts,
        tokenizer=tokenizer,
        cuda_graphs=cuda_graphs,
        max_batch_tokens=max_batch_tokens,
        block_size=block_size,
        run_id=run_id,
        dataset_path=dataset_path,
        engine_args=extra,
        strict_engine=strict_engine,
        warmup=warmup,
        trace=trace,
    )
    try:
        result = run(options)
    except KeyboardInterrupt:
        typer.echo("moecap-collect: interrupted", err=True)
        raise typer.Exit(130) from None
    for w in result.warnings:
        typer.echo(f"moecap-collect: warning: {w}", err=True)
    errors = [s["error"] for s in result.worker_stats if s and "error" in s]
    if errors:
        raise CollectError(f"the vLLM workers' tracer did not answer ({errors[0]})")
    files = ", ".join(p.name for p in result.files)
    t = result.timing
    typer.echo(
        f"moecap-collect: engine start {t.get('engine_start_s', 0):.1f} s, warm-up {t.get('warmup_s', 0):.1f} s "
        f"({int(t.get('warmup_requests', 0))} requests), prompts handed over in {1e3 * t.get('submit_s', 0):.1f} ms, "
        f"first token after {1e3 * t.get('first_token_s', 0):.1f} ms",
        err=True,
    )
    typer.echo(
        f"{result.run_id}: {result.steps} steps, {result.requests} requests, {result.output_tokens} output tokens "
        f"in {result.wall_s:.1f} s ({result.tokens_per_s:.1f} tok/s) -> {result.out}/ [{files}]"
    )
