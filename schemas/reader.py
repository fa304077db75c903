"""TraceReader: open trace files, validate them, recover truncated ones, group them by run.

Every problem a user can cause is a `TraceError` whose message names the file and what was expected.
`open_traces(..., strict=False)` collects those per file and still loads the rest.

Every record batch is fully validated (`validate(full=True)`: offsets, dictionary indices, UTF-8)
and its checksum verified before any consumer sees it, so a corrupt batch is left out with one
warning line naming the file, the batch and what was wrong, and the file's good batches are kept.
After a framing error the reader walks the file message by message and resynchronises on the next
message marker, so the batches after a damaged stretch are kept too.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from . import integrity
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
    corrupt_batches: int = 0
    """Record batches (or unreadable stretches of bytes) left out as corrupt; see `problems`."""
    corrupt_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    """One line per corrupt batch or stretch: where (batch number, byte offset) and what was wrong."""
    integrity: str = "unchecked"
    """"verified" (every kept batch passed its checksum), "unchecked" (written before checksums,
    format 1.0) or "partly unchecked" (some batches could not be verified)."""
    unchecked_batches: int = 0
    drops: list[dict[str, Any]] = field(default_factory=list)
    """The writer's dropped rows by cause: {"field", "reason", "rows", "example"?}; field "*" = whole row."""

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
    """Read and validate one trace file, recovering every complete, valid record batch of a truncated
    or corrupt one."""
    batches: list[pa.RecordBatch] = []
    scan = scan_trace_file(path, batches.append)
    table = pa.Table.from_batches(batches, schema=scan.schema) if batches else scan.schema.empty_table()
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
        corrupt_batches=scan.corrupt_batches,
        corrupt_bytes=scan.corrupt_bytes,
        problems=scan.problems,
        integrity=scan.integrity,
        unchecked_batches=scan.unchecked_batches,
        drops=scan.drops,
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
    """True when the stream ends with the end-of-stream marker written by the writer's close()."""
    lost_bytes: int = 0
    """Trailing bytes after the last readable message (a truncated file)."""
    rows_dropped: int = 0
    batch_anchors: list[tuple[int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    corrupt_batches: int = 0
    """Record batches (or unreadable stretches of bytes) left out as corrupt."""
    corrupt_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    """One line per corrupt batch or stretch: where and what was wrong (summarised in `warnings`)."""
    integrity: str = "unchecked"
    """"verified", "unchecked" (a format 1.0 file, written before checksums) or "partly unchecked"."""
    unchecked_batches: int = 0
    drops: list[dict[str, Any]] = field(default_factory=list)
    """The writer's dropped rows by cause: {"field", "reason", "rows", "example"?}; field "*" = whole row."""
    checksums_expected: bool = field(default=False, repr=False)
    _drops_at: int = field(default=-1, repr=False)


def read_trace_header(path: str | os.PathLike[str]) -> TraceScan:
    """Validate a file's schema and metadata without reading its batches."""
    path = Path(path)
    with _open_mapped(path) as source:
        _, _, scan = _open_stream(path, source)
    return scan


def scan_trace_file(path: str | os.PathLike[str], on_batch: Callable[[pa.RecordBatch], None]) -> TraceScan:
    """Stream every complete, valid record batch of a trace file to `on_batch` (memory-mapped, so a
    file larger than memory is fine). Each batch is fully validated and its checksum verified first;
    a corrupt batch is left out and named in `warnings` (one line per file), a truncation stops
    quietly, and what was lost is reported."""
    path = Path(path)
    with _open_mapped(path) as source:
        size = source.size()
        reader, schema_end, scan = _open_stream(path, source)
        pos = schema_end
        resync_from: int | None = None
        while True:
            try:
                batch, custom = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                if source.tell() < size:  # an end-of-stream marker before the end of the file
                    resync_from = pos
                break
            except _READ_ERRORS:
                resync_from = pos
                break
            if _batch_problem(batch, custom, scan) is not None:
                resync_from = pos  # the walker re-reads it, names it and goes on after it
                break
            _deliver(batch, custom, scan, on_batch)
            pos = source.tell()
        if resync_from is None:
            scan.complete = _ends_with_eos(source, size) and source.tell() == size
            if not scan.complete:
                scan.lost_bytes = size - pos
        else:
            _walk(path, source, size, schema_end, resync_from, scan, on_batch)
    _finish_scan(scan)
    return scan


_READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, MemoryError, IndexError, TypeError)


def _batch_problem(batch: pa.RecordBatch, custom: Any, scan: TraceScan) -> str | None:
    """What is wrong with a batch as read (None when nothing): invalid arrays, a null in a required
    column, a missing, malformed or mismatching checksum. Counts unverifiable batches in `scan`.

    Basic validation first (buffer sizes agree with lengths, O(columns)), so the checksum reads only
    memory that is there; then the checksum. A batch whose checksum verifies is logically identical
    to the batch the writer wrote, which the writer built valid (pyarrow's converters, or a full
    validation of a prebuilt batch), so full validation (offsets monotonic, dictionary indices in
    range, UTF-8: ~30% of a steps file's read time) runs for every batch that is not verified."""
    try:
        batch.validate()
    except (pa.ArrowException, ValueError) as exc:
        return f"invalid arrays ({_short(exc)})"
    columns = batch.columns
    by_name = dict(zip(batch.schema.names, columns))
    for column in TABLES[scan.table_kind]:
        if not column.nullable and by_name[column.name].null_count:
            return f"null in required column {scan.table_kind}.{column.name}"
    verified = False
    stored = _meta_get(custom, integrity.CHECKSUM_KEY)
    if stored is None:
        if scan.checksums_expected:
            return "checksum missing"
        scan.unchecked_batches += 1
    else:
        parsed = integrity.parse_checksum(stored)
        if parsed is None:
            return f"malformed checksum {stored[:40]!r}"
        algorithm, value = parsed
        if integrity.available(algorithm):
            info = _meta_get(custom, b"moecap.batch") or b""
            try:
                actual = integrity.batch_checksum(batch, info, algorithm, columns)
            except (pa.ArrowException, ValueError, IndexError, TypeError) as exc:
                return f"invalid arrays ({_short(exc)})"
            if actual != value:
                return "checksum mismatch (the content differs from what was written)"
            verified = True
        else:
            scan.unchecked_batches += 1
    if not verified:
        try:
            batch.validate(full=True)
        except (pa.ArrowException, ValueError) as exc:
            return f"invalid arrays ({_short(exc)})"
    return None


def _deliver(
    batch: pa.RecordBatch, custom: Any, scan: TraceScan, on_batch: Callable[[pa.RecordBatch], None]
) -> None:
    on_batch(batch)
    scan.batches += 1
    scan.rows += batch.num_rows
    info = _batch_info(custom) if custom is not None else None
    if info:
        dropped = _int(info.get("rows_dropped_before"))
        if dropped is not None and dropped > scan._drops_at:
            scan._drops_at = dropped
            scan.rows_dropped = max(scan.rows_dropped, dropped)
            drops = info.get("drops")
            if isinstance(drops, list):
                scan.drops = [d for d in drops if isinstance(d, dict)]
        mono, unix = _int(info.get("monotonic_ns")), _int(info.get("unix_ns"))
        if mono is not None and unix is not None:
            scan.batch_anchors.append((mono, unix))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _meta_get(custom: Any, key: bytes) -> bytes | None:
    if custom is None:
        return None
    try:
        value = custom.get(key)
    except (AttributeError, TypeError, ValueError):
        return None
    return value if isinstance(value, bytes) else None


def _walk(
    path: Path,
    source: pa.MemoryMappedFile,
    size: int,
    schema_end: int,
    start: int,
    scan: TraceScan,
    on_batch: Callable[[pa.RecordBatch], None],
) -> None:
    """The slow path, from the first message at `start` that failed to read or check: walk the
    messages one by one, decode each record batch on its own (schema + current dictionary + batch),
    and after a bad message resynchronise on the next 8-byte-aligned message marker. A damaged
    stretch that runs to the end of a file without its end-of-stream marker is a truncation."""
    schema_bytes = source.read_at(schema_end, 0)
    dictionary = b""
    o = schema_end
    # Messages before `start` were read and checked by the fast path: only their dictionaries matter.
    try:
        while o < start:
            source.seek(o)
            msg = ipc.read_message(source)
            if msg.type == "dictionary":
                dictionary = msg.serialize().to_pybytes()
            o = source.tell()
    except _READ_ERRORS:  # pragma: no cover - these messages already read once
        pass
    o = start
    damage: tuple[int, str] | None = None  # (start offset, first error) of the stretch being skipped
    last_batch_end = start  # a dictionary without its batch is lost with it
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while o + 8 <= size:
            if o + 8 == size and mm[o:size] == _END_OF_STREAM:
                scan.complete = True
                break
            problem, end, kind, payload = _read_message_at(source, o, scan, schema_bytes, dictionary)
            if problem is None:
                if damage is not None:
                    _note_damage(scan, path, damage, o)
                    damage = None
                if kind == "dictionary":
                    dictionary = payload
                elif kind == "record batch":
                    _deliver(payload[0], payload[1], scan, on_batch)
                    last_batch_end = end
                o = end
                continue
            if damage is None:
                damage = (o, problem)
            o = _next_marker(mm, o + 8, size)
        if damage is not None and scan.complete:
            _note_damage(scan, path, damage, size - len(_END_OF_STREAM))
        elif not scan.complete:
            scan.lost_bytes = size - min(last_batch_end, damage[0] if damage else size)


def _read_message_at(
    source: pa.MemoryMappedFile, o: int, scan: TraceScan, schema_bytes: bytes, dictionary: bytes
) -> tuple[str | None, int, str, Any]:
    """(problem or None, end offset, message type, payload) of the message at byte `o`; the payload
    is a dictionary message's bytes or a checked (batch, custom metadata)."""
    try:
        source.seek(o)
        msg = ipc.read_message(source)
        end = source.tell()
        kind = msg.type
    except _READ_ERRORS as exc:
        return f"unreadable message ({_short(exc)})", o, "", None
    size = source.size()
    if end < size and (
        end % 8 or not _STREAM_CONTINUATION.startswith(source.read_at(min(4, size - end), end))
    ):
        # A corrupt body length: the message does not end where a message (or the file) starts.
        # Not decoded (its "body" may be the rest of the file).
        return "message length does not lead to the next message", end, kind, None
    if kind == "dictionary":
        return None, end, kind, msg.serialize().to_pybytes()
    if kind != "record batch":
        return f"unexpected {kind} message", end, kind, None
    try:
        one = pa.py_buffer(schema_bytes + dictionary + msg.serialize().to_pybytes())
        batch, custom = ipc.open_stream(one).read_next_batch_with_custom_metadata()
    except (*_READ_ERRORS, StopIteration) as exc:
        return f"undecodable record batch ({_short(exc)})", end, kind, None
    problem = _batch_problem(batch, custom, scan)
    if problem is not None:
        return f"record batch {problem}", end, kind, None
    return None, end, kind, (batch, custom)


def _next_marker(mm: mmap.mmap, start: int, size: int) -> int:
    """The next 8-byte-aligned offset >= start holding a message continuation marker, else size."""
    o = start
    while True:
        o = mm.find(_STREAM_CONTINUATION, o)
        if o < 0:
            return size
        if o % 8 == 0:
            return o
        o += 1


def _note_damage(scan: TraceScan, path: Path, damage: tuple[int, str], end: int) -> None:
    start, problem = damage
    scan.corrupt_batches += 1
    scan.corrupt_bytes += end - start
    where = f"bytes {start}-{end}" if end - start > 0 else f"byte {start}"
    scan.problems.append(f"{where} (after {scan.batches} good batch(es)): {problem}")


def _finish_scan(scan: TraceScan) -> None:
    path = scan.path
    if scan.corrupt_batches:
        shown = "; ".join(scan.problems[:3]) + ("; …" if len(scan.problems) > 3 else "")
        scan.warnings.append(
            f"{path}: {scan.corrupt_batches} corrupt record batch(es) or stretch(es) left out "
            f"({scan.corrupt_bytes} bytes); kept {scan.batches} good batch(es), {scan.rows} rows: {shown}"
        )
    if not scan.complete:
        scan.warnings.append(
            f"{path}: truncated stream: recovered {scan.batches} complete batch(es), {scan.rows} rows; "
            f"{scan.lost_bytes} trailing byte(s) lost"
        )
    if scan.rows_dropped:
        causes = ", ".join(
            f"{d.get('rows')} x {scan.table_kind}.{d.get('field')}: {d.get('reason')}"
            + (f" (e.g. {d['example']})" if d.get("example") else "")
            for d in scan.drops
        )
        scan.warnings.append(
            f"{path}: the writer dropped {scan.rows_dropped} row(s) while recording"
            + (f" ({causes})" if causes else "")
        )
    if scan.unchecked_batches == 0:
        scan.integrity = "verified" if scan.checksums_expected or scan.batches else "unchecked"
    else:
        scan.integrity = "partly unchecked" if scan.unchecked_batches < scan.batches else "unchecked"
    if _minor(scan.schema_version) > _minor(SCHEMA_VERSION):
        scan.warnings.append(
            f"{path}: written by newer format {scan.schema_version} (this reader knows {SCHEMA_VERSION})"
        )


def _minor(version: str) -> int:
    parts = version.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


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
    try:
        kind, version, run = _validate_schema(path, schema)
    except TraceError:
        raise
    except (pa.ArrowException, ValueError, KeyError, TypeError, AttributeError) as exc:
        # e.g. a field name that is no longer UTF-8: pyarrow cannot even list the columns
        raise TraceError(f"{path}: corrupt header: the schema is unreadable ({_short(exc)})") from None
    scan = TraceScan(path=path, table_kind=kind, schema_version=version, run=run, schema=schema)
    scan.checksums_expected = integrity.CHECKSUM_KEY in (schema.metadata or {})
    return reader, source.tell(), scan


def _validate_schema(path: Path, schema: pa.Schema) -> tuple[str, str, RunMetadata]:
    meta = schema.metadata or {}
    if b"moecap.table" not in meta:
        raise TraceError(
            f"{path}: an Arrow stream without moecap metadata (moecap.table), not a moecap trace"
        )
    checked = _check_header_checksum(path, meta)
    try:
        kind = meta[b"moecap.table"].decode()
    except UnicodeDecodeError:
        raise TraceError(f"{path}: moecap.table is not UTF-8 text") from None
    if kind not in TABLES:
        raise TraceError(f"{path}: unknown table kind {kind!r}; expected one of {', '.join(TABLES)}")
    version = meta.get(b"moecap.schema_version", b"").decode("utf-8", "replace")
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
    if not checked and _minor(version) >= 1:
        raise TraceError(
            f"{path}: corrupt header: format {version} requires a moecap.checksum, and it is missing"
        )
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


def _check_header_checksum(path: Path, meta: dict[bytes, bytes]) -> bool:
    """Verify the checksum over the version, table kind and run metadata (format >= 1.1), where
    present; returns whether it was present."""
    stored = meta.get(integrity.CHECKSUM_KEY)
    if stored is None:
        return False
    parsed = integrity.parse_checksum(stored)
    if parsed is None:
        raise TraceError(f"{path}: corrupt header: malformed moecap.checksum {stored[:40]!r}")
    algorithm, value = parsed
    if not integrity.available(algorithm):
        return True
    actual = integrity.header_checksum(
        meta.get(b"moecap.schema_version", b""),
        meta.get(b"moecap.table", b""),
        meta.get(b"moecap.run", b""),
        algorithm,
    )
    if actual != value:
        raise TraceError(
            f"{path}: corrupt header: the schema metadata (format version, table kind or run metadata) "
            "fails its checksum; the file cannot be trusted"
        )
    return True


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
    `strict=True` the first error (or a truncated file, or one with corrupt batches) raises
    `TraceError` instead.
    """
    result = TraceSet()
    for path in expand_paths(paths):
        try:
            tf = read_trace_file(path)
            if strict and (tf.corrupt_batches or not tf.complete):
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
