"""TraceReader: open trace files, validate them, recover truncated ones, group them by run.

Every problem a user can cause is a `TraceError` whose message names the file and what was expected.
`open_traces(..., strict=False)` collects those per file and still loads the rest.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from .errors import TraceError
from .metadata import RunMetadata
from .tables import SCHEMA_VERSION, TABLES

_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"
_END_OF_STREAM = _STREAM_CONTINUATION + b"\x00\x00\x00\x00"


@dataclass
class TraceFile:
    """One validated trace file."""

    path: Path
    table_kind: str
    schema_version: str
    run: RunMetadata
    table: pa.Table
    batches: int
    complete: bool
    """False when the stream ended without its end-of-stream marker (killed writer, truncation)."""
    lost_bytes: int = 0
    """Bytes after the last complete record batch that could not be read."""
    rows_dropped: int = 0
    """Rows the writer reported dropping (queue full or write errors)."""
    batch_anchors: list[tuple[int, int]] = field(default_factory=list)
    """(monotonic_ns, unix_ns) pairs written with each batch."""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


@dataclass
class TraceRun:
    """All files of one run."""

    run_id: str
    files: list[TraceFile] = field(default_factory=list)

    @property
    def metadata(self) -> RunMetadata:
        """Run metadata of the first engine-side file (else the first file)."""
        engine_files = [f for f in self.files if f.table_kind in ("steps", "experts")]
        return (engine_files or self.files)[0].run

    def tables(self, kind: str) -> list[TraceFile]:
        return [f for f in self.files if f.table_kind == kind]


@dataclass
class TraceSet:
    """What `open_traces` found: the runs, and one error line per file that could not be used."""

    runs: dict[str, TraceRun] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[TraceFile]:
        return [f for run in self.runs.values() for f in run.files]


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files, directories (their *.arrow files) and glob patterns, in sorted order, de-duplicated."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except OSError as exc:  # e.g. a name too long: not a path at all
            raise TraceError(f"{str(raw)[:80]}: not a usable path ({exc.strerror or exc})") from None
        if is_dir:
            found.extend(sorted(p.glob("*.arrow")))
        elif exists:
            found.append(p)
        else:
            matches = sorted(glob.glob(str(raw)))
            if not matches:
                raise TraceError(f"{raw}: no such file, directory or glob match")
            found.extend(Path(m) for m in matches)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_trace_file(path: str | os.PathLike[str]) -> TraceFile:
    """Read and validate one trace file, recovering every complete record batch of a truncated one."""
    batches: list[pa.RecordBatch] = []
    scan = scan_trace_file(path, batches.append)
    table = pa.Table.from_batches(batches, schema=scan.schema) if batches else scan.schema.empty_table()
    _check_nulls(scan.path, scan.table_kind, table)
    return TraceFile(
        path=scan.path,
        table_kind=scan.table_kind,
        schema_version=scan.schema_version,
        run=scan.run,
        table=table,
        batches=scan.batches,
        complete=scan.complete,
        lost_bytes=scan.lost_bytes,
        rows_dropped=scan.rows_dropped,
        batch_anchors=scan.batch_anchors,
        warnings=scan.warnings,
    )


@dataclass
class TraceScan:
    """What `scan_trace_file` learned about a file while streaming its batches to a callback."""

    path: Path
    table_kind: str
    schema_version: str
    run: RunMetadata
    schema: pa.Schema
    batches: int = 0
    rows: int = 0
    complete: bool = False
    lost_bytes: int = 0
    rows_dropped: int = 0
    batch_anchors: list[tuple[int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_trace_header(path: str | os.PathLike[str]) -> TraceScan:
    """Validate a file's schema and metadata without reading its batches."""
    path = Path(path)
    with _open_mapped(path) as source:
        _, _, scan = _open_stream(path, source)
    return scan


def scan_trace_file(path: str | os.PathLike[str], on_batch: Callable[[pa.RecordBatch], None]) -> TraceScan:
    """Stream every complete record batch of a trace file to `on_batch` (memory-mapped, so a file
    larger than memory is fine); stops quietly at a truncation and reports what was lost."""
    path = Path(path)
    with _open_mapped(path) as source:
        size = source.size()
        reader, good_end, scan = _open_stream(path, source)
        while True:
            try:
                batch, custom = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                # pyarrow also stops cleanly at EOF on a message boundary; only the end-of-stream
                # marker written by close() proves the writer finished.
                scan.complete = _ends_with_eos(source, size)
                break
            except (pa.ArrowException, OSError, ValueError, EOFError):
                break
            on_batch(batch)
            scan.batches += 1
            scan.rows += batch.num_rows
            good_end = source.tell()
            info = _batch_info(custom) if custom is not None else None
            if info:
                scan.rows_dropped = max(scan.rows_dropped, int(info.get("rows_dropped_before", 0)))
                if "monotonic_ns" in info and "unix_ns" in info:
                    scan.batch_anchors.append((int(info["monotonic_ns"]), int(info["unix_ns"])))
    if not scan.complete:
        scan.lost_bytes = size - good_end
        scan.warnings.append(
            f"{path}: truncated stream: recovered {scan.batches} complete batch(es), {scan.rows} rows; "
            f"{scan.lost_bytes} trailing byte(s) lost"
        )
    if scan.rows_dropped:
        scan.warnings.append(f"{path}: the writer dropped {scan.rows_dropped} row(s) while recording")
    if scan.schema_version.split(".")[1:2] > SCHEMA_VERSION.split(".")[1:2]:
        scan.warnings.append(
            f"{path}: written by newer format {scan.schema_version} (this reader knows {SCHEMA_VERSION})"
        )
    return scan


class _open_mapped:
    """Memory-map a file (an empty or unreadable one gives a TraceError)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source: pa.MemoryMappedFile | None = None

    def __enter__(self) -> pa.MemoryMappedFile:
        try:
            if self.path.stat().st_size == 0:
                raise TraceError(f"{self.path}: empty file, expected an Arrow IPC stream trace")
            self.source = pa.memory_map(str(self.path), "r")
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        return self.source

    def __exit__(self, *exc: object) -> None:
        if self.source is not None:
            self.source.close()


def _ends_with_eos(source: pa.MemoryMappedFile, size: int) -> bool:
    if size < len(_END_OF_STREAM):
        return False
    return source.read_at(len(_END_OF_STREAM), size - len(_END_OF_STREAM)) == _END_OF_STREAM


def _open_stream(
    path: Path, source: pa.MemoryMappedFile
) -> tuple[ipc.RecordBatchStreamReader, int, TraceScan]:
    head = source.read_at(min(8, source.size()), 0)
    if head[:4] == _PARQUET_MAGIC:
        raise TraceError(f"{path}: is a Parquet file, expected an Arrow IPC stream trace (.arrow)")
    if head[:6] == _ARROW_FILE_MAGIC:
        raise TraceError(
            f"{path}: is an Arrow IPC *file* (random-access format), expected an IPC stream trace"
        )
    if head[:4] != _STREAM_CONTINUATION:
        raise TraceError(f"{path}: not an Arrow IPC stream (bad leading bytes), expected a moecap trace")
    try:
        reader = ipc.open_stream(source)
        schema = reader.schema
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        raise TraceError(f"{path}: truncated or corrupt before the schema ended ({_short(exc)})") from None
    kind, version, run = _validate_schema(path, schema)
    scan = TraceScan(path=path, table_kind=kind, schema_version=version, run=run, schema=schema)
    return reader, source.tell(), scan


def _validate_schema(path: Path, schema: pa.Schema) -> tuple[str, str, RunMetadata]:
    meta = schema.metadata or {}
    if b"moecap.table" not in meta:
        raise TraceError(
            f"{path}: an Arrow stream without moecap metadata (moecap.table), not a moecap trace"
        )
    kind = meta[b"moecap.table"].decode()
    if kind not in TABLES:
        raise TraceError(f"{path}: unknown table kind {kind!r}; expected one of {', '.join(TABLES)}")
    version = meta.get(b"moecap.schema_version", b"").decode()
    major = _major(version)
    if major is None:
        raise TraceError(f"{path}: missing or malformed moecap.schema_version {version!r}; expected semver")
    ours = _major(SCHEMA_VERSION)
    if major > (ours or 0):
        raise TraceError(
            f"{path}: trace format {version} is newer than this moecap understands ({SCHEMA_VERSION}); "
            "upgrade moecap to read it"
        )
    if major < (ours or 0):
        raise TraceError(f"{path}: trace format {version} is older than the supported major {ours}.x")
    if b"moecap.run" not in meta:
        raise TraceError(f"{path}: missing moecap.run metadata")
    run = RunMetadata.from_json(meta[b"moecap.run"], source=str(path))
    names = set(schema.names)
    missing = [c.name for c in TABLES[kind] if c.name not in names]
    if missing:
        raise TraceError(f"{path}: {kind} table lacks required column(s) {', '.join(missing)}")
    for column in TABLES[kind]:
        actual = schema.field(column.name).type
        if actual != column.type:
            raise TraceError(f"{path}: column {kind}.{column.name} has type {actual}, expected {column.type}")
    return kind, version, run


def _check_nulls(path: Path, kind: str, table: pa.Table) -> None:
    for column in TABLES[kind]:
        if not column.nullable and table.column(column.name).null_count:
            raise TraceError(f"{path}: column {kind}.{column.name} holds nulls but is not nullable")


def _major(version: str) -> int | None:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0])


def _batch_info(custom: pa.KeyValueMetadata) -> dict[str, Any] | None:
    raw = custom.get(b"moecap.batch") if hasattr(custom, "get") else None
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_traces(paths: Iterable[str | os.PathLike[str]], *, strict: bool = False) -> TraceSet:
    """Read every trace file under `paths` and group the files by run.

    Each unusable file gives one error line in `TraceSet.errors` and the others still load; with
    `strict=True` the first error (or a truncated file) raises `TraceError` instead.
    """
    result = TraceSet()
    for path in expand_paths(paths):
        try:
            tf = read_trace_file(path)
            if strict and not tf.complete:
                raise TraceError(tf.warnings[0])
            _check_name(tf)
        except TraceError as exc:
            if strict:
                raise
            result.errors.append(str(exc))
            continue
        result.warnings.extend(tf.warnings)
        run = result.runs.setdefault(tf.run.run_id, TraceRun(run_id=tf.run.run_id))
        conflict = _conflict(run, tf)
        if conflict:
            if strict:
                raise TraceError(conflict)
            result.errors.append(conflict)
            continue
        run.files.append(tf)
    return result


def _check_name(tf: TraceFile) -> None:
    error = file_name_error(tf.path, tf.table_kind, tf.run)
    if error:
        raise TraceError(error)


def file_name_error(path: Path, table_kind: str, run: RunMetadata) -> str | None:
    """A one-line error when a file's name names another run than its metadata, else None.

    Our writer names files <run_id>.<tag>.<table>.arrow; a file renamed to another run's id is a mix-up.
    """
    name = path.name
    if name.endswith(f".{table_kind}.arrow") and name.count(".") >= 3:
        prefix = name[: -len(f".{table_kind}.arrow")].rsplit(".", 1)[0]
        if prefix != run.run_id and _looks_like_run_id(prefix):
            return f"{path}: file name says run {prefix!r} but its metadata says {run.run_id!r}"
    return None


DRIVER_ENGINE = "client"
"""`engine.name` of the tables a workload driver (`moecap-collect drive`) writes beside a server's
trace: same run id, other process. Its `model.id` is the name the server serves, which the engine's
files need not repeat (a `--served-model-name`, a local path), so it is compared with other driver
files only."""


def is_driver_side(run: RunMetadata) -> bool:
    return run.engine.name == DRIVER_ENGINE


def mixed_run_error_among(
    existing: Sequence[tuple[RunMetadata, Path]], run: RunMetadata, path: Path
) -> str | None:
    """`mixed_run_error` against the first of `existing` written by the same side (driver or engine)."""
    for first, first_path in existing:
        if is_driver_side(first) == is_driver_side(run):
            return mixed_run_error(first, first_path, run, path)
    return None


def mixed_run_error(first: RunMetadata, first_path: Path, run: RunMetadata, path: Path) -> str | None:
    """A one-line error when `run` (from `path`) claims the run id of `first` but is another run."""
    if first.model.id != run.model.id or first.engine.name != run.engine.name:
        return (
            f"{path}: run {run.run_id!r} mixes files of different runs "
            f"(model {run.model.id!r}/{run.engine.name} vs {first.model.id!r}/{first.engine.name} "
            f"in {first_path.name})"
        )
    return None


def _looks_like_run_id(text: str) -> bool:
    return len(text) > 17 and text[:8].isdigit() and text[8] == "T"


def _conflict(run: TraceRun, tf: TraceFile) -> str | None:
    if not run.files:
        return None
    mixed = mixed_run_error_among([(f.run, f.path) for f in run.files], tf.run, tf.path)
    if mixed:
        return mixed
    for other in run.files:
        if (
            other.table_kind == tf.table_kind
            and other.run.rank == tf.run.rank
            and other.table_kind != "gpu_samples"
        ):
            return f"{tf.path}: duplicate {tf.table_kind} file for run {tf.run.run_id!r} rank {tf.run.rank.tag()}"
    return None
