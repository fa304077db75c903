"""A record file decoded by msgspec into typed records: the columns of `columns.record_columns` without
a Python dict per record or an object per unread value.

Python's `json` builds a dict and a Python object for every key and value of the file (~0.25 CPU s
of a 1e5-record file); msgspec decodes straight into `_Record` / `_Entry` structs, in C, ~5x faster,
and the columns are then taken field by field (`operator.attrgetter`, no Python loop per record).

It is used only where it reads the file as Python's `json` would, and gives up (None: the caller
decodes with `json`, `columns.read_record_columns`) in every other case:

* msgspec not installed (it is an optional dependency: the `analyze` extra);
* bytes that are not all ASCII: msgspec does not check the UTF-8 of strings it skips, Python's
  strict decoding does; and any backslash: no escapes, so every key and string is as written;
* anything msgspec rejects: not a JSON list at the top level (`{"records": ...}`, JSON Lines),
  NaN / Infinity (which `json` reads), a number beyond float64 (`1e400`: `json` reads infinity),
  a key other than `_Record`'s / `_Entry`'s, a value of another type than the struct's (a bool for
  a number, an integer request id, an array or object as gpu_num / gpu_raw_type: JSON scalars only,
  so no nested value that `json` might find too deep is taken), malformed JSON;
* a key written twice in one object (msgspec keeps the last value, as `json` does, but the record
  frame keeps the first): as on the `json` path, the file's ':' must number exactly the keys the
  records and entries have (absent fields are `UNSET`, so the keys present are counted);
* whatever `columns.columns_of` does not take (the same checks as for `json`'s records).

msgspec's floats are correctly rounded (the same float64 as `float(text)`; tested), and its
integers are Python ints of any size, like `json`'s.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

try:
    import msgspec
    from msgspec import UNSET, Struct, UnsetType
except ImportError:  # optional: Python's json reads the file then
    msgspec = None  # type: ignore[assignment]

from .columns import _NONE, RecordColumns, _Entries, _float_column, _NumpyColumn, columns_of

if msgspec is not None:
    _Number = int | float | None | UnsetType
    _Scalar = str | int | float | bool | None | UnsetType

    class _Entry(Struct, forbid_unknown_fields=True, gc=False):
        """A per_req_info entry: the fields the formulas read (each UNSET where absent)."""

        req_id: str | UnsetType | None = UNSET
        req_pool_idx: int | UnsetType | None = UNSET
        extend_len: int | UnsetType | None = UNSET
        total_len: int | UnsetType | None = UNSET
        is_last_chunk: bool | UnsetType | None = UNSET

    class _Record(Struct, forbid_unknown_fields=True, gc=False):
        """A record: the fields reference mode reads (each UNSET where absent)."""

        forward_mode: str | UnsetType | None = UNSET
        latency: _Number = UNSET
        expert_activation: _Number = UNSET
        seq_lens_sum: _Number = UNSET
        batch_size: _Number = UNSET
        ttft: _Number = UNSET
        scheduled_tokens: _Number = UNSET
        per_req_info: list[_Entry] | UnsetType | None = UNSET
        gpu_num: _Scalar = UNSET
        gpu_raw_type: _Scalar = UNSET

    _DECODER = msgspec.json.Decoder(list[_Record])
    _UNSET_TYPE: type = UnsetType


def typed_record_columns(data: bytes) -> RecordColumns | None:
    """The columns of a record file's bytes, decoded by msgspec, or None where this module leaves the
    file to Python's `json` (module docstring)."""
    if msgspec is None or not data.isascii() or b"\\" in data:
        return None
    try:
        records = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not records:
        return None
    keys = 0

    def field(name: str, items: list[Any] = records) -> tuple[list[Any], set[type]]:
        """The field's values (None where absent) and their types; counts the fields present."""
        nonlocal keys
        values = list(map(attrgetter(name), items))
        seen = set(map(type, values))
        n = len(values)
        if _UNSET_TYPE in seen:
            unset = values.count(UNSET)
            seen.discard(_UNSET_TYPE)
            seen.add(_NONE)
            values = [None] * n if unset == n else [None if v is UNSET else v for v in values]
            n -= unset
        keys += n
        return values, seen

    def column_of(name: str) -> _NumpyColumn | None:
        values, seen = field(name)
        return _float_column(values, seen=seen)

    def entries_of(flat: list[Any]) -> _Entries:
        nonlocal keys
        req_id = list(map(attrgetter("req_id"), flat))  # UNSET stays: an absent id is not a null one
        keys += len(req_id) - req_id.count(UNSET)
        return _Entries(
            req_id,
            field("req_pool_idx", flat)[0],
            field("is_last_chunk", flat)[0],
            field("extend_len", flat)[0],
            field("total_len", flat)[0],
            absent=UNSET,
            n_keys=0,
        )

    head = records[0]
    first = {k: v for k in ("gpu_num", "gpu_raw_type") if (v := getattr(head, k)) is not UNSET}
    for name in ("gpu_num", "gpu_raw_type"):  # only their keys are counted
        keys += len(records) - list(map(attrgetter(name), records)).count(UNSET)
    modes, info = field("forward_mode")[0], field("per_req_info")[0]
    columns = columns_of(first, modes, column_of, info, entries_of)
    if columns is None:
        return None
    return columns if data.count(b":") == keys else None
