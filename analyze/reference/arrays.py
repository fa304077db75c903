"""The record frame as flat numpy arrays: what the section-4 and run-level computations read.

Extracted once per run from a frame with the metric columns (`records.normalize_frame`):

* per record (`RecordArrays`): latency, activation, context, batch size (null -> NaN plus a null mask,
  because the reference treats a missing field and a NaN differently) and forward-mode masks;
* per prefill pass (`PrefillArrays`): the same plus ttft, scheduled_tokens and whether it carries
  `per_req_info` - only prefill passes have those, and they are a small share of a trace;
* per `per_req_info` entry (`EntryArrays`): the entry fields and two integer request keys.

Decode steps are usually ~95 % of a trace, so the work over all records is a few numpy passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

BoolArray = np.ndarray
FloatArray = np.ndarray
IntArray = np.ndarray

#: Modes the run-level decode aggregates count (the reference's runner; section 4 counts every
#: non-prefill mode as decode).
DECODE_LIKE_MODES = ("decode", "decoding", "mixed")


#: (frame column, PrefillArrays field, its null-mask field)
_PREFILL_FIELDS = (
    ("latency", "latency", "latency_null"),
    ("ttft", "ttft", "ttft_null"),
    ("expert_activation", "activation", "activation_null"),
    ("seq_lens_sum", "seq_lens_sum", "seq_null"),
    ("batch_size", "batch_size", "batch_null"),
    ("scheduled_tokens", "scheduled_tokens", "scheduled_null"),
)


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


@dataclass(frozen=True)
class Grouping:
    """Entries grouped by request: `gid[i]` is the request number (0 .. count-1) of entry i, so per-request
    sums are `np.bincount(gid, weights)` and per-request extremes `np.maximum.at` / `np.minimum.at`,
    both accumulating in entry order as the reference's dict does."""

    gid: IntArray
    count: int

    @classmethod
    def of(cls, keys: np.ndarray) -> Grouping:
        order = np.argsort(keys)
        sorted_keys = keys[order]
        gid = np.empty(len(keys), dtype=np.int64)
        if len(keys):
            group = np.zeros(len(keys), dtype=np.int64)
            np.cumsum(sorted_keys[1:] != sorted_keys[:-1], out=group[1:])
            gid[order] = group
            return cls(gid=gid, count=int(group[-1]) + 1)
        return cls(gid=gid, count=0)

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


@dataclass(frozen=True)
class RecordArrays:
    """Per-record arrays (length n), float arrays NaN where null, plus the prefill passes and entries."""

    n: int
    prefill: BoolArray
    decode_like: BoolArray
    mode_null: BoolArray
    latency: FloatArray
    latency_null: BoolArray
    activation: FloatArray
    activation_null: BoolArray
    seq_lens_sum: FloatArray
    seq_null: BoolArray
    batch_size: FloatArray
    batch_null: BoolArray
    prefill_passes: PrefillArrays
    entries: EntryArrays


def _values(column: pl.Series) -> tuple[FloatArray, BoolArray]:
    nulls = column.is_null().to_numpy() if column.null_count() else np.zeros(len(column), dtype=bool)
    return column.cast(pl.Float64).to_numpy(), nulls


def _request_groupings(info: pl.DataFrame) -> tuple[Grouping, Grouping, BoolArray]:
    """Request groupings by 64-bit hashes of the req_id or the pool slot (0 for the None key).

    Exact: the number of distinct hashes is checked against the number of distinct ids and slots; if
    two different keys ever hash alike, dense ranks are used instead.
    """
    req_id, pool = info.get_column("req_id"), info.get_column("req_pool_idx")
    id_null = req_id.is_null().to_numpy()
    pool_null = pool.is_null().to_numpy()
    present = (
        info.select(pl.coalesce("req_id_present", pl.col("req_id").is_not_null())).to_series().to_numpy()
    )
    by_id, by_pool = present & ~id_null, ~present & ~pool_null
    server_by_id, server_by_pool = ~id_null, id_null & ~pool_null
    server_keyed = server_by_id | server_by_pool
    # Both rules pick the same field for every entry (no present-but-null req_id): one grouping.
    same_rule = bool(np.array_equal(by_id, server_by_id) and np.array_equal(by_pool, server_by_pool))

    def n_unique(series: pl.Series, mask: BoolArray) -> int:
        if not mask.any():
            return 0
        return int((series if mask.all() else series.filter(pl.Series(mask))).n_unique())

    def groupings(id_codes: np.ndarray, pool_codes: np.ndarray) -> tuple[Grouping, Grouping, bool]:
        key = np.where(by_id, id_codes, np.where(by_pool, pool_codes, 0))
        requests = Grouping.of(key)
        exact = requests.count == n_unique(req_id, by_id) + n_unique(pool, by_pool) + int(
            (~(by_id | by_pool)).any()
        )
        if same_rule:
            return requests, requests, exact
        server = np.where(server_by_id, id_codes, np.where(server_by_pool, pool_codes, 0))
        if not (key != server)[server_keyed].any():
            # Same keys wherever the server keys an entry (the usual case): one sort serves both.
            return requests, requests, exact
        server_requests = Grouping.of(np.where(server_keyed, server, 0))
        distinct = server_requests.distinct(server_keyed)
        exact = exact and distinct == n_unique(req_id, server_by_id) + n_unique(pool, server_by_pool)
        return requests, server_requests, exact

    # Ids and slots are hashed with different seeds, so an id and a slot of equal value stay apart.
    requests, server_requests, exact = groupings(req_id.hash(seed=1).to_numpy(), pool.hash(seed=2).to_numpy())
    if not _hashes_are_exact(exact):
        # A hash collision (about 1 in 1e8 for a million requests): fall back to exact dense ranks.
        ids = req_id.rank("dense").fill_null(0).cast(pl.UInt64).to_numpy()
        slots = (pool.rank("dense").fill_null(0).cast(pl.UInt64) + (int(ids.max(initial=0)) + 1)).to_numpy()
        requests, server_requests, _ = groupings(ids, slots)
    return requests, server_requests, server_keyed


def _hashes_are_exact(exact: bool) -> bool:
    """Whether the hashed keys are collision-free (a seam for tests of the fallback)."""
    return exact


def _no_entries() -> EntryArrays:
    empty = Grouping(gid=np.empty(0, dtype=np.int64), count=0)
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


def _entries(info: pl.Series, passes: PrefillArrays) -> EntryArrays:
    with np.errstate(invalid="ignore"):
        usable = passes.has_info & ~(~passes.seq_null & (passes.seq_lens_sum <= 10))
    pos = np.flatnonzero(usable)
    if not len(pos):
        return _no_entries()  # decode-only or no per_req_info: skip the polars explode and grouping
    lists = info if len(pos) == len(info) else info.gather(pos)
    # Series.explode, not DataFrame.explode: several times cheaper; no list here is empty or null.
    exploded = lists.explode().struct.unnest()
    requests, server_requests, server_keyed = _request_groupings(exploded)
    total, total_null = _values(exploded.get_column("total_len"))
    return EntryArrays(
        prefill_pos=np.repeat(pos, lists.list.len().to_numpy()),
        extend_len=exploded.get_column("extend_len").fill_null(0).cast(pl.Float64).to_numpy(),
        total_len=total,
        total_null=total_null,
        is_last_chunk=exploded.get_column("is_last_chunk").fill_null(False).to_numpy(),
        requests=requests,
        server_requests=server_requests,
        server_keyed=server_keyed,
    )


def record_arrays(frame: pl.DataFrame) -> RecordArrays:
    """Arrays of a normalised record frame (see `records.normalize_frame`)."""
    n = frame.height
    mode = frame.get_column("forward_mode")
    prefill = (mode == "prefill").fill_null(False).to_numpy()
    decode = (mode == "decode").fill_null(False).to_numpy()
    mode_null = mode.is_null().to_numpy() if mode.null_count() else np.zeros(n, dtype=bool)
    decode_like = decode
    # Most traces have only prefill and decode; look for the rarer names only when something else is there.
    if np.count_nonzero(prefill) + np.count_nonzero(decode) < n:
        decode_like = mode.is_in(DECODE_LIKE_MODES).fill_null(False).to_numpy()

    latency, latency_null = _values(frame.get_column("latency"))
    activation, activation_null = _values(frame.get_column("expert_activation"))
    seq, seq_null = _values(frame.get_column("seq_lens_sum"))
    batch, batch_null = _values(frame.get_column("batch_size"))

    index = np.flatnonzero(prefill)
    fields: dict[str, np.ndarray] = {}
    if len(index):
        # One multi-column gather for the prefill passes (cheaper than a numpy gather per column).
        pre = frame.select(*(column for column, _, _ in _PREFILL_FIELDS), "per_req_info")[index]
        for column, name, null_name in _PREFILL_FIELDS:
            fields[name], fields[null_name] = _values(pre.get_column(column))
        info = pre.get_column("per_req_info")
        has_info = (info.list.len().fill_null(0) > 0).to_numpy()
        passes = PrefillArrays(index=index, has_info=has_info, **fields)
        entries = _entries(info, passes)
    else:
        # No prefill pass (a decode-only window): empty arrays without the polars gather.
        for _, name, null_name in _PREFILL_FIELDS:
            fields[name], fields[null_name] = np.empty(0), np.empty(0, dtype=bool)
        passes = PrefillArrays(index=index, has_info=np.empty(0, dtype=bool), **fields)
        entries = _no_entries()
    return RecordArrays(
        n=n,
        prefill=prefill,
        decode_like=decode_like,
        mode_null=mode_null,
        latency=latency,
        latency_null=latency_null,
        activation=activation,
        activation_null=activation_null,
        seq_lens_sum=seq,
        seq_null=seq_null,
        batch_size=batch,
        batch_null=batch_null,
        prefill_passes=passes,
        entries=entries,
    )
