"""`moecap-collect sweep`: a thin layer over `moecap.collect.sweep` (parse the matrix, run it, show the table)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CollectError
from .execute import run_sweep, show_table, table_command
from .matrix import expand, load_spec

_EXAMPLE = """
Example (CPU, a tiny random-weight MoE, 2 tasks x 2 batch sizes = 4 runs, one model load):

    moecap-collect sweep --engine hf --model collect/models/tiny-qwen2-moe/config.json --random-weights \\
        --task synthetic:64x16 --task synthetic:128x16 --batch-sizes 1,4 --waves 2 --out sweep-out/

The same from a YAML file (keys = the long option names, lists for the matrix axes):

    moecap-collect sweep --config sweep.yaml --out sweep-out/

Re-running the same command skips the points already recorded. vLLM, one engine per batch size as
MoE-CAP's guide restarts its server: --engine vllm --engine-args "--max-num-seqs {batch_size}".
SGLang (--engine sglang) starts one engine per point, each exactly as `run --engine sglang` starts it.
"""


def register(app: typer.Typer) -> None:
    summary = (
        "Run a benchmark matrix (models x tasks x batch sizes x repeats), one recorded run per point, "
        "resumable; then print the MoE-CAP-style table."
    )
    app.command("sweep", help=summary + "\n" + _EXAMPLE)(sweep)


def sweep(
    out: Path = typer.Option(..., "--out", help="Folder for every point's trace files and sweep.json."),
    config: Path | None = typer.Option(
        None, "--config", help="A YAML file with the matrix (see docs/sweep.md)."
    ),
    engine: list[str] = typer.Option([], "--engine", help="hf | vllm | sglang (repeatable)."),
    model: list[str] = typer.Option(
        [], "--model", help="config.json, model directory or hub id (repeatable)."
    ),
    engine_args: list[str] = typer.Option(
        [],
        "--engine-args",
        help='vLLM / SGLang flags as one string (repeatable); "{batch_size}" is replaced per point.',
    ),
    task: list[str] = typer.Option(
        [],
        "--task",
        help="synthetic:<in>x<out>, gsm8k, gsm8k:4000x1000, longbench_v2:13000x1000, … (repeatable).",
    ),
    batch_sizes: str | None = typer.Option(
        None, "--batch-sizes", "--concurrencies", help="Comma-separated requests in flight, e.g. 1,32,64,128."
    ),
    num_prompts: int | None = typer.Option(None, "--num-prompts", min=1, help="Prompts per point."),
    waves: int | None = typer.Option(
        None, "--waves", min=1, help="Prompts per point = waves x batch size (instead of --num-prompts)."
    ),
    repeats: int | None = typer.Option(
        None, "--repeats", min=1, help="Runs per (task, batch size); default 1."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Output tokens per request (default: the task's)."
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, hidden=True),
    random_weights: bool | None = typer.Option(
        None, "--random-weights/--checkpoint-weights", help="Random weights from the config (no download)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 | auto."),
    device: str | None = typer.Option(None, "--device", help="hf: auto | cpu | cuda | cuda:N."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer for text datasets."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the workload sample and random weights."),
    dataset_path: str | None = typer.Option(None, "--dataset-path", help="Local copy of a named dataset."),
    counts: bool | None = typer.Option(
        None, "--counts/--no-counts", help="Record per-step expert token counts (default on)."
    ),
    cuda_graphs: str | None = typer.Option(None, "--cuda-graphs", help="auto | on | off."),
    attn_implementation: str | None = typer.Option(
        None, "--attn-implementation", help="hf: e.g. sdpa, eager."
    ),
    max_batch_tokens: int | None = typer.Option(
        None, "--max-batch-tokens", min=1, help="hf: tokens per forward pass."
    ),
    name: str | None = typer.Option(None, "--name", help="Sweep name, in every run's workload metadata."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed point."),
    table: bool = typer.Option(True, "--table/--no-table", help="Print the matrix table at the end."),
    analyze_args: str = typer.Option(
        "", "--analyze-args", help='Extra moecap-analyze flags for the table, e.g. "--gpu H100".'
    ),
) -> None:
    """Run the matrix; see the examples above."""
    if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
        raise CollectError("--max-tokens and --max-new-tokens (its old name) disagree: pass one")
    overrides = {
        "engines": engine,
        "models": model,
        "engine_args": engine_args,
        "tasks": task,
        "batch_sizes": batch_sizes,
        "num_prompts": num_prompts,
        "waves": waves,
        "repeats": repeats,
        "max_new_tokens": max_tokens or max_new_tokens,
        "random_weights": random_weights,
        "dtype": dtype,
        "device": device,
        "tokenizer": tokenizer,
        "seed": seed,
        "dataset_path": dataset_path,
        "counts": counts,
        "cuda_graphs": cuda_graphs,
        "attn_implementation": attn_implementation,
        "max_batch_tokens": max_batch_tokens,
        "name": name,
    }
    spec = load_spec(config, overrides)
    points = expand(spec)

    def log(line: str) -> None:
        typer.echo(line, err=True)

    log(f"sweep: {len(points)} point(s) -> {out}/")
    outcome = run_sweep(points, out, name=spec.name, fail_fast=fail_fast, log=log)
    recorded = len(outcome.skipped) + len(outcome.recorded)
    log(
        f"sweep: {recorded}/{outcome.total} recorded ({len(outcome.recorded)} now, {len(outcome.skipped)} before), "
        f"{len(outcome.failed)} failed, {len(outcome.not_run)} not run; state in {out / 'sweep.json'}"
    )
    if outcome.stopped:
        log("sweep: interrupted; re-run the same command to record the rest")
        raise typer.Exit(130)
    if table and recorded:
        show_table(out, analyze_args, log=log)
    elif recorded:
        log("sweep: table: " + " ".join(table_command(out, analyze_args)))
    if outcome.failed or outcome.not_run:
        raise CollectError(
            f"{len(outcome.failed)} point(s) failed"
            + (f", {len(outcome.not_run)} not run (--fail-fast)" if outcome.not_run else "")
            + f"; reasons in {out / 'sweep.json'}"
        )
