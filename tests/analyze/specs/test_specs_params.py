"""Parameter counts per module class agree with the models transformers builds.

Every bundled config (and random small configs of every family) is built with transformers on
the meta device; the total and the per-class counts obtained by classifying the real tensor
names must equal ModelSpec's exactly. Invariants of the counts and bytes are property-tested.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap.analyze.specs import MODULE_CLASSES, list_registry, load_model_config, model_spec_from_config

try:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError:  # pragma: no cover - the dev environment has both
    torch = None  # type: ignore[assignment]

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and transformers")


def classify(name: str) -> str:
    """Module class of a transformers state_dict key (independent of moecap's own tables)."""
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if re.search(r"\.mlp\.(gate|router)\.", name):
        return "router"
    if ".mlp.experts." in name:
        return "routed_expert"
    if re.search(r"\.mlp\.shared_expert(s|_gate)?\.", name):
        return "shared_experts"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "dense_ffn"
    if "layernorm" in name or name.startswith("model.norm."):
        return "norms"
    raise AssertionError(f"unclassified tensor {name}")


def meta_counts(config: dict[str, Any]) -> tuple[int, int, dict[str, int], list[str]]:
    """(parameters, persistent buffer elements, elements per class, buffer names) of the model
    transformers builds from `config` on the meta device; tied tensors counted once."""
    cfg = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
    hf_config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    n_params = sum(p.numel() for p in model.parameters())
    param_ids = {id(p) for p in model.parameters()}
    per_class = dict.fromkeys(MODULE_CLASSES, 0)
    seen: set[int] = set()
    buffers: list[str] = []
    n_buffers = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        per_class[classify(name)] += tensor.numel()
        if id(tensor) not in param_ids:
            buffers.append(name)
            n_buffers += tensor.numel()
    return n_params, n_buffers, per_class, buffers


def assert_matches_meta(config: dict[str, Any]) -> None:
    spec = model_spec_from_config(config)
    n_params, n_buffers, per_class, buffers = meta_counts(config)
    # The only persistent buffer a checkpoint stores is DeepSeek-V3's router correction bias.
    assert all(b.endswith("mlp.gate.e_score_correction_bias") for b in buffers), buffers
    assert n_buffers == spec.unit_params["router"].fp32 * spec.num_moe_layers
    assert spec.total_params() == n_params + n_buffers
    assert spec.params_by_class() == per_class


# ---- bundled configs ---------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("name", list_registry())
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bundled_config_counts_equal_meta_model(name: str, tied: bool) -> None:
    config = load_model_config(name)
    if tied:
        config["tie_word_embeddings"] = True
    assert_matches_meta(config)


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        # Totals the model cards state (rounded as they round them).
        ("mistralai/Mixtral-8x7B-v0.1", 46.7),
        ("deepseek-ai/DeepSeek-V3", 671.0),
        ("deepseek-ai/DeepSeek-V2", 236.0),
        ("deepseek-ai/DeepSeek-V2-Lite", 15.7),
        ("Qwen/Qwen3-30B-A3B", 30.5),
        ("Qwen/Qwen3-235B-A22B", 235.0),
        ("openai/gpt-oss-120b", 116.8),
        ("openai/gpt-oss-20b", 20.9),
        ("allenai/OLMoE-1B-7B-0924", 6.9),
        ("microsoft/Phi-3.5-MoE-instruct", 41.9),
    ],
)
def test_totals_agree_with_model_cards(name: str, billions: float) -> None:
    total = model_spec_from_config(load_model_config(name)).total_params() / 1e9
    assert total == pytest.approx(billions, rel=0.006)


# ---- random small configs ----------------------------------------------------------------
@st.composite
def heads(draw: st.DrawFn) -> dict[str, int]:
    h = draw(st.sampled_from([2, 4, 8]))
    g = draw(st.sampled_from([d for d in (1, 2, 4, 8) if h % d == 0]))
    return {
        "num_attention_heads": h,
        "num_key_value_heads": g,
        "hidden_size": h * draw(st.sampled_from([4, 8])),
    }


@st.composite
def mixtral_like(draw: st.DrawFn, model_type: str) -> dict[str, Any]:
    e = draw(st.integers(1, 6))
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "num_hidden_layers": draw(st.integers(1, 4)),
        "vocab_size": draw(st.integers(8, 64)),
        "intermediate_size": draw(st.integers(4, 40)),
        "num_local_experts": e,
        "num_experts_per_tok": draw(st.integers(1, e)),
        "sliding_window": draw(st.none() | st.integers(4, 64)),
        "tie_word_embeddings": draw(st.booleans()),
        **draw(heads()),
    }
    if model_type == "phimoe":
        cfg["attention_bias"] = draw(st.booleans())
        cfg["lm_head_bias"] = draw(st.booleans())
    return cfg


@st.composite
def qwen_moe(draw: st.DrawFn, model_type: str) -> dict[str, Any]:
    n = draw(st.integers(1, 5))
    e = draw(st.integers(1, 6))
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "num_hidden_layers": n,
        "vocab_size": draw(st.integers(8, 64)),
        "intermediate_size": draw(st.integers(4, 40)),
        "moe_intermediate_size": draw(st.integers(4, 24)),
        "num_experts": e,
        "num_experts_per_tok": draw(st.integers(1, e)),
        "decoder_sparse_step": draw(st.integers(1, 3)),
        "mlp_only_layers": draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)),
        "tie_word_embeddings": draw(st.booleans()),
        **draw(heads()),
    }
    if model_type == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = draw(st.integers(4, 40))
        cfg["qkv_bias"] = draw(st.booleans())
    else:
        cfg["head_dim"] = draw(st.sampled_from([4, 8, 16]))
        cfg["attention_bias"] = draw(st.booleans())
    return cfg


@st.composite
def olmoe(draw: st.DrawFn) -> dict[str, Any]:
    e = draw(st.integers(1, 6))
    return {
        "model_type": "olmoe",
        "num_hidden_layers": draw(st.integers(1, 4)),
        "vocab_size": draw(st.integers(8, 64)),
        "intermediate_size": draw(st.integers(4, 40)),
        "num_experts": e,
        "num_experts_per_tok": draw(st.integers(1, e)),
        "attention_bias": draw(st.booleans()),
        "tie_word_embeddings": draw(st.booleans()),
        **draw(heads()),
    }


@st.composite
def deepseek(draw: st.DrawFn, model_type: str) -> dict[str, Any]:
    n = draw(st.integers(1, 5))
    e = draw(st.integers(1, 8))
    h = draw(st.sampled_from([2, 4, 8]))
    return {
        "model_type": model_type,
        "num_hidden_layers": n,
        "hidden_size": draw(st.sampled_from([16, 32, 48])),
        "num_attention_heads": h,
        "num_key_value_heads": h,
        "vocab_size": draw(st.integers(8, 64)),
        "intermediate_size": draw(st.integers(4, 40)),
        "moe_intermediate_size": draw(st.integers(4, 24)),
        "n_routed_experts": e,
        "num_experts_per_tok": draw(st.integers(1, e)),
        "n_shared_experts": draw(st.integers(0, 2)),
        "first_k_dense_replace": draw(st.integers(0, n)),
        "moe_layer_freq": 1,  # transformers ignores it (every released checkpoint has 1)
        "q_lora_rank": draw(st.none() | st.integers(4, 24)),
        "kv_lora_rank": draw(st.integers(4, 24)),
        "qk_rope_head_dim": draw(st.sampled_from([2, 4, 8])),
        "qk_nope_head_dim": draw(st.integers(2, 12)),
        "v_head_dim": draw(st.integers(2, 12)),
        "attention_bias": draw(st.booleans()),
        "n_group": 1,
        "topk_group": 1,
        "tie_word_embeddings": draw(st.booleans()),
    }


@st.composite
def gpt_oss(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 5))
    e = draw(st.integers(1, 6))
    return {
        "model_type": "gpt_oss",
        "num_hidden_layers": n,
        "vocab_size": draw(st.integers(8, 64)),
        "intermediate_size": draw(st.integers(4, 40)),
        "head_dim": draw(st.sampled_from([4, 8, 16])),
        "num_local_experts": e,
        "num_experts_per_tok": draw(st.integers(1, e)),
        "sliding_window": draw(st.integers(4, 64)),
        "attention_bias": draw(st.booleans()),
        "tie_word_embeddings": draw(st.booleans()),
        **draw(heads()),
    }


any_family_config = st.one_of(
    mixtral_like("mixtral"),
    mixtral_like("phimoe"),
    qwen_moe("qwen2_moe"),
    qwen_moe("qwen3_moe"),
    olmoe(),
    deepseek("deepseek_v2"),
    deepseek("deepseek_v3"),
    gpt_oss(),
)

_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_torch
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # n_shared_experts = 0
@_SETTINGS
@given(any_family_config)
def test_random_configs_count_equal_meta_model(config: dict[str, Any]) -> None:
    assert_matches_meta(config)


@_SETTINGS
@given(any_family_config)
def test_total_is_sum_of_classes_and_bytes_grow_with_experts(config: dict[str, Any]) -> None:
    spec = model_spec_from_config(config)
    by_class = spec.params_by_class()
    assert spec.total_params() == sum(by_class.values())
    # Units × per-unit parameters, written out independently of params_by_class.
    per_layer = spec.unit_params["attention"].params * spec.num_layers
    per_moe = (
        spec.unit_params["router"].params
        + spec.num_experts * spec.unit_params["routed_expert"].params
        + spec.unit_params["shared_experts"].params
    ) * spec.num_moe_layers
    per_dense = spec.unit_params["dense_ffn"].params * spec.num_dense_layers
    once = sum(spec.unit_params[c].params for c in ("embedding", "lm_head", "norms"))
    assert spec.total_params() == per_layer + per_moe + per_dense + once
    assert sorted(spec.moe_layer_ids + spec.dense_layer_ids) == list(range(spec.num_layers))
    all_experts = spec.weight_bytes()
    one_expert = spec.weight_bytes(experts_per_moe_layer=1)
    assert all_experts >= one_expert >= spec.weight_bytes(experts_per_moe_layer=0)
    # Unquantised bf16: 2 B per parameter, 4 B for the fp32 DeepSeek-V3 correction bias.
    fp32 = spec.unit_params["router"].fp32 * spec.num_moe_layers
    assert all_experts == 2 * spec.total_params() + 2 * fp32
    assert spec.active_params() <= spec.total_params()
