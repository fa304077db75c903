"""The hf collector's per-step rows and expert counts against independent references.

For every supported family, a tiny random-weight model runs in transformers' continuous batching (CB) and in
static `generate`; on every step the recorded counts must equal, expert by expert, the routing re-derived
from a separate eager forward (tiny_moe.reference_routing), sum per layer to the tokens the *scheduler*
scheduled × top_k, and the step's request ids / prefix / new tokens / logit rows must be what the
scheduler decided.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_moe import CB_FAMILIES, FAMILIES, NUM_EXPERTS, TOP_K, expected_counts, reference_routing, tiny_model
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import model_runner, scheduler

from moecap.collect.engines.hf.adapter import HFCollector

PROMPT_LENS = (13, 5, 9)
NEW_TOKENS = 4


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def _spy_scheduler(monkeypatch) -> list[list[tuple[str, int, int, int]]]:
    """Record what FIFOScheduler.schedule_batch hands back: per batch, (request id, query length,
    tokens already in the KV cache, logit row) of each scheduled request."""
    batches: list[list[tuple[str, int, int, int]]] = []
    original = scheduler.FIFOScheduler.schedule_batch

    def schedule_batch(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        requests = result[0]
        if requests:
            batches.append(
                [
                    (fs.state.request_id, fs.query_length, fs.state.position_offset, int(fs.has_new_token))
                    for fs in requests
                ]
            )
        return result

    monkeypatch.setattr(scheduler.FIFOScheduler, "schedule_batch", schedule_batch)
    return batches


def _force_padding(monkeypatch) -> None:
    """Make the model runner pad every batch as it does under CUDA graphs (not available on a CPU)."""
    original = model_runner.ModelRunner.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.pad_inputs = True

    monkeypatch.setattr(model_runner.ModelRunner, "__init__", __init__)


def _router_rows(model) -> tuple[list[int], list]:
    """Rows the first router sees per call (test-side hook: how many rows, padding included)."""
    seen: list[int] = []
    first = next(m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter")))
    return seen, first.register_forward_hook(lambda m, a, o: seen.append(int(o[2].shape[0])))


def _run_cb(model, prompts, *, padded: bool):
    rows = []
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        max_batch_tokens=8, num_blocks=16, block_size=16, q_padding_interval_size=8 if padded else 0
    )
    with HFCollector(model, lambda row, counts: rows.append((row, counts))) as collector:
        out = model.generate_batch(
            prompts, generation_config=gen, continuous_batching_config=cb, warmup=False
        )
    return rows, out, collector


@pytest.mark.parametrize(
    ("family", "padded"),
    [(f, False) for f in CB_FAMILIES] + [("qwen2_moe", True), ("gpt_oss", True)],
)
def test_cb_counts_equal_independent_routing_on_every_step(family, padded, monkeypatch):
    model = tiny_model(family)
    scheduled = _spy_scheduler(monkeypatch)
    if padded:
        _force_padding(monkeypatch)
    seen, handle = _router_rows(model)
    prompts = _prompts(model.config.vocab_size)
    rows, out, collector = _run_cb(model, prompts, padded=padded)
    handle.remove()

    assert [o.error for o in out.values()] == [None] * len(prompts)
    assert all(len(o.generated_tokens) == NEW_TOKENS for o in out.values())
    layers = len(collector.layout.layer_ids)
    sequences = {rid: list(o.prompt_ids) + list(o.generated_tokens[:-1]) for rid, o in out.items()}
    routing = reference_routing(model, family, sequences)

    assert len(rows) == len(scheduled) > len(prompts)
    phases = set()
    for (row, counts), batch in zip(rows, scheduled):
        ids, q_lens, prefix, logits = (list(x) for x in zip(*batch))
        assert row["req_ids"] == ids
        assert row["req_new_tokens"] == q_lens
        assert row["req_prefix_lens"] == prefix
        assert row["req_num_logits"] == logits
        assert row["num_tokens"] == sum(q_lens)
        got = counts.reshape(layers, NUM_EXPERTS)
        np.testing.assert_array_equal(
            got, expected_counts(routing, ids, prefix, q_lens), err_msg=f"step {row['step']}"
        )
        assert (got.sum(axis=1) == sum(q_lens) * TOP_K).all()
        phases.add(row["phase"])
    # The workload exercised chunked prefill, mixed prefill+decode and pure decode steps.
    assert {"prefill", "mixed", "decode"} <= phases
    # Every token of every request was computed once, and a finished request leaves the batch.
    for rid, o in out.items():
        steps_with = [row for row, _ in rows if rid in row["req_ids"]]
        total = sum(row["req_new_tokens"][row["req_ids"].index(rid)] for row in steps_with)
        assert total == len(o.prompt_ids) + NEW_TOKENS - 1
        assert steps_with[-1]["req_num_logits"][steps_with[-1]["req_ids"].index(rid)] == 1
        assert [row["step"] for row in steps_with] == sorted(row["step"] for row in steps_with)
    if padded:
        # The router saw padding rows that the counts (checked above) left out.
        real = [sum(q for _, q, _, _ in b) for b in scheduled]
        assert any(s > r for s, r in zip(seen, real))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_generate_left_padding_counts_no_padding(family):
    model = tiny_model(family)
    lens = (7, 3, 5)
    prompts = _prompts(model.config.vocab_size, lens, seed=2)
    width = max(lens)
    ids = torch.zeros((len(lens), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    new_tokens = 3
    rows = []
    with HFCollector(model, lambda row, counts: rows.append((row, counts))) as collector:
        collector.label_next_generate(["a", "b", "c"])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    generated = out[:, width:].tolist()
    assert all(len(g) == new_tokens for g in generated)
    sequences = {rid: prompts[b] + generated[b][:-1] for b, rid in enumerate("abc")}
    routing = reference_routing(model, family, sequences)
    layers = len(collector.layout.layer_ids)

    assert len(rows) == new_tokens
    for k, (row, counts) in enumerate(rows):
        # Per-request facts from this test's own prompt lengths, not from the collector's tensors.
        new = list(lens) if k == 0 else [1, 1, 1]
        prefix = [0, 0, 0] if k == 0 else [n + k - 1 for n in lens]
        assert row["req_ids"] == ["a", "b", "c"]
        assert row["phase"] == ("prefill" if k == 0 else "decode")
        assert row["req_new_tokens"] == new
        assert row["req_prefix_lens"] == prefix
        assert row["num_tokens"] == sum(new)
        got = counts.reshape(layers, NUM_EXPERTS)
        np.testing.assert_array_equal(
            got, expected_counts(routing, list("abc"), prefix, new), err_msg=f"step {k}"
        )
        assert (got.sum(axis=1) == sum(new) * TOP_K).all()
    # The prefill step computed width × batch rows, of which only the real tokens counted.
    assert width * len(lens) > sum(lens)
