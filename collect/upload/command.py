"""`moecap-collect upload`: put closed trace files into a bucket prefix (once, or watching a directory)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Annotated

import typer

_EXAMPLE = """

Example: moecap-collect upload traces/ s3://fleet-traces/raw --watch   (beside `moecap-collect serve`)
"""


def upload(
    directory: Annotated[str, typer.Argument(help="Directory the collector writes its trace files to.")],
    dest: Annotated[
        str,
        typer.Argument(help="Bucket prefix (s3://bucket/prefix, any pyarrow filesystem URI) or a directory."),
    ],
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep scanning every --interval seconds until Ctrl-C.")
    ] = False,
    interval_s: Annotated[
        float, typer.Option("--interval", help="Seconds between scans with --watch.")
    ] = 10.0,
    stale_after_s: Annotated[
        float,
        typer.Option(
            "--stale-after",
            help="Upload a file without its end-of-stream marker, flagged as recovered, once it has not "
            "changed for this many seconds (its writer died).",
        ),
    ] = 600.0,
) -> None:
    """Upload closed trace files to DEST/date=…/host=…/run=…/ (recovered ones under …/recovered/).

    Exit 1 when some upload failed after its retries."""
    from .uploader import BackgroundUploader

    def report(item, outcome: str) -> None:
        flag = " (recovered)" if item.recovered else ""
        typer.echo(f"{outcome}: {item.key}{flag}")

    up = BackgroundUploader(dest, on_done=report)
    if watch:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        up.watch(directory, stale_after_s, interval_s)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    else:
        up.scan(directory, stale_after_s)
    stats = up.close()
    for key, error in stats.failed.items():
        typer.echo(f"failed: {key}: {error}", err=True)
    typer.echo(
        f"{len(stats.uploaded)} uploaded, {len(stats.unchanged)} already there, {len(stats.failed)} failed"
    )
    raise typer.Exit(1 if stats.failed else 0)


def register(app: typer.Typer) -> None:
    app.command("upload", help=(upload.__doc__ or "") + _EXAMPLE)(upload)
