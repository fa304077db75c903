"""Properties of the per-step formulas: brute-force agreement on random batches, linearity, bounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from metrics_helpers import TINY_GPT_OSS, TINY_MLA, TINY_QWEN2, steps_batch

from moecap.analyze.metrics.step_costs import cost_model, step_costs, windowed_context_sum
from moecap.analyze.specs import ModelSpec, model_spec_from_config

SPECS = {
    name: model_spec_from_config(c)
    for name, c in (("qwen2", TINY_QWEN2), ("mla", TINY_MLA), ("gpt_oss", TINY_GPT_OSS))
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=20),
    st.integers(0, 400),
)
def test_windowed_context_sum_equals_brute_force(requests: list[tuple[int, int]], window: int) -> None:
    """Σ_{i=1..n} min(p + i, W) (W = 0: no window) summed by a Python loop."""
    prefix = np.array([p for p, _ in requests])
    new = np.array([n for _, n in requests])
    got = windowed_context_sum(prefix, new, window)
    limit = window if window > 0 else math.inf
    expected = [sum(min(p + i, limit) for i in range(1, n + 1)) for p, n in requests]
    assert got.tolist() == expected


def brute_force(spec: ModelSpec, prefix: list[int], new: list[int]) -> dict[str, float]:
    """KV bytes and attention-score FLOPs of one step, request by request and layer by layer."""
    kv = spec.kv_bytes_per_token_per_layer()
    if spec.mla is not None:
        m = spec.mla
        per_pair = 2 * spec.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        per_pair += 2 * spec.num_attention_heads * m.v_head_dim
    else:
        per_pair = 4 * spec.num_attention_heads * spec.head_dim
    read = write = pairs = 0.0
    for window in spec.attention_windows:
        limit = math.inf if window is None else window
        for p, n in zip(prefix, new):
            read += min(p, limit) * kv
            write += n * kv
            pairs += sum(min(p + i, limit) for i in range(1, n + 1))
    return {"bytes_kv_read": read, "bytes_kv_write": write, "flops_attention": pairs * per_pair}


requests = st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16), st.booleans()), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(SPECS)), st.lists(requests, min_size=1, max_size=6), st.data())
def test_vectorised_costs_equal_request_by_request_loop(
    name: str, steps: list[list[tuple[int, int, bool]]], data: Any
) -> None:
    spec = SPECS[name]
    table = steps_batch(
        [[p for p, _, _ in s] for s in steps],
        [[n for _, n, _ in s] for s in steps],
        [[int(lg) for _, _, lg in s] for s in steps],
    )
    active = np.array(
        [data.draw(st.integers(0, spec.num_moe_layers * spec.num_experts)) for _ in steps], dtype=float
    )
    model = cost_model(spec)
    got = step_costs(table, model, active)
    for i, s in enumerate(steps):
        prefix, new = [p for p, _, _ in s], [n for _, n, _ in s]
        for column, value in brute_force(spec, prefix, new).items():
            assert got[column][i] == value, column
        tokens, rows = sum(new), sum(lg for _, _, lg in s)
        assert got["logit_rows"][i] == rows
        assert got["flops_linear"][i] == tokens * model.linear_flops_per_token
        assert got["flops_lm_head"][i] == rows * 2 * spec.vocab_size * spec.hidden_size
        assert got["bytes_routed_experts"][i] == active[i] * model.expert_bytes
        assert got["bytes_weights"][i] == (got["bytes_static_weights"][i] + got["bytes_routed_experts"][i])
        # The LM head is read only in steps that compute a logit.
        lm = spec.precision.classes["lm_head"].bytes_per_unit
        no_lm = got["bytes_static_weights"][i] - (lm if rows else 0)
        assert no_lm == model.attention_bytes + model.router_bytes + model.shared_bytes + (
            model.dense_bytes + model.norms_bytes + tokens * model.embedding_row_bytes
        )


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(SPECS)), requests, st.integers(2, 5))
def test_flops_and_kv_writes_grow_linearly_with_copies_of_a_batch(
    name: str, reqs: list[tuple[int, int, bool]], copies: int
) -> None:
    """A batch of `copies` identical request sets costs `copies` times the KV traffic and FLOPs;
    weights (other than embedding rows) are read once."""
    spec = SPECS[name]
    prefix, new, logits = ([r[i] for r in reqs] for i in range(3))
    one = steps_batch([prefix], [new], [[int(x) for x in logits]])
    many = steps_batch([prefix * copies], [new * copies], [[int(x) for x in logits] * copies])
    model = cost_model(spec)
    a, b = step_costs(one, model, np.array([3.0])), step_costs(many, model, np.array([3.0]))
    for column in ("bytes_kv_read", "bytes_kv_write", "flops_total", "logit_rows", "context_tokens"):
        assert b[column][0] == copies * a[column][0], column
    embed = model.embedding_row_bytes * sum(new)
    assert b["bytes_weights"][0] - copies * embed == a["bytes_weights"][0] - embed


def test_decode_attention_is_the_context_length_times_per_pair() -> None:
    """Decode (n = 1): 4·H·h·(p + 1) per full layer, 4·H·h·min(p + 1, W) per windowed layer."""
    spec = SPECS["qwen2"]
    got = step_costs(steps_batch([[0], [99]], [[1], [1]], [[1], [1]]), cost_model(spec), None)
    assert got["flops_attention"].tolist() == [3 * 1 * 32, (2 * 100 + 4) * 32]
