"""drive's warm-up requests have the measured prompts' shapes but none of their prefixes: a prefix cache the
warm-up fills must not serve a measured request. (On an H100, vLLM 0.26, sending sample 0 itself as the
warm-up made request 0 prefill 16 of its 256 tokens: 17 ms TTFT instead of ~50 ms, a fifth off a 4-request
mean.) Checked on what the scripted loopback server received, and on `warmup_sample` itself."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.workload import WARMUP_PREFIX, warmup_sample


def _received(scripted, prefix: str) -> tuple[list[dict], list[dict]]:
    """(warm-up bodies in warm-up order, measured bodies) the server saw from the run with request-id prefix
    `prefix` (warm-ups go out concurrently, so the server may see them in another order). Warm-up ids start
    with `moecap-warmup-` (SGLang's tracer leaves those passes out), measured ones with the prefix."""
    seen = scripted.get("/_seen")
    warm = sorted(
        (s for s in seen if s["id"].startswith(f"{WARMUP_PREFIX}{prefix}-")),
        key=lambda s: int(s["id"].rsplit("-", 1)[1]),
    )
    measured = [s["body"] for s in seen if s["id"].startswith(f"{prefix}-")]
    return [s["body"] for s in warm], measured


def test_token_id_warmups_keep_the_lengths_and_share_no_first_token(scripted):
    rng = random.Random(3)
    samples = [Sample(f"s{i}", "random", prompt_token_ids=[rng.randrange(100, 5000) for _ in range(64)])
               for i in range(4)]  # fmt: skip
    cfg = ClientConfig(
        api_url=scripted.url, model="m", max_tokens=2, preflight=False, request_id_prefix="ids"
    )
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=2, warmup=6, seed=11)))
    assert all(r.ok for r in res.records) and len(res.records) == 4
    warm, measured = _received(scripted, "ids")
    assert len(warm) == 6 and len(measured) == 4
    firsts = {tuple(b["prompt"][:1]) for b in measured}
    for i, body in enumerate(warm):
        shape = samples[i % 4].prompt_token_ids
        assert sorted(body["prompt"]) == sorted(shape)  # same ids, so same length and vocabulary
        assert body["prompt"] != shape
        assert tuple(body["prompt"][:1]) not in firsts  # no measured prompt starts as it does
    assert sorted(b["prompt"] for b in measured) == sorted(s.prompt_token_ids for s in samples)  # as given


def test_text_warmups_reorder_the_words_and_the_server_still_sees_the_workload(scripted):
    # the scripted server reads a scenario from the words in any order: the warm-ups behave as the samples
    samples = [
        Sample(f"t{i}", "scripted", prompt=f"stream ttft_ms=5 itl_ms=1 tokens=3 pad{i}") for i in range(3)
    ]
    cfg = ClientConfig(
        api_url=scripted.url, model="m", max_tokens=3, preflight=False, request_id_prefix="txt"
    )
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=3, seed=0)))
    assert all(r.ok and r.output_tokens == 3 for r in res.records)
    warm, measured = _received(scripted, "txt")
    assert [b["prompt"] for b in measured] == [s.prompt for s in samples]
    for body, sample in zip(warm, samples, strict=True):
        assert Counter(body["prompt"].split(" ")) == Counter(sample.prompt.split(" "))
        assert body["prompt"].split(" ")[0] != "stream"


def test_warmups_are_drawn_from_the_seed():
    s = Sample("a", "random", prompt_token_ids=list(range(100, 164)))
    once = [warmup_sample(s, random.Random(5)).prompt_token_ids for _ in range(2)]
    other = warmup_sample(s, random.Random(6)).prompt_token_ids
    assert once[0] == once[1] and once[0] != other


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (Sample("one", "x", prompt="hello"), "hello"),  # one word: no other order
        (Sample("rep", "x", prompt_token_ids=[7, 7, 7]), [7, 7, 7]),  # one id repeated: likewise
    ],
)
def test_a_prompt_with_no_other_order_is_sent_as_it_is(sample, expected):
    out = warmup_sample(sample, random.Random(0))
    assert (out.prompt if sample.prompt is not None else out.prompt_token_ids) == expected


def test_the_first_element_moves_even_when_the_shuffle_keeps_it():
    # a two-element prompt keeps its order for about half of the seeds: every seed must still move it
    s = Sample("two", "x", prompt_token_ids=[1, 2])
    assert {tuple(warmup_sample(s, random.Random(k)).prompt_token_ids) for k in range(20)} == {(2, 1)}


def test_sglang_sees_the_warmup_rid_its_tracer_skips(scripted):
    # SGLang's tracer under `serve` leaves a pass out when its first request's rid starts with WARMUP_PREFIX
    # (collect/engines/sglang/adapter.py); drive sends its request id as the `rid` body field to SGLang.
    samples = [Sample("g", "scripted", prompt="stream ttft_ms=2 itl_ms=1 tokens=2 pad")]
    cfg = ClientConfig(
        api_url=scripted.url,
        model="m",
        max_tokens=2,
        preflight=False,
        engine="sglang",
        request_id_prefix="sgl",
    )
    res = asyncio.run(drive(samples, cfg, LoadConfig(concurrency=1, warmup=2, seed=0)))
    assert all(r.ok for r in res.records)
    seen = [s for s in scripted.get("/_seen") if "sgl-" in s["id"]]
    warm = [s["rid"] for s in seen if s["id"].startswith(WARMUP_PREFIX)]
    measured = [s["rid"] for s in seen if not s["id"].startswith(WARMUP_PREFIX)]
    assert sorted(warm) == [f"{WARMUP_PREFIX}sgl-0", f"{WARMUP_PREFIX}sgl-1"]
    assert measured == ["sgl-000000"]
