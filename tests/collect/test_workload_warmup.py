"""The warm-up's one step off the multiple of 16 tokens (collect/workload.py `off_sixteen`): both shipped H100
sweeps compiled Triton kernels inside the recorded window at exactly the steps whose token count was not a
multiple of 16, which a warm-up of whole 1,024-token prompts never forms."""

from __future__ import annotations

from moecap.collect.datasets import Sample
from moecap.collect.workload import WARMUP_PREFIX, Prompt, off_sixteen, warmup_prompts


def _prompts(lengths: list[int]) -> list[Prompt]:
    return [
        Prompt(f"r{i}", list(range(100, 100 + n)), 8, Sample(f"s{i}", "t")) for i, n in enumerate(lengths)
    ]


def _chunks(total: int, budget: int) -> list[int]:
    """A wave of `total` prompt tokens prefilled in steps of at most `budget` tokens (chunked prefill)."""
    return [budget] * (total // budget) + ([total % budget] if total % budget else [])


def test_a_warm_up_of_whole_prompts_gets_one_token_less_at_its_end():
    warm = warmup_prompts(_prompts([1024] * 64), 64, vocab_size=32000, seed=0)
    lengths = [len(p.token_ids) for p in warm]
    assert lengths == [1024] * 63 + [1023] and sum(lengths) == 65535
    assert all(p.req_id.startswith(WARMUP_PREFIX) and min(p.token_ids) >= 100 for p in warm)
    # Whatever multiple of 16 the engine chunks prefills at (SGLang 8,192, vLLM 16,384, ...), the wave now
    # has a step off the multiple of 16 — before, none.
    for budget in (512, 2048, 8192, 16384):
        assert any(c % 16 for c in _chunks(sum(lengths), budget))
        assert not any(c % 16 for c in _chunks(64 * 1024, budget))


def test_what_already_has_such_a_step_or_cannot_spare_a_token_is_left_alone():
    six = _prompts([6, 6])  # 12 tokens: already off the multiple of 16
    assert off_sixteen(six) == six
    one = _prompts([1024])  # one prompt: shortening it would leave the workload's own length cold
    assert off_sixteen(one) == one
    tiny = _prompts([15, 1])  # the last prompt has one token to give
    assert off_sixteen(tiny) == tiny
    pair = _prompts([8, 8])
    out = off_sixteen(pair)
    assert [p.token_ids for p in out] == [pair[0].token_ids, pair[1].token_ids[:-1]]
    assert [p.req_id for p in out] == ["r0", "r1"] and pair[1].token_ids == list(range(100, 108))
