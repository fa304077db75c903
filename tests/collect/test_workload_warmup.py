"""The warm-up's residue ladder (collect/workload.py `residue_ladder`): the H100 vLLM sweep compiled Triton
kernels inside the recorded window at steps whose (tile-configuration range, token count mod 16) class no
warm-up step had met — 15,425 tokens at 64 in flight, 569 at 128 (docs/sweep.md). The ladder hands the
engine groups that each fill one step of a chosen token count: every residue mod 16 at sizes about √2
apart, up to the largest step the run can form."""

from __future__ import annotations

import itertools
import math

import pytest

from moecap.collect.datasets import Sample
from moecap.collect.engines.base import OfflineSession
from moecap.collect.workload import (
    WARMUP_PREFIX,
    Prompt,
    ladder_reach,
    ladder_sizes,
    residue_ladder,
    warmup_prompts,
)


def _prompts(lengths: list[int]) -> list[Prompt]:
    return [
        Prompt(f"r{i}", list(range(100, 100 + n)), 8, Sample(f"s{i}", "t")) for i, n in enumerate(lengths)
    ]


def _vllm_026_bf16_tile(m: int, experts: int = 60) -> tuple[int, ...]:
    """vLLM 0.26's default bf16 fused-MoE launch configuration for a step of `m` tokens (`get_default_config`,
    fused_moe.py, read from the wheel): the Triton kernel compiles once per configuration and argument
    specialization. Written out here as vLLM states it, to check the ladder against a real range layout."""
    block_m = 16 if m <= 32 else 32 if m <= 96 else 64 if m <= 512 else 128
    return (
        block_m,
        64 if m <= 64 else 128,
        128 if m <= 64 else 64,
        16 if m // experts > 128 else 1,
        4 if m <= 128 else 8,
        4 if m <= 32 else 3,
    )


def _specialization(m: int, top_k: int = 4, experts: int = 60) -> tuple[bool, bool]:
    """Triton's divisibility-by-16 of the kernel's two token-dependent integers: `num_valid_tokens` = m·top_k
    and the expert-sorted length EM = m·top_k + experts·(BLOCK_SIZE_M − 1) (`moe_align_block_size`)."""
    block_m = _vllm_026_bf16_tile(m, experts)[0]
    return ((m * top_k) % 16 == 0, (m * top_k + experts * (block_m - 1)) % 16 == 0)


def test_the_ladder_meets_every_compile_class_the_recorded_sweep_met_cold():
    groups = residue_ladder(
        step_budget=16384, max_prompt_tokens=1024, max_requests=128, vocab_size=151936, seed=0
    )
    counts = [sum(len(p.token_ids) for p in g) for g in groups]
    met = {(_vllm_026_bf16_tile(m), _specialization(m)) for m in counts}
    # Every class a step of 1..16,384 tokens can fall in is met (above 512 vLLM runs no CUDA graph) ...
    every = {(_vllm_026_bf16_tile(m), _specialization(m)) for m in range(1, 16385)}
    assert every <= met
    # ... including the two that compiled inside the H100 sweep's recorded window (not met by a warm-up of
    # whole 1,024-token prompts, whose steps are multiples of 1,024 and the tail of each wave).
    for cold in (15425, 569):
        assert (_vllm_026_bf16_tile(cold), _specialization(cold)) in met
    whole_waves = {m for wave in (1, 2, 4, 8, 16, 32, 64, 128) for m in range(1024, wave * 1024 + 1, 1024)}
    assert (_vllm_026_bf16_tile(15425), _specialization(15425)) not in {
        (_vllm_026_bf16_tile(m), _specialization(m)) for m in whole_waves if m <= 16384
    }


@pytest.mark.parametrize(
    "budget, longest, in_flight", [(16384, 1024, 128), (8192, 1024, 16), (16384, 256, 1)]
)
def test_each_group_is_one_step_of_its_count_and_fits_what_the_run_allows(budget, longest, in_flight):
    groups = residue_ladder(
        step_budget=budget, max_prompt_tokens=longest, max_requests=in_flight, vocab_size=32000, seed=3
    )
    reach = min(budget, longest * in_flight)
    counts = [sum(len(p.token_ids) for p in g) for g in groups]
    assert max(counts) <= reach and len(counts) == len(set(counts))
    for size in ladder_sizes(reach):
        assert {c % 16 for c in counts if size <= c < size + 16} == set(range(16))
    sizes = ladder_sizes(reach)
    assert all(a < b <= 2 * a for a, b in itertools.pairwise(sizes))  # no range skipped
    for g, count in zip(groups, counts, strict=True):
        lengths = [len(p.token_ids) for p in g]
        assert len(g) == math.ceil(count / longest) <= in_flight
        assert max(lengths) <= longest and max(lengths) - min(lengths) <= 1
        assert all(p.max_new_tokens == 1 and p.req_id.startswith(WARMUP_PREFIX) for p in g)
        assert all(100 <= t < 32000 for p in g for t in p.token_ids)
    # No two prompts share a first block (a prefix cache would prefill fewer tokens than the count).
    heads = [tuple(p.token_ids[:16]) for g in groups for p in g if len(p.token_ids) >= 16]
    assert len(heads) == len(set(heads))


@pytest.mark.parametrize("cap", [4095, 8191, 100_000])
def test_the_engines_longest_prompt_makes_fewer_prompts_per_group_not_a_longer_reach(cap):
    """A run of 256-token prompts, 64 in flight, 16,384-token budget: the reach is 16,384 with or without
    the engine's longer prompt limit; with it each group is ⌈count / cap⌉ prompts (one up to the cap, two
    above it when the cap is 8,191) instead of up to 64."""
    limits = dict(step_budget=16384, max_prompt_tokens=256, max_requests=64, vocab_size=32000, seed=5)
    plain, capped = residue_ladder(**limits), residue_ladder(**limits, prompt_cap=cap)
    count = lambda g: sum(len(p.token_ids) for p in g)  # noqa: E731
    assert [count(g) for g in capped] == [count(g) for g in plain]  # the same steps, the same reach
    assert max(count(g) for g in capped) == 16383 and max(len(g) for g in plain) == 64
    for g in capped:
        assert len(g) == math.ceil(count(g) / cap) and max(len(p.token_ids) for p in g) <= cap
    assert residue_ladder(**limits, prompt_cap=100) == plain  # a cap below the run's prompts changes nothing


def test_nothing_to_climb_when_the_run_forms_only_tiny_steps():
    assert residue_ladder(step_budget=30, max_prompt_tokens=8, max_requests=4, vocab_size=1000, seed=0) == []
    assert ladder_sizes(31) == [16] and ladder_sizes(30) == []


class _Recording(OfflineSession):
    """`OfflineSession`'s warm-up with the engine replaced by a record of what was handed over."""

    def __init__(self, budget: int | None, in_flight: int) -> None:
        self.options = type("O", (), {"seed": 0, "trace": True})()
        self.vocab, self.max_in_flight, self.timing = 32000, in_flight, {}
        self.budget, self.handed, self.paused = budget, [], []

    def _step_budget(self):
        return self.budget

    def _submit(self, prompts, concurrency, progress):
        self.handed.append((list(prompts), concurrency, list(self.paused)))
        return [], 0.0

    def _pause(self):
        self.paused.append("pause")

    def _resume(self):
        self.paused.append("resume")


def test_run_warm_up_climbs_the_ladder_group_by_group_then_sends_the_workload_shapes():
    s = _Recording(budget=4096, in_flight=8)
    shapes = _prompts([512] * 8)
    s.warmup(shapes, 8)
    *ladder, (last, last_concurrency, state) = s.handed
    expected = residue_ladder(
        step_budget=4096, max_prompt_tokens=512, max_requests=8, vocab_size=32000, seed=0
    )
    assert [[p.token_ids for p in g] for g, _, _ in ladder] == [[p.token_ids for p in g] for g in expected]
    assert all(c is None and st == ["pause"] for _, c, st in ladder)  # all at once, tracing paused
    assert [len(p.token_ids) for p in last] == [512] * 8 and last_concurrency is None and state == ["pause"]
    assert s.paused == ["pause", "resume"]
    assert s.timing["warmup_ladder_steps"] == len(expected) > 0


def test_an_engine_that_does_not_tell_its_step_budget_gets_the_shapes_only():
    s = _Recording(budget=None, in_flight=8)
    s.warmup(_prompts([512] * 8), 8)
    assert len(s.handed) == 1 and s.timing["warmup_ladder_steps"] == 0
    s = _Recording(budget=4096, in_flight=8)
    s.warmup(_prompts([512] * 8), 0)  # --warmup 0: nothing at all
    assert s.handed == []


def test_warm_up_shapes_keep_the_workload_lengths_with_ids_of_their_own():
    warm = warmup_prompts(_prompts([1024] * 64), 64, vocab_size=32000, seed=0)
    assert [len(p.token_ids) for p in warm] == [1024] * 64
    assert all(p.req_id.startswith(WARMUP_PREFIX) and min(p.token_ids) >= 100 for p in warm)


def test_a_later_point_climbs_only_what_earlier_points_did_not():
    """The vLLM sweep's points share one engine: a point that can form larger steps climbs the counts
    above what the earlier points' ladders reached, and nothing below."""
    kw = dict(step_budget=16384, max_prompt_tokens=1024, vocab_size=32000, seed=0)
    full = residue_ladder(**kw, max_requests=4)
    covered = ladder_reach(step_budget=16384, max_prompt_tokens=1024, max_requests=2)
    rest = residue_ladder(**kw, max_requests=4, covered=covered)
    count = lambda g: sum(len(p.token_ids) for p in g)  # noqa: E731
    assert [count(g) for g in rest] == [count(g) for g in full if count(g) > covered] and covered == 2048
    assert residue_ladder(**kw, max_requests=4, covered=4096) == []
