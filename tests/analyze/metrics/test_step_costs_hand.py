"""Hand-derived per-step bytes and FLOPs (docs/metrics.md §2–§4) on tiny configs, every column.

The arithmetic is written out in full so a reader can check it with a pencil; nothing here is
computed with the code under test. The configs (and their shapes) are in metrics_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from metrics_helpers import TINY_GPT_OSS, TINY_MLA, TINY_QWEN2, steps_batch

from moecap.analyze.metrics.step_costs import cost_model, step_costs
from moecap.analyze.specs import model_spec_from_config

# TINY_QWEN2: L = 3, D = 8, H = 2, G = 1, h = 4, V = 16, E = 4, F = 6, k = 2, Fs = 10 (+ gate),
# layer 0 dense (width 12), layers 1, 2 MoE; layer 2 has a window W = 4. Parameters (2 B each):
#   attention / layer : q 8·8 + k 4·8 + v 4·8 + o 8·8 = 192 matmul + q/k/v biases 8 + 4 + 4 = 208
#                       -> 416 B, × 3 layers = 1248 B
#   router / MoE layer: E·D = 32 -> 64 B, × 2 = 128 B
#   one routed expert : 3·F·D = 144 -> 288 B
#   shared / MoE layer: 3·Fs·D + D (gate) = 248 -> 496 B, × 2 = 992 B
#   dense FFN layer 0 : 3·12·8 = 288 -> 576 B
#   norms             : (2·L + 1)·D = 56 -> 112 B
#   LM head           : V·D = 128 -> 256 B          embedding row: D = 8 -> 16 B per token
STATIC = 1248 + 128 + 992 + 576 + 112  # 3056 B read every step whatever the batch
EXPERT, LM_HEAD, EMBED_ROW = 288, 256, 16
# KV per token per layer: K and V, G·h = 4 elements each, 2 B -> 16 B.
KV = 16
# Matmul FLOPs per token: 2·[L·192 + 2 MoE·(k·144 + 3·10·8 + 8 + E·D) + 1 dense·288]
#                       = 2·[576 + 2·(288 + 240 + 8 + 32) + 288] = 2·2000
LINEAR_PER_TOKEN = 4000
LM_PER_ROW = 2 * 16 * 8  # 256
SCORE_PER_PAIR = 4 * 2 * 4  # 4·H·h = 32 per (query, key) pair and layer


def test_tiny_qwen2_every_column_of_four_steps() -> None:
    spec = model_spec_from_config(TINY_QWEN2)
    assert spec.attention_windows == (None, None, 4)
    table = steps_batch(
        prefix=[[3, 10], [0, 5], [0], [2, 2]],
        new=[[1, 1], [6, 3], [4], [1, 1]],
        logits=[[1, 1], [0, 1], [0], None],
    )
    # Activated experts summed over the two MoE layers (each ≥ k = 2 when a layer has a token).
    active = np.array([2 + 3, 4 + 4, 3 + 2, 2 + 2], dtype=float)
    got = step_costs(table, cost_model(spec), active)

    # Row 0 — decode, two requests with p = 3 and 10.
    #   weights: static + 5 experts + LM head + 2 embedding rows = 3056 + 1440 + 256 + 32 = 4784
    #   KV read: full layers 0, 1: (3 + 10) each; sliding layer 2: min(3, 4) + min(10, 4) = 7
    #            -> (2·13 + 7)·16 = 528;  KV write: 2 tokens × 3 layers × 16 = 96
    #   scores: full layers (p + 1) = 4 + 11 = 15 each; sliding min(4, 4) + min(11, 4) = 8
    #           -> (2·15 + 8)·32 = 1216
    # Row 1 — chunked prefill: request A (p 0, n 6, not its last chunk: no logit), B (p 5, n 3).
    #   weights: 3056 + 8·288 + 256 + 9·16 = 5760
    #   KV read: full (0 + 5)·2 layers, sliding min(0, 4) + min(5, 4) = 4 -> 14·16 = 224
    #   scores, full: A 6·0 + 6·7/2 = 21, B 3·5 + 3·4/2 = 21 -> 42 per layer
    #           sliding: A 1+2+3+4+4+4 = 18, B min(6,4)+min(7,4)+min(8,4) = 12 -> 30
    #           -> (2·42 + 30)·32 = 3648
    # Row 2 — a first, non-final chunk alone: no logit row, so no LM head bytes or FLOPs.
    #   weights: 3056 + 5·288 + 4·16 = 4560; scores: full 4·5/2 = 10 per layer, sliding
    #   1 + 2 + 3 + 4 = 10 -> 30·32 = 960
    # Row 3 — decode whose engine recorded no logit rows: one per request assumed (num_reqs).
    #   weights: 3056 + 4·288 + 256 + 2·16 = 4496; KV read (2·4 + 4)·16 = 192;
    #   scores (2·6 + 6)·32 = 576
    assert [
        STATIC + 5 * EXPERT + LM_HEAD + 2 * EMBED_ROW,
        STATIC + 8 * EXPERT + LM_HEAD + 9 * EMBED_ROW,
        STATIC + 5 * EXPERT + 4 * EMBED_ROW,
        STATIC + 4 * EXPERT + LM_HEAD + 2 * EMBED_ROW,
    ] == [4784, 5760, 4560, 4496]
    expected: dict[str, list] = {
        "bytes_weights": [4784, 5760, 4560, 4496],
        "bytes_routed_experts": [5 * EXPERT, 8 * EXPERT, 5 * EXPERT, 4 * EXPERT],
        "bytes_static_weights": [
            STATIC + LM_HEAD + 2 * EMBED_ROW,
            STATIC + LM_HEAD + 9 * EMBED_ROW,
            STATIC + 4 * EMBED_ROW,
            STATIC + LM_HEAD + 2 * EMBED_ROW,
        ],
        "bytes_kv_read": [528, 224, 0, 192],
        "bytes_kv_write": [2 * 3 * KV, 9 * 3 * KV, 4 * 3 * KV, 2 * 3 * KV],
        "flops_linear": [
            2 * LINEAR_PER_TOKEN,
            9 * LINEAR_PER_TOKEN,
            4 * LINEAR_PER_TOKEN,
            2 * LINEAR_PER_TOKEN,
        ],
        "flops_lm_head": [2 * LM_PER_ROW, 1 * LM_PER_ROW, 0, 2 * LM_PER_ROW],
        "flops_attention": [1216, 3648, 960, 576],
        "logit_rows": [2, 1, 0, 2],
        "logits_known": [True, True, True, False],
        "context_tokens": [4 + 11, 6 + 8, 4, 3 + 3],
    }
    expected["bytes_total"] = [
        w + r + wr
        for w, r, wr in zip(expected["bytes_weights"], expected["bytes_kv_read"], expected["bytes_kv_write"])
    ]
    expected["flops_total"] = [
        a + b + c
        for a, b, c in zip(expected["flops_linear"], expected["flops_lm_head"], expected["flops_attention"])
    ]
    assert set(got) == set(expected)
    for column, values in expected.items():
        assert got[column].tolist() == values, column


def test_unknown_active_experts_make_routed_bytes_and_totals_nan() -> None:
    spec = model_spec_from_config(TINY_QWEN2)
    got = step_costs(steps_batch([[3]], [[1]], [[1]]), cost_model(spec), None)
    assert np.isnan(got["bytes_routed_experts"][0])
    assert np.isnan(got["bytes_weights"][0]) and np.isnan(got["bytes_total"][0])
    # Everything that does not depend on the counts is still known.
    assert got["bytes_static_weights"][0] == STATIC + LM_HEAD + EMBED_ROW
    assert got["bytes_kv_read"][0] == (2 * 3 + 3) * KV
    assert got["flops_total"][0] == LINEAR_PER_TOKEN + LM_PER_ROW + (2 * 4 + 4) * SCORE_PER_PAIR


def test_kv_bytes_from_the_trace_are_used_per_layer() -> None:
    """Engines record what they allocate per layer; reads use each layer's own figure and window."""
    spec = model_spec_from_config(TINY_QWEN2)
    model = cost_model(spec, kv_bytes_per_token_per_layer=[10, 20, 30])
    got = step_costs(steps_batch([[3, 10]], [[1, 1]], [[1, 1]]), model, np.array([4.0]))
    # layers 0, 1 full: 13 cached tokens × (10 + 20); layer 2, W = 4: 7 × 30
    assert got["bytes_kv_read"][0] == 13 * 30 + 7 * 30
    assert got["bytes_kv_write"][0] == 2 * (10 + 20 + 30)


def test_pipeline_stages_split_the_whole_model() -> None:
    """Stage 0 = layers [0, 2) with the embedding, stage 1 = layer 2 with the LM head; their sums
    are the whole model's (norms are split by layer share)."""
    spec = model_spec_from_config(TINY_QWEN2)
    table = steps_batch([[3, 10], [0, 5]], [[1, 1], [6, 3]], [[1, 1], [0, 1]])
    layer1, layer2 = np.array([2.0, 4.0]), np.array([3.0, 4.0])
    whole = step_costs(table, cost_model(spec), layer1 + layer2)
    first = step_costs(table, cost_model(spec, layer_start=0, layer_end=2), layer1)
    last = step_costs(table, cost_model(spec, layer_start=2), layer2)
    for column in ("bytes_weights", "bytes_kv_read", "bytes_kv_write", "flops_total", "flops_attention"):
        np.testing.assert_allclose(first[column] + last[column], whole[column], rtol=1e-12, err_msg=column)
    # stage 0: 2 layers of attention (832 B), 1 router + 1 shared (64 + 496), dense 576,
    #          norms 112·2/3, no LM head, embedding rows; decode row: 2 active experts, 2 tokens.
    assert first["bytes_weights"][0] == pytest.approx(832 + 64 + 496 + 576 + 112 * 2 / 3 + 2 * 288 + 2 * 16)
    assert first["flops_lm_head"].tolist() == [0, 0]
    # stage 1: 1 layer of attention, 1 router + shared, norms 112/3, LM head, no embedding.
    assert last["bytes_weights"][0] == pytest.approx(416 + 64 + 496 + 112 / 3 + 3 * 288 + 256)


def test_mla_scores_and_latent_kv() -> None:
    """TINY_MLA. Per (query, key) pair and layer: 2·H·(d_n + d_r) + 2·H·d_v = 2·2·5 + 2·2·4 = 36.
    Cached per token and layer: the latent r_kv + d_r = 7 elements × 2 B = 14 B."""
    spec = model_spec_from_config(TINY_MLA)
    table = steps_batch([[9], [4]], [[1], [3]], [[1], [1]])
    got = step_costs(table, cost_model(spec), np.array([2.0, 2.0]))
    # decode p = 9: 10 pairs per layer; prefill p = 4, n = 3: 3·4 + 3·4/2 = 18 pairs per layer.
    assert got["flops_attention"].tolist() == [2 * 10 * 36, 2 * 18 * 36]
    assert got["bytes_kv_read"].tolist() == [9 * 2 * 14, 4 * 2 * 14]
    assert got["bytes_kv_write"].tolist() == [1 * 2 * 14, 3 * 2 * 14]
    # An engine that caches decompressed heads records H·(d_n + d_r) + H·d_v = 18 elements = 36 B.
    wide = step_costs(table, cost_model(spec, kv_bytes_per_token_per_layer=[36, 36]), np.array([2.0, 2.0]))
    assert wide["bytes_kv_read"].tolist() == [9 * 2 * 36, 4 * 2 * 36]
    assert wide["flops_attention"].tolist() == got["flops_attention"].tolist()  # model FLOPs unchanged


def test_gpt_oss_biases_are_read_but_not_multiplied() -> None:
    """TINY_GPT_OSS. Bytes count every stored parameter; FLOPs only the matmul weights.
    attention / layer: 192 matmul + q, k, v, o biases 8 + 4 + 4 + 8 + 2 sinks = 218 params
    router / layer   : E·D = 32 matmul + E = 4 bias = 36 params
    one expert       : gate_up 2F·D = 96 + down D·F = 48 matmul + 2F + D = 20 bias = 164 params
    FLOPs per token  : 2·[2·192 + 2·(k·144 + E·D)] = 2·[384 + 2·320] = 2048"""
    spec = model_spec_from_config(TINY_GPT_OSS)
    assert spec.attention_windows == (3, None)
    got = step_costs(steps_batch([[5]], [[1]], [[1]]), cost_model(spec), np.array([4.0]))
    assert got["flops_linear"][0] == 2048
    norms = (2 * 2 + 1) * 8
    # 2 B × (attention, routers, 4 active experts, norms, LM head V·D, one embedding row D)
    assert got["bytes_weights"][0] == 2 * (2 * 218 + 2 * 36 + 4 * 164 + norms + 16 * 8 + 8)
    # sliding layer 0: min(6, 3) keys; full layer 1: 6 keys; 4·H·h = 32 per pair
    assert got["flops_attention"][0] == (3 + 6) * 32
    # KV: 2·G·h·2 B = 16 B per token and layer; the sliding layer reads min(5, 3) cached tokens.
    assert got["bytes_kv_read"][0] == (3 + 5) * 16


def test_tied_embeddings_read_the_table_once_as_the_lm_head() -> None:
    """With tied embeddings the LM head is the embedding table (V·D = 256 B), read once per step
    that computes a logit; the gathered embedding rows are counted as usual."""
    untied = model_spec_from_config(TINY_QWEN2)
    tied = model_spec_from_config({**TINY_QWEN2, "tie_word_embeddings": True})
    assert tied.total_params() == untied.total_params() - 16 * 8
    table = steps_batch([[3, 10], [0]], [[1, 1], [4]], [[1, 1], [0]])
    a = step_costs(table, cost_model(untied), np.array([5.0, 5.0]))
    b = step_costs(table, cost_model(tied), np.array([5.0, 5.0]))
    for column in a:
        assert b[column].tolist() == a[column].tolist(), column
