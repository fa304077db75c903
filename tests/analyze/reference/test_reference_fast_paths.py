"""The vectorised reference mode's shortcuts give what the per-record loop gives, and step aside where
they would not.

The shortcuts: one blocked pass for the decode sums of section 4 and the run-level decode means
(`decode_sums`, run while `RecordArrays` reads the columns), taken only when every non-prefill record is a decode step, latency / context / batch
size have no nulls and every sum is finite; request grouping by one sort of packed hashes, checked for
collisions; `per_req_info` read through its Arrow offsets. The baseline is benchmarks/reference_loop.py,
which applies the reference's formulas record by record (its own oracle agreement is tested in
test_reference_loop_agrees.py).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_helpers import close, load_loop_module, oracle_cases

from moecap.analyze.reference import records_to_frame, reference_metrics
from moecap.analyze.reference.arrays import Grouping, record_arrays
from moecap.analyze.reference.decode_sums import BLOCK
from moecap.analyze.reference.records import normalize_frame

LOOP = load_loop_module()
MODELS: dict[str, dict[str, Any]] = {}
for _case in oracle_cases("metrics"):
    MODELS.setdefault(_case["model_id"], _case["model_config"])
MODEL_IDS = sorted(MODELS)
KWARGS: dict[str, Any] = {
    "model_config": MODELS["Qwen/Qwen3-30B-A3B"],
    "model_name": "Qwen/Qwen3-30B-A3B",
    "gpu": "NVIDIA-H200-141GB",
    "num_gpus": 8,
    "num_requests": 300,
    "total_time_s": 60.0,
}


def agree(records: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """Loop and vectorised results for the records; asserts they agree (1e-9, NaN = NaN)."""
    kwargs = {**KWARGS, **overrides}
    loop = LOOP.reference_loop_metrics(records, **kwargs)
    vec = reference_metrics(records, **kwargs)
    assert (loop["reason"] is None) == (vec["reason"] is None), (loop["reason"], vec["reason"])
    diff = [(k, v, vec[k]) for k, v in loop.items() if k != "reason" and not close(v, vec[k], rel_tol=1e-9)]
    assert diff == []
    return vec


def paths(records: list[dict[str, Any]]) -> tuple[bool, bool]:
    """(section-4 blocked sums used, run-level blocked sums used)."""
    sums = record_arrays(normalize_frame(records_to_frame(records))).decode
    return sums.section4 is not None, sums.run_level is not None


def trace(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n records over several blocks: decode steps, every 7th a prefill pass, a few invalid activations."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        prefill = i % 7 == 3
        out.append(
            {
                "forward_mode": "prefill" if prefill else "decode",
                "batch_size": rng.randint(1, 4) if prefill else rng.randint(1, 64),
                "seq_lens_sum": rng.randint(11, 8000) if prefill else rng.randint(100, 90000),
                "latency": rng.uniform(0.05, 0.3) if prefill else rng.uniform(0.005, 0.05),
                "expert_activation": -1.0 if rng.random() < 0.02 else rng.uniform(1, 60),
            }
        )
    return out


N = 2 * BLOCK + 123  # three blocks, the last one partial


def test_blocked_sums_over_several_blocks_agree_with_the_loop() -> None:
    records = trace(N)
    assert paths(records) == (True, True)
    agree(records)


def with_record(records: list[dict[str, Any]], i: int, **fields: Any) -> list[dict[str, Any]]:
    out = [dict(r) for r in records]
    for key, value in fields.items():
        if value is _ABSENT:
            del out[i][key]
        else:
            out[i][key] = value
    return out


_ABSENT = object()
DECODE_AT = BLOCK + 5  # a decode record in the second block
PREFILL_AT = BLOCK + 3 - (BLOCK + 3) % 7 + 3  # a prefill pass in the second block


@pytest.mark.parametrize(
    ("change", "expected_paths"),
    [
        # A null activation counts as invalid (-1) in the blocked pass too.
        ({"i": DECODE_AT, "expert_activation": None}, (True, True)),
        ({"i": PREFILL_AT, "expert_activation": None}, (True, True)),
        # Where the reference raises (decode latency 0), section 4 takes its masked path and reports it.
        ({"i": DECODE_AT, "latency": 0.0}, (False, True)),
        # A prefill pass with latency 0 that the reference skips (warm-up size): masked path, no crash.
        ({"i": PREFILL_AT, "latency": 0.0, "seq_lens_sum": 5}, (False, True)),
        # Values the run-level means drop (< 0): their masked path; section 4 keeps them.
        ({"i": DECODE_AT, "latency": -0.02}, (True, False)),
        ({"i": DECODE_AT, "batch_size": -3}, (True, False)),
        # NaN activation: the reference keeps the record (NaN < 0 is False) and its means become NaN.
        ({"i": DECODE_AT, "expert_activation": math.nan}, (False, False)),
        ({"i": DECODE_AT, "latency": math.nan}, (False, False)),
        ({"i": DECODE_AT, "expert_activation": math.inf}, (False, False)),
        # Other modes or missing fields: every masked path.
        ({"i": DECODE_AT, "forward_mode": "mixed"}, (False, False)),
        ({"i": DECODE_AT, "forward_mode": "decoding"}, (False, False)),
        ({"i": DECODE_AT, "seq_lens_sum": _ABSENT}, (False, False)),
        ({"i": PREFILL_AT, "seq_lens_sum": _ABSENT}, (False, False)),
        ({"i": DECODE_AT, "batch_size": _ABSENT}, (False, False)),
        ({"i": PREFILL_AT, "latency": _ABSENT, "ttft": 0.2}, (False, False)),
    ],
    ids=lambda v: repr(v) if isinstance(v, tuple) else ",".join(f"{k}={v[k]!r}" for k in v if k != "i"),
)
def test_special_values_take_the_right_path_and_agree(
    change: dict[str, Any], expected_paths: tuple[bool, bool]
) -> None:
    fields = dict(change)
    records = with_record(trace(N), fields.pop("i"), **fields)
    assert paths(records) == expected_paths
    agree(records)


def test_every_activation_invalid_gives_no_decode_samples() -> None:
    records = [dict(r, expert_activation=-1.0) for r in trace(BLOCK + 10)]
    assert paths(records) == (True, True)
    got = agree(records)
    assert got["decoding_smbu"] == 0 and got["tpot"] == 0


def test_decode_only_and_prefill_only_traces() -> None:
    records = trace(BLOCK + 10)
    agree([r for r in records if r["forward_mode"] == "decode"])
    prefill_only = [r for r in records if r["forward_mode"] == "prefill"]
    assert paths(prefill_only) == (True, True)
    agree(prefill_only)


def chunked_trace(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """Chunked prefill passes between decode steps, requests over 1-3 passes, pool slots reused."""
    rng = random.Random(seed)
    out = trace(n, seed)
    counter = 0
    active: list[dict[str, Any]] = []
    for rec in out:
        if rec["forward_mode"] != "prefill":
            continue
        while len(active) < 3:
            counter += 1
            active.append(
                {"id": f"{counter % 40}_{counter}", "pool": counter % 40, "left": rng.randint(1, 3)}
            )
        info = []
        for req in active[: rng.randint(1, 3)]:
            req["left"] -= 1
            info.append(
                {
                    "req_id": req["id"],
                    "req_pool_idx": req["pool"],
                    "extend_len": 256,
                    "total_len": 256 * (3 - req["left"]),
                    "is_last_chunk": req["left"] == 0,
                }
            )
        active = [r for r in active if r["left"] > 0]
        rec["per_req_info"] = info
        rec["scheduled_tokens"] = 256 * len(info)
    return out


def test_chunked_accounting_agrees_with_the_loop() -> None:
    agree(chunked_trace(N))


def test_entries_outside_the_counted_passes_are_ignored() -> None:
    """per_req_info on a decode step, on a warm-up pass (seq_lens_sum <= 10) and on a pass with an invalid
    activation: the Arrow read gathers the usable passes' entries instead of taking one slice."""
    records = chunked_trace(3000)
    entry = {"req_id": "stray", "req_pool_idx": 99, "extend_len": 7, "total_len": 7, "is_last_chunk": True}
    decode = next(i for i, r in enumerate(records) if r["forward_mode"] == "decode")
    prefill = [i for i, r in enumerate(records) if r["forward_mode"] == "prefill"]
    records[decode]["per_req_info"] = [entry]
    records[prefill[5]]["seq_lens_sum"] = 4
    records[prefill[9]]["expert_activation"] = -1.0
    agree(records)


def test_ids_keyed_by_pool_slot_and_by_none() -> None:
    """Entries without req_id key by their pool slot; an explicit None req_id is a key of its own."""
    records = chunked_trace(3000)
    for i, rec in enumerate(r for r in records if "per_req_info" in r):
        for e in rec["per_req_info"]:
            if i % 3 == 0:
                del e["req_id"]
            elif i % 3 == 1 and e["is_last_chunk"]:
                e["req_id"] = None
    agree(records)


def test_a_sliced_frame_gives_the_records_result() -> None:
    """A frame that is a slice of a larger one (its Arrow arrays start at an offset)."""
    records = chunked_trace(4000)
    frame = records_to_frame(records)
    kwargs = {k: v for k, v in KWARGS.items() if k not in ("num_requests", "total_time_s")}
    got = reference_metrics(frame.slice(1001, 2500), **kwargs)
    want = LOOP.reference_loop_metrics(records[1001:3501], **kwargs)
    assert [(k, v, got[k]) for k, v in want.items() if not close(v, got[k])] == []


def test_packed_hash_grouping_groups_equal_hashes_in_entry_order() -> None:
    hashes = np.array([9, 3, 9, 1 << 60, 3, 9], dtype=np.uint64) << np.uint64(8)
    g = Grouping.of_hashes(hashes)
    assert g.count == 3
    assert len(set(g.gid[[0, 2, 5]])) == 1 and len(set(g.gid[[1, 4]])) == 1 and g.gid[3] not in g.gid[[0, 1]]
    assert sorted(g.first_entries().tolist()) == [0, 1, 3]
    assert sorted(g.last_entries().tolist()) == [3, 4, 5]
    # Hashes that differ only in the bits the entry index takes fall into one group: a collision, which
    # the caller detects (group count below the number of distinct keys).
    assert Grouping.of_hashes(np.array([8, 9, 10, 11], dtype=np.uint64)).count == 1
    assert Grouping.of(np.array([8, 9, 10, 11], dtype=np.uint64)).count == 4


def test_a_grouping_collision_falls_back_to_exact_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the packed grouping merged different requests, the distinct-key count check must see it and the
    exact fallback must give the loop's result."""
    records = chunked_trace(3000)
    expected = agree(records)

    def merge_everything(hashes: np.ndarray) -> Grouping:
        return Grouping.of(np.zeros(len(hashes), dtype=np.uint64))

    monkeypatch.setattr(Grouping, "of_hashes", staticmethod(merge_everything))
    got = reference_metrics(records, **KWARGS)
    assert [(k, v, got[k]) for k, v in expected.items() if not close(v, got[k])] == []


def test_frames_with_ready_columns_are_read_without_copies() -> None:
    """A frame whose columns already have the documented dtypes is passed through column by column."""
    frame = records_to_frame(trace(100))
    norm = normalize_frame(frame)
    for name in ("latency", "seq_lens_sum", "batch_size", "expert_activation"):
        assert norm.get_column(name).to_numpy().ctypes.data == frame.get_column(name).to_numpy().ctypes.data
    assert norm.get_column("ttft").null_count() == 100


value = st.one_of(st.floats(1e-3, 1.0), st.just(0.0), st.just(-0.5), st.just(math.nan))


@st.composite
def plain_record(draw: st.DrawFn) -> dict[str, Any]:
    """Only prefill / decode records with every field (what the blocked sums need), odd values now and then."""
    rare = st.integers(0, 29)
    rec: dict[str, Any] = {
        "forward_mode": draw(st.sampled_from(["prefill", "decode", "decode", "decode"])),
        "batch_size": draw(st.integers(-1, 64)) if draw(rare) == 0 else draw(st.integers(1, 64)),
        "seq_lens_sum": draw(st.integers(0, 20000)),
        "latency": draw(value) if draw(rare) == 0 else draw(st.floats(1e-3, 1.0)),
        "expert_activation": draw(st.one_of(st.none(), st.just(-1.0), st.just(math.nan)))
        if draw(rare) == 0
        else draw(st.floats(0, 64)),
    }
    return rec


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(plain_record(), min_size=1, max_size=40),
    model_id=st.sampled_from(MODEL_IDS),
    num_requests=st.one_of(st.none(), st.integers(0, 10)),
)
def test_records_the_blocked_sums_can_take_agree_with_the_loop(
    records: list[dict[str, Any]], model_id: str, num_requests: int | None
) -> None:
    agree(
        records,
        model_config=MODELS[model_id],
        model_name=model_id,
        num_requests=num_requests,
        total_time_s=None if num_requests is None else 10.0,
    )


def test_frame_input_and_record_input_agree_on_a_large_chunked_trace() -> None:
    records = chunked_trace(N)
    assert reference_metrics(pl.DataFrame(records_to_frame(records)), **KWARGS) == reference_metrics(
        records, **KWARGS
    )
