"""Tiny random-weight models of every MoE family the hf collector supports, and an independent
reference for their routing.

The reference never looks at the collector: it runs a separate eager forward over each request's whole
sequence, takes the router *logits* (`output_router_logits=True` where the family supports it, else a
test-side hook on the router's logits output) and re-derives each token's top-k experts with the
family's own selection rule written out here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=3,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        kv_lora_rank=16,
        q_lora_rank=16,
        num_key_value_heads=4,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
    ),
}
CB_FAMILIES = [f for f in FAMILIES if not f.startswith("deepseek")]
"""transformers 5.17's continuous batching cannot run MLA (DeepSeek) models; they run under `generate`."""

TOP_K = 2
NUM_EXPERTS = 8


def tiny_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            # Routers start at zero in some families: give every router real, distinct logits, and
            # DeepSeek-V3 a non-zero correction bias so its selection rule is exercised.
            if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
                module.weight.normal_(0.0, 1.0)
                bias = getattr(module, "e_score_correction_bias", None)
                if bias is not None:
                    bias.normal_(0.0, 0.3)
    return model


def routers(model: Any) -> list[Any]:
    """Router modules in layer order, found by class name (independently of the collector)."""
    return [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]


def router_logits(model: Any, token_ids: list[int]) -> list[torch.Tensor]:
    """[seq_len, num_experts] router logits of each MoE layer for one eager forward over `token_ids`."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    found = routers(model)
    if "router_logits" in getattr(model.model, "_can_record_outputs", {}) or "router_logits" in getattr(
        model, "_can_record_outputs", {}
    ):
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        logits = [t.reshape(-1, t.shape[-1]).float() for t in out.router_logits]
        assert len(logits) == len(found)
        return logits
    captured: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda m, a, o: captured.append(o[0].float())) for r in found]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def select_experts(model: Any, family: str, layer: int, logits: torch.Tensor) -> torch.Tensor:
    """[seq_len, top_k] expert ids chosen by `family`'s routing rule (eval mode) from its logits."""
    cfg = model.config
    k = TOP_K
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "phimoe"):
        # softmax is monotone: top-k of the probabilities = top-k of the logits (gpt-oss: of the logits).
        # Phi-MoE's sparsemixer in eval takes the arg-max, masks it, and takes the next arg-max.
        return torch.topk(logits, k, dim=-1).indices
    if family == "deepseek_v2":
        scores = logits.softmax(dim=-1)
        groups = scores.view(-1, cfg.n_group, NUM_EXPERTS // cfg.n_group).max(dim=-1).values
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, cfg.topk_group, dim=-1).indices, 1.0)
        keep = keep.repeat_interleave(NUM_EXPERTS // cfg.n_group, dim=1).bool()
        return torch.topk(scores.masked_fill(~keep, 0.0), k, dim=-1).indices
    if family == "deepseek_v3":
        bias = routers(model)[layer].e_score_correction_bias.float()
        choice = logits.sigmoid() + bias
        groups = choice.view(-1, cfg.n_group, NUM_EXPERTS // cfg.n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, cfg.topk_group, dim=-1).indices, 1.0)
        keep = keep.repeat_interleave(NUM_EXPERTS // cfg.n_group, dim=1).bool()
        return torch.topk(choice.masked_fill(~keep, float("-inf")), k, dim=-1).indices
    raise AssertionError(family)


def reference_routing(model: Any, family: str, sequences: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """request id -> [num_moe_layers, seq_len, top_k] expert ids for its whole sequence."""
    out = {}
    for rid, tokens in sequences.items():
        per_layer = [
            select_experts(model, family, i, logits).numpy()
            for i, logits in enumerate(router_logits(model, tokens))
        ]
        out[rid] = np.stack(per_layer)
    return out


def expected_counts(
    routing: dict[str, np.ndarray], req_ids: list[str], prefix: list[int], new: list[int]
) -> np.ndarray:
    """[num_moe_layers, num_experts] counts of the tokens [prefix, prefix + new) of each request."""
    layers = next(iter(routing.values())).shape[0]
    counts = np.zeros((layers, NUM_EXPERTS), dtype=np.int64)
    for rid, p, n in zip(req_ids, prefix, new):
        chosen = routing[rid][:, p : p + n, :]
        for layer in range(layers):
            counts[layer] += np.bincount(chosen[layer].reshape(-1), minlength=NUM_EXPERTS)
    return counts
