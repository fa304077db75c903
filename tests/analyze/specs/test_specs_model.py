"""ModelSpec structure: KV bytes, MoE/dense layer ids, attention windows, dispatch, errors, registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moecap.analyze.errors import InputError, SpecError
from moecap.analyze.specs import (
    list_registry,
    load_model_config,
    load_model_spec,
    model_spec_from_config,
    supported_families,
)


def small(model_type: str, **fields: Any) -> dict[str, Any]:
    """A small valid config of a family, with `fields` overriding."""
    base: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "intermediate_size": 96,
        "num_experts_per_tok": 2,
    }
    per_family: dict[str, dict[str, Any]] = {
        "mixtral": {"num_local_experts": 4},
        "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16},
        "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
        "deepseek_v3": {
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
        },
    }
    return {"model_type": model_type, **base, **per_family[model_type], **fields}


# ---- KV bytes per token per layer -----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen/Qwen1.5-MoE-A2.7B", 2 * 16 * 128 * 2),  # 2 (K, V) · G 16 · h 2048/16 · 2 B = 8192
        ("mistralai/Mixtral-8x7B-v0.1", 2 * 8 * 128 * 2),
        ("Qwen/Qwen3-30B-A3B", 2 * 4 * 128 * 2),
        ("openai/gpt-oss-20b", 2 * 8 * 64 * 2),
        ("deepseek-ai/DeepSeek-V2-Lite", (512 + 64) * 2),  # latent r_kv + rope key d_r, bf16
        ("deepseek-ai/DeepSeek-V3", (512 + 64) * 2),
    ],
)
def test_kv_bytes_per_token_per_layer(name: str, expected: int) -> None:
    assert load_model_spec(name).kv_bytes_per_token_per_layer() == expected


def test_kv_bytes_mla_decompressed_layout() -> None:
    spec = load_model_spec("deepseek-ai/DeepSeek-V2-Lite")
    # transformers 4.x: per head K = d_n 128 + d_r 64, V = d_v 128; 16 heads; bf16.
    assert spec.kv_bytes_per_token_per_layer(mla_layout="decompressed") == 16 * (128 + 64) * 2 + 16 * 128 * 2
    assert spec.attention_kind == "mla" and spec.head_dim == 192


# ---- MoE / dense layers ---------------------------------------------------------------------
def test_deepseek_first_k_dense_replace() -> None:
    v3 = load_model_spec("deepseek-ai/DeepSeek-V3")
    assert v3.dense_layer_ids == (0, 1, 2)
    assert v3.moe_layer_ids == tuple(range(3, 61))
    assert v3.dense_ffn_dim == 18432 and v3.num_shared_experts == 1 and v3.shared_expert_ffn_dim == 2048
    lite = load_model_spec("deepseek-ai/DeepSeek-V2-Lite")
    assert lite.dense_layer_ids == (0,) and lite.num_moe_layers == 26 and lite.num_shared_experts == 2


def test_deepseek_moe_layer_freq() -> None:
    spec = model_spec_from_config(
        small("deepseek_v3", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    )
    assert spec.moe_layer_ids == (2, 4)
    assert spec.dense_layer_ids == (0, 1, 3, 5)


def test_qwen3_mlp_only_layers_and_decoder_sparse_step() -> None:
    spec = model_spec_from_config(
        small("qwen3_moe", num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=[0, 5])
    )
    # MoE iff i not in mlp_only_layers and (i + 1) % 2 == 0 -> 1, 3, 7 (5 is mlp-only).
    assert spec.moe_layer_ids == (1, 3, 7)
    assert spec.dense_layer_ids == (0, 2, 4, 5, 6)
    assert spec.dense_ffn_dim == 96
    assert load_model_spec("Qwen/Qwen3-30B-A3B").moe_layer_ids == tuple(range(48))


def test_qwen2_shared_expert_with_gate() -> None:
    spec = load_model_spec("Qwen/Qwen1.5-MoE-A2.7B")
    # gate/up/down 5632×2048 + the sigmoid gate's D = 2048 weights
    assert spec.unit_params["shared_experts"].params == 3 * 5632 * 2048 + 2048
    assert spec.shared_expert_gate and spec.num_shared_experts == 1 and spec.shared_expert_ffn_dim == 5632


def test_dense_layers_need_intermediate_size() -> None:
    config = small("qwen3_moe", mlp_only_layers=[1])
    del config["intermediate_size"]
    with pytest.raises(SpecError, match=r"lacks required field.*intermediate_size"):
        model_spec_from_config(config)


# ---- attention windows ------------------------------------------------------------------------
def test_gpt_oss_alternates_sliding_and_full() -> None:
    spec = load_model_spec("openai/gpt-oss-20b")
    assert spec.attention_windows == (128, None) * 12
    config = load_model_config("openai/gpt-oss-20b")
    del config["layer_types"]  # the family default gives the same pattern
    assert model_spec_from_config(config).attention_windows == (128, None) * 12


def test_mixtral_and_phi_windows() -> None:
    assert load_model_spec("mistralai/Mixtral-8x7B-v0.1").attention_windows == (None,) * 32
    assert model_spec_from_config(small("mixtral", sliding_window=4096)).attention_windows == (4096,) * 4
    assert load_model_spec("microsoft/Phi-3.5-MoE-instruct").attention_windows == (131072,) * 32


def test_qwen_use_sliding_window_and_max_window_layers() -> None:
    assert (
        load_model_spec("Qwen/Qwen2-57B-A14B").attention_windows == (None,) * 28
    )  # use_sliding_window false
    config = small("qwen2_moe", use_sliding_window=True, sliding_window=4096, max_window_layers=2)
    assert model_spec_from_config(config).attention_windows == (None, None, 4096, 4096)


def test_layer_types_win_and_bad_ones_are_errors() -> None:
    config = small("qwen2_moe", sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 2)
    assert model_spec_from_config(config).attention_windows == (512, None, 512, None)
    with pytest.raises(SpecError, match="unsupported layer type 'chunked_attention'"):
        model_spec_from_config(small("qwen2_moe", layer_types=["chunked_attention"] * 4))


# ---- dispatch and errors ----------------------------------------------------------------------
def test_every_bundled_config_dispatches_to_its_family() -> None:
    families = {load_model_spec(name).family for name in list_registry()}
    assert families == set(supported_families())


def test_dispatch_by_architectures_when_model_type_is_unknown() -> None:
    config = load_model_config("deepseek-ai/DeepSeek-V3")
    config["model_type"] = "kimi_k2"  # Kimi-K2 reuses DeepseekV3ForCausalLM
    spec = model_spec_from_config(config)
    assert spec.family == "deepseek_v3" and spec.model_type == "kimi_k2"


def test_nested_text_config_inherits_quantization() -> None:
    text = load_model_config("Qwen/Qwen3-30B-A3B")
    wrapper = {
        "model_type": "some_vlm",
        "architectures": ["SomeVLMForConditionalGeneration"],
        "text_config": text,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    spec = model_spec_from_config(wrapper)
    assert spec.family == "qwen3_moe"
    assert spec.total_params() == load_model_spec("Qwen/Qwen3-30B-A3B").total_params()
    assert spec.precision.classes["routed_expert"].weight_format == "fp8-block128x128"


def test_unknown_family_error_names_model_type_and_supported_ones() -> None:
    with pytest.raises(SpecError) as info:
        model_spec_from_config(
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8}
        )
    message = str(info.value)
    assert "model_type 'llama'" in message
    assert (
        "supported model_type values: deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe"
        in message
    )


def test_missing_fields_are_all_named() -> None:
    config = load_model_config("mistralai/Mixtral-8x7B-v0.1")
    del config["hidden_size"], config["num_local_experts"]
    with pytest.raises(SpecError) as info:
        model_spec_from_config(config)
    assert str(info.value).startswith(
        "config for model_type 'mixtral' lacks required field(s): hidden_size, num_local_experts|num_experts"
    )


# ---- registry -------------------------------------------------------------------------------------
def test_registry_lists_the_bundled_configs() -> None:
    names = list_registry()
    assert len(names) == 14
    assert "Qwen/Qwen1.5-MoE-A2.7B" in names and "openai/gpt-oss-20b" in names


@pytest.mark.parametrize(
    "name",
    [
        "Qwen/Qwen1.5-MoE-A2.7B",
        "qwen/qwen1.5-moe-a2.7b",
        "Qwen__Qwen1.5-MoE-A2.7B",
        "qwen__qwen1.5-moe-a2.7b.json",
    ],
)
def test_registry_names_are_case_insensitive(name: str) -> None:
    assert load_model_config(name)["moe_intermediate_size"] == 1408


def test_load_from_file_and_directory(tmp_path: Path) -> None:
    config = load_model_config("openai/gpt-oss-20b")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model_config(tmp_path) == config
    assert load_model_config(str(tmp_path / "config.json")) == config


def test_unknown_model_lists_registry(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown model 'org/nope'.*registry: .*Qwen/Qwen3-30B-A3B"):
        load_model_config("org/nope")
    with pytest.raises(SpecError, match=r"has no config\.json"):
        load_model_config(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="cannot read model config"):
        load_model_config(bad)


def test_specs_import_no_torch_or_engines() -> None:
    code = (
        "import sys, moecap.analyze.specs as s; s.load_model_spec('openai/gpt-oss-20b'); s.resolve_gpu('H100');"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vllm', 'sglang')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
