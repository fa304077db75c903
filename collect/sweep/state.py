"""A sweep's record of itself: `<out>/sweep.json`, one entry per point, rewritten atomically after
every change, so a killed sweep leaves a true account of what finished.

A point is *recorded* when its entry says `done` and every trace file of its run is in `<out>` and
ends with the Arrow end-of-stream marker (closed by its writer). Anything else is run again on a
re-run: the files of an earlier, unfinished attempt (killed, interrupted, failed) are moved into
`<out>/incomplete/` first — kept, but out of the folder the analyzer reads (an empty file, created but
never written because a stop signal landed while it was being opened, holds nothing and is removed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import TraceError, scan_trace_file

from ..errors import CollectError
from .matrix import Point

STATE_FILE = "sweep.json"
INCOMPLETE_DIR = "incomplete"
SCHEMA = "moecap.sweep/1"
STATUSES = ("pending", "running", "done", "failed", "interrupted", "killed")
"""A point's status is its last attempt's; `killed` is a `running` attempt found by a later run."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Attempt:
    """One try at recording a point."""

    run_id: str
    status: str = "running"
    reason: str | None = None
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    files: list[str] = field(default_factory=list)
    """Trace files of the attempt, relative to the sweep folder (an unfinished one's under incomplete/)."""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PointState:
    key: str
    slug: str
    point: dict[str, Any]
    status: str = "pending"
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        return self.attempts[-1].run_id if self.attempts else None

    @property
    def reason(self) -> str | None:
        return self.attempts[-1].reason if self.attempts else None


class SweepState:
    """`<out>/sweep.json`: the points of a sweep and what became of each."""

    def __init__(self, out: Path, points: dict[str, PointState] | None = None) -> None:
        self.out = out
        self.points: dict[str, PointState] = points or {}

    @property
    def path(self) -> Path:
        return self.out / STATE_FILE

    @classmethod
    def load(cls, out: Path) -> SweepState:
        """The state in `out` (empty when there is none yet)."""
        path = out / STATE_FILE
        if not path.exists():
            return cls(out)
        try:
            data = json.loads(path.read_text())
            points = {}
            for key, p in data["points"].items():
                attempts = [Attempt(**a) for a in p.get("attempts", [])]
                points[key] = PointState(
                    key=key, slug=p["slug"], point=p["point"], status=p["status"], attempts=attempts
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CollectError(
                f"{path}: not a readable sweep state ({type(exc).__name__}: {exc}); move it away to start afresh"
            ) from None
        if data.get("schema") != SCHEMA:
            raise CollectError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}")
        return cls(out, points)

    def save(self) -> None:
        """Write the state atomically (temporary file, fsync, rename)."""
        doc = {
            "schema": SCHEMA,
            "updated_at": _now(),
            "points": {
                k: {
                    "slug": p.slug,
                    "status": p.status,
                    "run_id": p.run_id,
                    "reason": p.reason,
                    "point": p.point,
                    "attempts": [a.__dict__ for a in p.attempts],
                }
                for k, p in self.points.items()
            },
        }
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".sweep-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def entry(self, point: Point) -> PointState:
        """The entry of `point` (created pending when new)."""
        found = self.points.get(point.key)
        if found is None:
            found = PointState(key=point.key, slug=point.slug, point=point.identity())
            self.points[point.key] = found
        return found

    # -- recorded or not ----------------------------------------------------------------------------
    def is_recorded(self, point: Point) -> bool:
        """True when the point's last attempt is done and all its files are present and closed."""
        entry = self.points.get(point.key)
        if entry is None or entry.status != "done" or not entry.attempts:
            return False
        files = entry.attempts[-1].files
        return bool(files) and all(file_closed(self.out / name) for name in files)

    def set_aside(self, point: Point) -> list[Path]:
        """Move the files of the point's earlier attempts out of the sweep folder (into incomplete/)."""
        entry = self.points.get(point.key)
        if entry is None:
            return []
        moved = []
        for attempt in entry.attempts:
            here = self._set_aside_run(attempt.run_id)
            if attempt.status == "running":  # the sweep process died during this attempt
                attempt.status = "killed"
                attempt.reason = "the sweep ended during this point (killed); its files were not closed"
                attempt.files = [str(p.relative_to(self.out)) for p in here]
            moved += here
        return moved

    def _set_aside_run(self, run_id: str) -> list[Path]:
        moved: list[Path] = []
        for path in sorted(self.out.glob(f"{run_id}.*.arrow")):
            if path.stat().st_size == 0:
                # Created, never written (a stop signal while its writer was being opened): it holds
                # no schema and no row, so removing it loses nothing.
                path.unlink()
                continue
            target_dir = self.out / INCOMPLETE_DIR
            target_dir.mkdir(exist_ok=True)
            target = target_dir / path.name
            shutil.move(str(path), str(target))
            moved.append(target)
        return moved

    # -- transitions --------------------------------------------------------------------------------
    def begin(self, point: Point, run_id: str) -> Attempt:
        entry = self.entry(point)
        attempt = Attempt(run_id=run_id)
        entry.attempts.append(attempt)
        entry.status = "running"
        self.save()
        return attempt

    def finish(
        self,
        point: Point,
        status: str,
        *,
        reason: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        entry = self.entry(point)
        attempt = entry.attempts[-1]
        attempt.status = status
        attempt.reason = reason
        attempt.finished_at = _now()
        if status == "done":
            attempt.files = sorted(p.name for p in self.out.glob(f"{attempt.run_id}.*.arrow"))
        else:  # an unfinished run's files are kept, out of the folder the analyzer reads
            moved = self._set_aside_run(attempt.run_id)
            attempt.files = [str(p.relative_to(self.out)) for p in moved]
        attempt.summary = summary or {}
        entry.status = status
        self.save()


def file_closed(path: Path) -> bool:
    """True when `path` is a readable trace whose writer closed it (end-of-stream marker present)."""
    if not path.is_file():
        return False
    try:
        return scan_trace_file(path, lambda _batch: None).complete
    except TraceError:
        return False
