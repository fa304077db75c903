"""The records of a MoE-CAP record file as numpy columns, without a frame library.

`record_columns(records)` takes the dicts Python's `json` gives (`record_file`) and returns a
`RecordColumns`, the `arrays.RecordSource` that `RecordArrays` reads, with the same arrays the record
frame (`records.records_to_frame` + `normalize_frame`) gives for the same records: so
`reference_metrics` computes with the same formulas and gives the same numbers. It does so only for
plain records, and returns None for anything else, which the caller then reads through the frame
(whose rules, and errors, are the only definition of the rest):

* forward_mode a string or null; latency, ttft, expert_activation, seq_lens_sum, batch_size and
  scheduled_tokens finite JSON numbers (not true/false, integers below 2**53 in size) or null;
* per_req_info null or absent except on prefill passes; there, a list of objects whose req_id is a
  string or null, req_pool_idx / extend_len / total_len integers (below 2**53 in size) or null and
  is_last_chunk true, false or null.

Absent and null are the same, as in the frame; `req_id_present` tells them apart for req_id.
Requests are numbered in order of first appearance (the frame numbers them by hash): the formulas'
sums over requests do not depend on that order (`continuous._request_sums`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moecap.analyze.errors import AnalyzeError

from .arrays import (
    DECODE_LIKE_MODES,
    BoolArray,
    EntryArrays,
    FloatArray,
    Grouping,
    IntArray,
)
from .record_file import parse_reference_records

#: Integers this exact as float64; a larger one is left to the frame (its conversion rules).
_MAX_EXACT = 2.0**53
_NONE: type = type(None)
#: The req_id of an entry without that field (`_Entries.of_dicts`).
_ABSENT: Any = type("_Absent", (), {"__repr__": lambda self: "<absent>"})()
_NUMBER_TYPES: frozenset[type] = frozenset({int, float, _NONE})
_INT_TYPES: frozenset[type] = frozenset({int, _NONE})
_NUMERIC = ("latency", "expert_activation", "seq_lens_sum", "batch_size", "ttft", "scheduled_tokens")


class _NumpyColumn:
    """A numeric column: float64 values (NaN where null) and the null mask."""

    def __init__(self, values: FloatArray, nulls: BoolArray | None) -> None:
        self.values = values
        self._nulls = nulls
        self.null_count = 0 if nulls is None else int(np.count_nonzero(nulls))

    @property
    def nulls(self) -> BoolArray:
        return np.zeros(len(self.values), dtype=bool) if self._nulls is None else self._nulls

    def at(self, index: IntArray, values: FloatArray | None = None) -> tuple[FloatArray, BoolArray]:
        nulls = self._nulls[index] if self._nulls is not None else np.zeros(len(index), dtype=bool)
        return self.values[index] if values is None else values, nulls


def _float_column(
    values: list[Any], types: frozenset[type] = _NUMBER_TYPES, seen: set[type] | None = None
) -> _NumpyColumn | None:
    """`values` as a float column when each is None or a finite number of `types` (integers below
    2**53 in size); else None. `seen`: the types of `values`, where the caller has them."""
    if seen is None:
        seen = set(map(type, values))
    if not seen <= types:
        return None
    n, n_null = len(values), values.count(None) if _NONE in seen else 0
    if n_null == n:
        return _NumpyColumn(np.full(n, np.nan), np.ones(n, dtype=bool))
    array = np.array(values, dtype=np.float64)  # None -> NaN
    finite = np.isfinite(array)
    nulls = None
    if n_null:
        nulls = ~finite
        # Every None is NaN here: as many non-finite values as Nones means no NaN or infinity of its own.
        if int(np.count_nonzero(nulls)) != n_null:
            return None
        if int in seen and float(np.abs(np.where(finite, array, 0.0)).max()) >= _MAX_EXACT:
            return None
    elif not finite.all() or (int in seen and float(np.abs(array).max()) >= _MAX_EXACT):
        return None
    return _NumpyColumn(array, nulls)


class _Entries:
    """The plain per_req_info entries of every prefill pass, in record then entry order, as columns.

    `req_id` holds `absent` where an entry has no req_id field (None where it is null); the other
    columns hold None where the field is absent or null. `n_keys`: the entries' keys in all."""

    def __init__(
        self,
        req_id: list[Any],
        pool: list[Any],
        last: list[Any],
        extend_len: list[Any],
        total_len: list[Any],
        *,
        absent: Any,
        n_keys: int,
    ) -> None:
        self.n, self.n_keys, self.absent = len(req_id), n_keys, absent
        self.req_id, self.pool, self.last = req_id, pool, last
        self.ok = set(map(type, req_id)) <= {str, _NONE, type(absent)} and set(map(type, last)) <= {
            bool,
            _NONE,
        }
        pool_col = _float_column(pool, _INT_TYPES) if self.ok else None
        extend = _float_column(extend_len, _INT_TYPES) if pool_col else None
        total = _float_column(total_len, _INT_TYPES) if extend else None
        self.ok = total is not None
        if extend is not None and total is not None:
            self.extend = np.where(extend.nulls, 0.0, extend.values) if extend.null_count else extend.values
            self.total, self.total_null = total.values, total.nulls

    @classmethod
    def of_dicts(cls, entries: list[dict[str, Any]]) -> _Entries:
        """The entries as Python's `json` gives them."""
        return cls(
            [e.get("req_id", _ABSENT) for e in entries],
            [e.get("req_pool_idx") for e in entries],
            [e.get("is_last_chunk") for e in entries],
            [e.get("extend_len") for e in entries],
            [e.get("total_len") for e in entries],
            absent=_ABSENT,
            n_keys=sum(map(len, entries)),
        )

    def arrays(self, select: IntArray | None, prefill_pos: IntArray) -> EntryArrays:
        """EntryArrays of all entries (select None) or of the entries at `select`, grouped by request
        as `arrays.EntryArrays` documents: key req_id if the entry has that field (even null), else
        req_pool_idx, else the None key (`requests`); req_id if not null, else req_pool_idx, where either
        is set (`server_requests`). A string id and an integer slot are never equal, so the raw values
        serve as keys."""
        req_id, pool, last, absent = self.req_id, self.pool, self.last, self.absent
        extend, total, total_null = self.extend, self.total, self.total_null
        if select is not None:
            rows = select.tolist()
            req_id, pool, last = [req_id[i] for i in rows], [pool[i] for i in rows], [last[i] for i in rows]
            extend, total, total_null = extend[select], total[select], total_null[select]
        n = len(req_id)
        if None in req_id or absent in req_id:
            request_key = [p if r is absent else r for r, p in zip(req_id, pool, strict=True)]
            server_key = [p if r is None or r is absent else r for r, p in zip(req_id, pool, strict=True)]
            requests, server_requests = _grouping(request_key), _grouping(server_key)
            server_keyed = np.fromiter((k is not None for k in server_key), dtype=bool, count=n)
        else:  # every entry keyed by its req_id, by both rules
            requests = server_requests = _grouping(req_id)
            server_keyed = np.ones(n, dtype=bool)
        return EntryArrays(
            prefill_pos=prefill_pos,
            extend_len=extend,
            total_len=total,
            total_null=total_null,
            is_last_chunk=np.array([v is True for v in last], dtype=bool),
            requests=requests,
            server_requests=server_requests,
            server_keyed=server_keyed,
        )


class RecordColumns:
    """Plain records as numpy columns (module docstring); an `arrays.RecordSource`.

    `first` is the first record (its gpu_num / gpu_raw_type are the reference's defaults)."""

    def __init__(
        self,
        first: dict[str, Any],
        modes: list[Any],
        prefill_index: IntArray,
        columns: dict[str, _NumpyColumn],
        info: list[Any],
        entries: _Entries,
    ) -> None:
        self.first = first
        self.n = len(modes)
        self._modes = modes
        self.prefill_index = prefill_index
        self.mode_nulls = modes.count(None)
        self.decode_count = modes.count("decode")
        self._columns = columns
        self._info = info  # per_req_info of each prefill pass
        self._entries = entries
        self._entry_start = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    @property
    def n_entries(self) -> int:
        return self._entries.n

    def decode_like_mask(self) -> BoolArray:
        modes = DECODE_LIKE_MODES
        return np.fromiter((m in modes for m in self._modes), dtype=bool, count=self.n)

    def mode_null_mask(self) -> BoolArray:
        return np.fromiter((m is None for m in self._modes), dtype=bool, count=self.n)

    def column(self, name: str) -> _NumpyColumn:
        return self._columns[name]

    def values_at(self, name: str, index: IntArray) -> tuple[FloatArray, BoolArray]:
        return self._columns[name].at(index)

    def info_counts(self, index: IntArray) -> IntArray | None:
        """Entries per prefill pass (`index` is `prefill_index`); None when no pass has per_req_info."""
        if self._info.count(None) == len(self._info):
            return None
        counts = np.fromiter(
            (0 if i is None else len(i) for i in self._info), dtype=np.int64, count=len(index)
        )
        self._entry_start = np.cumsum(counts) - counts
        return counts

    def entries(self, pos: IntArray, counts: IntArray) -> EntryArrays:
        prefill_pos = np.repeat(pos, counts)
        total = int(counts.sum())
        if total == self.n_entries:
            return self._entries.arrays(None, prefill_pos)  # the usual case: every entry, in order
        starts = self._entry_start[pos]
        select = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total)
        return self._entries.arrays(select, prefill_pos)


def record_columns(records: list[dict[str, Any]]) -> RecordColumns | None:
    """The records (dicts, as `record_file.load_reference_records` returns them) as numpy columns, or
    None where some value is not plain (module docstring): the frame then reads them."""
    if not records:
        return None

    def entries(flat: list[Any]) -> _Entries | None:
        return _Entries.of_dicts(flat) if all(type(e) is dict for e in flat) else None

    return columns_of(
        records[0],
        [r.get("forward_mode") for r in records],
        lambda name: _float_column([r.get(name) for r in records]),
        [r.get("per_req_info") for r in records],
        entries,
    )


def columns_of(
    first: dict[str, Any],
    modes: list[Any],
    column_of: Callable[[str], _NumpyColumn | None],
    info_all: list[Any],
    entries_of: Callable[[list[Any]], _Entries | None],
) -> RecordColumns | None:
    """`RecordColumns` of records given field by field, or None where a value is not plain: `modes`
    (forward_mode of each record), `column_of(name)` (a numeric field's `_float_column`), `info_all` (their
    per_req_info) - None where absent or null - and `entries_of`, which takes the entries of every
    prefill pass in order (None where one is not an entry)."""
    if not set(map(type, modes)) <= {str, _NONE}:
        return None
    prefill = _positions(modes, "prefill")
    columns: dict[str, _NumpyColumn] = {}
    for name in _NUMERIC:
        column = column_of(name)
        if column is None:
            return None
        columns[name] = column
    info = [info_all[i] for i in prefill]
    if info_all.count(None) != len(modes) - (len(info) - info.count(None)):
        return None  # per_req_info on a record that is not a prefill pass
    flat: list[Any] = []
    for entry_list in info:
        if entry_list is None:
            continue
        if type(entry_list) is not list:
            return None
        flat.extend(entry_list)
    entries = entries_of(flat)
    if entries is None or not entries.ok:
        return None
    return RecordColumns(first, modes, np.array(prefill, dtype=np.int64), columns, info, entries)


def _positions(values: list[Any], value: str) -> list[int]:
    """Ascending positions of `value` in `values` (list.index scans in C)."""
    out: list[int] = []
    at = -1
    index = values.index
    try:
        while True:
            at = index(value, at + 1)
            out.append(at)
    except ValueError:
        return out


def _grouping(keys: list[Any]) -> Grouping:
    """Entries grouped by equal keys, numbered in order of first appearance."""
    codes: dict[Any, int] = {}
    number = codes.setdefault
    return Grouping.of(np.array([number(k, len(codes)) for k in keys], dtype=np.int64))


def read_record_columns(path: str | Path) -> RecordColumns | None:
    """A record file's plain records as columns (`record_columns`), or None: the file cannot be read
    or parsed (the caller's frame path then gives the one-line error), a value is not plain, or a key
    may be written twice in one object. For the last, every ':' in the file must be a key's - there
    must be exactly as many as the records and their per_req_info entries have keys - since
    `records.load_reference_frame`, which reads a JSON list today, keeps a repeated key's first value
    where Python's `json` keeps the last.

    Decoded by msgspec where it is installed and reads the file as `json` would (`typed_read`), else
    by Python's `json`: the same columns either way."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    from .typed_read import typed_record_columns

    typed = typed_record_columns(data)
    if typed is not None:
        return typed
    return json_record_columns(Path(path), data)


def json_record_columns(path: Path, data: bytes) -> RecordColumns | None:
    """`read_record_columns` by Python's `json` alone (`path` names the file in errors): the fallback
    where msgspec is missing or reads the file otherwise."""
    try:
        records = parse_reference_records(path, data.decode("utf-8"))
    except (UnicodeDecodeError, AnalyzeError):
        return None
    columns = record_columns(records)
    if columns is None:
        return None
    keys = sum(map(len, records)) + columns._entries.n_keys
    return columns if data.count(b":") == keys else None
