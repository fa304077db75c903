"""The record frame as flat numpy arrays: what the section-4 and run-level computations read.

Extracted once per run from a frame with the metric columns (`records.normalize_frame`):

* per record (`RecordArrays`): latency, activation, context, batch size as float arrays (NaN where
  null; the null masks, because the reference treats a missing field and a NaN differently), the
  record indices of the prefill passes, and whether every other record is a plain decode step;
* per prefill pass (`PrefillArrays`): the same plus ttft, scheduled_tokens and whether it carries
  `per_req_info` - only prefill passes have those, and they are a small share of a trace;
* per `per_req_info` entry (`EntryArrays`): the entry fields and two integer request keys.

The records come from a `RecordSource`: a polars frame (`record_arrays`; polars and pyarrow are
imported for it only) or the numpy columns of `columns.record_columns`, which reference mode on a
record file uses without loading a frame library (`moecap.analyze.lean`).

Decode steps are usually ~95 % of a trace, so nothing here builds a temporary as long as the trace:
the frame's numeric columns are polars' own buffers (zero-copy), a null mask is built only for a
column that has nulls and only when asked for, the mode masks come from one string comparison each
through their Arrow bitmaps, and `per_req_info` is read through its Arrow offsets, touching the
prefill passes' entries only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .decode_sums import NOT_APPLICABLE, DecodeSums, FloatArray, IntArray, decode_sums

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

BoolArray = np.ndarray

#: Modes the run-level decode aggregates count (the reference's runner; section 4 counts every
#: non-prefill mode as decode).
DECODE_LIKE_MODES = ("decode", "decoding", "mixed")

#: (frame column, PrefillArrays field, its null-mask field) of the columns read only at prefill passes
_PREFILL_ONLY_FIELDS = (
    ("ttft", "ttft", "ttft_null"),
    ("scheduled_tokens", "scheduled_tokens", "scheduled_null"),
)


def _compat_level() -> pl.CompatLevel:
    """String views reach pyarrow without a copy from pyarrow 16 on; older versions get large strings."""
    import polars as pl
    import pyarrow as pa

    return pl.CompatLevel.newest() if int(pa.__version__.split(".")[0]) >= 16 else pl.CompatLevel.oldest()


@dataclass(frozen=True)
class PrefillArrays:
    """One entry per prefill pass, in record order; `index` is the record index of each."""

    index: IntArray
    latency: FloatArray
    latency_null: BoolArray
    ttft: FloatArray
    ttft_null: BoolArray
    activation: FloatArray
    activation_null: BoolArray
    seq_lens_sum: FloatArray
    seq_null: BoolArray
    batch_size: FloatArray
    batch_null: BoolArray
    scheduled_tokens: FloatArray
    scheduled_null: BoolArray
    has_info: BoolArray


#: Entries up to 2**24 are grouped by one sort of packed keys (see `Grouping.of_hashes`).
_MAX_PACKED_INDEX_BITS = 24


@dataclass(frozen=True)
class Grouping:
    """Entries grouped by request: `gid[i]` is the request number (0 .. count-1) of entry i, so per-request
    sums are `np.bincount(gid, weights)`, accumulating in entry order as the reference's dict does.

    `order` lists the entries group by group, each group's in entry order, and `starts` where each group
    begins in it: a group's first and last entries are `order[starts]` and `order[ends - 1]`.
    """

    gid: IntArray
    count: int
    order: IntArray
    starts: IntArray

    @classmethod
    def of(cls, keys: np.ndarray) -> Grouping:
        """Exact grouping of equal keys (a stable sort)."""
        order = np.argsort(keys, kind="stable")
        return cls._from_sorted(order, keys[order])

    @classmethod
    def of_hashes(cls, hashes: np.ndarray) -> Grouping:
        """Grouping of 64-bit hashes, by one sort of the hashes with the entry index packed into their low
        bits (about twice as fast as an argsort, and stable). Two hashes that differ only in those low
        bits fall into one group: a collision, which the caller's exactness check catches like any other."""
        n = len(hashes)
        bits = max(1, (n - 1).bit_length())
        if bits > _MAX_PACKED_INDEX_BITS:
            return cls.of(hashes)
        shift = np.uint64(bits)
        packed = hashes >> shift
        packed <<= shift
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        # The low bits are entry indices (< 2**24): the same bits read as int64, without a copy.
        order = np.bitwise_and(packed, np.uint64((1 << bits) - 1)).view(np.int64)
        packed >>= shift
        return cls._from_sorted(order, packed)

    @classmethod
    def _from_sorted(cls, order: IntArray, sorted_keys: np.ndarray) -> Grouping:
        n = len(order)
        if n == 0:
            empty = np.empty(0, dtype=np.int64)
            return cls(gid=empty, count=0, order=empty, starts=empty)
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        # Group numbers in sorted order: each group's number repeated over its length (a cumsum of
        # `new` gives the same, at several times the cost).
        lengths = np.diff(starts, append=n)
        gid = np.empty(n, dtype=np.int64)
        gid[order] = np.repeat(np.arange(len(starts)), lengths)
        return cls(gid=gid, count=len(starts), order=order, starts=starts)

    def first_entries(self) -> IntArray:
        """Each group's first entry."""
        return self.order[self.starts]

    def last_entries(self) -> IntArray:
        """Each group's last entry."""
        ends = np.empty(self.count, dtype=np.int64)
        ends[:-1] = self.starts[1:]
        ends[-1:] = len(self.order)
        return self.order[ends - 1]

    def distinct(self, mask: BoolArray) -> int:
        """How many requests have an entry where mask holds."""
        return int(np.count_nonzero(np.bincount(self.gid[mask], minlength=self.count)))


@dataclass(frozen=True)
class EntryArrays:
    """One entry per `per_req_info` entry of a prefill pass that is not a warm-up probe (seq_lens_sum
    present and <= 10), in record then entry order.

    `requests` groups entries as `_calculate_continuous_metrics` keys them (req_id if the entry has that
    field, even null, else req_pool_idx; None is a key of its own); `server_requests` as
    `_mean_server_request_ttft` does (req_id if not null, else req_pool_idx), for the entries where
    `server_keyed`. String ids and integer slots never share a key.
    """

    prefill_pos: IntArray
    """Position of the entry's pass in PrefillArrays."""
    extend_len: FloatArray
    total_len: FloatArray
    total_null: BoolArray
    is_last_chunk: BoolArray
    requests: Grouping
    server_requests: Grouping
    server_keyed: BoolArray

    @property
    def n(self) -> int:
        return len(self.prefill_pos)


class Column(Protocol):
    """One numeric record column as `RecordArrays` reads it."""

    values: FloatArray
    """float64, NaN where null."""
    null_count: int

    @property
    def nulls(self) -> BoolArray: ...

    def at(self, index: IntArray, values: FloatArray | None = None) -> tuple[FloatArray, BoolArray]:
        """(values, null mask) at the given record indices (`values`: already gathered)."""
        ...


class RecordSource(Protocol):
    """What `RecordArrays` reads from the records: a polars frame (`_FrameSource`) or the columns of
    `columns.record_columns` (no frame library). Both give the same arrays for the same records."""

    n: int
    prefill_index: IntArray
    """Ascending record indices of the records whose forward_mode is "prefill"."""
    mode_nulls: int
    decode_count: int
    """Records whose forward_mode is "decode"."""

    def decode_like_mask(self) -> BoolArray: ...

    def mode_null_mask(self) -> BoolArray: ...

    def column(self, name: str) -> Column:
        """latency, expert_activation, seq_lens_sum or batch_size."""
        ...

    def values_at(self, name: str, index: IntArray) -> tuple[FloatArray, BoolArray]:
        """(values, null mask) of ttft or scheduled_tokens at the given record indices."""
        ...

    def info_counts(self, index: IntArray) -> IntArray | None:
        """Entries of `per_req_info` at the given (prefill) records, 0 where null; None when no record
        has it."""
        ...

    def entries(self, pos: IntArray, counts: IntArray) -> EntryArrays:
        """The entries of the prefill passes at positions `pos` of the last `info_counts` index (each
        with counts[i] > 0 entries), in record then entry order."""
        ...


class RecordArrays:
    """Per-record arrays (length n), float arrays NaN where null, plus the prefill passes and entries.

    `prefill_index` lists the prefill passes' record indices (ascending); `decode_is_rest` says that
    every other record is a "decode" step (no null, "mixed", "decoding" or other mode). The boolean masks
    over all records (`prefill`, `decode_like`, `mode_null`, `*_null`) are built on first use.
    `decode`: the blocked decode sums (`decode_sums`), taken while the columns are read where the records
    qualify, else `NOT_APPLICABLE`.
    """

    def __init__(self, source: RecordSource) -> None:
        n = source.n
        self.n = n
        self._source = source
        self.prefill_index: IntArray = source.prefill_index
        self.n_prefill = len(self.prefill_index)
        self.mode_nulls = source.mode_nulls
        self.decode_is_rest = self.n_prefill + source.decode_count == n

        self._latency = source.column("latency")
        self._activation = source.column("expert_activation")
        self._seq = source.column("seq_lens_sum")
        self._batch = source.column("batch_size")
        self.latency = self._latency.values
        self.activation = self._activation.values
        self.seq_lens_sum = self._seq.values
        self.batch_size = self._batch.values
        self.latency_nulls = self._latency.null_count
        self.activation_nulls = self._activation.null_count
        self.seq_nulls = self._seq.null_count
        self.batch_nulls = self._batch.null_count

        self.decode: DecodeSums = NOT_APPLICABLE
        at_prefill: list[FloatArray] | None = None
        if self.decode_is_rest and not (self.latency_nulls or self.seq_nulls or self.batch_nulls):
            a = self.activation
            if self.activation_nulls:
                a = np.where(self.activation_null, -1.0, a)  # skipped like -1 everywhere
            self.decode, at_prefill = decode_sums(
                self.latency, a, self.seq_lens_sum, self.batch_size, self.prefill_index
            )
            if self.activation_nulls:
                at_prefill[1] = self.activation[self.prefill_index]
        self.prefill_passes, self.entries = _prefill_passes(source, self, at_prefill)

    @cached_property
    def prefill(self) -> BoolArray:
        mask = np.zeros(self.n, dtype=bool)
        mask[self.prefill_index] = True
        return mask

    @cached_property
    def decode_like(self) -> BoolArray:
        if self.decode_is_rest:
            return ~self.prefill
        return self._source.decode_like_mask()

    @cached_property
    def mode_null(self) -> BoolArray:
        if self.mode_nulls == 0:
            return np.zeros(self.n, dtype=bool)
        return self._source.mode_null_mask()

    @property
    def latency_null(self) -> BoolArray:
        return self._latency.nulls

    @property
    def activation_null(self) -> BoolArray:
        return self._activation.nulls

    @property
    def seq_null(self) -> BoolArray:
        return self._seq.nulls

    @property
    def batch_null(self) -> BoolArray:
        return self._batch.nulls


def _prefill_passes(
    source: RecordSource, arr: RecordArrays, at_prefill: list[FloatArray] | None
) -> tuple[PrefillArrays, EntryArrays]:
    """The prefill passes' arrays; `at_prefill`: latency, activation, seq_lens_sum, batch_size already
    gathered at them (by the decode pass), or None."""
    index = arr.prefill_index
    fields: dict[str, np.ndarray] = {}
    for i, (column, name, null_name) in enumerate(
        (
            (arr._latency, "latency", "latency_null"),
            (arr._activation, "activation", "activation_null"),
            (arr._seq, "seq_lens_sum", "seq_null"),
            (arr._batch, "batch_size", "batch_null"),
        )
    ):
        fields[name], fields[null_name] = column.at(index, None if at_prefill is None else at_prefill[i])
    for column_name, name, null_name in _PREFILL_ONLY_FIELDS:
        fields[name], fields[null_name] = source.values_at(column_name, index)

    counts = source.info_counts(index) if len(index) else None
    if counts is None:
        # No prefill pass, or no per_req_info anywhere: no entries.
        passes = PrefillArrays(index=index, has_info=np.zeros(len(index), dtype=bool), **fields)
        return passes, _no_entries()
    passes = PrefillArrays(index=index, has_info=counts > 0, **fields)
    # The entries of the usable passes: with per_req_info, and not a warm-up probe.
    with np.errstate(invalid="ignore"):
        usable = passes.has_info & ~(~passes.seq_null & (passes.seq_lens_sum <= 10))
    pos = np.flatnonzero(usable)
    if not len(pos):
        return passes, _no_entries()  # no per_req_info on a usable pass: skip the grouping
    return passes, source.entries(pos, counts[pos])


def _no_entries() -> EntryArrays:
    empty = Grouping.of(np.empty(0, dtype=np.uint64))
    return EntryArrays(
        prefill_pos=np.empty(0, dtype=np.int64),
        extend_len=np.empty(0),
        total_len=np.empty(0),
        total_null=np.empty(0, dtype=bool),
        is_last_chunk=np.empty(0, dtype=bool),
        requests=empty,
        server_requests=empty,
        server_keyed=np.empty(0, dtype=bool),
    )


# --- The record frame as a source: polars and pyarrow, imported by `record_arrays` only. ----------


class _Column:
    """One numeric frame column: float values (NaN where null) and, built on first use, its null mask."""

    def __init__(self, column: pl.Series) -> None:
        import polars as pl

        self._column = column
        self.null_count = column.null_count()
        # Float64 without nulls: polars' own buffer, no copy.
        self.values: FloatArray = column.cast(pl.Float64).to_numpy()

    @cached_property
    def nulls(self) -> BoolArray:
        if self.null_count == 0:
            return np.zeros(len(self.values), dtype=bool)
        return _true_mask(self._column.is_null())

    def at(self, index: IntArray, values: FloatArray | None = None) -> tuple[FloatArray, BoolArray]:
        """(values, null mask) at the given record indices (`values`: already gathered)."""
        nulls = self.nulls[index] if self.null_count else np.zeros(len(index), dtype=bool)
        return self.values[index] if values is None else values, nulls


class _FrameSource:
    """A normalised record frame (`records.normalize_frame`) as a `RecordSource`: the numeric columns
    are polars' own buffers (zero-copy), the mode masks come from one string comparison each through
    their Arrow bitmaps, and `per_req_info` is read through its Arrow offsets."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame
        self.n = frame.height
        self._mode = mode = frame.get_column("forward_mode")
        self.prefill_index: IntArray = np.flatnonzero(_true_mask(mode == "prefill"))
        self.mode_nulls = mode.null_count()
        self.decode_count = int((mode == "decode").sum())
        self._lists: pa.Array | None = None
        self._starts: IntArray = np.empty(0, dtype=np.int64)

    def decode_like_mask(self) -> BoolArray:
        return _true_mask(self._mode.is_in(DECODE_LIKE_MODES))

    def mode_null_mask(self) -> BoolArray:
        return _true_mask(self._mode.is_null())

    def column(self, name: str) -> _Column:
        return _Column(self._frame.get_column(name))

    def values_at(self, name: str, index: IntArray) -> tuple[FloatArray, BoolArray]:
        return _values_at(self._frame.get_column(name), index)

    def info_counts(self, index: IntArray) -> IntArray | None:
        info = self._frame.get_column("per_req_info")
        if info.null_count() == len(info):
            return None  # no per_req_info anywhere: no Arrow export
        lists = info.to_arrow(compat_level=_compat_level())
        # The offsets buffer read directly: pyarrow's to_numpy would import pandas on first use (~0.1 s).
        offsets = np.frombuffer(lists.buffers()[1], dtype=np.int64)[
            lists.offset : lists.offset + len(lists) + 1
        ]
        self._lists, self._offsets = lists, offsets
        self._starts = starts = offsets[index]
        return np.where(_valid_at(lists, index), offsets[1:][index] - starts, 0)

    def entries(self, pos: IntArray, counts: IntArray) -> EntryArrays:
        assert self._lists is not None
        return _entries(self._lists, self._offsets, self._starts[pos], counts, pos)


def _true_mask(flags: pl.Series) -> BoolArray:
    """A Boolean series as a numpy bool array, null -> False. Unpacked from its Arrow bitmap: ~10x
    cheaper than `to_numpy`, which converts value by value."""
    arr = (flags.fill_null(False) if flags.null_count() else flags).to_arrow()
    if len(arr) == 0:
        return np.zeros(0, dtype=bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[1], dtype=np.uint8), bitorder="little")
    return bits[arr.offset : arr.offset + len(arr)].view(bool)


def _values(column: pl.Series) -> tuple[FloatArray, BoolArray]:
    import polars as pl

    nulls = _true_mask(column.is_null()) if column.null_count() else np.zeros(len(column), dtype=bool)
    return column.cast(pl.Float64).to_numpy(), nulls


def _zero_filled(column: pl.Series) -> FloatArray:
    values, nulls = _values(column)
    return np.where(nulls, 0.0, values) if column.null_count() else values


def _values_at(column: pl.Series, index: IntArray) -> tuple[FloatArray, BoolArray]:
    """(values, null mask) of a column at the given record indices, without converting the whole column
    when it has nulls (an all-null column costs nothing)."""
    import polars as pl

    nulls = column.null_count()
    if nulls == len(column):
        return np.full(len(index), np.nan), np.ones(len(index), dtype=bool)
    values = column.cast(pl.Float64)
    if nulls == 0:
        return values.to_numpy()[index], np.zeros(len(index), dtype=bool)
    # Through the Arrow buffers (no copy): polars' gather, or to_numpy's NaN-filled copy of the whole
    # column, cost several times more.
    arr = values.to_arrow()
    data = np.frombuffer(arr.buffers()[1], dtype=np.float64)[arr.offset : arr.offset + len(arr)]
    valid = _valid_at(arr, index)
    return np.where(valid, data[index], np.nan), ~valid


def _valid_at(array: pa.Array, rows: IntArray) -> BoolArray:
    """Validity of an Arrow array at the given positions, read from its bitmap (LSB bit order)."""
    if array.null_count == 0:
        return np.ones(len(rows), dtype=bool)
    bitmap = np.frombuffer(array.buffers()[0], dtype=np.uint8)
    pos = rows + array.offset
    return ((bitmap[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool)


def _request_groupings(info: pl.DataFrame) -> tuple[Grouping, Grouping, BoolArray]:
    """Request groupings by 64-bit hashes of the req_id or the pool slot (0 for the None key).

    Exact: where every entry is keyed by its req_id (the usual case), the ids of each group are compared
    in sorted order; otherwise the number of groups is checked against the number of distinct ids and
    slots. If two different keys ever hash alike, dense ranks are used instead.
    """
    req_id, pool = info.get_column("req_id"), info.get_column("req_pool_idx")
    id_null = _true_mask(req_id.is_null()) if req_id.null_count() else np.zeros(len(req_id), dtype=bool)
    pool_null = _true_mask(pool.is_null()) if pool.null_count() else np.zeros(len(pool), dtype=bool)
    # req_id_present null: present iff req_id is not null.
    flag = info.get_column("req_id_present")
    present = _true_mask(flag)
    if flag.null_count():
        present = present | (_true_mask(flag.is_null()) & ~id_null)
    by_id, by_pool = present & ~id_null, ~present & ~pool_null
    server_by_id, server_by_pool = ~id_null, id_null & ~pool_null
    server_keyed = server_by_id | server_by_pool
    # Both rules pick the same field for every entry (no present-but-null req_id): one grouping.
    same_rule = bool(np.array_equal(by_id, server_by_id) and np.array_equal(by_pool, server_by_pool))

    import polars as pl

    def n_unique(series: pl.Series, mask: BoolArray) -> int:
        if not mask.any():
            return 0
        return int((series if mask.all() else series.filter(pl.Series(mask))).n_unique())

    def groupings(
        id_codes: np.ndarray, pool_codes: np.ndarray, of: Callable[[np.ndarray], Grouping]
    ) -> tuple[Grouping, Grouping, bool]:
        if by_id.all():  # then same_rule holds too
            requests = of(id_codes)
            return requests, requests, _one_key_per_group(req_id, requests)
        key = np.where(by_id, id_codes, np.where(by_pool, pool_codes, 0))
        requests = of(key)
        exact = requests.count == n_unique(req_id, by_id) + n_unique(pool, by_pool) + int(
            (~(by_id | by_pool)).any()
        )
        if same_rule:
            return requests, requests, exact
        server = np.where(server_by_id, id_codes, np.where(server_by_pool, pool_codes, 0))
        if not (key != server)[server_keyed].any():
            # Same keys wherever the server keys an entry (the usual case): one sort serves both.
            return requests, requests, exact
        server_requests = of(np.where(server_keyed, server, 0))
        distinct = server_requests.distinct(server_keyed)
        exact = exact and distinct == n_unique(req_id, server_by_id) + n_unique(pool, server_by_pool)
        return requests, server_requests, exact

    # Ids and slots are hashed with different seeds, so an id and a slot of equal value stay apart.
    # Slots are hashed only where some entry is keyed by its slot.
    keyed_by_pool = bool((by_pool | server_by_pool).any())
    pool_codes = pool.hash(seed=2).to_numpy() if keyed_by_pool else np.zeros(len(pool), dtype=np.uint64)
    id_codes = req_id.hash(seed=1).to_numpy()
    requests, server_requests, exact = groupings(id_codes, pool_codes, Grouping.of_hashes)
    if not _hashes_are_exact(exact):
        # A hash collision (about 1 in 1e5 for 50k requests, counting the packed sort's shorter hashes):
        # fall back to exact dense ranks.
        ids = req_id.rank("dense").fill_null(0).cast(pl.UInt64).to_numpy()
        slots = (pool.rank("dense").fill_null(0).cast(pl.UInt64) + (int(ids.max(initial=0)) + 1)).to_numpy()
        requests, server_requests, _ = groupings(ids, slots, Grouping.of)
    return requests, server_requests, server_keyed


def _one_key_per_group(keys: pl.Series, g: Grouping) -> bool:
    """Whether every group holds a single value of `keys` (no nulls): neighbours in group order differ
    only where a group starts. Cheaper than counting distinct keys, since the groups are sorted already."""
    n = len(keys)
    if g.count == n:
        return True  # one entry per group
    in_order = keys.gather(g.order)
    changes = _true_mask(in_order.slice(1) != in_order.slice(0, n - 1))
    changes[g.starts[1:] - 1] = False
    return not changes.any()


def _hashes_are_exact(exact: bool) -> bool:
    """Whether the hashed keys are collision-free (a seam for tests of the fallback)."""
    return exact


class _ArrowArray:
    """A pyarrow array seen only through the Arrow C data interface, so that polars imports it as such:
    `pl.from_arrow` first imports pyarrow.compute (~40 ms, a quarter of a 1e5-record reference run's
    own work) for a coercion that plain arrays do not need."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __arrow_c_array__(self, requested_schema: object = None) -> tuple[object, object]:
        return self.array.__arrow_c_array__(requested_schema)


def _entries(
    lists: pa.Array, offsets: IntArray, starts: IntArray, counts: IntArray, pos: IntArray
) -> EntryArrays:
    """The entries of the prefill passes at `pos` (their entries start at `starts` and number `counts`
    in the list column), taken from the list column's Arrow child array."""
    import polars as pl

    total = int(counts.sum())
    # Every record's entries (the offsets index this child array directly), as polars, without a copy.
    child = pl.Series(_ArrowArray(lists.values))
    if total == int(offsets[-1] - offsets[0]):
        # The usual case: the usable passes hold every entry of the column, one slice in order.
        entries = child.slice(int(offsets[0]), total)
    else:
        # Concatenated ranges [start, start + count) of the usable passes.
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        entries = child.gather(shift + np.arange(total))
    exploded = entries.struct.unnest()
    requests, server_requests, server_keyed = _request_groupings(exploded)
    total_len, total_null = _values(exploded.get_column("total_len"))
    return EntryArrays(
        prefill_pos=np.repeat(pos, counts),
        extend_len=_zero_filled(exploded.get_column("extend_len")),
        total_len=total_len,
        total_null=total_null,
        is_last_chunk=_true_mask(exploded.get_column("is_last_chunk")),
        requests=requests,
        server_requests=server_requests,
        server_keyed=server_keyed,
    )


def record_arrays(frame: pl.DataFrame) -> RecordArrays:
    """Arrays of a normalised record frame (see `records.normalize_frame`)."""
    return RecordArrays(_FrameSource(frame))
