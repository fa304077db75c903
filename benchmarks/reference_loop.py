"""Per-record Python-loop implementation of the MoE-CAP reference formulas: the speed baseline.

This computes what `moecap.analyze.reference.reference_metrics` computes, the way the reference
(`continuous_batching_utils._calculate_continuous_metrics`, `openai_api_profile.run_async`) does it:
a Python loop over record dicts, one function call per record and family. Static, once-per-run facts
(config reading, precision, GPU tables, cost) come from `moecap.analyze.reference`; everything that
touches records is written out here. Used only as the baseline of the speed benchmark and as a
second, independent path in the tests.

    reference_loop_metrics(records, model_config=..., model_name=..., gpu=..., num_gpus=...,
                           precision=..., num_requests=..., total_time_s=...) -> dict
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moecap.analyze.errors import InputError, SpecError
from moecap.analyze.reference import (
    CONTINUOUS_KEYS,
    ReferenceModelSizes,
    normalize_model_id,
    reference_cost,
    reference_effective_precision,
    reference_family,
    reference_model_sizes,
    reference_peak_bw,
    reference_peak_flops,
    reference_precision_bytes,
    resolve_reference_gpu,
)


def _kv_and_score(sizes: ReferenceModelSizes, ctx_len: float) -> tuple[float, float, float]:
    """(kv read T-units, true kv in elements/1e6, attention score T-units) of one record."""
    if sizes.score_mla:
        score = ctx_len * sizes.score_k_size + 0 * sizes.score_k_size / 2
        score = score + ctx_len * sizes.score_v_size + 0 * sizes.score_v_size / 2
    else:
        score = (ctx_len * sizes.score_kv_size + 0 * sizes.score_kv_size / 2) * 2
    kv = sizes.per_token_kv_size
    return ctx_len * kv / 1e12, (ctx_len * kv + 1 * kv) / 1e9 * 1e3, score / 1e12


def _prefill(
    s: ReferenceModelSizes,
    a: float,
    hw: tuple[float, float],
    n: Any,
    b: float,
    ttft: float,
    tp: float,
    kv: float,
    sc: float,
) -> tuple[float, float]:
    ec, L, A = s.expert_config, s.dims.n_layers, s.attention_size_per_token
    E = ec["expert_size"]
    if s.family == "qwen":
        num = (L * (a * E + ec["shared_experts_size_total"] + A) + kv) * b / ttft
        c = L * (A + E + ec["shared_experts_size_total"]) + sc
    elif s.family == "qwen3":
        n_moe, n_dense = ec.get("num_moe_layers", 0), ec.get("num_dense_layers", L)
        dense = n_dense * ec.get("dense_ffn_size", 0)
        num = (n_moe * (a * E) + dense + L * A + kv) * b / ttft
        c = n_moe * E + dense + L * A + sc
    elif s.family == "deepseek":
        sp, nd = ec["deepseek_sparse_layer_num"], ec["deepseek_num_dense_layer"]
        S, Dn = ec["shared_experts_size_total"], ec["deepseek_dense_ffn_size"]
        num = (L * A + sp * (a * E + S) + nd * Dn + kv) * b / ttft
        c = L * A + sp * (E + S) + nd * Dn + sc
    else:
        num = (L * (a * E + A) + kv) * b / (ttft or 1)
        c = L * (A + E) + sc
    return num / (n * hw[0]), c * 2 * tp / (n * hw[1] / 2)


def _decode(
    s: ReferenceModelSizes,
    a: float,
    hw: tuple[float, float],
    n: Any,
    b: float,
    tpot: float,
    tp: float,
    kv: float,
    sc: float,
) -> tuple[float, float]:
    ec, L, A = s.expert_config, s.dims.n_layers, s.attention_size_per_token
    E = ec["expert_size"]
    if s.family == "qwen":
        num = (L * (a * E + ec["shared_experts_size_total"] + A) + kv) * b / tpot
        c = L * (A + E + ec["shared_experts_size_total"]) + sc
    elif s.family == "qwen3":
        n_moe, n_dense = ec.get("num_moe_layers", 0), ec.get("num_dense_layers", L)
        dense = n_dense * ec.get("dense_ffn_size", 0)
        num = (n_moe * a * E + dense + L * A + kv) * b / tpot
        c = n_moe * E + dense + L * A + sc
    elif s.family == "deepseek":
        sp, nd = ec["deepseek_sparse_layer_num"], ec["deepseek_num_dense_layer"]
        S, Dn = ec["shared_experts_size_total"], ec["deepseek_dense_ffn_size"]
        num = (L * A + sp * (a * E + S) + nd * Dn + kv) * b / tpot
        c = L * A + sp * (E + S) + nd * Dn + sc
    else:
        num = (L * (a * E + A) + kv) * b / tpot
        c = L * (A + E) + sc
    return num / (n * hw[0]), c * 2 * tp / (n * hw[1] / 2)


def _continuous(
    records: Sequence[Mapping[str, Any]], s: ReferenceModelSizes, hw: tuple[float, float], n: Any, b: float
) -> dict[str, Any]:
    ttfts: list[float] = []
    tpots: list[float] = []
    prefill_tps: list[float] = []
    decoding_tps: list[float] = []
    kvs: list[float] = []
    p_smbu: list[float] = []
    p_smfu: list[float] = []
    d_smbu: list[float] = []
    d_smfu: list[float] = []

    def prefill_sample(ctx: float, a: float, ttft: float, tp: float) -> None:
        kv, true_kv, sc = _kv_and_score(s, ctx)
        kvs.append(true_kv)
        mbu, mfu = _prefill(s, a, hw, n, b, ttft, tp, kv, sc)
        p_smbu.append(mbu)
        p_smfu.append(mfu)

    def decode_sample(out: Mapping[str, Any]) -> None:
        kv, true_kv, sc = _kv_and_score(s, out["seq_lens_sum"])
        kvs.append(true_kv)
        tpot = out["latency"]
        tp = out["batch_size"] / tpot
        tpots.append(tpot)
        decoding_tps.append(tp)
        mbu, mfu = _decode(s, out.get("expert_activation", 0), hw, n, b, tpot, tp, kv, sc)
        d_smbu.append(mbu)
        d_smfu.append(mfu)

    chunked = any(out.get("forward_mode") == "prefill" and out.get("per_req_info") for out in records)
    accum: dict[Any, dict[str, Any]] = {}
    for out in records:
        ea = out.get("expert_activation")
        if ea is None or ea < 0:
            continue
        if out["forward_mode"] == "prefill" and out.get("seq_lens_sum", 0) <= 10:
            continue
        if out["forward_mode"] != "prefill":
            decode_sample(out)
            continue
        info = out.get("per_req_info", []) if chunked else None
        if not info:
            ttft = out["latency"]
            tp = out["seq_lens_sum"] / ttft
            ttfts.append(ttft)
            prefill_tps.append(tp)
            prefill_sample(out["seq_lens_sum"], ea, ttft, tp)
            continue
        latency = out["latency"]
        for req in info:
            key = req.get("req_id", req.get("req_pool_idx"))
            acc = accum.setdefault(key, {"lat": 0.0, "total": 0, "ext": 0, "act": 0, "done": False})
            acc["lat"] += latency
            acc["ext"] += req.get("extend_len", 0)
            if "total_len" in req:
                acc["total"] = req["total_len"]
            acc["act"] = ea
            if req.get("is_last_chunk"):
                acc["done"] = True
    for acc in accum.values():
        if not acc["done"]:
            continue
        ttft = acc["lat"]
        tokens = acc["total"] if acc["total"] > 0 else acc["ext"]
        tp = tokens / ttft if ttft > 0 else 0
        ttfts.append(ttft)
        prefill_tps.append(tp)
        prefill_sample(tokens, acc["act"], ttft, tp)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0

    return {
        "prefill_smbu": mean(p_smbu),
        "prefill_smfu": mean(p_smfu),
        "decoding_smbu": mean(d_smbu),
        "decoding_smfu": mean(d_smfu),
        "kv_size": mean(kvs),
        "decoding_throughput": mean(decoding_tps),
        "prefill_tp": mean(prefill_tps),
        "ttft": mean(ttfts),
        "tpot": mean(tpots),
        "chunked_prefill_accounting": chunked,
    }


def _client_prefill(records: Sequence[Mapping[str, Any]], n_client: int) -> list[Mapping[str, Any]]:
    passes = [
        r
        for r in records
        if r.get("forward_mode") == "prefill"
        and not (r.get("seq_lens_sum") is not None and r["seq_lens_sum"] <= 10)
    ]
    if n_client <= 0:
        return passes

    def rows(recs: list[Mapping[str, Any]]) -> int:
        return sum(int(r.get("batch_size") or 0) for r in recs)

    trimmed = list(passes)
    while (
        trimmed
        and len(passes) - len(trimmed) < 4
        and rows(trimmed) > n_client
        and (trimmed[0].get("batch_size") or 0) == 1
        and (trimmed[0].get("seq_lens_sum") or 0) < 1000
    ):
        trimmed = trimmed[1:]
    return trimmed if rows(trimmed) == n_client else passes


def _server_ttft(records: Sequence[Mapping[str, Any]]) -> float | None:
    active: dict[tuple[str, Any], float] = {}
    completed: list[float] = []
    for r in records:
        if r.get("forward_mode") != "prefill":
            continue
        seq = r.get("seq_lens_sum")
        if seq is not None and seq <= 10:
            continue
        info = r.get("per_req_info") or []
        if not info:
            continue
        lat = r.get("latency", r.get("ttft"))
        if not isinstance(lat, (int, float)):
            continue
        for req in info:
            if req.get("req_id") is not None:
                key: tuple[str, Any] = ("id", req["req_id"])
            elif req.get("req_pool_idx") is not None:
                key = ("pool", req["req_pool_idx"])
            else:
                continue
            active[key] = active.get(key, 0.0) + float(lat)
            if req.get("is_last_chunk"):
                completed.append(active.pop(key))
    return sum(completed) / len(completed) if completed else None


def _mean_nonneg(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in records if r.get(key) is not None and r[key] >= 0]
    return sum(xs) / len(xs) if xs else None


def reference_loop_metrics(
    records: list[dict[str, Any]],
    *,
    model_config: Mapping[str, Any],
    model_name: str,
    gpu: str | None = None,
    num_gpus: int | None = None,
    precision: str | None = None,
    num_requests: int | None = None,
    total_time_s: float | None = None,
) -> dict[str, Any]:
    """Same arguments and result keys as `reference_metrics`; crashes of the reference become `reason`."""
    if not records:
        raise InputError("no records: expected at least one forward-pass record")
    first = records[0]
    n = (
        num_gpus
        if num_gpus is not None
        else (first.get("gpu_num") if first.get("gpu_num") is not None else 1)
    )
    gpu_key = resolve_reference_gpu(gpu if gpu is not None else first.get("gpu_raw_type"))
    used_dtype = reference_effective_precision(model_config, precision)
    b = reference_precision_bytes(used_dtype)
    hw = (reference_peak_bw(gpu_key) / 1e12, reference_peak_flops(gpu_key, used_dtype) / 1e12)

    reason = None
    continuous: dict[str, Any] | None
    try:
        sizes = reference_model_sizes(model_config, model_name)
        continuous = _continuous(records, sizes, hw, n, b)
    except (SpecError, ZeroDivisionError, TypeError, KeyError) as exc:
        continuous, reason = None, f"the reference raises here: {exc.__class__.__name__}: {exc}"

    client = _client_prefill(records, num_requests or 0)
    decode = [r for r in records if r.get("forward_mode") in ("decode", "decoding", "mixed")]
    server_ttft = _server_ttft(records)
    decode_latency = _mean_nonneg(decode, "latency")
    forwarded: int | None = None
    elapsed: float | None = None
    if client:
        forwarded, elapsed = 0, 0.0
        for r in client:
            sched = r.get("scheduled_tokens")
            if isinstance(sched, (int, float)) and not isinstance(sched, bool):
                forwarded = None if forwarded is None else forwarded + int(sched)
            else:
                forwarded = None
            dur = r.get("latency", r.get("ttft"))
            if isinstance(dur, (int, float)) and not isinstance(dur, bool):
                elapsed = None if elapsed is None else elapsed + float(dur)
            else:
                elapsed = None
    if total_time_s is None or num_requests is None:
        e2e_s = request_per_s = None
    else:
        e2e_s = total_time_s / max(num_requests, 1)
        request_per_s = num_requests / total_time_s if total_time_s > 0 else 0.0
    cost = None
    if continuous is not None and total_time_s is not None and isinstance(n, (int, float)):
        cost = reference_cost(total_time_s, gpu_key, n)

    result: dict[str, Any] = {k: (continuous[k] if continuous else None) for k in CONTINUOUS_KEYS}
    result.update(
        {
            "cost": cost,
            "e2e_s": e2e_s,
            "request_per_s": request_per_s,
            "server_request_ttft": server_ttft,
            "published_ttft": server_ttft
            if server_ttft is not None
            else ((continuous or {}).get("ttft") or None),
            "prefill_pass_latency_s": _mean_nonneg(client, "latency"),
            "published_tpot": decode_latency
            if decode_latency is not None
            else ((continuous or {}).get("tpot") or 0),
            "prefill_forwarded_tokens": forwarded,
            "prefill_step_elapsed_s": elapsed,
            "avg_expert_activation_prefill": _mean_nonneg(client, "expert_activation") or 0,
            "avg_expert_activation_decode": _mean_nonneg(decode, "expert_activation") or 0,
            "prefill_avg_batch_size": _mean_nonneg(client, "batch_size") or 0,
            "decode_avg_batch_size": _mean_nonneg(decode, "batch_size") or 0,
            "reason": reason,
            "gpu_raw_type": gpu_key,
            "num_gpus": n,
            "precision": used_dtype,
            "precision_bytes": b,
            "model_family": reference_family(normalize_model_id(model_name)),
            "chunked_prefill_accounting": continuous["chunked_prefill_accounting"] if continuous else None,
        }
    )
    return result
