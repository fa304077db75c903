"""Batch snapshots from the real `ForwardBatch` / `ForwardMode`, one per kind of pass."""

from __future__ import annotations

from sglang_objects import make_batch

from moecap.collect.engines.sglang import compat
from moecap.collect.engines.sglang.adapter import snapshot_batch


def snap(fb, **kw):
    return snapshot_batch(compat.batch_fields(fb), **kw)


def test_extend(sgl):
    fb = make_batch("EXTEND", ["a", "b"], seq_lens=[5, 3], extend_seq_lens_cpu=[5, 3],
                    extend_prefix_lens_cpu=[0, 0], extend_num_tokens=8)  # fmt: skip
    row = snap(fb)
    assert row["phase"] == "prefill" and row["num_reqs"] == 2 and row["num_tokens"] == 8
    assert (
        row["req_ids"] == ["a", "b"] and row["req_new_tokens"] == [5, 3] and row["req_prefix_lens"] == [0, 0]
    )
    assert row["req_num_logits"] is None and row["is_draft"] is False


def test_chunked_prefill_second_chunk_counts_its_prefix(sgl):
    # A 3000-token prompt under --chunked-prefill-size 1024: its second chunk has 1024 tokens cached.
    fb = make_batch("EXTEND", ["long"], seq_lens=[2048], extend_seq_lens_cpu=[1024],
                    extend_prefix_lens_cpu=[1024], extend_num_tokens=1024)  # fmt: skip
    row = snap(fb)
    assert row["phase"] == "prefill"
    assert (row["req_new_tokens"], row["req_prefix_lens"], row["num_tokens"]) == ([1024], [1024], 1024)


def test_decode(sgl):
    fb = make_batch("DECODE", ["a", "b", "c"], seq_lens=[10, 20, 7])
    row = snap(fb)
    assert row["phase"] == "decode" and row["num_tokens"] == 3
    assert row["req_new_tokens"] == [1, 1, 1] and row["req_prefix_lens"] == [9, 19, 6]
    assert row["req_num_logits"] == [1, 1, 1]


def test_mixed(sgl):
    # --enable-mixed-chunk: a prefill chunk and two decoding requests (1 token each) in one pass.
    fb = make_batch("MIXED", ["p", "d1", "d2"], seq_lens=[300, 41, 12], extend_seq_lens_cpu=[300, 1, 1],
                    extend_prefix_lens_cpu=[0, 40, 11], extend_num_tokens=302)  # fmt: skip
    row = snap(fb)
    assert row["phase"] == "mixed" and row["num_tokens"] == 302
    assert row["req_new_tokens"] == [300, 1, 1] and row["req_prefix_lens"] == [0, 40, 11]


def test_idle(sgl):
    # DP attention: a rank with nothing to run still joins the MoE collectives with an IDLE pass.
    fb = make_batch("IDLE", [], seq_lens=[])
    row = snap(fb)
    assert row["phase"] == "idle" and row["num_reqs"] == 0 and row["num_tokens"] == 0
    assert row["req_ids"] == [] and row["req_new_tokens"] == []


def test_target_verify(sgl):
    fb = make_batch("TARGET_VERIFY", ["a", "b"], seq_lens=[50, 60])
    fb.spec_info = type("Spec", (), {"draft_token_num": 4})()
    row = snap(fb)
    assert row["phase"] == "verify" and row["num_tokens"] == 8
    assert (
        row["req_new_tokens"] == [4, 4]
        and row["req_spec_tokens"] == [3, 3]
        and row["req_prefix_lens"] == [50, 60]
    )


def test_draft_pass_is_tagged(sgl):
    fb = make_batch("DECODE", ["a"], seq_lens=[5])
    assert snap(fb, is_draft=True)["is_draft"] is True


def test_every_forward_mode_has_a_phase(sgl):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    phases = {m.name: compat.phase_of_mode(m) for m in ForwardMode}
    assert set(phases.values()) <= {"prefill", "decode", "mixed", "idle", "verify"}
    assert phases["IDLE"] == "idle" and phases["TARGET_VERIFY"] == "verify" and phases["MIXED"] == "mixed"
    assert set(compat._PHASE_OF_MODE) >= set(phases), "a ForwardMode the adapter does not map"
