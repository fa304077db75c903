"""`analyze.validity.RowFilter`: which rows of a file's batches the loader keeps. Properties against a
plain-Python oracle (first occurrence of each key kept, however the rows are cut into batches) and
hand-made rows for each rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from moecap.analyze.validity import MAX_CONTEXT_TOKENS, MAX_NS, RowFilter
from moecap.schemas import TABLES


def _batch(kind: str, rows: list[dict]) -> pa.RecordBatch:
    schema = pa.schema([pa.field(c.name, c.type) for c in TABLES[kind]])
    return pa.RecordBatch.from_pylist(rows, schema=schema)


def _step(step: int, **kw) -> dict:
    row = {
        "step": step,
        "t_start_ns": 1_000 + step,
        "t_end_ns": 2_000 + step,
        "phase": "decode",
        "is_draft": False,
        "num_reqs": 1,
        "num_tokens": 1,
        "req_ids": ["r"],
        "req_prefix_lens": [10],
        "req_new_tokens": [1],
    }
    row.update(kw)
    return row


def _kept(f: RowFilter, batch: pa.RecordBatch) -> list[int]:
    return f.apply(batch).column("step").to_pylist()


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(min_value=-5, max_value=40), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6),
)
def test_first_occurrence_of_each_step_is_kept_across_batches(keys: list[int], cuts: list[int]) -> None:
    edges = sorted({0, len(keys), *(c for c in cuts if c <= len(keys))})
    f = RowFilter("experts")
    kept: list[int] = []
    for a, b in itertools.pairwise(edges):
        batch = _batch("experts", [{"step": k, "counts": [1, 2]} for k in keys[a:b]])
        kept += _kept(f, batch)
    assert kept == list(dict.fromkeys(keys))  # the oracle: first occurrences, in order
    repeated = len(keys) - len(set(keys))
    assert sum(f.left_out.values()) == repeated


def test_each_step_rule_names_its_row() -> None:
    rows = [
        _step(0),
        _step(1, t_end_ns=2**62),
        _step(2, gpu_start_ns=-1, gpu_end_ns=5),
        _step(3, req_new_tokens=[-3]),
        _step(4, num_tokens=-(2**31) + 5),
        _step(5, req_prefix_lens=[MAX_CONTEXT_TOKENS]),  # + 1 new token: one over
        _step(6, req_prefix_lens=[MAX_CONTEXT_TOKENS - 1]),  # exactly the limit: kept
        _step(7, t_start_ns=MAX_NS - 1, t_end_ns=MAX_NS - 1),  # the last representable time: kept
    ]
    f = RowFilter("steps")
    assert _kept(f, _batch("steps", rows)) == [0, 6, 7]
    assert dict(f.left_out) == {
        f"a timestamp outside [0, {MAX_NS:.0e}) ns": 2,
        "a negative token or request count (int32 overflow?)": 2,
        f"a context above {MAX_CONTEXT_TOKENS:,} tokens": 1,
    }
    assert f.excluded_steps == [1, 2, 3, 4, 5]
    lines = f.findings("x.steps.arrow")
    assert "x.steps.arrow: 2 row(s) left out of every view and metric: a timestamp outside" in lines[0]
    assert lines[0].endswith("(first: step 1)")


def test_experts_rows_of_left_out_steps_go_with_them() -> None:
    f = RowFilter("experts", drop_steps=np.array([3, 5]))
    rows = [{"step": s, "counts": [1, -1 if s == 4 else 1]} for s in range(7)]
    assert _kept(f, _batch("experts", rows)) == [0, 1, 2, 6]
    assert dict(f.left_out) == {
        "a negative expert count (int32 overflow?)": 1,
        "its step was left out of the steps file": 2,
    }


def test_rules_see_only_the_rows_of_a_sliced_batch() -> None:
    # Batches arrive as slices of larger ones (a reader's zero-copy views): a bad value outside the
    # slice, in a list column's shared child array or a scalar column's buffer, is no row of it.
    rows = [_step(0, req_new_tokens=[-3]), _step(1), _step(2), _step(3, num_tokens=-1, req_prefix_lens=[-1])]
    batch = _batch("steps", rows)
    f = RowFilter("steps")
    assert _kept(f, batch.slice(1, 2)) == [1, 2] and not f.left_out
    assert _kept(RowFilter("steps"), batch.slice(2, 2)) == [2]  # step 3 is in this slice: left out
    counts = _batch("experts", [{"step": s, "counts": [1, -1 if s in (0, 3) else 1]} for s in range(4)])
    assert _kept(RowFilter("experts"), counts.slice(1, 2)) == [1, 2]
    nulls = _batch(
        "steps", [_step(0, req_prefix_lens=None, req_new_tokens=None), _step(1, req_new_tokens=[-2])]
    )
    f = RowFilter("steps")
    assert _kept(f, nulls) == [0]  # a null list holds no value; the fallback path finds the negative
    assert dict(f.left_out) == {"a negative token or request count (int32 overflow?)": 1}


def test_request_rules() -> None:
    base = {
        "arrival_ns": 100,
        "first_token_ns": 200,
        "finish_ns": 300,
        "prompt_tokens": 5,
        "output_tokens": 3,
    }
    rows = [
        {"req_id": "ok", **base},
        {"req_id": "early", **base, "first_token_ns": 99},
        {"req_id": "finish", **base, "finish_ns": 150},
        {"req_id": "wrapped", **base, "output_tokens": -(2**31) + 1},
        {"req_id": "cached", **base, "cached_prompt_tokens": 6},
        {"req_id": "chunks", **base, "chunk_times_ns": [150, 2**62]},
        {"req_id": "ok", **base},  # a repeated id
        {"req_id": "no-first-token", "arrival_ns": 100, "finish_ns": 300},  # a failed request: kept
    ]
    for r in rows:
        r.setdefault("retries", 0)
    f = RowFilter("requests")
    kept = f.apply(_batch("requests", rows)).column("req_id").to_pylist()
    assert kept == ["ok", "no-first-token"]
    assert sum(f.left_out.values()) == 6


def test_power_samples() -> None:
    rows = [
        {"t_ns": i, "gpu_index": 0, "gpu_uuid": "g", "power_w": p}
        for i, p in enumerate([300.0, math.nan, math.inf, -1.0, None, 0.0])
    ]
    f = RowFilter("gpu_samples")
    assert f.apply(_batch("gpu_samples", rows)).column("t_ns").to_pylist() == [0, 4, 5]  # null: not measured
