"""`moecap-collect`: a thin typer layer over the collector library.

Each sub-command lives beside the code it drives and registers itself here with one line.
User errors (`CollectError`, `TraceError`) print as one line and exit 2; no tracebacks.
"""

from __future__ import annotations

import sys

import typer

from moecap.schemas import TraceError

from .errors import CollectError

app = typer.Typer(
    name="moecap-collect",
    help="Record per-step traces of an MoE serving engine and a workload (writes Arrow trace files).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # One line per sub-command module; each defines `register(app)`.
    from . import run_command
    from .driver import command as drive_command
    from .engines.sglang import cli as sglang_cli
    from .sweep import command as sweep_command
    from .upload import command as upload_command

    run_command.register(app)  # run and serve, for every engine in the registry
    drive_command.register(app)
    sglang_cli.register(app)
    upload_command.register(app)
    sweep_command.register(app)


def main() -> None:
    """Console-script entry point."""
    _register()
    try:
        app()
    except (CollectError, TraceError) as exc:
        typer.echo(f"moecap-collect: error: {exc}", err=True)
        sys.exit(2)
