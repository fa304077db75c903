"""Batch composition from vLLM's real `SchedulerOutput` / `NewRequestData` / `CachedRequestData`."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm_objects import ToyScheduler, cached_requests, new_request, scheduler_output

from moecap.collect.engines.vllm.adapter import RequestTracker, idle_row, snapshot_batch


def snap(tracker: RequestTracker, so):
    tracker.observe(so)
    return snapshot_batch(so, tracker)


def test_chunked_prefill_then_decode_with_a_prefix_cache_hit(vllm_version):
    t = RequestTracker()
    # a: 100-token prompt, 32 tokens served from the prefix cache, chunked by a 40-token budget.
    so = scheduler_output(
        [new_request("a", list(range(100)), num_computed_tokens=32)], cached_requests([], [], []), {"a": 40}
    )
    row = snap(t, so)
    assert row == {
        "phase": "prefill",
        "is_draft": False,
        "num_reqs": 1,
        "num_tokens": 40,
        "req_ids": ["a"],
        "req_prefix_lens": [32],
        "req_new_tokens": [40],
        "req_num_logits": [0],
        "req_spec_tokens": None,
    }
    # Last chunk: 72 + 28 = 100 -> samples its first token.
    row = snap(t, scheduler_output([], cached_requests(["a"], [72], [0]), {"a": 28}))
    assert (row["phase"], row["req_prefix_lens"], row["req_new_tokens"], row["req_num_logits"]) == (
        "prefill",
        [72],
        [28],
        [1],
    )
    row = snap(t, scheduler_output([], cached_requests(["a"], [100], [1]), {"a": 1}))
    assert (row["phase"], row["req_prefix_lens"], row["req_num_logits"]) == ("decode", [100], [1])


def test_mixed_step_keeps_the_schedulers_order(vllm_version):
    t = RequestTracker()
    snap(t, scheduler_output([new_request("a", [1] * 8)], cached_requests([], [], []), {"a": 8}))
    so = scheduler_output([new_request("b", [2] * 50)], cached_requests(["a"], [8], [1]), {"a": 1, "b": 20})
    row = snap(t, so)
    assert row["phase"] == "mixed"
    assert row["req_ids"] == ["a", "b"]
    assert row["req_prefix_lens"] == [8, 0]
    assert row["req_new_tokens"] == [1, 20]
    assert row["req_num_logits"] == [1, 0]
    assert row["num_tokens"] == 21 and row["num_reqs"] == 2


def test_spec_decode_verifies_drafts(vllm_version):
    t = RequestTracker()
    snap(t, scheduler_output([new_request("a", [1] * 4)], cached_requests([], [], []), {"a": 4}))
    # 1 sampled token + 3 drafts are computed; 4 logit rows are sampled.
    so = scheduler_output([], cached_requests(["a"], [4], [1]), {"a": 4}, spec={"a": [5, 6, 7]})
    row = snap(t, so)
    assert row["phase"] == "verify"
    assert row["req_spec_tokens"] == [3]
    assert row["req_num_logits"] == [4]
    assert row["req_new_tokens"] == [4]


def test_empty_step_and_finished_ids_a_step_late(vllm_version):
    t = RequestTracker()
    snap(t, scheduler_output([new_request("a", [1] * 4)], cached_requests([], [], []), {"a": 4}))
    assert "a" in t.targets
    # The step after 'a' finished schedules nothing and reports 'a' as finished only now.
    row = snap(t, scheduler_output([], cached_requests([], [], []), {}, finished={"a"}))
    assert row["phase"] == "idle" and row["num_reqs"] == 0 and row["num_tokens"] == 0
    assert row["req_ids"] == [] and row["req_num_logits"] == []
    assert "a" not in t.targets
    assert idle_row()["phase"] == "idle"


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_preempted_request_recomputes_as_a_prefill(vllm_version, runner):
    t = RequestTracker()
    snap(t, scheduler_output([new_request("a", [1] * 10)], cached_requests([], [], []), {"a": 10}))
    snap(t, scheduler_output([], cached_requests(["a"], [10], [1]), {"a": 1}))
    snap(t, scheduler_output([], cached_requests(["a"], [11], [2]), {"a": 1}))
    # Preempted with 3 outputs (2 of them in the cache); the recomputation covers 13 tokens.
    if runner == "v1":
        so = scheduler_output(
            [], cached_requests(["a"], [0], [3], resumed={"a"}, all_token_ids={"a": [1] * 13}), {"a": 8}
        )
    else:
        so = scheduler_output(
            [new_request("a", [1] * 10, 0, prefill_token_ids=[1] * 13)],
            cached_requests([], [], []),
            {"a": 8},
            preempted={"a"},
        )
    row = snap(t, so)
    assert (row["phase"], row["req_prefix_lens"], row["req_num_logits"]) == ("prefill", [0], [0])
    if runner == "v1":
        so = scheduler_output([], cached_requests(["a"], [8], [3]), {"a": 5})
    else:
        so = scheduler_output([], cached_requests(["a"], [8], [3]), {"a": 5})
    row = snap(t, so)
    assert (row["phase"], row["req_num_logits"]) == ("prefill", [1])
    row = snap(t, scheduler_output([], cached_requests(["a"], [13], [4]), {"a": 1}))
    assert (row["phase"], row["req_num_logits"]) == ("decode", [1])


def test_unknown_request_falls_back_to_vllms_rule(vllm_version):
    # A tracer attached mid-run never saw 'x' as new: vLLM's own is_context_phase decides; the
    # logit rows are unknown (null).
    row = snap(RequestTracker(), scheduler_output([], cached_requests(["x"], [40], [3]), {"x": 1}))
    assert row["phase"] == "decode" and row["req_num_logits"] is None


@pytest.mark.parametrize(
    ("runner", "spec_k", "budget", "seed"),
    [("v2", 0, 64, 0), ("v1", 0, 48, 1), ("v2", 3, 96, 2), ("v1", 2, 40, 3), ("v2", 0, 16, 4)],
)
def test_scripted_runs_match_the_schedulers_truth(vllm_version, runner, spec_k, budget, seed):
    """A toy scheduler following vLLM's rules (chunked prefill, prefix hits, preemption and resume,
    drafts, late finished ids, empty steps) produces real scheduler outputs; every step's snapshot
    equals what the scheduler knows each request did, and its prefill/decode split agrees with vLLM's
    own `compute_iteration_details` for every request that was not resumed."""
    from vllm.v1.utils import compute_iteration_details

    s = ToyScheduler(budget, runner=runner, spec_k=spec_k, seed=seed)
    for i in range(7):
        s.add(f"r{i}", prompt_len=5 + 23 * i % 90, max_tokens=3 + i % 5, prefix_hit=16 * (i % 3))
    t = RequestTracker()
    steps = 0
    resumed_ever: set[str] = set()
    while not s.done() and steps < 300:
        if steps == 6 and s.requests["r0"].status == "running":
            s.preempt("r0")
        if steps == 9 and s.requests["r1"].status == "running":
            s.preempt("r1")
        so, truth = s.step(idle=steps in (3, 11))
        resumed_ever |= {r for r in ("r0", "r1") if s.requests[r].preempted}
        row = snap(t, so)
        assert row["req_ids"] == list(truth)
        assert row["req_prefix_lens"] == [x.prefix for x in truth.values()]
        assert row["req_new_tokens"] == [x.new for x in truth.values()]
        assert row["req_num_logits"] == [x.logits for x in truth.values()]
        assert row["num_tokens"] == sum(x.new for x in truth.values())
        if spec_k:
            assert row["req_spec_tokens"] == [x.spec for x in truth.values()] or not any(
                x.spec for x in truth.values()
            )
        prefilling = [x.prefilling for x in truth.values()]
        expected = (
            "idle"
            if not truth
            else "prefill"
            if all(prefilling)
            else ("verify" if any(x.spec for x in truth.values()) else "decode")
            if not any(prefilling)
            else "mixed"
        )
        assert row["phase"] == expected
        if not resumed_ever & set(truth):
            details = compute_iteration_details(so)
            ctx = sum(1 for p in prefilling if p)
            assert details.num_ctx_requests == ctx
            assert details.num_generation_requests == len(truth) - ctx
        steps += 1
    assert s.done()
    assert not t.targets or set(t.targets) <= {f"r{i}" for i in range(7)}
