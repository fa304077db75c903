"""Impossible values and repeated keys in trace rows: which rows the loader leaves out, and why.

A row is left out of the views (and so of every metric) when a value in it cannot have been measured:
a timestamp outside any clock's range, a negative count (an int32 that wrapped), a context longer than
any model serves, a first token before the request was sent, a finish before the first token, a
non-finite or negative power sample. A row whose key (a steps / experts file's step, a requests /
outputs file's req_id) an earlier row of the same file already holds is a duplicate: the first is
kept. `RowFilter` applies the rules to a file's batches as they stream by (vectorised, with a fast
path for the common clean batch) and says, per reason, how many rows it left out and the first one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_NS = 4_000_000_000_000_000_000
"""Largest timestamp (ns) any clock the collector reads can hold: 4e18 ns is the year 2096 as Unix
time and 126 years as monotonic uptime. A larger (or a negative) value is corruption."""

MAX_CONTEXT_TOKENS = 1 << 24
"""Most tokens a request's context can hold (16.8 M): above every served model's context window
(the longest, Llama 4 Scout, is 10 M). A larger prefix + new tokens is corruption or int32 overflow."""

_STEP_TIMES = ("t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns")
_STEP_COUNTS = ("num_reqs", "num_tokens")
_STEP_LISTS = ("req_new_tokens", "req_prefix_lens", "req_num_logits", "req_spec_tokens")
_REQUEST_TIMES = ("arrival_ns", "first_token_ns", "finish_ns")
_REQUEST_COUNTS = ("prompt_tokens", "output_tokens", "cached_prompt_tokens", "preemptions", "queue_ns")

KEYS = {"steps": "step", "experts": "step", "requests": "req_id", "outputs": "req_id"}
"""The column that identifies a row within one file of each table (none for gpu_samples)."""


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN (comparisons with NaN are False)."""
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _times(col: pa.Array) -> np.ndarray:
    """A timestamp column as int64 (exact: float64 rounds near 4e18), nulls as 0 (in range)."""
    return np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _out_of_range(values: np.ndarray) -> np.ndarray:
    return (values < 0) | (values >= MAX_NS)


def _list_values(col: pa.Array) -> pa.Array:
    """A list column's values, in order (`pc.list_flatten`; a slice of the child array, no kernel
    call, when no list is null)."""
    if col.null_count:
        return pc.list_flatten(col)
    offsets = col.offsets
    return col.values.slice(offsets[0].as_py(), offsets[-1].as_py() - offsets[0].as_py())


def _integer_values(col: pa.Array) -> np.ndarray | None:
    """An integer column's (or list column's) values as numpy over Arrow's own buffer (no copy),
    None for another type or with nulls. The common case: every column the step and expert rules
    bound; a few µs against ~20 µs of Arrow kernel set-up per call on a 256-row batch."""
    values = _list_values(col) if pa.types.is_list(col.type) else col
    if pa.types.is_integer(values.type) and not values.null_count:
        return values.to_numpy(zero_copy_only=True)
    return None


def _bounds(col: pa.Array) -> tuple[float, float] | None:
    """(min, max) of a numeric or list column's values (exact Python numbers), None when it has none
    (no copy)."""
    ints = _integer_values(col)
    if ints is not None:
        return (int(ints.min()), int(ints.max())) if len(ints) else None
    values = _list_values(col) if pa.types.is_list(col.type) else col
    mm = pc.min_max(values)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return None if lo is None else (lo, hi)


def _any_below(col: pa.Array, limit: float) -> bool:
    ints = _integer_values(col)
    if ints is not None:
        return bool(len(ints)) and int(ints.min()) < limit
    b = _bounds(col)
    return b is not None and b[0] < limit


def _any_outside(col: pa.Array, lo: float, hi: float) -> bool:
    """Whether some value is < lo or >= hi (or NaN, for a float column)."""
    b = _bounds(col)
    if b is None:
        return False
    if pa.types.is_floating(col.type) and pc.any(pc.is_nan(col)).as_py():
        return True
    return b[0] < lo or b[1] >= hi


def _list_rows(col: pa.Array, bad_values: np.ndarray, n: int) -> np.ndarray:
    """Rows of a list column with at least one flagged value (`bad_values` over the flat values)."""
    out = np.zeros(n, bool)
    if bad_values.any():
        parents = np.asarray(pc.list_parent_indices(col))
        out[parents[bad_values]] = True
    return out


def _flat(col: pa.Array) -> np.ndarray:
    return _np(pc.list_flatten(col))


def step_rules(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """Per reason, the rows of a steps batch holding an impossible value."""
    n = batch.num_rows
    names = batch.schema.names
    out: dict[str, np.ndarray] = {}
    # Each check first asks the column's min / max (the clean batch stops there), then finds the rows.
    times = np.zeros(n, bool)
    for c in _STEP_TIMES:
        if c in names and _any_outside(batch.column(c), 0, MAX_NS):
            times |= _out_of_range(_times(batch.column(c)))
    out[f"a timestamp outside [0, {MAX_NS:.0e}) ns"] = times
    negative = np.zeros(n, bool)
    for c in _STEP_COUNTS:
        if c in names and _any_below(batch.column(c), 0):
            negative |= _np(batch.column(c)) < 0
    for c in _STEP_LISTS:
        if c in names and _any_below(batch.column(c), 0):
            negative |= _list_rows(batch.column(c), _flat(batch.column(c)) < 0, n)
    out["a negative token or request count (int32 overflow?)"] = negative
    if "req_prefix_lens" in names and "req_new_tokens" in names:
        prefix, new = batch.column("req_prefix_lens"), batch.column("req_new_tokens")
        bp, bn = _bounds(prefix), _bounds(new)
        if bp is not None and bn is not None and bp[1] + bn[1] > MAX_CONTEXT_TOKENS:
            pf, nf = _flat(prefix), _flat(new)
            if len(pf) == len(nf):  # lists that do not line up are refused by the step sums
                out[f"a context above {MAX_CONTEXT_TOKENS:,} tokens"] = _list_rows(
                    prefix, pf + nf > MAX_CONTEXT_TOKENS, n
                )
    return out


def experts_rules(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    counts = batch.column("counts")
    negative = np.zeros(batch.num_rows, bool)
    if _any_below(counts, 0):
        negative = _list_rows(counts, np.asarray(pc.list_flatten(counts)) < 0, batch.num_rows)
    return {"a negative expert count (int32 overflow?)": negative}


def request_rules(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    n = batch.num_rows
    names = batch.schema.names
    times = np.zeros(n, bool)
    for c in _REQUEST_TIMES:
        if c in names:
            times |= _out_of_range(_times(batch.column(c)))
    if "chunk_times_ns" in names:
        col = batch.column("chunk_times_ns")
        times |= _list_rows(col, _out_of_range(_times(pc.list_flatten(col))), n)
    out = {f"a timestamp outside [0, {MAX_NS:.0e}) ns": times}
    out["first_token_ns before arrival_ns"] = _before(batch, "first_token_ns", "arrival_ns")
    out["finish_ns before first_token_ns or arrival_ns"] = _before(
        batch, "finish_ns", "first_token_ns"
    ) | _before(batch, "finish_ns", "arrival_ns")
    negative = np.zeros(n, bool)
    for c in _REQUEST_COUNTS:
        if c in names:
            negative |= _np(batch.column(c)) < 0
    if "chunk_tokens" in names:
        col = batch.column("chunk_tokens")
        negative |= _list_rows(col, _flat(col) < 0, n)
    out["a negative token count (int32 overflow?)"] = negative
    if "cached_prompt_tokens" in names and "prompt_tokens" in names:
        out["cached_prompt_tokens above prompt_tokens"] = _np(batch.column("cached_prompt_tokens")) > _np(
            batch.column("prompt_tokens")
        )
    return out


def _before(batch: pa.RecordBatch, a: str, b: str) -> np.ndarray:
    """Rows where time `a` < time `b` (exact int64 comparison; False where either is null)."""
    names = batch.schema.names
    if a not in names or b not in names:
        return np.zeros(batch.num_rows, bool)
    less = pc.fill_null(pc.less(batch.column(a), batch.column(b)), False)
    return np.asarray(less.to_numpy(zero_copy_only=False), bool)


def gpu_sample_rules(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    names = batch.schema.names
    out = {f"a timestamp outside [0, {MAX_NS:.0e}) ns": _out_of_range(_times(batch.column("t_ns")))}
    if "power_w" in names:
        raw = batch.column("power_w")
        power = _np(raw)
        valid = np.asarray(raw.is_valid().to_numpy(zero_copy_only=False), bool)
        out["a power that is NaN, infinite or negative"] = valid & ~(np.isfinite(power) & (power >= 0))
    if "energy_mj" in names:
        out["a negative energy counter"] = _np(batch.column("energy_mj")) < 0
    return out


RULES = {
    "steps": step_rules,
    "experts": experts_rules,
    "requests": request_rules,
    "gpu_samples": gpu_sample_rules,
}


@dataclass
class _SeenIntKeys:
    """Integer keys seen so far, as closed intervals where they are consecutive (step keys usually
    are: one interval for a whole file) plus loose values."""

    intervals: list[tuple[int, int]] = field(default_factory=list)
    loose: list[np.ndarray] = field(default_factory=list)
    max_seen: int | None = None

    def contains(self, keys: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(keys), bool)
        if self.max_seen is None or not len(keys) or keys.min() > self.max_seen:
            return hit  # the usual case: keys only grow
        for a, b in self.intervals:
            hit |= (keys >= a) & (keys <= b)
        if self.loose:
            hit |= np.isin(keys, np.concatenate(self.loose))
        return hit

    def add(self, unique_sorted: np.ndarray) -> None:
        if not len(unique_sorted):
            return
        a, b = int(unique_sorted[0]), int(unique_sorted[-1])
        if b - a + 1 == len(unique_sorted):
            if self.intervals and self.intervals[-1][1] + 1 == a:
                self.intervals[-1] = (self.intervals[-1][0], b)
            else:
                self.intervals.append((a, b))
        else:
            self.loose.append(unique_sorted)
        self.max_seen = b if self.max_seen is None else max(self.max_seen, b)


class RowFilter:
    """The rows of one file's batches to keep, in stream order. Stateful (duplicates are found across
    batches): one instance per pass over a file; two passes over one file keep the same rows.
    `drop_steps` are step keys to leave out as well (an experts file: its steps file's left-out steps).
    """

    def __init__(self, kind: str, drop_steps: np.ndarray | None = None) -> None:
        self.kind = kind
        self.key = KEYS.get(kind)
        self.rule = RULES.get(kind)
        self.drop_steps = drop_steps if drop_steps is not None and len(drop_steps) else None
        self.left_out: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.excluded_steps: list[int] = []
        """Step keys of rows left out for an impossible value (not duplicates: their key is kept)."""
        self._int_keys = _SeenIntKeys()
        self._str_keys: set[str] = set()

    def _note(self, reason: str, mask: np.ndarray, keys: np.ndarray | None) -> None:
        n = int(np.count_nonzero(mask))
        if not n:
            return
        self.left_out[reason] += n
        if reason not in self.first:
            i = int(np.flatnonzero(mask)[0])
            self.first[reason] = f"{self.key} {keys[i]}" if keys is not None else f"row {i}"

    def keep(self, batch: pa.RecordBatch) -> np.ndarray | None:
        """A mask of the rows of `batch` to keep; None when every row is kept."""
        n = batch.num_rows
        if not n:
            return None
        keys = None
        if self.key and self.key in batch.schema.names:
            col = batch.column(self.key)
            keys = np.asarray(col.to_numpy(zero_copy_only=False))
        bad = np.zeros(n, bool)
        if self.rule is not None:
            for reason, mask in self.rule(batch).items():
                self._note(reason, mask & ~bad, keys)
                bad |= mask
        if self.key == "step" and keys is not None:
            if self.kind == "steps" and bad.any():
                self.excluded_steps.extend(int(k) for k in keys[bad])
            if self.drop_steps is not None:
                with_step = np.isin(keys, self.drop_steps) & ~bad
                self._note("its step was left out of the steps file", with_step, keys)
                bad |= with_step
        dup = self._duplicates(keys)
        if dup is not None:
            dup &= ~bad
            self._note(f"a {self.key} an earlier row already holds (the first is kept)", dup, keys)
            bad |= dup
        return ~bad if bad.any() else None

    def _duplicates(self, keys: np.ndarray | None) -> np.ndarray | None:
        if keys is None:
            return None
        n = len(keys)
        dup = np.zeros(n, bool)
        if self.key == "step":
            ints = keys.astype(np.int64)
            uniq, first = np.unique(ints, return_index=True)
            dup[:] = True
            dup[first] = False
            dup |= self._int_keys.contains(ints)
            self._int_keys.add(uniq)
        else:
            for i, k in enumerate(keys.tolist()):
                if k in self._str_keys:
                    dup[i] = True
                else:
                    self._str_keys.add(k)
        return dup

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """`batch` without the rows left out."""
        mask = self.keep(batch)
        return batch if mask is None else batch.filter(pa.array(mask))

    def findings(self, label: str) -> list[str]:
        """One line per reason: how many rows were left out, and the first."""
        return [
            f"{label}: {n} row(s) left out of every view and metric: {reason} (first: {self.first[reason]})"
            for reason, n in self.left_out.items()
        ]
