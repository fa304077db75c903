"""The reference's `_calculate_continuous_metrics`, vectorised (metrics.md sections 3-4).

Every kept record gives one sample of S-MBU / S-MFU / throughput / latency / KV size; with per-request
(chunked prefill) accounting the prefill samples come from completed requests instead. Published values
are unweighted means of the samples, 0 without samples.

Each family's per-record formula is linear in the activation a and the context c (metrics.md 3.1-3.2):

    W = w0 + wa.a + k.c     (weights + KV read, T-units)      S-MBU = W.b / t / (N.BW)
    C = c0 + s.c            (compute per token, T-units)      S-MFU = C.2.X / (N.P/2)

so the mean over records needs only a handful of sums (sum 1/t, a/t, c/t, ...) instead of per-record
values; they agree with the reference's per-record evaluation to rounding (far below 1e-9 relative
for non-negative inputs; the reference's own left-to-right sums over 1e6 records round more), which
`benchmarks/reference_loop.py` and the tests check. No Python loop touches records.

Where the reference raises (ZeroDivisionError on a zero latency, zero peak bandwidth / FLOPS, a
missing field, a non-numeric GPU count) `continuous_metrics` raises `ReferenceCrash` with a one-line
reason; `reference_metrics` turns it into null metrics + `reason`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import BoolArray, FloatArray, IntArray, RecordArrays
from .decode_sums import BLOCK, Section4DecodeSums
from .model import ReferenceModelSizes

#: Result keys of `_calculate_continuous_metrics`, in its order.
CONTINUOUS_KEYS = (
    "prefill_smbu",
    "prefill_smfu",
    "decoding_smbu",
    "decoding_smfu",
    "kv_size",
    "decoding_throughput",
    "prefill_tp",
    "ttft",
    "tpot",
)


class ReferenceCrash(Exception):
    """The reference raises on this input; the message names the exception and the cause."""


@dataclass(frozen=True)
class ReferenceHardware:
    """Peak figures as the reference uses them: bandwidth in TB/s, tensor FLOPS in TFLOP/s (table value,
    i.e. with sparsity for A100/H100/H200; S-MFU halves it)."""

    gpu: str | None
    peak_bandwidth_tb: float
    peak_flops_tf: float


@dataclass(frozen=True)
class FormulaCoefficients:
    """W = w0 + wa.a + k.c and C = c0 + s.c for one model (T-units; k and s per context token)."""

    w0: float
    wa: float
    k: float
    c0: float
    s: float


def formula_coefficients(sizes: ReferenceModelSizes) -> FormulaCoefficients:
    """The family formulas of metrics.md 3.1-3.2 written as coefficients of a and c."""
    ec = sizes.expert_config
    n_layers = sizes.dims.n_layers
    attn = sizes.attention_size_per_token
    e = ec["expert_size"]
    if sizes.family == "qwen":
        shared = ec["shared_experts_size_total"]
        w0, wa, c0 = n_layers * (shared + attn), n_layers * e, n_layers * (attn + e + shared)
    elif sizes.family == "qwen3":
        n_moe = ec.get("num_moe_layers", 0)
        dense = ec.get("num_dense_layers", n_layers) * ec.get("dense_ffn_size", 0)
        w0, wa, c0 = dense + n_layers * attn, n_moe * e, n_moe * e + dense + n_layers * attn
    elif sizes.family == "deepseek":
        n_sparse = ec["deepseek_sparse_layer_num"]
        shared = ec["shared_experts_size_total"]
        dense = ec["deepseek_num_dense_layer"] * ec["deepseek_dense_ffn_size"]
        w0 = n_layers * attn + n_sparse * shared + dense
        wa = n_sparse * e
        c0 = n_layers * attn + n_sparse * (e + shared) + dense
    else:
        w0, wa, c0 = n_layers * attn, n_layers * e, n_layers * (attn + e)
    if sizes.score_mla:
        s = (sizes.score_k_size + sizes.score_v_size) / 1e12
    else:
        s = 2 * sizes.score_kv_size / 1e12
    return FormulaCoefficients(w0=w0, wa=wa, k=sizes.per_token_kv_size / 1e12, c0=c0, s=s)


def is_number(value: Any) -> bool:
    """True for int / float (what the reference's arithmetic accepts for a GPU count)."""
    return isinstance(value, (int, float))


@dataclass
class _Sums:
    """Sums over the samples of one phase; means are sum / n."""

    n: int = 0
    smbu: float = 0.0
    smfu: float = 0.0
    throughput: float = 0.0
    latency: float = 0.0
    kv: float = 0.0

    def add(self, other: _Sums) -> None:
        self.n += other.n
        self.smbu += other.smbu
        self.smfu += other.smfu
        self.throughput += other.throughput
        self.latency += other.latency
        self.kv += other.kv


@dataclass(frozen=True)
class _Scales:
    coef: FormulaCoefficients
    kv_per_token: float
    mbu: float
    """b / (N.BW): S-MBU = W/t x mbu."""
    mfu: float
    """2 / (N.P/2): S-MFU = C.X x mfu."""

    def sums(self, n: int, w_over_t: float, c_x: float, x: float, t: float, c: float) -> _Sums:
        """A phase's sums from sum(W/t), sum(C.X), sum(X), sum(t) and sum(c) over its n samples."""
        return _Sums(
            n=n,
            smbu=w_over_t * self.mbu,
            smfu=c_x * self.mfu,
            throughput=x,
            latency=t,
            kv=(c + n) * self.kv_per_token / 1e6,
        )


def _phase_sums(
    sc: _Scales, t: FloatArray, a: FloatArray, c: FloatArray, b: FloatArray | None, mask: BoolArray | None
) -> _Sums:
    """Sums over one phase's per-record samples: decode (b given, X = B/t requests/s) or prefill
    (X = c/t tokens/s). With a mask, records outside it get weight 0."""
    n = len(t) if mask is None else int(np.count_nonzero(mask))
    if n == 0:
        return _Sums()
    weight = np.ones(len(t), dtype=bool) if mask is None else mask
    sums = _weighted_sums(weight, t, a, c, b)
    if mask is not None and not np.isfinite(sums).all():
        # A NaN / inf of a record outside the mask (a null, or a genuine one) leaked through its zero
        # weight: redo with those records' values replaced, so only the samples' own count.
        t = np.where(mask, t, 1.0)
        a, c = np.where(mask, a, 0.0), np.where(mask, c, 0.0)
        sums = _weighted_sums(weight, t, a, c, None if b is None else np.where(mask, b, 0.0))
    sum_inv, sum_a, sum_c, sum_x, sum_cx, latency, context = (float(v) for v in sums)
    coef = sc.coef
    w_over_t = coef.w0 * sum_inv + coef.wa * sum_a + coef.k * sum_c
    c_x = coef.c0 * sum_x + coef.s * sum_cx
    return sc.sums(n, w_over_t, c_x, sum_x, latency, context)


def _weighted_sums(
    weight: BoolArray, t: FloatArray, a: FloatArray, c: FloatArray, b: FloatArray | None
) -> np.ndarray:
    """Weighted by w (1 for a sample, 0 otherwise): [sum w/t, sum w.a/t, sum w.c/t, sum w.X, sum w.c.X,
    sum w.t, sum w.c] with X = B/t (decode) or c/t (prefill, b None).

    Taken block by block (`decode_sums.BLOCK`), so each block's inputs are read from memory once for
    all seven sums, into temporaries allocated once per call (a loop over blocks, not over records).
    """
    total = np.zeros(7)
    size = min(len(t), BLOCK)
    # All records weighted (the usual prefill case): the block of ones is never overwritten.
    all_weighted = bool(weight.all())
    w, inv, x = np.ones(size), np.empty(size), np.empty(size)
    dot = np.dot
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, len(t), BLOCK):
            stop = min(start + BLOCK, len(t))
            k = stop - start
            tb, cb, wb, ib, xb = t[start:stop], c[start:stop], w[:k], inv[:k], x[:k]
            if not all_weighted:
                np.copyto(wb, weight[start:stop])
            np.divide(wb, tb, out=ib)
            np.multiply(cb if b is None else b[start:stop], ib, out=xb)
            total += (
                ib.sum(),
                dot(a[start:stop], ib),
                dot(cb, ib),
                xb.sum(),
                dot(cb, xb),
                dot(tb, wb),
                dot(cb, wb),
            )
    return total


def _first(mask: BoolArray, rows: IntArray | None = None) -> int | None:
    """Record index of the first True (mask over records, or over the records listed in rows)."""
    if not mask.any():
        return None
    pos = int(np.argmax(mask))
    return pos if rows is None else int(rows[pos])


def continuous_metrics(
    arr: RecordArrays,
    sizes: ReferenceModelSizes,
    hw: ReferenceHardware,
    num_gpus: Any,
    precision_bytes: float,
) -> dict[str, Any]:
    """The nine `_calculate_continuous_metrics` values (fractions, tokens/s, requests/s, s, KV elements
    / 1e6) plus `chunked_prefill_accounting` (whether per-request mode was used). Raises ReferenceCrash.
    """
    fast = arr.decode.section4
    # Filters: activation missing or < 0 -> skipped; prefill with seq_lens_sum <= 10 (or missing) -> skipped.
    pp = arr.prefill_passes
    with np.errstate(invalid="ignore"):
        kept = ~pp.activation_null & ~(pp.activation < 0) & ~pp.seq_null & ~(pp.seq_lens_sum <= 10)
    chunked = bool(pp.has_info.any())
    per_request = kept & pp.has_info if chunked else np.zeros(len(kept), dtype=bool)
    per_record = kept & ~per_request

    # (records the check applies to, the failing condition, record index map, what the reference raises),
    # in the reference's order; `scope & cond` is only formed where cond holds somewhere.
    checks: list[tuple[BoolArray, BoolArray, IntArray | None, str]] = []
    dec: BoolArray | None = None
    if fast is None:
        with np.errstate(invalid="ignore"):
            dec = ~arr.activation_null & ~(arr.activation < 0) & ~arr.prefill
        for nulls, null_mask, what in (
            (arr.mode_nulls, lambda: arr.mode_null, "KeyError: record without forward_mode"),
            (arr.latency_nulls, lambda: arr.latency_null, "TypeError: record without latency"),
            (arr.seq_nulls, lambda: arr.seq_null, "KeyError: decode record without seq_lens_sum"),
            (arr.batch_nulls, lambda: arr.batch_null, "TypeError: decode record without batch_size"),
        ):
            if nulls:
                checks.append((dec, null_mask(), None, what))
    # With the blocked decode sums (`fast`) every decode check holds: no mode, latency, seq_lens_sum or
    # batch_size is null, and a zero decode latency would have made a sum infinite.
    checks.append((kept, pp.latency_null, pp.index, "TypeError: record without latency"))
    if dec is not None:
        checks.append(
            (dec, arr.latency == 0, None, "ZeroDivisionError: float division by zero (record latency 0)")
        )
    checks.append(
        (
            per_record,
            pp.latency == 0,
            pp.index,
            "ZeroDivisionError: float division by zero (record latency 0)",
        )
    )
    for scope, cond, rows, what in checks:
        row = _first(scope & cond, rows) if cond.any() else None
        if row is not None:
            raise ReferenceCrash(f"{what} at record {row}")

    requests = _request_table(arr, per_request) if chunked else None
    n_requests = len(requests.tokens) if requests is not None else 0
    n_dec = fast.n if fast is not None else int(np.count_nonzero(dec))  # type: ignore[arg-type]
    if n_dec + int(np.count_nonzero(per_record)) + n_requests > 0:
        _check_denominators(hw, num_gpus)
    n_gpus = num_gpus if is_number(num_gpus) else 1
    sc = _Scales(
        coef=formula_coefficients(sizes),
        kv_per_token=sizes.per_token_kv_size,
        mbu=precision_bytes / ((n_gpus * hw.peak_bandwidth_tb) or 1.0),
        mfu=2 / ((n_gpus * hw.peak_flops_tf / 2) or 1.0),
    )
    if per_record.all():
        pre = _phase_sums(sc, pp.latency, pp.activation, pp.seq_lens_sum, None, None)
    else:
        rows = np.flatnonzero(per_record)
        pre = _phase_sums(sc, pp.latency[rows], pp.activation[rows], pp.seq_lens_sum[rows], None, None)
    if requests is not None and n_requests:
        pre.add(_request_sums(requests, sizes, sc))
    if fast is not None:
        dec_sums = _decode_phase_sums(sc, fast)
    else:
        dec_sums = _phase_sums(sc, arr.latency, arr.activation, arr.seq_lens_sum, arr.batch_size, dec)

    def mean(total: float, n: int) -> float:
        return total / n if n else 0

    return {
        "prefill_smbu": mean(pre.smbu, pre.n),
        "prefill_smfu": mean(pre.smfu, pre.n),
        "decoding_smbu": mean(dec_sums.smbu, dec_sums.n),
        "decoding_smfu": mean(dec_sums.smfu, dec_sums.n),
        "kv_size": mean(pre.kv + dec_sums.kv, pre.n + dec_sums.n),
        "decoding_throughput": mean(dec_sums.throughput, dec_sums.n),
        "prefill_tp": mean(pre.throughput, pre.n),
        "ttft": mean(pre.latency, pre.n),
        "tpot": mean(dec_sums.latency, dec_sums.n),
        "chunked_prefill_accounting": chunked,
    }


def _decode_phase_sums(sc: _Scales, d: Section4DecodeSums) -> _Sums:
    """`_phase_sums` of the decode samples from the blocked decode sums."""
    if d.n == 0:
        return _Sums()
    coef = sc.coef
    w_over_t = coef.w0 * d.inv_t + coef.wa * d.a_over_t + coef.k * d.c_over_t
    c_x = coef.c0 * d.x + coef.s * d.c_x
    return sc.sums(d.n, w_over_t, c_x, d.x, d.t, d.c)


def _check_denominators(hw: ReferenceHardware, num_gpus: Any) -> None:
    if not is_number(num_gpus):
        raise ReferenceCrash(f"TypeError: GPU count {num_gpus!r} is not a number")
    if num_gpus * hw.peak_bandwidth_tb == 0:
        raise ReferenceCrash(
            f"ZeroDivisionError: float division by zero (peak bandwidth of GPU {hw.gpu!r} x {num_gpus} GPUs is 0)"
        )
    if num_gpus * hw.peak_flops_tf / 2 == 0:
        raise ReferenceCrash(
            f"ZeroDivisionError: float division by zero (peak FLOPS of GPU {hw.gpu!r} for this precision "
            f"x {num_gpus} GPUs is 0)"
        )


@dataclass(frozen=True)
class _Requests:
    """Completed requests of the chunked-prefill accounting (in key order: the reference's dict order
    only changes the rounding of the means)."""

    latency_sum: FloatArray
    tokens: FloatArray
    activation: FloatArray
    first_row: IntArray
    """Record index of each request's first chunk (for messages); empty unless some latency_sum is 0."""


def _request_table(arr: RecordArrays, per_request: BoolArray) -> _Requests:
    """Per request key: summed pass latency (s), tokens, activation of its last pass; completed only.

    Only entries of passes counted per request (kept, with per_req_info) take part. Keys are never
    reset, so a reused pool slot merges requests (defect 7.14). Each request is charged the whole pass
    latency; tokens = last total_len if > 0 else the summed extend_len.
    """
    e, pp = arr.entries, arr.prefill_passes
    g = e.requests
    n_groups = g.count
    counted = per_request[e.prefill_pos]
    if counted.all():  # the usual case: every entry's pass is counted per request
        entry, gid, pos = None, g.gid, e.prefill_pos
        last_entry = g.last_entries()
    else:
        entry = np.flatnonzero(counted)  # in record / entry order
        gid, pos = g.gid[entry], e.prefill_pos[entry]
        last_entry = _per_group_max(n_groups, gid, entry)

    def per_request_sum(values: np.ndarray) -> FloatArray:
        return np.bincount(gid, weights=values if entry is None else values[entry], minlength=n_groups)

    latency_sum = np.bincount(gid, weights=pp.latency[pos], minlength=n_groups)
    extend_sum = per_request_sum(e.extend_len)
    completed = np.zeros(n_groups, dtype=bool)
    completed[gid[np.flatnonzero(e.is_last_chunk if entry is None else e.is_last_chunk[entry])]] = True
    # total_len: the last one seen (an entry without it leaves it unchanged), 0 before any.
    with_total = ~e.total_null if entry is None else ~e.total_null[entry]
    if with_total.all():
        last_total = last_entry
    else:
        entries = np.arange(e.n) if entry is None else entry
        last_total = _per_group_max(n_groups, gid[with_total], entries[with_total])
    # Index gathers, not boolean masks: a mask with no pattern to it costs ~5x more to apply.
    done = np.flatnonzero(completed)
    last_total = last_total[done]
    if (last_total >= 0).all():  # every completed request saw a total_len (always without nulls)
        total = e.total_len[last_total]
    else:
        total = np.where(last_total >= 0, e.total_len[np.maximum(last_total, 0)], 0.0)
    latency_done = latency_sum[done]
    first_row = np.empty(0, dtype=np.int64)
    if (latency_done == 0).any():
        # Only for the message of the reference's ZeroDivisionError (`_request_sums`).
        first = g.first_entries() if entry is None else _per_group_min(n_groups, gid, entry)
        first_row = pp.index[e.prefill_pos[first[done]]]
    return _Requests(
        latency_sum=latency_done,
        tokens=np.where(total > 0, total, extend_sum[done]),
        activation=pp.activation[e.prefill_pos[last_entry[done]]],
        first_row=first_row,
    )


def _per_group_max(n_groups: int, gid: IntArray, positions: IntArray) -> IntArray:
    """Largest position per group, -1 where a group has none."""
    out = np.full(n_groups, -1, dtype=np.int64)
    np.maximum.at(out, gid, positions)
    return out


def _per_group_min(n_groups: int, gid: IntArray, positions: IntArray) -> IntArray:
    """Smallest position per group (groups without one are never asked for)."""
    out = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, gid, positions)
    return out


def _exact_sum(values: FloatArray) -> float:
    """The correctly rounded sum (math.fsum): the same float whatever order the values come in. With a
    NaN or infinity among them (or a sum beyond the float range) numpy's sum, which is NaN or ±inf in
    any order, where fsum would raise."""
    if np.isfinite(values).all():
        try:
            return math.fsum(values.tolist())
        except OverflowError:
            pass
    return float(values.sum())


def _request_sums(requests: _Requests, sizes: ReferenceModelSizes, sc: _Scales) -> _Sums:
    """Sums of the per-request prefill samples (c := tokens, t := latency_sum, X := tokens / t).

    Exact sums: the requests come in the order of their grouping (hashes of the ids for a frame, first
    appearance for `columns.record_columns`), and both must give the same bytes (docs/decisions.md,
    2026-12-06, reference mode without a frame library)."""
    t, c, a = requests.latency_sum, requests.tokens, requests.activation
    with np.errstate(divide="ignore", invalid="ignore"):
        # prefill_tp = tokens / ttft if ttft > 0 else 0 (NaN > 0 is False in Python too).
        x = np.where(t > 0, c / t, 0.0)
    ttft_sum = _exact_sum(t)
    zero = t == 0
    if zero.any():
        if sizes.family != "generic":
            row = int(requests.first_row[zero].min())
            raise ReferenceCrash(
                "ZeroDivisionError: float division by zero (a completed chunked-prefill request has summed "
                f"latency 0; its first chunk is at record {row})"
            )
        t = np.where(zero, 1.0, t)  # the generic path's `ttft or 1`
    coef = sc.coef
    w_over_t = _exact_sum((coef.w0 + coef.wa * a + coef.k * c) / t)
    c_x = _exact_sum((coef.c0 + coef.s * c) * x)
    return sc.sums(len(t), w_over_t, c_x, _exact_sum(x), ttft_sum, _exact_sum(c))
