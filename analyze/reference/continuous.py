"""The reference's `_calculate_continuous_metrics`, vectorised with polars (metrics.md sections 3-4).

Every kept record gives one sample of S-MBU / S-MFU / throughput / latency / KV size; with per-request
(chunked prefill) accounting the prefill samples come from completed requests instead. Published values
are unweighted means of the samples, 0 without samples. Nothing loops over records in Python.

Where the reference raises (ZeroDivisionError on a zero latency, zero peak bandwidth / FLOPS, a
missing field, a non-numeric GPU count) `continuous_metrics` raises `ReferenceCrash` with a one-line
reason instead; `reference_metrics` turns it into null metrics + `reason`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

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


def is_number(value: Any) -> bool:
    """True for int / float (what the reference's arithmetic accepts for a GPU count)."""
    return isinstance(value, (int, float))


def _gt(expr: pl.Expr, value: float) -> pl.Expr:
    # Python's NaN > x is False; polars orders NaN above every number.
    return (expr > value) & expr.is_not_nan()


def _attention_score(sizes: ReferenceModelSizes, c: pl.Expr) -> pl.Expr:
    """Sc in T-units for context c (output_len fixed at 1, so the triangular term is zero)."""
    if sizes.score_mla:
        return (c * sizes.score_k_size + c * sizes.score_v_size) / 1e12
    return c * sizes.score_kv_size * 2 / 1e12


def _weights_read(sizes: ReferenceModelSizes, a: pl.Expr, kv_read: pl.Expr, *, prefill: bool) -> pl.Expr:
    """W (T-units), metrics.md 3.1, grouped as the reference groups it."""
    ec = sizes.expert_config
    n_layers = sizes.dims.n_layers
    attn = sizes.attention_size_per_token
    e = ec["expert_size"]
    if sizes.family == "generic":
        return n_layers * (a * e + attn) + kv_read
    if sizes.family == "qwen":
        return n_layers * (a * e + ec["shared_experts_size_total"] + attn) + kv_read
    if sizes.family == "qwen3":
        n_moe = ec.get("num_moe_layers", 0)
        n_dense = ec.get("num_dense_layers", n_layers)
        moe = n_moe * (a * e) if prefill else n_moe * a * e
        return moe + n_dense * ec.get("dense_ffn_size", 0) + n_layers * attn + kv_read
    return (
        n_layers * attn
        + ec["deepseek_sparse_layer_num"] * (a * e + ec["shared_experts_size_total"])
        + ec["deepseek_num_dense_layer"] * ec["deepseek_dense_ffn_size"]
        + kv_read
    )


def _compute_per_token(sizes: ReferenceModelSizes, score: pl.Expr) -> pl.Expr:
    """C (T-units per token), metrics.md 3.2: one routed expert per MoE layer, plus the score term."""
    ec = sizes.expert_config
    n_layers = sizes.dims.n_layers
    attn = sizes.attention_size_per_token
    e = ec["expert_size"]
    if sizes.family == "generic":
        return n_layers * (attn + e) + score
    if sizes.family == "qwen":
        return n_layers * (attn + e + ec["shared_experts_size_total"]) + score
    if sizes.family == "qwen3":
        n_moe = ec.get("num_moe_layers", 0)
        n_dense = ec.get("num_dense_layers", n_layers)
        return n_moe * e + n_dense * ec.get("dense_ffn_size", 0) + n_layers * attn + score
    return (
        n_layers * attn
        + ec["deepseek_sparse_layer_num"] * (e + ec["shared_experts_size_total"])
        + ec["deepseek_num_dense_layer"] * ec["deepseek_dense_ffn_size"]
        + score
    )


def _samples(
    sizes: ReferenceModelSizes,
    hw: ReferenceHardware,
    num_gpus: float,
    precision_bytes: float,
    *,
    c: pl.Expr,
    a: pl.Expr,
    t_eff: pl.Expr,
    x: pl.Expr,
    prefill: bool | pl.Expr,
) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(S-MBU, S-MFU, kv record value) per sample. `x` is tokens/s (prefill) or requests/s (decode)."""
    kv = sizes.per_token_kv_size
    kv_read = c * kv / 1e12
    if isinstance(prefill, bool):
        w = _weights_read(sizes, a, kv_read, prefill=prefill)
    else:
        w = (
            pl.when(prefill)
            .then(_weights_read(sizes, a, kv_read, prefill=True))
            .otherwise(_weights_read(sizes, a, kv_read, prefill=False))
        )
    bw_denominator = num_gpus * hw.peak_bandwidth_tb
    flops_denominator = num_gpus * hw.peak_flops_tf / 2
    # Denominators of 0 are caught before the results are used (ReferenceCrash), never divided by.
    smbu = w * precision_bytes / t_eff / (bw_denominator or 1.0)
    smfu = _compute_per_token(sizes, _attention_score(sizes, c)) * 2 * x / (flops_denominator or 1.0)
    kv_record = (c * kv + kv) / 1e9 * 1e3
    return smbu, smfu, kv_record


def _first_row(frame: pl.DataFrame, cond: pl.Expr) -> int | None:
    idx = frame.select(cond.arg_true().first()).item()
    return None if idx is None else int(idx)


def continuous_metrics(
    frame: pl.DataFrame,
    sizes: ReferenceModelSizes,
    hw: ReferenceHardware,
    num_gpus: Any,
    precision_bytes: float,
) -> dict[str, Any]:
    """The nine `_calculate_continuous_metrics` values (fractions, tokens/s, s, KV elements / 1e6) plus
    `chunked_prefill_accounting` (whether per-request mode was used). Raises ReferenceCrash.

    `frame` must have the metric columns (`records.normalize_frame`).
    """
    lf = frame.lazy()
    fm = pl.col("forward_mode")
    is_prefill = fm == "prefill"
    has_info = pl.col("per_req_info").list.len().fill_null(0) > 0
    ea = pl.col("expert_activation")
    t = pl.col("latency")
    c = pl.col("seq_lens_sum")
    bsz = pl.col("batch_size")

    marked = lf.select(
        is_prefill.fill_null(False).alias("_prefill"),
        has_info.alias("_info"),
        (ea.is_not_null() & ~(ea < 0)).alias("_valid"),
        fm.is_null().alias("_no_mode"),
        c,
        t,
        bsz,
        ea,
        pl.col("per_req_info"),
    ).collect()
    chunked = bool(marked.select((pl.col("_prefill") & pl.col("_info")).any()).item())

    p = pl.col("_prefill")
    kept = pl.col("_valid") & ~(p & (c.fill_null(0) <= 10))
    record_level = kept & ~(p & pl.col("_info")) if chunked else kept
    request_level = kept & p & pl.col("_info") if chunked else pl.lit(False)

    checks: list[tuple[pl.Expr, str]] = [
        (kept & pl.col("_no_mode"), "KeyError: record without forward_mode"),
        ((record_level | request_level) & t.is_null(), "TypeError: record without latency"),
        (record_level & ~p & c.is_null(), "KeyError: decode record without seq_lens_sum"),
        (record_level & ~p & bsz.is_null(), "TypeError: decode record without batch_size"),
        (record_level & (t == 0), "ZeroDivisionError: float division by zero (record latency 0)"),
    ]
    for cond, what in checks:
        row = _first_row(marked, cond)
        if row is not None:
            raise ReferenceCrash(f"{what} at record {row}")

    smbu, smfu, kvr = _samples(
        sizes,
        hw,
        num_gpus if is_number(num_gpus) else 0,
        precision_bytes,
        c=c,
        a=ea,
        t_eff=t,
        x=pl.when(p).then(c / t).otherwise(bsz / t),
        prefill=p,
    )
    rec = marked.lazy().filter(record_level)
    pre, dec = p, ~p
    agg = rec.select(
        pre.sum().alias("n_prefill"),
        (~p).sum().alias("n_decode"),
        smbu.filter(pre).sum().alias("prefill_smbu"),
        smfu.filter(pre).sum().alias("prefill_smfu"),
        smbu.filter(dec).sum().alias("decoding_smbu"),
        smfu.filter(dec).sum().alias("decoding_smfu"),
        (bsz / t).filter(dec).sum().alias("decoding_throughput"),
        (c / t).filter(pre).sum().alias("prefill_tp"),
        t.filter(pre).sum().alias("ttft"),
        t.filter(dec).sum().alias("tpot"),
        kvr.sum().alias("kv_size"),
    ).collect()
    sums = agg.row(0, named=True)
    n_prefill, n_decode = int(sums["n_prefill"]), int(sums["n_decode"])

    n_requests = 0
    if chunked:
        req_sums, n_requests = _per_request(marked, request_level, sizes, hw, num_gpus, precision_bytes)
        for key, value in req_sums.items():
            sums[key] += value

    if n_prefill + n_decode + n_requests > 0:
        _check_denominators(hw, num_gpus)

    def mean(key: str, n: int) -> float:
        return sums[key] / n if n else 0

    n_pre_all = n_prefill + n_requests
    return {
        "prefill_smbu": mean("prefill_smbu", n_pre_all),
        "prefill_smfu": mean("prefill_smfu", n_pre_all),
        "decoding_smbu": mean("decoding_smbu", n_decode),
        "decoding_smfu": mean("decoding_smfu", n_decode),
        "kv_size": mean("kv_size", n_pre_all + n_decode),
        "decoding_throughput": mean("decoding_throughput", n_decode),
        "prefill_tp": mean("prefill_tp", n_pre_all),
        "ttft": mean("ttft", n_pre_all),
        "tpot": mean("tpot", n_decode),
        "chunked_prefill_accounting": chunked,
    }


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


def _per_request(
    marked: pl.DataFrame,
    request_level: pl.Expr,
    sizes: ReferenceModelSizes,
    hw: ReferenceHardware,
    num_gpus: Any,
    precision_bytes: float,
) -> tuple[dict[str, float], int]:
    """Chunked-prefill samples: one per completed request key (metrics.md section 4).

    Key = req_id when the entry has that key (even null), else req_pool_idx; keys are never reset, so
    a reused pool slot merges requests (defect 7.14). Each request is charged the whole pass latency.
    """
    info = pl.col("per_req_info")
    field = info.struct.field
    present = pl.coalesce(field("req_id_present"), field("req_id").is_not_null())
    # A None key (req_id present but null, or neither field) is one shared key, as in the reference.
    # String ids and integer slots are told apart by a tag; ids are compared by their string form.
    raw_key = (
        pl.when(present)
        .then(pl.concat_str(pl.lit("id:"), field("req_id")))
        .otherwise(pl.concat_str(pl.lit("pool:"), field("req_pool_idx").cast(pl.String)))
    )
    entries = (
        marked.lazy()
        .filter(request_level)
        .select("latency", "expert_activation", info)
        .explode("per_req_info")
        .select(
            raw_key.fill_null("none").alias("key"),
            pl.col("latency"),
            pl.col("expert_activation"),
            field("extend_len").fill_null(0).alias("extend_len"),
            field("total_len").alias("total_len"),
            field("is_last_chunk").fill_null(False).alias("is_last_chunk"),
        )
    )
    per_key = (
        entries.group_by("key", maintain_order=True)
        .agg(
            pl.col("latency").sum().alias("latency_sum"),
            pl.col("extend_len").sum().alias("extend_sum"),
            pl.col("total_len").drop_nulls().last().fill_null(0).alias("total"),
            pl.col("expert_activation").last().alias("activation"),
            pl.col("is_last_chunk").any().alias("completed"),
        )
        .filter(pl.col("completed"))
        .with_columns(
            pl.when(pl.col("total") > 0)
            .then(pl.col("total"))
            .otherwise(pl.col("extend_sum"))
            .cast(pl.Float64)
            .alias("tokens")
        )
        .collect()
    )
    n = per_key.height
    if n == 0:
        return {}, 0
    ttft = pl.col("latency_sum")
    tokens = pl.col("tokens")
    tp = pl.when(_gt(ttft, 0)).then(tokens / ttft).otherwise(0.0)
    if sizes.family == "generic":
        t_eff = pl.when(ttft == 0).then(1.0).otherwise(ttft)  # the generic path's `ttft or 1`
    else:
        row = _first_row(per_key, ttft == 0)
        if row is not None:
            raise ReferenceCrash(
                "ZeroDivisionError: float division by zero (a completed chunked-prefill request has summed "
                f"latency 0; request key {per_key['key'][row]})"
            )
        t_eff = ttft
    smbu, smfu, kvr = _samples(
        sizes,
        hw,
        num_gpus if is_number(num_gpus) else 0,
        precision_bytes,
        c=tokens,
        a=pl.col("activation"),
        t_eff=t_eff,
        x=tp,
        prefill=True,
    )
    sums = per_key.select(
        smbu.sum().alias("prefill_smbu"),
        smfu.sum().alias("prefill_smfu"),
        tp.sum().alias("prefill_tp"),
        ttft.sum().alias("ttft"),
        kvr.sum().alias("kv_size"),
    ).row(0, named=True)
    return sums, n
