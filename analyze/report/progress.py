"""Progress of `report` on stderr: a rich progress bar on a terminal, a line per stage otherwise
(so a log shows where the time went); stdout stays for the summary."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_STAGES = {"charts": "building charts (sections)", "export": "exporting chart files"}


class ReportProgress:
    """Context manager: `loading(done, total, path)` for trace files, `update(stage, done, total)`
    for the report's stages, `stage(text)` for a step without a count."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.bar: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.last: str | None = None

    def __enter__(self) -> ReportProgress:
        if self.live:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.bar.start()
        self.stage("analysing traces")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif exc[0] is None:
            self._line(f"done in {time.monotonic() - self.t0:.1f} s")

    def _line(self, text: str) -> None:
        self.console.print(f"report: {text}", markup=False, highlight=False)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(f"[dim]{text}…[/]")
        else:
            self._line(f"{text} ({time.monotonic() - self.t0:.1f} s)")

    def update(self, stage: str, done: int, total: int) -> None:
        name = _STAGES.get(stage, stage)
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(name, total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total)
        elif stage != self.last or done == total:
            self._line(f"{name} {done}/{total} ({time.monotonic() - self.t0:.1f} s)")
        self.last = stage

    def loading(self, done: int, total: int, path: str) -> None:
        self.update("loading trace files", done, total)
