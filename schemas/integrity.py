"""Checksums over the logical content of a trace file's header and record batches.

The writer stores `moecap.checksum` = "<algorithm>:<hex>" in the schema metadata (over the format
version, table kind and run metadata) and in every record batch's custom metadata (over the batch's
`moecap.batch` JSON and its columns). The reader recomputes it after full validation, so a flipped
bit that still decodes (a digit of the run metadata, a value in an uncompressed buffer, a null count
or length in a message header) is a named corrupt batch instead of a silently different value.

"Logical" means the hash reads each array through its offset and length (validity bits only when it
holds nulls, list/string offsets rebased to 0, children only over the range the offsets use), so it
is the same for the batch the writer holds and for the batch the IPC reader rebuilds from the file,
whatever padding, slicing or buffer sharing either side has. No copy of the data is made except for
sliced arrays (writer side only) whose bitmaps start mid-byte.

Algorithm: xxh3_64 (the `xxhash` package, ~6 GB/s on one core) where it is installed, else the
standard library's crc32 (~1.3 GB/s); the name is stored with the value, so either reader verifies
what either writer wrote (a reader without xxhash reports xxh3 batches as unchecked).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

try:  # pragma: no cover - both branches are exercised by tests through `new_hasher`
    import xxhash as _xxhash
except ImportError:  # pragma: no cover
    _xxhash = None

CHECKSUM_KEY = b"moecap.checksum"
"""Key of the checksum, both in the schema metadata and in each record batch's custom metadata."""

XXH3 = "xxh3_64"
CRC32 = "crc32"
DEFAULT_ALGORITHM = XXH3 if _xxhash is not None else CRC32

_PACK2 = struct.Struct("<qq").pack


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


def available(algorithm: str) -> bool:
    """Whether this process can compute `algorithm`."""
    return algorithm == CRC32 or (algorithm == XXH3 and _xxhash is not None)


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Any:
    """An object with update(bytes-like) and intdigest()."""
    if algorithm == XXH3 and _xxhash is not None:
        return _xxhash.xxh3_64()
    if algorithm == CRC32:
        return _Crc32()
    raise ValueError(f"checksum algorithm {algorithm!r} is not available")


def format_checksum(algorithm: str, value: int) -> str:
    return f"{algorithm}:{value:016x}"


def parse_checksum(text: bytes | str) -> tuple[str, int] | None:
    """(algorithm, value) of a stored checksum, or None when it is malformed."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    algorithm, _, digits = text.partition(":")
    if algorithm not in (XXH3, CRC32) or len(digits) != 16:
        return None
    try:
        return algorithm, int(digits, 16)
    except ValueError:
        return None


def header_checksum(version: bytes, table: bytes, run: bytes, algorithm: str = DEFAULT_ALGORITHM) -> int:
    """Checksum of the header fields a reader uses (the column names and types are checked
    against the table definitions instead)."""
    h = new_hasher(algorithm)
    for part in (version, table, run):
        h.update(_PACK2(len(part), 0))
        h.update(part)
    return h.intdigest()


def batch_checksum(
    batch: pa.RecordBatch,
    info: bytes,
    algorithm: str = DEFAULT_ALGORITHM,
    columns: list[pa.Array] | None = None,
) -> int:
    """Checksum of a record batch's `moecap.batch` JSON and logical content (`columns`: the batch's
    columns where the caller has them already; making the Python column objects is a good part of
    the cost for a small batch).

    Call only on a batch that passed basic validation (buffer sizes agree with lengths): the hash
    follows the batch's offsets, and reads past nothing that basic validation checked.
    """
    h = new_hasher(algorithm)
    h.update(_PACK2(len(info), batch.num_rows))
    h.update(info)
    for column in batch.columns if columns is None else columns:
        _hash_array(h, column)
    return h.intdigest()


_DICT, _BOOL, _OFFSETS, _LIST, _FIXED = range(5)
_KINDS: dict[pa.DataType, tuple[int, int]] = {}


def _kind(type_: pa.DataType) -> tuple[int, int]:
    """(layout, byte width) of a type, cached (the type predicates cost more than the hashing of a
    small batch)."""
    kind = _KINDS.get(type_)
    if kind is None:
        if pa.types.is_dictionary(type_):
            kind = (_DICT, 0)
        elif pa.types.is_boolean(type_):
            kind = (_BOOL, 0)
        elif pa.types.is_string(type_):
            kind = (_OFFSETS, 0)
        elif pa.types.is_list(type_):
            kind = (_LIST, 0)
        else:
            kind = (_FIXED, type_.bit_width // 8)
        _KINDS[type_] = kind
    return kind


def _hash_array(h: Any, arr: pa.Array) -> None:
    n = len(arr)
    nulls = arr.null_count
    h.update(_PACK2(n, nulls))
    if n == 0:
        return
    layout, width = _kind(arr.type)
    if layout == _DICT:
        if nulls:
            _hash_bits(h, arr.buffers()[0], arr.offset, n)
        _hash_array(h, arr.indices)
        _hash_array(h, arr.dictionary)
        return
    buffers = arr.buffers()
    offset = arr.offset
    if nulls:
        _hash_bits(h, buffers[0], offset, n)
    if layout == _FIXED:
        if buffers[1] is not None:
            h.update(memoryview(buffers[1])[offset * width : (offset + n) * width])
    elif layout == _BOOL:
        _hash_bits(h, buffers[1], offset, n)
    else:
        offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=4 * offset)
        first, last = int(offsets[0]), int(offsets[-1])
        h.update(offsets if first == 0 else offsets - np.int32(first))
        if layout == _OFFSETS:
            if buffers[2] is not None and last > first:
                h.update(memoryview(buffers[2])[first:last])
        else:
            _hash_array(h, arr.values.slice(first, last - first))


def _hash_bits(h: Any, buf: pa.Buffer | None, offset: int, n: int) -> None:
    """Bits [offset, offset + n) of a bitmap, the bits past n in the last byte masked off."""
    if buf is None:
        return
    if offset % 8:
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[offset : offset + n]
        h.update(np.packbits(bits, bitorder="little"))
        return
    start = offset // 8
    full, rest = divmod(n, 8)
    view = memoryview(buf)
    h.update(view[start : start + full])
    if rest:
        h.update(bytes((view[start + full] & ((1 << rest) - 1),)))
