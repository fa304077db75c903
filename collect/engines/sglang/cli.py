"""`moecap-collect import-sglang-dump`: SGLang's own expert-distribution dumps into trace files (`dump.py`).
(`run` and `serve --engine sglang` go through the engine registry: `SglangEngine` in `runner.py`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    from .dump import import_sglang_dumps, load_model_config

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
