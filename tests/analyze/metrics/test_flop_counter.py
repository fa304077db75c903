"""Model FLOPs of `step_costs` (docs/metrics.md §4) agree with torch's FlopCounterMode on tiny models.

For every supported family, a tiny random model (transformers 5.17, CPU, fp32) runs one step on a
KV cache that already holds p tokens per request: a final prefill chunk (n new tokens, one logit row
per request), a non-final chunk (n new tokens, no LM head: the base model is called) and a decode
step (one new token). Eager attention and eager experts make every matmul an aten mm / addmm
(projections, router, experts, LM head) or bmm (attention scores, rotary frequencies) that the
counter sees; the default `grouped_mm` experts would be invisible to it.

* matmul FLOPs (mm + addmm) = our flops_linear + flops_lm_head, except where transformers executes
  more than docs/metrics.md §4's model FLOPs: its MLA caches the latent and re-expands the *cached* prefix with
  `kv_b_proj` every step (2·p·r_kv·H·(d_n + d_v) per request and layer; docs/metrics.md §4 names them executed FLOPs,
  never model FLOPs).
* attention scores: the counter counts the full, non-causal score matrix of a multi-token step, so
  our causal flops_attention is checked by running the same n tokens one at a time (a single query's
  score row is exactly its causal row) and summing the counter's bmm inside `self_attn`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from metrics_helpers import steps_batch

from moecap.analyze.metrics.step_costs import cost_model, step_costs
from moecap.analyze.specs import model_spec_from_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

_BASE: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
_DEEPSEEK: dict[str, Any] = {
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "intermediate_size": 40,  # dense FFN of layer 0
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 12,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 6,
}

# 8 experts, top-2 everywhere; each family's distinguishing parts switched on.
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {
        "model_type": "mixtral",
        "intermediate_size": 24,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "phimoe": {  # LayerNorm, attention and LM-head biases (biases are not matmul FLOPs)
        "model_type": "phimoe",
        "intermediate_size": 24,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "attention_bias": True,
        "lm_head_bias": True,
    },
    "qwen2_moe": {  # shared expert + its sigmoid gate, q/k/v biases, a dense layer (mlp_only_layers)
        "model_type": "qwen2_moe",
        "num_hidden_layers": 3,
        "intermediate_size": 40,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {  # q/k norms, head_dim ≠ hidden / heads
        "model_type": "qwen3_moe",
        "intermediate_size": 40,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 16,
    },
    "olmoe": {"model_type": "olmoe", "intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v2": {  # V2-Lite-like: queries projected directly (q_lora_rank None), 2 shared experts
        "model_type": "deepseek_v2",
        **_DEEPSEEK,
        "q_lora_rank": None,
        "n_shared_experts": 2,
    },
    "deepseek_v2_mlp_bias": {  # shared experts and dense FFN with biases
        "model_type": "deepseek_v2",
        **_DEEPSEEK,
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "mlp_bias": True,
    },
    "deepseek_v3": {  # q_lora_rank set; grouped routing (2 groups, best 1) with e_score_correction_bias
        "model_type": "deepseek_v3",
        **_DEEPSEEK,
        "q_lora_rank": 20,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
    },
    "gpt_oss": {  # alternating sliding (window 4) / full layers, sinks, router and expert biases
        "model_type": "gpt_oss",
        "intermediate_size": 24,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matmuls: threads only add contention (the whole module runs in seconds on one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_config(family: str) -> dict[str, Any]:
    return {**_BASE, **FAMILIES[family]}


@functools.cache
def tiny_model(family: str) -> Any:
    """The family's tiny random model (fp32, eval mode, eager attention and experts)."""
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**family_config(family))
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


@dataclass
class Counted:
    """What FlopCounterMode counted for one forward pass."""

    matmul: int  # aten.mm + aten.addmm, whole model
    attention_scores: int  # aten.bmm inside the layers' self_attn (QK^T and PV)
    bmm_elsewhere: int  # aten.bmm outside self_attn (rotary frequencies)
    by_module: dict[str, int]  # mm + addmm per module, name without the root class (inclusive)


_MATMUL = ("aten.mm", "aten.addmm")


def _count(counter: FlopCounterMode) -> Counted:
    counts = {
        name: {str(op): flops for op, flops in ops.items()} for name, ops in counter.get_flop_counts().items()
    }
    total = counts.pop("Global")
    by_module = {
        name.split(".", 1)[1]: sum(ops.get(op, 0) for op in _MATMUL)
        for name, ops in counts.items()
        if "." in name
    }
    scores = sum(ops.get("aten.bmm", 0) for name, ops in counts.items() if name.endswith(".self_attn"))
    assert set(total) <= {*_MATMUL, "aten.bmm"}, total  # nothing uncounted by our split
    return Counted(
        matmul=sum(total.get(op, 0) for op in _MATMUL),
        attention_scores=scores,
        bmm_elsewhere=total.get("aten.bmm", 0) - scores,
        by_module=by_module,
    )


def counted_step(family: str, *, batch: int, prefix: int, new: int, logits: bool) -> Counted:
    """Fill a cache with `prefix` tokens per request, then count one forward of `new` tokens each:
    through the LM head for the last position only (logits_to_keep=1), or not at all."""
    model = tiny_model(family)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prefix + new))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        if prefix:
            model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        with FlopCounterMode(display=False) as counter:
            if logits:
                model(ids[:, prefix:], past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                model.model(ids[:, prefix:], past_key_values=cache, use_cache=True)
    return _count(counter)


def our_costs(family: str, *, batch: int, prefix: int, new: int, logits: bool) -> dict[str, float]:
    """step_costs of that step: `batch` requests with (p, n), one logit row each or none."""
    spec = model_spec_from_config(family_config(family))
    table = steps_batch([[prefix] * batch], [[new] * batch], [[int(logits)] * batch])
    costs = step_costs(table, cost_model(spec), None)
    return {k: float(v[0]) for k, v in costs.items()}


def mla_reexpansion_flops(config: dict[str, Any], *, batch: int, prefix: int) -> int:
    """FLOPs transformers' MLA spends re-expanding the cached latents of the prefix (kv_b_proj on
    p tokens per request and layer): executed, not model FLOPs (docs/metrics.md §4)."""
    if "kv_lora_rank" not in config:
        return 0
    kv_b = (
        config["kv_lora_rank"]
        * config["num_attention_heads"]
        * (config["qk_nope_head_dim"] + config["v_head_dim"])
    )
    return 2 * batch * prefix * kv_b * config["num_hidden_layers"]


STEPS = {
    "final_prefill_chunk": {"batch": 2, "prefix": 5, "new": 3, "logits": True},
    "non_final_chunk": {"batch": 2, "prefix": 5, "new": 3, "logits": False},
    "first_chunk": {"batch": 1, "prefix": 0, "new": 4, "logits": True},
    "decode": {"batch": 2, "prefix": 7, "new": 1, "logits": True},
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matmul_flops_equal_flop_counter(family: str, step: str) -> None:
    kw = STEPS[step]
    counted = counted_step(family, **kw)
    ours = our_costs(family, **kw)
    executed_extra = mla_reexpansion_flops(family_config(family), batch=kw["batch"], prefix=kw["prefix"])
    assert ours["flops_linear"] + ours["flops_lm_head"] + executed_extra == counted.matmul
    if not kw["logits"]:
        assert ours["flops_lm_head"] == 0 and "lm_head" not in counted.by_module


def _ffn_shape(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(D, E, k, F) from a family config."""
    experts = config.get("num_local_experts") or config.get("num_experts") or config["n_routed_experts"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    return config["hidden_size"], experts, config["num_experts_per_tok"], width


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counter_per_module_matches_hand_formulas(family: str) -> None:
    """Per MoE layer: experts 2·T·k·3·F·D (only the k experts a token is routed to run), router
    2·T·E·D (the gpt-oss router bias, DeepSeek-V3's correction bias and its grouped top-k selection
    are no matmul), shared experts
    2·T·3·D·Fs (+ 2·T·D for Qwen2's gate); dense layers 2·T·3·D·F_dense; LM head 2·rows·V·D."""
    config = family_config(family)
    spec = model_spec_from_config(config)
    batch, prefix, new = 2, 5, 3
    tokens = batch * new
    counted = counted_step(family, batch=batch, prefix=prefix, new=new, logits=True).by_module
    d, e, k, f = _ffn_shape(config)
    router = "router" if family in ("phimoe", "gpt_oss") else "gate"
    for layer in spec.moe_layer_ids:
        mlp = f"model.layers.{layer}.mlp"
        assert counted[f"{mlp}.experts"] == 2 * tokens * k * 3 * f * d
        assert counted[f"{mlp}.{router}"] == 2 * tokens * e * d
        if family == "qwen2_moe":
            fs = config["shared_expert_intermediate_size"]
            assert counted[f"{mlp}.shared_expert"] == 2 * tokens * 3 * d * fs
            assert counted[f"{mlp}.shared_expert_gate"] == 2 * tokens * d
        elif family.startswith("deepseek"):
            fs = config["n_shared_experts"] * config["moe_intermediate_size"]
            assert counted[f"{mlp}.shared_experts"] == 2 * tokens * 3 * d * fs
    for layer in spec.dense_layer_ids:
        assert counted[f"model.layers.{layer}.mlp"] == 2 * tokens * 3 * d * config["intermediate_size"]
    assert counted["lm_head"] == 2 * batch * config["vocab_size"] * d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_scores_equal_counter_one_query_at_a_time(family: str) -> None:
    """Σ over the n new tokens, run one at a time on the growing cache, of the counter's QK^T + PV
    bmm = our causal flops_attention of the n-token step (GQA 4·H·h·Σ min(p + i, W) per layer;
    MLA (2·H·(d_n + d_r) + 2·H·d_v) per pair). p = 6 > W = 4 exercises gpt-oss's window."""
    model = tiny_model(family)
    batch, prefix, new = 2, 6, 4
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, prefix + new))
    cache = transformers.DynamicCache(config=model.config)
    one_at_a_time = 0
    with torch.no_grad():
        model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        for i in range(prefix, prefix + new):
            with FlopCounterMode(display=False) as counter:
                model(ids[:, i : i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            one_at_a_time += _count(counter).attention_scores
    ours = our_costs(family, batch=batch, prefix=prefix, new=new, logits=True)
    assert ours["flops_attention"] == one_at_a_time


def _full_matrix_scores(config: dict[str, Any], *, batch: int, prefix: int, new: int) -> int:
    """The counter's count for a multi-token step: every new query against every key it is handed
    (p + n; on sliding layers transformers' cache keeps only the last W − 1 tokens)."""
    spec = model_spec_from_config(config)
    h = config["num_attention_heads"]
    if spec.mla is not None:
        m = spec.mla
        per_pair = 2 * h * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * h * m.v_head_dim
    else:
        per_pair = 4 * h * spec.head_dim
    keys = sum(prefix + new if w is None else min(prefix, w - 1) + new for w in spec.attention_windows)
    return per_pair * batch * new * keys


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counter_counts_the_full_score_matrix(family: str) -> None:
    """Why attention scores are not compared on the multi-token step itself: the counter sees the
    full n × keys matrix, more than the causal (and windowed) pairs docs/metrics.md §4 counts."""
    kw = STEPS["final_prefill_chunk"]
    counted = counted_step(family, **kw)
    full = _full_matrix_scores(family_config(family), batch=kw["batch"], prefix=kw["prefix"], new=kw["new"])
    assert counted.attention_scores == full
    assert our_costs(family, **kw)["flops_attention"] < full
    assert counted.bmm_elsewhere < 0.01 * counted.matmul  # rotary frequencies only


def test_all_supported_families_are_covered() -> None:
    from moecap.analyze.specs import supported_families

    assert {c["model_type"] for c in FAMILIES.values()} == set(supported_families())


def test_our_costs_do_not_depend_on_active_experts_for_flops() -> None:
    spec = model_spec_from_config(family_config("mixtral"))
    table = steps_batch([[5, 5]], [[3, 3]], [[1, 1]])
    a = step_costs(table, cost_model(spec), np.array([3.0]))
    b = step_costs(table, cost_model(spec), np.array([16.0]))
    assert a["flops_total"][0] == b["flops_total"][0]
    assert a["bytes_weights"][0] < b["bytes_weights"][0]
