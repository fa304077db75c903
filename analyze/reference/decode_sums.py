"""Sums over the decode steps in one blocked pass, for section 4 and for the run-level means at once.

Section 4's decode samples are the records that are not prefill passes and have a valid activation
(present, not < 0); `continuous` needs their sums of 1/t, a/t, c/t, X = B/t, c.X, t and c (t latency,
a activation, c context, B batch size) to form the means of S-MBU, S-MFU, throughput, TPOT and KV
size. The run-level decode means (`run_level`) average latency, activation and batch size over the
decode-like records where the value is >= 0. Both cover ~95 % of a typical trace, so this pass
reads each record's four values once for all of them, block by block:

    w = 1 where a >= 0 and the record is not a prefill pass, else 0;  u = 1 where not a prefill pass
    sums of w, w/t, a.w/t, c.w/t, X = B.w/t, c.X, t.w, c.w, a.w, t.u, B.u;  minima of t and B

It stands in for the masked computations only where it gives the same samples: every non-prefill
record is a "decode" step (section 4 counts every non-prefill mode as decode, the run level only
decode / decoding / mixed), latency, context and batch size have no nulls (a null activation acts
as -1: both are skipped everywhere) - `arrays.RecordArrays` checks these and runs the pass while it
extracts the columns - and the sums are finite: a NaN anywhere, or a zero latency (where the
reference raises), leaves some sum NaN or infinite (0 x NaN is NaN, 1/0 is inf, 0/0 NaN). The
run-level part also needs every latency and batch size >= 0 (the minima). Otherwise `section4` /
`run_level` are None and the callers take their masked paths, which follow the reference record by
record in those cases.

The same pass gathers the four values at the prefill passes, while each block is in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FloatArray = np.ndarray
IntArray = np.ndarray

#: Records per block. Each block's four temporaries (64 KB each) stay in cache and below glibc's
#: mmap threshold (128 KB), so no block maps fresh pages (the time of a call then no longer depends
#: on what the process freed before); and np.dot stays on one thread (OpenBLAS threads dot products
#: above 10,000 elements, which on a 2-core machine costs more than it saves).
BLOCK = 8192


@dataclass(frozen=True)
class Section4DecodeSums:
    """Sums over section 4's decode samples (n of them); X = B/t, requests/s."""

    n: int
    inv_t: float
    a_over_t: float
    c_over_t: float
    x: float
    c_x: float
    t: float
    c: float


@dataclass(frozen=True)
class RunLevelDecodeSums:
    """Count and sum of each value over the decode-like records where it is >= 0."""

    n_latency: int
    latency: float
    n_activation: int
    activation: float
    n_batch: int
    batch: float


@dataclass(frozen=True)
class DecodeSums:
    """None where the blocked pass does not apply (see module docstring)."""

    section4: Section4DecodeSums | None
    run_level: RunLevelDecodeSums | None


#: Where the records do not qualify for the blocked pass.
NOT_APPLICABLE = DecodeSums(section4=None, run_level=None)


def decode_sums(
    t: FloatArray, a: FloatArray, c: FloatArray, b: FloatArray, prefill_index: IntArray
) -> tuple[DecodeSums, list[FloatArray]]:
    """The decode sums of records that qualify (module docstring; `a` with nulls as -1), and
    [t, a, c, b] at `prefill_index` (ascending record indices of the prefill passes)."""
    n_decode = len(t) - len(prefill_index)
    if n_decode == 0:
        zero = DecodeSums(
            section4=Section4DecodeSums(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
            run_level=RunLevelDecodeSums(0, 0.0, 0, 0.0, 0, 0.0),
        )
        return zero, [v[prefill_index] for v in (t, a, c, b)]
    sums, t_min, b_min, at_prefill = _blocked_sums(t, a, c, b, prefill_index)
    n, inv_t, a_over_t, c_over_t, x, c_x, tw, cw, a_w, t_u, b_u = (float(v) for v in sums)
    section4 = None
    if np.isfinite(sums[:8]).all():
        section4 = Section4DecodeSums(int(n), inv_t, a_over_t, c_over_t, x, c_x, tw, cw)
    run_level = None
    if np.isfinite(sums[8:]).all() and t_min >= 0 and b_min >= 0:
        run_level = RunLevelDecodeSums(n_decode, t_u, int(n), a_w, n_decode, b_u)
    return DecodeSums(section4=section4, run_level=run_level), at_prefill


def _blocked_sums(
    t: FloatArray, a: FloatArray, c: FloatArray, b: FloatArray, prefill_index: IntArray
) -> tuple[np.ndarray, float, float, list[FloatArray]]:
    """The eleven sums of the module docstring (in that order), the minima of t and b, and the four
    values at the prefill passes."""
    n = len(t)
    size = min(n, BLOCK)
    w, u, inv, x = np.empty(size), np.ones(size), np.empty(size), np.empty(size)
    starts = range(0, n, BLOCK)
    parts = np.empty((len(starts), 13))
    at_prefill = [np.empty(len(prefill_index)) for _ in range(4)]
    t_at, a_at, c_at, b_at = at_prefill
    # Prefill passes of block i: prefill_index[bounds[i]:bounds[i + 1]].
    bounds = np.searchsorted(prefill_index, np.arange(0, n + BLOCK, BLOCK))
    dot = np.dot
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, start in enumerate(starts):
            stop = min(start + BLOCK, n)
            k = stop - start
            tb, ab, cb, bb = t[start:stop], a[start:stop], c[start:stop], b[start:stop]
            wb, ub, ib, xb = w[:k], u[:k], inv[:k], x[:k]
            np.greater_equal(ab, 0.0, out=wb)
            lo, hi = bounds[i], bounds[i + 1]
            local = prefill_index[lo:hi] - start
            if hi > lo:
                wb[local] = 0.0
                ub[local] = 0.0
                t_at[lo:hi] = tb[local]
                a_at[lo:hi] = ab[local]
                c_at[lo:hi] = cb[local]
                b_at[lo:hi] = bb[local]
            np.divide(wb, tb, out=ib)
            np.multiply(bb, ib, out=xb)
            # Plain sums as dot products with u (w, 1/t and X are 0 where u is): cheaper than .sum().
            parts[i] = (
                dot(wb, ub),
                dot(ib, ub),
                dot(ab, ib),
                dot(cb, ib),
                dot(xb, ub),
                dot(cb, xb),
                dot(tb, wb),
                dot(cb, wb),
                dot(ab, wb),
                dot(tb, ub),
                dot(bb, ub),
                tb.min(),
                bb.min(),
            )
            if hi > lo:
                ub[local] = 1.0
    return parts[:, :11].sum(axis=0), float(parts[:, 11].min()), float(parts[:, 12].min()), at_prefill
