"""The Parquet cache: where it lives, how an entry is keyed, how its files are written.

DuckDB cannot re-scan an Arrow IPC stream, so every trace file is converted once (`convert`) into
Parquet files `<key>.<view>.parquet` plus `<key>.json` (what the scan found) in this cache. The key
is (absolute path, size, mtime, schema version, CACHE_LAYOUT, what else the entry depends on), so a
changed file or a new layout is converted again and nothing is ever read stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moecap.schemas import RunMetadata

from ..errors import InputError
from .runs import RANK_COLUMNS

CACHE_LAYOUT = "8"
"""Bump when the cached Parquet layout changes (invalidates every cache entry)."""

# Cache files are written once per trace and read often: zstd level 1, dictionaries only where values
# repeat (ids, phases), no statistics on the per-request list columns (nothing filters on them).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["run_id", "phase", "req_ids", "time_source", "finish_reason", "dataset", "gpu_uuid"],
    "write_statistics": ["run_id", "dp", "pp", "tp", "ep", "step", "t_start_ns", "arrival_ns", "t_ns"],
}
# The step scalars are read back whole by every cold analysis: lz4 and delta-encoded step / ns
# columns (monotonic) write and read faster than zstd-1 over plain integers, and are smaller.
STEP_SCALARS_OPTIONS: dict[str, Any] = {
    **PARQUET_OPTIONS,
    "compression": "lz4",
    "compression_level": None,
    "column_encoding": {
        c: "DELTA_BINARY_PACKED" for c in ("step", "t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns")
    },
    "write_batch_size": 65536,
}


def default_cache_dir() -> Path:
    """`$MOECAP_CACHE_DIR`, else `$XDG_CACHE_HOME/moecap`, else `~/.cache/moecap`."""
    if os.environ.get("MOECAP_CACHE_DIR"):
        return Path(os.environ["MOECAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moecap"


def prepare_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory (`cache_dir`, else `default_cache_dir()`), created if missing; InputError
    (one line) when it cannot be: a file is in the way, no permission, a read-only disk."""
    given = cache_dir is not None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = (
        "--cache-dir"
        if given
        else ("MOECAP_CACHE_DIR" if os.environ.get("MOECAP_CACHE_DIR") else "cache dir")
    )
    if cache.exists() and not cache.is_dir():
        raise InputError(f"{source} {cache}: is not a directory (the Parquet cache needs one)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"{source} {cache}: cannot write the Parquet cache there ({exc.strerror or exc}); "
            "pass --cache-dir DIR or set MOECAP_CACHE_DIR to a writable directory"
        ) from None
    return cache


def cache_key(path: Path, version: str, extra: str = "") -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{version}|{CACHE_LAYOUT}|{extra}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


class ParquetSink:
    """A Parquet file written batch by batch under a temporary name, moved into place on `close`
    (a reader never sees a half-written cache file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_suffix(".tmp")
        self.writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, batch.schema, **PARQUET_OPTIONS)
        self.writer.write_batch(batch)

    def close(self, empty_schema: pa.Schema) -> Path:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, empty_schema, **PARQUET_OPTIONS)
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path


def identity_of(run: RunMetadata) -> dict[str, Any]:
    """The identity columns' values of a file of `run` (RANK_COLUMNS)."""
    return {"run_id": run.run_id, "dp": run.rank.dp, "pp": run.rank.pp, "tp": run.rank.tp, "ep": run.rank.ep}


def with_identity(batch: pa.RecordBatch | pa.Table, identity: dict[str, Any]) -> Any:
    """`batch` (a record batch or a table) with the identity columns in front (phase as plain
    strings)."""
    n = batch.num_rows
    cols = [
        pa.array(np.full(n, v, dtype=np.int32))
        if k != "run_id"
        else pa.array([v], pa.string()).take(np.zeros(n, np.int32))
        for k, v in identity.items()
    ]
    names = list(identity)
    arrays = [*cols, *batch.columns]
    if "phase" in batch.schema.names:
        i = batch.schema.names.index("phase")
        arrays[len(cols) + i] = batch.column(i).cast(pa.string())
    build = pa.Table.from_arrays if isinstance(batch, pa.Table) else pa.RecordBatch.from_arrays
    return build(arrays, names=[*names, *batch.schema.names])


def identity_schema(kind_schema: pa.Schema) -> pa.Schema:
    """The schema of a cached table: the identity columns, then `kind_schema`'s (phase as strings)."""
    fields = [pa.field("run_id", pa.string())] + [pa.field(k, pa.int32()) for k in RANK_COLUMNS[1:]]
    for f in kind_schema:
        fields.append(pa.field(f.name, pa.string()) if f.name == "phase" else f.remove_metadata())
    return pa.schema(fields)
