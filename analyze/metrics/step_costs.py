"""Per-step bytes moved and model FLOPs (docs/metrics.md §2–§4), vectorised over flat list buffers.

Inputs are Arrow record batches of the `steps` view (plus the per-step activated-expert totals of
`expert_step_stats`); outputs are numpy columns, one value per step. No Python loop over steps or
requests: per-request quantities are computed on the flattened list values and summed back per step
with `np.add.reduceat`.

Units: bytes, FLOPs (multiply-add = 2 FLOPs), tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..specs import ModelSpec


@dataclass(frozen=True)
class StepCostModel:
    """Everything the per-step formulas need from the model spec and the trace metadata, per file.

    Weight bytes are per *unit* (one layer's attention, one expert, ...), restricted to the decoder
    layers this file's rank covers. `kv_bytes_by_window` maps an attention window (tokens; 0 = full
    attention) to the KV bytes one token occupies summed over the file's layers with that window.
    """

    attention_bytes: float  # all covered layers
    router_bytes: float  # all covered MoE layers
    expert_bytes: float  # ONE routed expert of one layer
    shared_bytes: float  # all covered MoE layers
    dense_bytes: float  # all covered dense-FFN layers
    norms_bytes: float
    lm_head_bytes: float  # 0 unless this file holds the last stage
    embedding_row_bytes: float  # one embedding row (gathered per token); 0 unless first stage
    kv_bytes_by_window: dict[int, float]
    # FLOPs per token (2 x matmul parameters), excluding attention scores and the LM head.
    linear_flops_per_token: float
    lm_head_flops_per_logit: float
    attn_score_flops_per_pair: float  # per (query, key) pair, summed over covered layers, per window
    score_layers_by_window: dict[int, int]
    num_moe_layers: int
    top_k: int
    num_experts: int


def cost_model(
    spec: ModelSpec,
    *,
    layer_start: int = 0,
    layer_end: int | None = None,
    kv_bytes_per_token_per_layer: list[float] | None = None,
) -> StepCostModel:
    """The per-step cost constants of `spec` for the decoder layers [layer_start, layer_end)."""
    end = spec.num_layers if layer_end is None else min(layer_end, spec.num_layers)
    layers = range(layer_start, end)
    n_layers = len(layers)
    n_moe = sum(1 for i in spec.moe_layer_ids if layer_start <= i < end)
    n_dense = sum(1 for i in spec.dense_layer_ids if layer_start <= i < end)
    first, last = layer_start == 0, end == spec.num_layers
    cls = spec.precision.classes
    up = spec.unit_params
    D, V = spec.hidden_size, spec.vocab_size
    lm_head_table = (
        cls["embedding"].bytes_per_unit if spec.tie_word_embeddings else cls["lm_head"].bytes_per_unit
    )
    if kv_bytes_per_token_per_layer is None:
        kv_layers = [spec.kv_bytes_per_token_per_layer()] * spec.num_layers
    else:
        kv_layers = list(kv_bytes_per_token_per_layer)
    kv_by_window: dict[int, float] = {}
    score_layers: dict[int, int] = {}
    for i in layers:
        w = spec.attention_windows[i] or 0
        kv_by_window[w] = kv_by_window.get(w, 0.0) + float(
            kv_layers[i] if i < len(kv_layers) else kv_layers[-1]
        )
        score_layers[w] = score_layers.get(w, 0) + 1
    if spec.mla is not None:
        m = spec.mla
        per_pair = (
            2 * spec.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
            + 2 * spec.num_attention_heads * m.v_head_dim
        )
    else:
        per_pair = 4 * spec.num_attention_heads * spec.head_dim
    linear = (
        n_layers * up["attention"].linear_params
        + n_moe
        * (
            spec.top_k * up["routed_expert"].linear_params
            # Matmul weights only (docs/metrics.md §4): biases (DeepSeek-V2 mlp_bias, the gpt-oss router bias,
            # DeepSeek-V3's e_score_correction_bias) are no matmul; Qwen2's shared gate is (D -> 1).
            + up["shared_experts"].linear_params
            + (D if spec.shared_expert_gate else 0)
            + spec.num_experts * D
        )
        + n_dense * up["dense_ffn"].linear_params
    )
    return StepCostModel(
        attention_bytes=n_layers * cls["attention"].bytes_per_unit,
        router_bytes=n_moe * cls["router"].bytes_per_unit,
        expert_bytes=cls["routed_expert"].bytes_per_unit,
        shared_bytes=n_moe * cls["shared_experts"].bytes_per_unit,
        dense_bytes=n_dense * cls["dense_ffn"].bytes_per_unit,
        norms_bytes=cls["norms"].bytes_per_unit * (n_layers / spec.num_layers),
        lm_head_bytes=lm_head_table if last else 0.0,
        embedding_row_bytes=(cls["embedding"].bytes_per_unit / V) if first else 0.0,
        kv_bytes_by_window=kv_by_window,
        linear_flops_per_token=2.0 * linear,
        lm_head_flops_per_logit=2.0 * V * D if last else 0.0,
        attn_score_flops_per_pair=float(per_pair),
        score_layers_by_window=score_layers,
        num_moe_layers=n_moe,
        top_k=spec.top_k,
        num_experts=spec.num_experts,
    )


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-row lengths) of a list column; null rows have length 0. Values keep their
    integer width (no widening copy); sums widen to int64 as they accumulate."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count == 0 and arr.values.null_count == 0:
        # Straight from the offsets buffer: no length kernel, no null handling.
        offsets = arr.offsets.to_numpy()
        values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        return values.to_numpy(zero_copy_only=False), np.diff(offsets).astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return values, lengths


def _per_row_sum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Exact int64 sum of each row's slice of `values` (rows with no values give 0)."""
    out = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    if values.size:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[nonempty] = np.add.reduceat(values, starts[nonempty], dtype=np.int64)
    return out


def windowed_context_sum(prefix: np.ndarray, new: np.ndarray, window: int) -> np.ndarray:
    """Σ_{i=1..n} min(p + i, W) per request: the keys each of the n new queries attends to.

    W = 0 means full attention: n·p + n(n+1)/2. With a window, the first m = clamp(W − p, 0, n)
    queries see p + i keys and the rest see W. Integer inputs give exact int64 results.
    """
    if prefix.dtype.kind in "iu" and new.dtype.kind in "iu":
        p = prefix.astype(np.int64)
        n = new.astype(np.int64)
        if window <= 0:
            return n * p + n * (n + 1) // 2
        m = np.clip(window - p, 0, n)
        return m * p + m * (m + 1) // 2 + (n - m) * window
    pf = prefix.astype(np.float64)
    nf = new.astype(np.float64)
    if window <= 0:
        return nf * pf + nf * (nf + 1) / 2
    mf = np.clip(window - pf, 0, nf)
    return mf * pf + mf * (mf + 1) / 2 + (nf - mf) * window


# Column names of the per-step request sums; loading hides every `_req_*` column from `steps`.
SUM_NEW = "_req_new_tokens_sum"
SUM_LOGITS = "_req_num_logits_sum"


def sum_kv(window: int) -> str:
    """Column of Σ min(prefix, W) per step (W = 0: Σ prefix)."""
    return f"_req_kv_tokens_w{int(window)}"


def sum_pairs(window: int) -> str:
    """Column of Σ windowed_context_sum(prefix, new, W) per step."""
    return f"_req_score_pairs_w{int(window)}"


def request_sums(batch: pa.RecordBatch | pa.Table, windows: Iterable[int]) -> dict[str, pa.Array]:
    """The per-step sums over each step's request lists that the step costs need, per attention
    window W (0 = full attention; always included): Σ min(prefix, W), Σ (query, key) pairs, Σ new
    tokens, and Σ logit rows (null where the engine recorded no req_num_logits). Exact int64.

    One pass over the flat list buffers; what `step_costs_from_sums` turns into bytes and FLOPs.
    """
    prefix, plen = _flat(batch.column("req_prefix_lens"))
    new, nlen = _flat(batch.column("req_new_tokens"))
    if not np.array_equal(plen, nlen):
        raise ValueError("req_prefix_lens and req_new_tokens differ in length")
    out: dict[str, pa.Array] = {}
    decode_only = bool(new.size) and int(new.min()) == 1 and int(new.max()) == 1
    # One new token per request (decode): Σ new = the request count, Σ pairs = Σ (p + 1).
    new_sum = nlen.copy() if decode_only or not new.size else _per_row_sum(new, nlen)
    for w in sorted({0, *(int(x) for x in windows)}):
        cached = prefix if w <= 0 else np.minimum(prefix, w)
        kv = _per_row_sum(cached, plen)
        out[sum_kv(w)] = pa.array(kv)
        if decode_only and w <= 0:
            pairs = kv + new_sum
        else:
            pairs = _per_row_sum(windowed_context_sum(prefix, new, w), plen)
        out[sum_pairs(w)] = pa.array(pairs)
    out[SUM_NEW] = pa.array(new_sum)
    logits_col = batch.column("req_num_logits")
    if isinstance(logits_col, pa.ChunkedArray):
        logits_col = logits_col.combine_chunks()
    lv, ll = _flat(logits_col)
    valid = pc.is_valid(logits_col).to_numpy(zero_copy_only=False)
    out[SUM_LOGITS] = pa.array(_per_row_sum(lv, ll), mask=~valid)
    return out


def sum_windows(names: Iterable[str]) -> set[int]:
    """The attention windows whose sums a set of column names holds."""
    prefix = sum_kv(0)[: -len("0")]
    return {int(n[len(prefix) :]) for n in names if n.startswith(prefix)}


def step_costs(
    batch: pa.RecordBatch | pa.Table, model: StepCostModel, active_experts: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Per-step bytes and FLOPs for the rows of a `steps` batch (with its request lists).

    `active_experts[i]`: experts with ≥ 1 token in step i, summed over the file's MoE layers (NaN
    where unknown → routed-expert bytes and the totals that include them are NaN).
    Returns numpy arrays keyed by column name (bytes_*, flops_*, kv_*, logit_rows).
    """
    sums = request_sums(batch, model.kv_bytes_by_window)
    cols = {k: batch.column(k) for k in ("num_tokens", "num_reqs")}
    return step_costs_from_sums({**cols, **sums}, model, active_experts)


def _np(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def step_costs_from_sums(
    cols: Mapping[str, pa.Array | pa.ChunkedArray], model: StepCostModel, active_experts: np.ndarray | None
) -> dict[str, np.ndarray]:
    """`step_costs` from `num_tokens`, `num_reqs` and the per-step `request_sums` columns."""
    tokens = _np(cols["num_tokens"]).astype(np.float64)
    n_rows = len(tokens)
    logits = cols[SUM_LOGITS]
    logits_known = _np(pc.is_valid(logits)).astype(bool)
    fallback = _np(cols["num_reqs"]).astype(np.float64)
    logit_rows = np.where(logits_known, _np(pc.fill_null(logits, 0)).astype(np.float64), fallback)

    kv_read = np.zeros(n_rows)
    kv_write_per_token = sum(model.kv_bytes_by_window.values())
    scores = np.zeros(n_rows)
    for window, kv_bytes in model.kv_bytes_by_window.items():
        kv_read += kv_bytes * _np(cols[sum_kv(window)]).astype(np.float64)
        pairs = _np(cols[sum_pairs(window)]).astype(np.float64)
        scores += model.score_layers_by_window[window] * pairs
    kv_write = kv_write_per_token * tokens

    act = np.full(n_rows, np.nan) if active_experts is None else active_experts.astype(np.float64)
    routed = act * model.expert_bytes
    lm_head = np.where(logit_rows > 0, model.lm_head_bytes, 0.0)
    static = (
        model.attention_bytes
        + model.router_bytes
        + model.shared_bytes
        + model.dense_bytes
        + model.norms_bytes
    )
    weights = static + routed + lm_head + tokens * model.embedding_row_bytes
    flops_linear = model.linear_flops_per_token * tokens
    flops_lm = model.lm_head_flops_per_logit * logit_rows
    flops_attn = model.attn_score_flops_per_pair * scores
    context = _np(cols[sum_kv(0)]).astype(np.float64) + _np(cols[SUM_NEW]).astype(np.float64)
    return {
        "bytes_weights": weights,
        "bytes_routed_experts": routed,
        "bytes_static_weights": np.full(n_rows, static) + lm_head + tokens * model.embedding_row_bytes,
        "bytes_kv_read": kv_read,
        "bytes_kv_write": kv_write,
        "bytes_total": weights + kv_read + kv_write,
        "flops_linear": flops_linear,
        "flops_lm_head": flops_lm,
        "flops_attention": flops_attn,
        "flops_total": flops_linear + flops_lm + flops_attn,
        "logit_rows": logit_rows,
        "logits_known": logits_known,
        "context_tokens": context,
    }
