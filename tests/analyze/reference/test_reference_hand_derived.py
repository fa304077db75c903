"""Hand-derived cases: the arithmetic of metrics.md sections 2-6 written out next to the code's result."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest

from moecap.analyze.errors import InputError, SpecError
from moecap.analyze.reference import (
    CONTINUOUS_KEYS,
    frame_to_records,
    records_to_frame,
    reference_cost,
    reference_metrics,
    reference_model_sizes,
)

# A toy generic (Mixtral-like) model: L=2 layers, D=8, H=2 query heads, G=1 KV head, h=4, F=16.
TOY = {
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "intermediate_size": 16,
    "torch_dtype": "bfloat16",
}
A100 = "NVIDIA-A100-SXM4-80GB"  # BW 2.039 TB/s, bf16 peak 624 TFLOP/s (table value, with sparsity)


def approx(x: float) -> Any:
    return pytest.approx(x, rel=1e-12, abs=0)


def test_static_sizes_of_the_toy_model() -> None:
    s = reference_model_sizes(TOY, "toy/Mixtral-like")
    assert s.family == "generic"
    assert s.per_token_kv_size == 2 * 2 * 4 * 1  # kv = 2.L.h.G = 16 elements per token
    assert s.attention_size_per_token == approx((8 * (2 * 4 + 2 * 1 * 4) + 2 * 4 * 8) / 1e12)  # 192e-12
    assert s.expert_config["expert_size"] == approx(3 * 16 * 8 / 1e12)  # E = 384e-12


def test_one_decode_record_of_a_generic_model() -> None:
    rec = {
        "forward_mode": "decode",
        "batch_size": 4,
        "seq_lens_sum": 100,
        "latency": 0.01,
        "expert_activation": 3.0,
    }
    got = reference_metrics([rec], model_config=TOY, model_name="toy/Mixtral-like", gpu=A100, num_gpus=1)
    L, E, A, kv, c, a, b, t, B = 2, 384e-12, 192e-12, 16, 100, 3.0, 2.0, 0.01, 4
    K = c * kv / 1e12  # KV read, T-units
    W = L * (a * E + A) + K  # 4288e-12 T-units
    assert got["decoding_smbu"] == approx(W * b / t / (1 * 2.039))
    Sc = 2 * c * L * 2 * 4 / 1e12  # attention score 2.c.L.H.h
    C = L * (A + E) + Sc
    X = B / t  # 400 requests/s
    assert got["decoding_smfu"] == approx(4 * C * X / (1 * 624))
    assert got["decoding_throughput"] == approx(400.0)
    assert got["tpot"] == approx(0.01)
    assert got["kv_size"] == approx((c + 1) * kv / 1e6)
    assert got["prefill_smbu"] == 0 and got["ttft"] == 0
    assert got["reason"] is None


def test_one_prefill_record_of_a_qwen_model_counts_the_shared_expert() -> None:
    cfg = dict(TOY, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    rec = {
        "forward_mode": "prefill",
        "batch_size": 1,
        "seq_lens_sum": 1000,
        "latency": 0.5,
        "expert_activation": 2.0,
    }
    got = reference_metrics([rec], model_config=cfg, model_name="Qwen/toy-MoE", gpu=A100, num_gpus=2)
    L, E, A, S = 2, 384e-12, 192e-12, 3 * 32 * 8 / 1e12
    c, a, t, b = 1000, 2.0, 0.5, 2.0
    W = L * (a * E + S + A) + c * 16 / 1e12
    assert got["prefill_smbu"] == approx(W * b / t / (2 * 2.039))
    C = L * (A + E + S) + 2 * c * L * 2 * 4 / 1e12
    assert got["prefill_smfu"] == approx(C * 2 * (c / t) / (2 * 624 / 2))
    assert got["prefill_tp"] == approx(2000.0)  # context tokens / s
    assert got["ttft"] == approx(0.5)


def test_qwen3_without_moe_intermediate_size_loses_its_ffn() -> None:
    """Defect 7.18: W = 0 MoE layers + L dense layers of size 0 + L.A + K."""
    rec = {
        "forward_mode": "decode",
        "batch_size": 1,
        "seq_lens_sum": 10,
        "latency": 0.1,
        "expert_activation": 5.0,
    }
    got = reference_metrics([rec], model_config=TOY, model_name="Qwen/Qwen3-toy", gpu=A100)
    W = 2 * 192e-12 + 10 * 16 / 1e12
    assert got["decoding_smbu"] == approx(W * 2 / 0.1 / 2.039)


def test_chunked_prefill_request_is_charged_every_pass() -> None:
    """Request r: chunks of 600 and 400 tokens in passes of 0.2 s and 0.3 s (the second shared with s)."""
    recs = [
        {
            "forward_mode": "prefill", "batch_size": 1, "seq_lens_sum": 600, "latency": 0.2, "expert_activation": 4.0,
            "per_req_info": [{"req_id": "r", "extend_len": 600, "total_len": 600, "is_last_chunk": False}],
        },
        {
            "forward_mode": "prefill", "batch_size": 2, "seq_lens_sum": 1500, "latency": 0.3, "expert_activation": 6.0,
            "per_req_info": [
                {"req_id": "r", "extend_len": 400, "total_len": 1000, "is_last_chunk": True},
                {"req_id": "s", "extend_len": 500, "total_len": 500, "is_last_chunk": False},
            ],
        },
    ]  # fmt: skip
    got = reference_metrics(recs, model_config=TOY, model_name="toy/generic", gpu=A100, num_gpus=1)
    ttft, tokens, a = 0.2 + 0.3, 1000, 6.0  # s never completes; activation of the last pass
    assert got["chunked_prefill_accounting"] is True
    assert got["ttft"] == approx(ttft)
    assert got["prefill_tp"] == approx(tokens / ttft)
    W = 2 * (a * 384e-12 + 192e-12) + tokens * 16 / 1e12
    assert got["prefill_smbu"] == approx(W * 2 / ttft / 2.039)
    assert got["kv_size"] == approx((tokens + 1) * 16 / 1e6)
    assert got["server_request_ttft"] == approx(ttft)


def test_deepseek_kv_depends_on_the_case_of_the_id() -> None:
    """Defect 7.17: MLA sizes only when the id contains "DeepSeek"."""
    cfg = {
        "num_hidden_layers": 27, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16,
        "moe_intermediate_size": 1408, "intermediate_size": 10944, "first_k_dense_replace": 1,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    }  # fmt: skip
    assert reference_model_sizes(cfg, "deepseek-ai/DeepSeek-V2-Lite").per_token_kv_size == 27 * (512 + 64)
    assert reference_model_sizes(cfg, "deepseek-ai/deepseek-v2-lite").per_token_kv_size == 2 * 27 * 128 * 16


def test_cost_example_of_metrics_md() -> None:
    capital = 19000 * 1 + 7214.0
    energy = (400 * 1 + 350) / 1000 * 0.15 * 3.5 / 3600
    assert reference_cost(3.5, A100, 1) == approx(1.25 * capital + 1.2 * energy)  # factors swapped (7.2)
    assert reference_cost(3.5, "H100-SXM-80GB", 1) is None  # detected key has no price (7.1)


DECODE = {
    "forward_mode": "decode",
    "batch_size": 2,
    "seq_lens_sum": 50,
    "latency": 0.02,
    "expert_activation": 1.0,
}


def test_gpu_count_na_gives_null_metrics_and_reason() -> None:
    rec = dict(DECODE, gpu_num="N/A", gpu_raw_type=A100)
    got = reference_metrics([rec], model_config=TOY, model_name="toy/x", total_time_s=1.0, num_requests=1)
    assert all(got[k] is None for k in CONTINUOUS_KEYS)
    assert "TypeError" in got["reason"] and "N/A" in got["reason"]
    assert got["cost"] is None
    assert got["published_tpot"] == approx(0.02)  # run-level values survive, as in the reference's runner


def test_unknown_gpu_gives_reason_only_when_a_sample_needs_it() -> None:
    got = reference_metrics([DECODE], model_config=TOY, model_name="toy/x", gpu="NVIDIA-L4-22GB")
    assert got["reason"] is not None and "bandwidth" in got["reason"]
    # No kept record -> nothing divides by the zero peak -> the reference returns zeros.
    invalid = dict(DECODE, expert_activation=-1)
    got = reference_metrics([invalid], model_config=TOY, model_name="toy/x", gpu="NVIDIA-L4-22GB")
    assert got["reason"] is None and got["decoding_smbu"] == 0


def test_generic_chunk_with_zero_latency_uses_one_second() -> None:
    """Generic path: `ttft or 1`; prefill_tp guarded to 0 (oracle 'chunk latency 0|Mixtral')."""
    rec = dict(
        DECODE,
        forward_mode="prefill",
        seq_lens_sum=100,
        latency=0.0,
        per_req_info=[{"req_id": "z", "extend_len": 100, "total_len": 100, "is_last_chunk": True}],
    )
    got = reference_metrics([rec], model_config=TOY, model_name="toy/x", gpu=A100, num_gpus=1)
    W = 2 * (1.0 * 384e-12 + 192e-12) + 100 * 16 / 1e12
    assert got["prefill_smbu"] == approx(W * 2 / 1 / 2.039)
    assert got["prefill_tp"] == 0 and got["prefill_smfu"] == 0


def test_published_ttft_falls_back_to_none_without_prefill() -> None:
    got = reference_metrics([DECODE], model_config=TOY, model_name="toy/x", gpu=A100)
    assert got["server_request_ttft"] is None and got["ttft"] == 0
    assert got["published_ttft"] is None  # 0 or simple_ttft (0) or None


def test_defaults_come_from_the_first_record() -> None:
    recs = [
        dict(DECODE, gpu_num=8, gpu_raw_type="NVIDIA-H200-141GB"),
        dict(DECODE, gpu_num=1, gpu_raw_type=A100),
    ]
    got = reference_metrics(recs, model_config=TOY, model_name="toy/x", total_time_s=0.0, num_requests=2)
    assert got["num_gpus"] == 8 and got["gpu_raw_type"] == "NVIDIA-H200-141GB"
    assert got["cost"] == approx(1.25 * (35000 * 8 + 7214.0))


def test_a_frame_gives_the_same_result_as_its_records() -> None:
    recs = [
        dict(DECODE, gpu_num=2, gpu_raw_type=A100),
        {
            "forward_mode": "prefill", "batch_size": 1, "seq_lens_sum": 900, "latency": 0.05,
            "expert_activation": 2.5, "per_req_info": [{"req_pool_idx": 0, "extend_len": 900, "is_last_chunk": True}],
        },
    ]  # fmt: skip
    kwargs: dict[str, Any] = {
        "model_config": TOY,
        "model_name": "toy/x",
        "num_requests": 1,
        "total_time_s": 1.0,
    }
    from_records = reference_metrics(recs, **kwargs)
    frame = records_to_frame(recs)
    assert reference_metrics(frame, **kwargs) == from_records
    assert reference_metrics(frame_to_records(frame), **kwargs) == from_records


def test_req_id_none_is_a_key_of_its_own() -> None:
    """{"req_id": None} keys by None (requests merge), an absent req_id by req_pool_idx."""
    base = {
        "forward_mode": "prefill",
        "batch_size": 1,
        "seq_lens_sum": 100,
        "latency": 0.1,
        "expert_activation": 1.0,
    }

    def run(with_none: bool) -> dict[str, Any]:
        recs = []
        for pool in (1, 2):
            e: dict[str, Any] = {
                "req_pool_idx": pool,
                "extend_len": 100,
                "total_len": 100,
                "is_last_chunk": True,
            }
            if with_none:
                e["req_id"] = None
            recs.append(dict(base, per_req_info=[e]))
        return reference_metrics(recs, model_config=TOY, model_name="toy/x", gpu=A100)

    assert run(with_none=True)["ttft"] == approx(0.2)
    assert run(with_none=False)["ttft"] == approx(0.1)
    frame = records_to_frame([dict(base, per_req_info=[{"req_id": None, "req_pool_idx": 1}])])
    assert frame["per_req_info"].to_list()[0][0]["req_id_present"] is True


def test_user_errors_raise() -> None:
    with pytest.raises(InputError, match="precision"):
        reference_metrics([DECODE], model_config=TOY, model_name="toy/x", precision="bf16")
    with pytest.raises(InputError, match="no records"):
        reference_metrics([], model_config=TOY, model_name="toy/x")
    with pytest.raises(SpecError, match="mapping"):
        reference_metrics([DECODE], model_config=["not", "a", "dict"], model_name="toy/x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"wrong type|fit"):
        reference_metrics([dict(DECODE, latency="fast")], model_config=TOY, model_name="toy/x")


def test_config_the_reference_cannot_read_gives_a_reason() -> None:
    cfg = {k: v for k, v in TOY.items() if k != "num_hidden_layers"}
    got = reference_metrics([DECODE], model_config=cfg, model_name="toy/x", gpu=A100)
    assert got["decoding_smbu"] is None and "num_hidden_layers" in got["reason"]


def test_no_polars_frames_leak_and_results_are_plain() -> None:
    got = reference_metrics([DECODE], model_config=TOY, model_name="toy/x", gpu=A100)
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in got.values())
    assert not any(isinstance(v, pl.Series) for v in got.values())
    assert math.isfinite(got["decoding_smbu"])
