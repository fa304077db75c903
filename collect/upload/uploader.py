"""Put closed trace files into object storage, laid out by date / host / run, off the engine's path.

Which files go up:
  * a *closed* file: it ends with the Arrow end-of-stream marker, which only the writer's close()
    writes (`moecap.schemas` writer), so it will not change again;
  * a file without the marker that nobody has touched for `stale_after_s` (its writer died): it goes
    up flagged as *recovered*, under `…/run=<id>/recovered/<name>` (S3 keeps no flag the analyzer's
    listing can see, so the flag is in the key); the analyzer recovers its complete batches and says so;
  * a file still being written waits for the next scan.
Keys: `<dest>/date=<YYYY-MM-DD>/host=<host>/run=<run_id>/<file name>`, from the file's own metadata
(`moecap.run`: created_at, host, run_id). An object is written whole or not at all (S3 multipart
upload completes on close), and a file already in the bucket with the same size is not sent again.

`BackgroundUploader` does the uploads on its own thread, fed by `submit` (which never blocks) or by
`watch` (a directory scanned every few seconds), so a serving engine never waits on the network.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from moecap.schemas import TraceError, read_trace_header
from moecap.schemas.reader import _END_OF_STREAM

from ..errors import CollectError

RECOVERED_DIR = "recovered"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 8 << 20


def is_closed(path: str | os.PathLike[str]) -> bool:
    """Whether a trace file ends with the end-of-stream marker its writer writes on close."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < len(_END_OF_STREAM):
                return False
            f.seek(size - len(_END_OF_STREAM))
            return f.read() == _END_OF_STREAM
    except OSError:
        return False


def _part(value: object) -> str:
    return _UNSAFE.sub("_", str(value or "")).strip("_") or "unknown"


def object_key(path: str | os.PathLike[str], recovered: bool = False) -> str:
    """`date=…/host=…/run=…/[recovered/]<name>` of a trace file, from its metadata (TraceError when
    the file is not a moecap trace)."""
    run = read_trace_header(path).run
    parts = [
        f"date={_part(str(run.created_at)[:10])}",
        f"host={_part(run.host)}",
        f"run={_part(run.run_id)}",
    ]
    if recovered:
        parts.append(RECOVERED_DIR)
    return "/".join([*parts, Path(path).name])


def resolve_destination(dest: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) of a destination URI (`s3://bucket/prefix`) or local directory."""
    try:
        if "://" in dest:
            return pafs.FileSystem.from_uri(dest)
        return pafs.LocalFileSystem(), os.path.abspath(dest)
    except (ValueError, OSError) as exc:
        raise CollectError(f"{dest}: not a usable upload destination ({exc})") from None


@dataclass
class Planned:
    """A file to upload and the key it goes to (relative to the destination)."""

    path: Path
    key: str
    recovered: bool


def plan(directory: str | os.PathLike[str], stale_after_s: float, now: float | None = None) -> list[Planned]:
    """The `*.arrow` files under `directory` that may go up now (see the module doc)."""
    now = time.time() if now is None else now
    out = []
    for path in sorted(Path(directory).rglob("*.arrow")):
        closed = is_closed(path)
        if not closed:
            try:
                idle = now - path.stat().st_mtime
            except OSError:
                continue
            if idle < stale_after_s:
                continue  # still being written
        try:
            key = object_key(path, recovered=not closed)
        except TraceError:
            continue  # not a trace (or its schema is not even written yet)
        out.append(Planned(path=path, key=key, recovered=not closed))
    return out


def upload_file(path: str | os.PathLike[str], fs: pafs.FileSystem, base: str, key: str) -> bool:
    """Copy one file to `base/key` (streaming). False when an object of the same size is there."""
    target = f"{base.rstrip('/')}/{key}"
    size = os.path.getsize(path)
    info = fs.get_file_info(target)
    if info.type == pafs.FileType.File and info.size == size:
        return False
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories to make (nor markers)
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with open(path, "rb") as src, fs.open_output_stream(target) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
    return True


@dataclass
class UploadStats:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """key -> last error (after the retries)."""


class BackgroundUploader:
    """Uploads on a daemon thread. `submit(planned)` queues without blocking; `watch(dir)` scans a
    directory every `interval_s` and queues what `plan` allows (each key once); `close()` drains."""

    def __init__(
        self,
        dest: str,
        *,
        retries: int = 3,
        backoff_s: float = 1.0,
        on_done: Callable[[Planned, str], None] | None = None,
    ) -> None:
        self.fs, self.base = resolve_destination(dest)
        self.retries = retries
        self.backoff_s = backoff_s
        self.on_done = on_done
        self.stats = UploadStats()
        self._queue: queue.SimpleQueue[Planned | None] = queue.SimpleQueue()
        self._queued: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="moecap-upload", daemon=True)
        self._thread.start()
        self._watcher: threading.Thread | None = None

    def submit(self, planned: Planned) -> None:
        key = (str(planned.path), planned.key)
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put(planned)

    def scan(self, directory: str | os.PathLike[str], stale_after_s: float) -> None:
        for p in plan(directory, stale_after_s):
            self.submit(p)

    def watch(
        self, directory: str | os.PathLike[str], stale_after_s: float, interval_s: float = 10.0
    ) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.scan(directory, stale_after_s)
                self._stop.wait(interval_s)

        self._watcher = threading.Thread(target=loop, name="moecap-upload-watch", daemon=True)
        self._watcher.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            outcome = "failed"
            for attempt in range(self.retries + 1):
                try:
                    sent = upload_file(item.path, self.fs, self.base, item.key)
                    (self.stats.uploaded if sent else self.stats.unchanged).append(item.key)
                    self.stats.failed.pop(item.key, None)
                    outcome = "uploaded" if sent else "unchanged"
                    break
                except OSError as exc:
                    self.stats.failed[item.key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if attempt < self.retries:
                        time.sleep(self.backoff_s * 2**attempt)
            if outcome == "failed":
                # A later scan may try again (the file is still on disk; nothing is lost).
                self._queued.discard((str(item.path), item.key))
            if self.on_done:
                self.on_done(item, outcome)

    def close(self, timeout_s: float | None = None) -> UploadStats:
        """Stop watching, upload what is queued, and return the stats."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)
        return self.stats
