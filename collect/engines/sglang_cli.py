"""The SGLang branches of `moecap-collect serve` and `run`, and `moecap-collect import-sglang-dump`.

A thin layer: arguments in, `sglang_run.serve_command` / `sglang_run.run` /
`recording.sglang_dump.import_sglang_dumps` called, one line out.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from ..errors import CollectError

SERVE_EXAMPLE = """
SGLang (its own flags after the model; expert counts need its recorder in mode stat, which serve adds):

    moecap-collect serve --engine sglang --out traces/ Qwen/Qwen1.5-MoE-A2.7B --tp-size 2
"""

_IMPORT_EXAMPLE = """
Example (a stat dump of a TP-2 server; counts there are summed over both ranks):

    moecap-collect import-sglang-dump /tmp/sglang/expert_distribution_recorder_1764806400.1.pt \\
        --model-config Qwen/Qwen1.5-MoE-A2.7B --tp-size 2 --out traces/

per_pass / per_token dumps: pass every rank's file (expert_distribution_recorder_<time>_<rank>.pt).
"""


def register(app: typer.Typer) -> None:
    summary = "Convert SGLang's own expert-distribution dumps (.pt) into steps + experts trace files."
    app.command("import-sglang-dump", help=summary + "\n" + _IMPORT_EXAMPLE, no_args_is_help=True)(
        import_command
    )


def import_command(
    dumps: Annotated[
        list[Path],
        typer.Argument(help="expert_distribution_recorder_*.pt files of one run (one recorder mode)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the trace files.")] = Path("traces"),
    model_config: Annotated[
        str | None,
        typer.Option(
            "--model-config", help="config.json (file or folder) or a bundled model name (Org/Name)."
        ),
    ] = None,
    tp_size: Annotated[
        int | None,
        typer.Option("--tp-size", min=1, help="stat dumps: divide the counts (SGLang sums them over ranks)."),
    ] = None,
    sum_ranks: Annotated[
        bool,
        typer.Option(
            "--sum-ranks", help="per_pass / per_token: ranks routed different tokens (DP attention, DeepEP)."
        ),
    ] = False,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id (default: from the dump).")] = None,
) -> None:
    """Import SGLang expert-distribution dumps."""
    from ..recording.sglang_dump import import_sglang_dumps, load_model_config

    config = load_model_config(model_config)
    name = model_config if model_config and not Path(model_config).exists() else None
    result = import_sglang_dumps(
        dumps, out, model_config=config, model_id=name, tp_size=tp_size, sum_ranks=sum_ranks, run_id=run_id
    )
    typer.echo(f"{result.run_id}: {len(result.paths)} files ({result.summary})", err=True)
    if result.summary.startswith("stat") and tp_size is None:
        typer.echo(
            "warning: stat counts are SGLang's sum over ranks (x tp_size under plain TP); "
            "pass --tp-size to divide",
            err=True,
        )
    for p in result.paths:
        typer.echo(f"  wrote {p}", err=True)


def serve_from_cli(
    model: str,
    sglang_args: list[str],
    *,
    out: Path,
    run_id: str | None,
    counts: bool,
    strict_engine: bool,
    random_weights: bool,
) -> None:
    """`moecap-collect serve --engine sglang MODEL [SGLang flags…]`: the serve command hands its options here."""
    from .sglang_run import serve_command

    status = serve_command(
        model,
        sglang_args,
        out=str(out),
        run_id=run_id,
        counts=counts,
        strict_engine=strict_engine,
        random_weights=random_weights,
    )
    if status:  # a server ended by a signal: the shell's 128 + signal number
        raise typer.Exit(status if status > 0 else 128 - status)


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
    run_id: str | None = None,
    dataset_path: str | None = None,
    engine_args: str | None = None,
    strict_engine: bool = False,
    warmup: int | None = None,
    trace: bool = True,
) -> None:
    """`moecap-collect run --engine sglang …`: the run command hands its options here.

    `engine_args`: further SGLang server flags as one string, e.g. "--tp-size 2"."""
    from .sglang_run import SglangRunOptions, run, sglang_argv

    extra = sglang_argv(shlex.split(engine_args)) if engine_args else {}
    options = SglangRunOptions(
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
    errors = [e for s in result.tracer_stats for e in s.get("errors") or []]
    if errors:
        raise CollectError(f"the SGLang schedulers' tracer stopped ({errors[0]})")
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
