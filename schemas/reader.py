"""TraceReader: open trace files, validate them, recover truncated ones, group them by run.

Every problem a user can cause is a `TraceError` whose message names the file and what was expected.
`open_traces(..., strict=False)` collects those per file and still loads the rest.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
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
        if p.is_dir():
            found.extend(sorted(p.glob("*.arrow")))
        elif p.exists():
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
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _read_bytes(path, data)


def _read_bytes(path: Path, data: bytes) -> TraceFile:
    if not data:
        raise TraceError(f"{path}: empty file, expected an Arrow IPC stream trace")
    if data[:4] == _PARQUET_MAGIC:
        raise TraceError(f"{path}: is a Parquet file, expected an Arrow IPC stream trace (.arrow)")
    if data[:6] == _ARROW_FILE_MAGIC:
        raise TraceError(
            f"{path}: is an Arrow IPC *file* (random-access format), expected an IPC stream trace"
        )
    if data[:4] != _STREAM_CONTINUATION:
        raise TraceError(f"{path}: not an Arrow IPC stream (bad leading bytes), expected a moecap trace")
    source = pa.BufferReader(pa.py_buffer(data))
    try:
        reader = ipc.open_stream(source)
        schema = reader.schema
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        raise TraceError(f"{path}: truncated or corrupt before the schema ended ({_short(exc)})") from None

    kind, version, run = _validate_schema(path, schema)
    batches: list[pa.RecordBatch] = []
    anchors: list[tuple[int, int]] = []
    rows_dropped = 0
    good_end = source.tell()
    complete = False
    warnings: list[str] = []
    while True:
        try:
            batch, custom = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            # pyarrow also stops cleanly at EOF on a message boundary; only the end-of-stream
            # marker written by close() proves the writer finished.
            complete = data.endswith(_END_OF_STREAM)
            break
        except (pa.ArrowException, OSError, ValueError, EOFError):
            break
        batches.append(batch)
        good_end = source.tell()
        if custom is not None:
            info = _batch_info(custom)
            if info:
                rows_dropped = max(rows_dropped, int(info.get("rows_dropped_before", 0)))
                if "monotonic_ns" in info and "unix_ns" in info:
                    anchors.append((int(info["monotonic_ns"]), int(info["unix_ns"])))
    lost = len(data) - good_end if not complete else 0
    table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    if not complete:
        warnings.append(
            f"{path}: truncated stream: recovered {len(batches)} complete batch(es), {table.num_rows} rows; "
            f"{lost} trailing byte(s) lost"
        )
    if rows_dropped:
        warnings.append(f"{path}: the writer dropped {rows_dropped} row(s) while recording")
    _check_nulls(path, kind, table)
    if version != SCHEMA_VERSION and version.split(".")[1:2] > SCHEMA_VERSION.split(".")[1:2]:
        warnings.append(f"{path}: written by newer format {version} (this reader knows {SCHEMA_VERSION})")
    return TraceFile(
        path=path,
        table_kind=kind,
        schema_version=version,
        run=run,
        table=table,
        batches=len(batches),
        complete=complete,
        lost_bytes=lost,
        rows_dropped=rows_dropped,
        batch_anchors=anchors,
        warnings=warnings,
    )


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
    # Our writer names files <run_id>.<tag>.<table>.arrow; a file renamed to another run's id is a mix-up.
    name = tf.path.name
    if name.endswith(f".{tf.table_kind}.arrow") and name.count(".") >= 3:
        prefix = name[: -len(f".{tf.table_kind}.arrow")].rsplit(".", 1)[0]
        if prefix != tf.run.run_id and _looks_like_run_id(prefix):
            raise TraceError(
                f"{tf.path}: file name says run {prefix!r} but its metadata says {tf.run.run_id!r}"
            )


def _looks_like_run_id(text: str) -> bool:
    return len(text) > 17 and text[:8].isdigit() and text[8] == "T"


def _conflict(run: TraceRun, tf: TraceFile) -> str | None:
    if not run.files:
        return None
    first = run.files[0].run
    if first.model.id != tf.run.model.id or first.engine.name != tf.run.engine.name:
        return (
            f"{tf.path}: run {tf.run.run_id!r} mixes files of different runs "
            f"(model {tf.run.model.id!r}/{tf.run.engine.name} vs {first.model.id!r}/{first.engine.name} "
            f"in {run.files[0].path.name})"
        )
    for other in run.files:
        if (
            other.table_kind == tf.table_kind
            and other.run.rank == tf.run.rank
            and other.table_kind != "gpu_samples"
        ):
            return f"{tf.path}: duplicate {tf.table_kind} file for run {tf.run.run_id!r} rank {tf.run.rank.tag()}"
    return None
