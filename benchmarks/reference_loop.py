"""Per-record Python-loop implementation of the MoE-CAP reference formulas: the speed baseline.

This computes what `moecap.analyze.reference.reference_metrics` computes, the way the reference
(`continuous_batching_utils._calculate_continuous_metrics`, `openai_api_profile.run_async`) does it:
a Python loop over record dicts with the reference's per-record call structure (per-record size dict,
attention score with attribute checks on the config, dispatch on the model name, family function).
Static, once-per-run facts (config reading, precision, GPU tables, cost) come from
`moecap.analyze.reference`; everything that touches records is written out here. Used only as the baseline of the speed benchmark and as a
second, independent path in the tests.

    reference_loop_metrics(records, model_config=..., model_name=..., gpu=..., num_gpus=...,
                           precision=..., num_requests=..., total_time_s=...) -> dict
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
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

# --- per-record helpers, structured as the reference's basic_utils / qwen_utils / deepseek_utils ---


def _attention_score(
    model_name: str, hf_config: Any, ctx_len: float, n_layers: Any, heads: Any, d_head: Any
) -> float:
    """Attention-score term (T-units) of one record; output length fixed at 1 as in the streaming path."""
    output_len = 1
    if (
        "DeepSeek" in model_name
        and hasattr(hf_config, "qk_rope_head_dim")
        and hasattr(hf_config, "qk_nope_head_dim")
        and hasattr(hf_config, "v_head_dim")
    ):
        k_size = n_layers * heads * (hf_config.qk_rope_head_dim + hf_config.qk_nope_head_dim)
        v_size = n_layers * heads * hf_config.v_head_dim
        score = (
            ctx_len * k_size
            + (output_len - 1) * k_size / 2
            + ctx_len * v_size
            + (output_len - 1) * v_size / 2
        )
    else:
        per_token = n_layers * heads * d_head
        score = (ctx_len * per_token + (output_len - 1) * per_token / 2) * 2
    return score / 1e12


def _record_sizes(
    out: Mapping[str, Any], kv_per_token: float, model_name: str, hf_config: Any, dims: Any
) -> dict[str, float]:
    """KV read (T-units), KV record value (elements / 1e6) and attention score of one record."""
    kvs, true_kvs, scores = [], [], []
    ctx_len = out["seq_lens_sum"]
    scores.append(
        _attention_score(model_name, hf_config, ctx_len, dims.n_layers, dims.n_attn_heads, dims.d_head)
    )
    kvs.append(ctx_len * kv_per_token / 1e12)
    true_kvs.append((ctx_len * kv_per_token + 1 * kv_per_token) / 1e9)
    return {
        "kv_size": sum(kvs) / len(kvs),
        "true_kv_size": sum(true_kvs) * 1e3,
        "attention_score": sum(scores) / len(scores),
    }


def _generic(
    n_layers: Any,
    attn: float,
    ec: dict,
    act: float,
    hw: dict,
    n: Any,
    b: float,
    t: float,
    x: float,
    md: dict,
    *,
    prefill: bool,
) -> tuple[float, float]:
    t_eff = (t or 1) if prefill else t
    smbu = (
        (n_layers * (act * ec["expert_size"] + attn) + md["kv_size"])
        * b
        / t_eff
        / (n * hw["peak_bandwidth_tb"])
    )
    smfu = (
        (n_layers * (attn + ec["expert_size"]) + md["attention_score"])
        * 2
        * x
        / (n * hw["peak_flops_tf"] / 2)
    )
    return smbu, smfu


def _qwen(
    n_layers: Any,
    attn: float,
    ec: dict,
    act: float,
    hw: dict,
    n: Any,
    b: float,
    t: float,
    x: float,
    md: dict,
    *,
    prefill: bool,
) -> tuple[float, float]:
    shared = ec["shared_experts_size_total"]
    smbu = (
        (n_layers * (act * ec["expert_size"] + shared + attn) + md["kv_size"])
        * b
        / t
        / (n * hw["peak_bandwidth_tb"])
    )
    smfu = (
        (n_layers * (attn + ec["expert_size"] + shared) + md["attention_score"])
        * 2
        * x
        / (n * hw["peak_flops_tf"] / 2)
    )
    return smbu, smfu


def _qwen3(
    n_layers: Any,
    attn: float,
    ec: dict,
    act: float,
    hw: dict,
    n: Any,
    b: float,
    t: float,
    x: float,
    md: dict,
    *,
    prefill: bool,
) -> tuple[float, float]:
    n_moe = ec.get("num_moe_layers", 0)
    n_dense = ec.get("num_dense_layers", n_layers)
    moe = n_moe * (act * ec["expert_size"]) if prefill else n_moe * act * ec["expert_size"]
    dense = n_dense * ec.get("dense_ffn_size", 0)
    attention = n_layers * attn
    smbu = (moe + dense + attention + md["kv_size"]) * b / t / (n * hw["peak_bandwidth_tb"])
    smfu = (
        (n_moe * ec["expert_size"] + dense + attention + md["attention_score"])
        * 2
        * x
        / (n * hw["peak_flops_tf"] / 2)
    )
    return smbu, smfu


def _deepseek(
    n_layers: Any,
    attn: float,
    ec: dict,
    act: float,
    hw: dict,
    n: Any,
    b: float,
    t: float,
    x: float,
    md: dict,
    *,
    prefill: bool,
) -> tuple[float, float]:
    sparse, shared = ec["deepseek_sparse_layer_num"], ec["shared_experts_size_total"]
    dense = ec["deepseek_num_dense_layer"] * ec["deepseek_dense_ffn_size"]
    weights = n_layers * attn + sparse * (act * ec["expert_size"] + shared) + dense + md["kv_size"]
    smbu = weights * b / t / (n * hw["peak_bandwidth_tb"])
    compute = n_layers * attn + sparse * (ec["expert_size"] + shared) + dense + md["attention_score"]
    smfu = compute * 2 * x / (n * hw["peak_flops_tf"] / 2)
    return smbu, smfu


def _dispatch(model_name: str) -> Any:
    if "Qwen" in model_name and "Qwen3" not in model_name:
        return _qwen
    if "Qwen3" in model_name:
        return _qwen3
    if "DeepSeek" in model_name:
        return _deepseek
    return _generic


def _prefill_metrics(model_name: str, **kw: Any) -> tuple[float, float]:
    return _dispatch(model_name)(**kw, prefill=True)


def _decoding_metrics(model_name: str, **kw: Any) -> tuple[float, float]:
    return _dispatch(model_name)(**kw, prefill=False)


def _continuous(
    records: Sequence[Mapping[str, Any]], s: ReferenceModelSizes, hf_config: Any, hw: dict, n: Any, b: float
) -> dict[str, Any]:
    """`_calculate_continuous_metrics`, record by record."""
    name, dims, ec, attn = s.model_name, s.dims, s.expert_config, s.attention_size_per_token
    kv_per_token = s.per_token_kv_size
    ttfts: list[float] = []
    tpots: list[float] = []
    prefill_tps: list[float] = []
    decoding_tps: list[float] = []
    kvs: list[float] = []
    p_smbu: list[float] = []
    p_smfu: list[float] = []
    d_smbu: list[float] = []
    d_smfu: list[float] = []

    def common(act: float, t: float, x: float, md: dict) -> dict[str, Any]:
        return {
            "n_layers": dims.n_layers,
            "attn": attn,
            "ec": ec,
            "act": act,
            "hw": hw,
            "n": n,
            "b": b,
            "t": t,
            "x": x,
            "md": md,
        }

    chunked = any(out.get("forward_mode") == "prefill" and out.get("per_req_info") for out in records)
    accum: dict[Any, dict[str, Any]] = {}
    for out in records:
        if out.get("expert_activation") is None or out.get("expert_activation", 0) < 0:
            continue
        if out["forward_mode"] == "prefill" and out.get("seq_lens_sum", 0) <= 10:
            continue
        if out["forward_mode"] != "prefill":
            md = _record_sizes(out, kv_per_token, name, hf_config, dims)
            kvs.append(md["true_kv_size"])
            act = out.get("expert_activation", 0)
            tpot = out["latency"]
            batch_size = out["batch_size"]
            tp = batch_size / tpot
            tpots.append(tpot)
            decoding_tps.append(tp)
            mbu, mfu = _decoding_metrics(name, **common(act, tpot, tp, md))
            d_smbu.append(mbu)
            d_smfu.append(mfu)
            continue
        info = out.get("per_req_info", []) if chunked else None
        if not info:
            act = out.get("expert_activation", 0)
            ttft = out["latency"]
            tp = out["seq_lens_sum"] / ttft
            ttfts.append(ttft)
            prefill_tps.append(tp)
            md = _record_sizes(out, kv_per_token, name, hf_config, dims)
            kvs.append(md["true_kv_size"])
            mbu, mfu = _prefill_metrics(name, **common(act, ttft, tp, md))
            p_smbu.append(mbu)
            p_smfu.append(mfu)
            continue
        latency = out["latency"]
        for req in info:
            key = req.get("req_id", req.get("req_pool_idx"))
            if key not in accum:
                accum[key] = {"lat": 0.0, "total": 0, "ext": 0, "act": 0, "last": None, "done": False}
            acc = accum[key]
            acc["lat"] += latency
            acc["ext"] += req.get("extend_len", 0)
            if "total_len" in req:
                acc["total"] = req["total_len"]
            acc["act"] = out.get("expert_activation", 0)
            acc["last"] = out
            if req.get("is_last_chunk"):
                acc["done"] = True
    for acc in accum.values():
        if not acc["done"] or acc["last"] is None:
            continue
        ttft = acc["lat"]
        tokens = acc["total"] if acc["total"] > 0 else acc["ext"]
        tp = tokens / ttft if ttft > 0 else 0
        ttfts.append(ttft)
        prefill_tps.append(tp)
        aggregated = dict(acc["last"])
        aggregated["seq_lens_sum"] = tokens
        md = _record_sizes(aggregated, kv_per_token, name, hf_config, dims)
        kvs.append(md["true_kv_size"])
        mbu, mfu = _prefill_metrics(name, **common(acc["act"], ttft, tp, md))
        p_smbu.append(mbu)
        p_smfu.append(mfu)

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
    hw = {
        "peak_bandwidth_tb": reference_peak_bw(gpu_key) / 1e12,
        "peak_flops_tf": reference_peak_flops(gpu_key, used_dtype) / 1e12,
    }
    # The reference's family helpers read the config as attributes (a transformers config object).
    hf_config = SimpleNamespace(**model_config)

    reason = None
    continuous: dict[str, Any] | None
    try:
        sizes = reference_model_sizes(model_config, model_name)
        continuous = _continuous(records, sizes, hf_config, hw, n, b)
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


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n reference records: every 20th a chunked prefill pass of 1-4 requests, the rest decode steps.

    Requests take 1-4 chunks of 512 tokens, so most span several passes; their ids are SGLang's
    "<pool slot>_<counter>", and a slot is reused once its request completes.
    """
    import random

    rng = random.Random(seed)
    free_slots = list(range(512))
    counters = [0] * 512
    active: list[dict[str, Any]] = []  # requests with chunks left
    records: list[dict[str, Any]] = []
    common = {"gpu_num": 8, "gpu_raw_type": "NVIDIA-H200-141GB"}
    for i in range(n):
        if i % 20 == 0:
            while len(active) < 4 and free_slots:
                slot = free_slots.pop(rng.randrange(len(free_slots)))
                counters[slot] += 1
                active.append(
                    {"slot": slot, "id": f"{slot}_{counters[slot]}", "left": rng.randint(1, 4), "done": 0}
                )
            batch = active[: rng.randint(1, 4)]
            info = []
            for req in batch:
                req["left"] -= 1
                req["done"] += 512
                info.append(
                    {
                        "req_pool_idx": req["slot"],
                        "req_id": req["id"],
                        "extend_len": 512,
                        "total_len": req["done"],
                        "is_last_chunk": req["left"] == 0,
                    }
                )
            for req in [r for r in batch if r["left"] == 0]:
                active.remove(req)
                free_slots.append(req["slot"])
            records.append(
                common
                | {
                    "forward_mode": "prefill",
                    "batch_size": len(batch),
                    "seq_lens_sum": sum(e["total_len"] for e in info),
                    "latency": rng.uniform(0.05, 0.3),
                    "expert_activation": rng.uniform(10, 60),
                    "per_req_info": info,
                    "scheduled_tokens": 512 * len(batch),
                }
            )
        else:
            bs = rng.randint(1, 64)
            records.append(
                common
                | {
                    "forward_mode": "decode",
                    "batch_size": bs,
                    "seq_lens_sum": bs * rng.randint(100, 4000),
                    "latency": rng.uniform(0.01, 0.05),
                    "expert_activation": rng.uniform(1, 60) if rng.random() > 0.01 else -1,
                }
            )
    return records


def _main() -> None:
    """Time the loop against the vectorised mode: python benchmarks/reference_loop.py [N]."""
    import sys
    import time

    from moecap.analyze.reference import records_to_frame, reference_metrics

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    config = {
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
    }  # fmt: skip
    kwargs: dict[str, Any] = {
        "model_config": config,
        "model_name": "Qwen/Qwen3-30B-A3B",
        "gpu": "NVIDIA-H200-141GB",
        "num_gpus": 8,
        "num_requests": n // 10,
        "total_time_s": 3600.0,
    }
    chunked = synthetic_records(n)
    plain = [{k: v for k, v in r.items() if k != "per_req_info"} for r in chunked]

    def best(fn: Any, repeat: int) -> tuple[float, float, Any, list[float]]:
        """(wall s, CPU s, result, every wall s): the minimum of each over the repeats."""
        walls, cpus, result = [], [], None
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return min(walls), min(cpus), result, walls

    for label, records in (
        ("chunked prefill: every 20th pass prefills chunks of 1-4 requests (per_req_info)", chunked),
        ("same passes without per_req_info", plain),
    ):
        loop_wall, loop_cpu, by_loop, _ = best(lambda r=records: reference_loop_metrics(r, **kwargs), 3)
        build_wall, _, frame, _ = best(lambda r=records: records_to_frame(r), 3)
        frame_wall, frame_cpu, by_frame, frame_walls = best(
            lambda f=frame: reference_metrics(f, **kwargs), 15
        )
        list_wall, _, by_records, _ = best(lambda r=records: reference_metrics(r, **kwargs), 3)
        same = all(
            v == by_frame[k] or abs(v - by_frame[k]) <= 1e-9 * abs(v)
            for k, v in by_loop.items()
            if isinstance(v, float)
        )
        assert by_records == by_frame
        print(f"{n} records, {label}; loop and vectorised agree to 1e-9: {same}")
        print(
            f"  loop (reference structure)       {loop_wall * 1e3:8.1f} ms wall {loop_cpu * 1e3:8.1f} ms CPU"
        )
        print(
            f"  vectorised, from a record frame  {frame_wall * 1e3:8.1f} ms wall {frame_cpu * 1e3:8.1f} ms CPU"
            f"   {loop_wall / frame_wall:5.0f}x wall {loop_cpu / frame_cpu:5.0f}x CPU"
        )
        # The loop is timed 3 times, the ~20 ms vectorised call 15 times; the minimum of more samples is
        # lower, and a process's first calls are slower (warm-up), so the same count is shown too.
        first3 = min(frame_walls[:3])
        print(
            f"    (best of its first 3 calls, as many as the loop's: {first3 * 1e3:.1f} ms, {loop_wall / first3:.0f}x)"
        )
        print(f"  records -> frame (polars)        {build_wall * 1e3:8.1f} ms wall")
        print(
            f"  vectorised, from list[dict]      {list_wall * 1e3:8.1f} ms wall   {loop_wall / list_wall:5.1f}x wall"
        )


if __name__ == "__main__":
    _main()
