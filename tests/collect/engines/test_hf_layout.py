"""Which models the hf collector counts, and the KV-cache bytes it records."""

from __future__ import annotations

import pytest
import torch
from tiny_moe import COMMON, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from moecap.collect.engines.hf.adapter import (
    HFCollector,
    dynamic_kv_bytes_per_token_per_layer,
    inspect_moe,
    paged_kv_bytes_per_token_per_layer,
)
from moecap.collect.errors import CollectError


def _model(model_type: str, **kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **kw})).eval()


def test_layout_maps_moe_layers_to_decoder_layer_indices():
    layout = inspect_moe(tiny_model("qwen2_moe"))  # 3 layers, layer 1 dense (mlp_only_layers)
    assert (layout.layer_ids, layout.num_experts, layout.top_k, layout.counts_available) == (
        [0, 2],
        8,
        2,
        True,
    )
    layout = inspect_moe(tiny_model("deepseek_v3"))  # first_k_dense_replace=1
    assert layout.layer_ids == [1, 2]


def test_unsupported_moe_family_is_a_clear_error_naming_it():
    model = _model("granitemoe", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(CollectError, match=r"'granitemoe'.*Mixture-of-Experts.*supported: deepseek_v2"):
        HFCollector(model, lambda row, counts: None)


def test_dense_model_records_steps_with_counts_unavailable():
    model = _model("llama")
    rows = []
    collector = HFCollector(model, lambda row, counts: rows.append((row, counts)))
    assert not collector.counts_enabled
    assert "'llama' has no MoE layers" in collector.counts_reason
    gen = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(max_batch_tokens=16, num_blocks=8, block_size=16)
    with collector:
        model.generate_batch(
            [[4, 5, 6], [7, 8]], generation_config=gen, continuous_batching_config=cb, warmup=False
        )
    assert rows and all(counts is None for _, counts in rows)
    # prompt tokens + all but the last generated token, per request
    assert sum(row["num_tokens"] for row, _ in rows) == (3 + 2) + 2 * (3 - 1)
    assert rows[0][0]["phase"] == "prefill" and rows[-1][0]["phase"] == "decode"


def test_paged_kv_bytes_equal_what_the_paged_cache_allocates():
    model = tiny_model("mixtral")
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1),
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=4, block_size=16, max_batch_tokens=16),
    )
    manager.warmup()  # creates the batch processor and its paged cache
    cache = manager.batch_processor.cache
    allocated = [
        cache.key_cache[cache.layer_index_to_group_indices[i][1]][0].nbytes
        + cache.value_cache[cache.layer_index_to_group_indices[i][1]][0].nbytes
        for i in range(model.config.num_hidden_layers)
    ]
    manager.destroy()
    recorded = paged_kv_bytes_per_token_per_layer(model)
    # by hand: K and V of 2 KV heads x head_dim 32/4 = 8, fp32
    assert recorded == allocated == [2 * 2 * 8 * 4] * 2


def test_dynamic_kv_bytes_record_the_mla_latent_not_decompressed_heads():
    # DeepSeek-V3 in transformers 5.17 caches kv_lora_rank (16) + qk_rope_head_dim (8) values per token
    # and layer (one "head"), fp32; decompressed heads would be 4 x (16 + 8) keys + 4 x 8 values.
    assert dynamic_kv_bytes_per_token_per_layer(tiny_model("deepseek_v3")) == [(16 + 8) * 4] * 3
    assert dynamic_kv_bytes_per_token_per_layer(tiny_model("qwen3_moe")) == [2 * 2 * 8 * 4] * 2
