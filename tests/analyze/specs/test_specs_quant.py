"""Bytes per module class and GEMM activation dtypes under each quantisation scheme.

Every expected value is derived by hand from the weight shapes (written out below), not from
moecap's own formulas.
"""

from __future__ import annotations

from typing import Any

import pytest

from moecap.analyze.errors import SpecError
from moecap.analyze.specs import load_model_config, model_spec_from_config, parse_quantization
from moecap.analyze.specs.model import ModelSpec


def spec_with(name: str, quantization_config: dict[str, Any] | None, **overrides: Any) -> ModelSpec:
    config = load_model_config(name)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config.update(overrides)
    return model_spec_from_config(config)


def unit_bytes(spec: ModelSpec, module_class: str) -> float:
    return spec.precision.classes[module_class].bytes_per_unit


# ---- fp8, 128×128 blocks (DeepSeek-V3 as released) -----------------------------------------
def test_fp8_block_deepseek_v3() -> None:
    spec = model_spec_from_config(load_model_config("deepseek-ai/DeepSeek-V3"))
    # One routed expert: gate/up 2048×7168 and down 7168×2048, 1 B each + one fp32 scale per
    # 128×128 block: 16·56 blocks each = 896 blocks · 4 B.
    expert = 3 * 2048 * 7168 * 1 + 3 * (16 * 56) * 4
    assert unit_bytes(spec, "routed_expert") == expert
    assert expert == pytest.approx(3 * 2048 * 7168 * (1 + 4 / 16384))
    # Attention (per layer): q_a 1536×7168, q_b 24576×1536, kv_a 576×7168 (576/128 = 4.5 -> 5 row
    # blocks), kv_b 32768×512, o 7168×16384; latent norms q_a 1536 + kv_a 512 stay bf16.
    params = 1536 * 7168 + 24576 * 1536 + 576 * 7168 + 32768 * 512 + 7168 * 16384
    blocks = 12 * 56 + 192 * 12 + 5 * 56 + 256 * 4 + 56 * 128
    assert unit_bytes(spec, "attention") == params + 4 * blocks + 2 * (1536 + 512)
    # Router stays bf16 plus the fp32 e_score_correction_bias (256 experts).
    assert unit_bytes(spec, "router") == 256 * 7168 * 2 + 256 * 4
    # Shared expert (1 × 2048 wide) like a routed one; dense FFN 18432 wide: 144·56 blocks per matrix.
    assert unit_bytes(spec, "shared_experts") == expert
    assert unit_bytes(spec, "dense_ffn") == 3 * 18432 * 7168 + 3 * (144 * 56) * 4
    # Embedding and LM head are not converted: bf16.
    assert unit_bytes(spec, "embedding") == unit_bytes(spec, "lm_head") == 129280 * 7168 * 2
    assert spec.activation_dtype("routed_expert") == "fp8"
    assert spec.activation_dtype("attention") == "fp8"
    assert spec.precision.kv_cache_dtype == "bf16"  # fp8 weights do not imply an fp8 KV cache


def test_fp8_per_tensor_and_modules_to_not_convert() -> None:
    qc = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", qc)
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 * 1
    # attention excluded: q 4096×2048, k/v 512×2048, o 2048×4096, q/k norms 128 each, all bf16
    attention = 4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 2 * 128
    assert unit_bytes(spec, "attention") == 2 * attention
    assert spec.activation_dtype("attention") == "bf16"
    assert spec.activation_dtype("routed_expert") == "fp8"


# ---- mxfp4 (gpt-oss as released) ------------------------------------------------------------
def test_mxfp4_gpt_oss_experts_only() -> None:
    spec = model_spec_from_config(load_model_config("openai/gpt-oss-20b"))
    d, f, e, n, v, h, g, hd = 2880, 2880, 32, 24, 201088, 64, 8, 64
    # Expert: gate_up 2F×D and down D×F at 4 bits + one E8M0 byte per 32 inputs; biases (2F + D) bf16.
    expert = (2 * f * d + d * f) * 0.5 + (2 * f * d // 32 + d * f // 32) * 1 + (2 * f + d) * 2
    assert unit_bytes(spec, "routed_expert") == expert == 13_236_480
    # modules_to_not_convert keeps attention (q, k, v, o + biases + sinks), router, embeddings, LM head in bf16.
    attention = d * h * hd + 2 * d * g * hd + h * hd * d + (h * hd + 2 * g * hd + d) + h
    assert unit_bytes(spec, "attention") == 2 * attention
    assert unit_bytes(spec, "router") == 2 * (e * d + e)
    norms = (2 * n + 1) * d
    total = n * (e * expert + 2 * attention + 2 * (e * d + e)) + 2 * (2 * v * d) + 2 * norms
    assert spec.weight_bytes() == total
    assert spec.weight_bytes(experts_per_moe_layer=4) == total - n * (e - 4) * expert
    # Weight-only: the GEMMs run in bf16 (on Hopper).
    assert spec.activation_dtype("routed_expert") == "bf16"


def test_mxfp4_never_touches_attention_even_without_exclusions() -> None:
    spec = spec_with("openai/gpt-oss-20b", {"quant_method": "mxfp4"})
    assert spec.precision.classes["attention"].weight_format == "bf16"
    assert spec.precision.classes["routed_expert"].weight_format == "mxfp4"
    excluded = spec_with(
        "openai/gpt-oss-20b", {"quant_method": "mxfp4", "modules_to_not_convert": ["mlp.experts"]}
    )
    assert excluded.precision.classes["routed_expert"].weight_format == "bf16"


# ---- GPTQ / AWQ -------------------------------------------------------------------------------
def test_gptq_int4_group128_qwen15_moe() -> None:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    spec = spec_with("Qwen/Qwen1.5-MoE-A2.7B", qc, torch_dtype="float16")
    # Expert gate/up 1408×2048, down 2048×1408. Per weight 0.5 B; per (output row, group of 128
    # inputs) an fp16 scale (2 B) + a packed 4-bit zero point (0.5 B) = 2.5 B; int32 g_idx per input.
    gate = 1408 * 2048 * 0.5 + 1408 * (2048 // 128) * 2.5 + 2048 * 4
    down = 2048 * 1408 * 0.5 + 2048 * (1408 // 128) * 2.5 + 1408 * 4
    assert unit_bytes(spec, "routed_expert") == 2 * gate + down == 4_516_352
    # = params · (0.5 + 2.5/g) + g_idx
    assert 2 * gate + down == 3 * 1408 * 2048 * (0.5 + 2.5 / 128) + (2 * 2048 + 1408) * 4
    # Router, shared-expert gate, norms, embeddings and LM head stay fp16 (lm_head not quantised).
    assert unit_bytes(spec, "router") == 60 * 2048 * 2
    assert unit_bytes(spec, "lm_head") == 151936 * 2048 * 2
    assert spec.activation_dtype("routed_expert") == "fp16"  # W4A16


def test_awq_int4_mixtral_with_and_without_zero_points() -> None:
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    spec = spec_with("mistralai/Mixtral-8x7B-v0.1", qc, torch_dtype="float16")
    # w1/w3 14336×4096 (32 groups per row), w2 4096×14336 (112 groups per row); 2 B scale + 0.5 B zero.
    expert = 3 * 14336 * 4096 * 0.5 + (14336 * 32 + 14336 * 32 + 4096 * 112) * 2.5
    assert unit_bytes(spec, "routed_expert") == expert == 91_521_024
    no_zero = spec_with("mistralai/Mixtral-8x7B-v0.1", {**qc, "zero_point": False}, torch_dtype="float16")
    assert unit_bytes(no_zero, "routed_expert") == 3 * 14336 * 4096 * (0.5 + 2 / 128)
    assert spec.activation_dtype("attention") == "fp16"


# ---- NVFP4 (ModelOpt) ---------------------------------------------------------------------------
def test_modelopt_nvfp4_qwen3_with_fp8_kv() -> None:
    qc = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head", "model.layers.*.self_attn*", "model.layers.*.mlp.gate"],
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", qc)
    # 3 matrices of 768×2048 at 0.5 B + one fp8 scale per 16 inputs: 0.5 + 1/16 B per weight.
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 * (0.5 + 1 / 16) == 2_654_208
    assert spec.precision.classes["attention"].weight_format == "bf16"  # excluded by glob
    assert spec.activation_dtype("routed_expert") == "fp4"  # W4A4 where the GPU has fp4
    assert spec.precision.kv_cache_dtype == "fp8"
    assert spec.kv_bytes_per_token_per_layer() == 2 * 4 * 128 * 1


# ---- compressed-tensors -------------------------------------------------------------------------
def test_compressed_tensors_w4a16_group128() -> None:
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                },
                "input_activations": None,
            }
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", qc)
    # Symmetric: only a bf16 scale (2 B) per group of 128 -> 0.5 + 2/128 B per weight.
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 * (0.5 + 2 / 128)
    # q 4096×2048, k/v 512×2048: 16 groups per row; o 2048×4096: 32 groups per row; q/k norms bf16.
    attention = (4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096) * 0.5
    attention += (4096 * 16 + 2 * 512 * 16 + 2048 * 32) * 2 + 2 * 128 * 2
    assert unit_bytes(spec, "attention") == attention
    assert unit_bytes(spec, "lm_head") == 151936 * 2048 * 2  # ignored
    assert spec.activation_dtype("routed_expert") == "bf16"


def test_compressed_tensors_fp8_channel_w8a8_with_fp8_kv_and_ignored_attention() -> None:
    qc = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            }
        },
        "ignore": ["lm_head", "re:.*self_attn.*"],
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", qc)
    # 1 B per weight + a bf16 scale per output row (768 + 768 + 2048 rows).
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 + (768 + 768 + 2048) * 2
    assert spec.activation_dtype("routed_expert") == "fp8"
    assert spec.precision.classes["attention"].weight_format == "bf16"
    assert spec.precision.kv_cache_dtype == "fp8"


def test_compressed_tensors_nvfp4_and_int8_activations() -> None:
    nvfp4 = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
                "input_activations": {
                    "num_bits": 4,
                    "type": "float",
                    "strategy": "tensor_group",
                    "group_size": 16,
                },
            }
        },
        "ignore": ["lm_head"],
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", nvfp4)
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 * (0.5 + 1 / 16)
    assert spec.activation_dtype("routed_expert") == "fp4"
    w8a8 = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "targets": ["re:.*mlp.experts.*"],
                "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": False},
                "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
            }
        },
    }
    spec = spec_with("Qwen/Qwen3-30B-A3B", w8a8)
    # Asymmetric: per row a bf16 scale + an 8-bit zero point.
    assert unit_bytes(spec, "routed_expert") == 3 * 768 * 2048 + (768 + 768 + 2048) * (2 + 1)
    assert spec.activation_dtype("routed_expert") == "int8"
    assert spec.precision.classes["attention"].weight_format == "bf16"  # not targeted


# ---- plain dtypes, KV dtype, errors -----------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "nbytes"), [("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_plain_dtype_bytes(dtype: str, nbytes: int) -> None:
    spec = spec_with("allenai/OLMoE-1B-7B-0924", None, torch_dtype=dtype)
    assert spec.weight_bytes() == nbytes * spec.total_params()
    assert spec.bytes_per_param("routed_expert") == nbytes


def test_transformers5_dtype_key_and_dtype_override() -> None:
    config = load_model_config("allenai/OLMoE-1B-7B-0924")
    config["dtype"] = "float32"
    assert model_spec_from_config(config).dtype == "fp32"
    assert model_spec_from_config(config, dtype="bf16").weight_bytes() == 2 * 6_919_161_856


def test_kv_cache_dtype_override() -> None:
    spec = model_spec_from_config(load_model_config("mistralai/Mixtral-8x7B-v0.1"), kv_cache_dtype="fp8_e4m3")
    assert spec.kv_bytes_per_token_per_layer() == 2 * 8 * 128 * 1
    assert spec.kv_bytes_per_token_per_layer(kv_cache_dtype="auto") == 2 * 8 * 128 * 1
    assert spec.kv_bytes_per_token_per_layer(kv_cache_dtype="bfloat16") == 2 * 8 * 128 * 2


def test_unknown_quant_method_names_it() -> None:
    with pytest.raises(SpecError, match=r"unsupported quant_method 'hqq'.*supported: awq"):
        parse_quantization({"quant_method": "hqq"}, dtype="bf16")
