"""Loading batch_data.json in each form the reference writes, and clear errors for anything else."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecap.analyze.errors import InputError
from moecap.analyze.reference import (
    RECORD_SCHEMA,
    frame_to_records,
    load_reference_records,
    normalize_frame,
    records_to_frame,
)

RECORDS = [
    {"forward_mode": "prefill", "batch_size": 1, "seq_lens_sum": 900, "latency": 0.05, "expert_activation": 2.5,
     "gpu_num": 1, "gpu_raw_type": "NVIDIA-A100-SXM4-80GB",
     "per_req_info": [{"req_pool_idx": 0, "req_id": "0_1", "extend_len": 900, "total_len": 900, "is_last_chunk": True}]},
    {"forward_mode": "decode", "batch_size": 1, "seq_lens_sum": 901, "latency": 0.01, "expert_activation": 0.75,
     "gpu_num": 1, "gpu_raw_type": "NVIDIA-A100-SXM4-80GB"},
]  # fmt: skip


def write(tmp_path: Path, text: str, name: str = "batch_data.json") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_json_list(tmp_path: Path) -> None:
    assert load_reference_records(write(tmp_path, json.dumps(RECORDS))) == RECORDS


def test_records_object(tmp_path: Path) -> None:
    assert load_reference_records(write(tmp_path, json.dumps({"records": RECORDS}))) == RECORDS


def test_json_lines(tmp_path: Path) -> None:
    text = "\n".join(json.dumps(r) for r in RECORDS) + "\n\n"
    assert load_reference_records(write(tmp_path, text, "records.jsonl")) == RECORDS


def test_json_lines_with_one_record(tmp_path: Path) -> None:
    assert load_reference_records(write(tmp_path, json.dumps(RECORDS[0]) + "\n")) == RECORDS[:1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("  \n\n", "empty file"),
        ("not json at all", "line 1 is not JSON"),
        ('{"a": 1}\n{"b": ', "line 2 is not JSON"),
        ('{"runs": []}', "without a 'records' list"),
        ('"just a string"', "top-level JSON str"),
        ("[1, 2]", "record 0 is a int"),
        ('{"records": 5}', "top-level JSON int"),
    ],
)
def test_garbage_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        load_reference_records(p)
    assert str(p) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_reference_records(tmp_path / "nope.json")


def test_frame_has_the_documented_columns() -> None:
    frame = records_to_frame(RECORDS)
    assert dict(frame.schema) == RECORD_SCHEMA
    assert frame.height == 2
    assert normalize_frame(frame).columns == [
        "forward_mode", "batch_size", "seq_lens_sum", "latency", "ttft", "expert_activation",
        "per_req_info", "scheduled_tokens",
    ]  # fmt: skip


def test_gpu_num_na_is_kept_as_text() -> None:
    frame = records_to_frame([dict(RECORDS[1], gpu_num="N/A")])
    assert frame.schema["gpu_num"] == pl.String
    assert frame["gpu_num"].to_list() == ["N/A"]


def test_hand_built_frame_missing_fields_is_completed() -> None:
    frame = pl.DataFrame(
        {"forward_mode": ["prefill"], "latency": [0.1], "per_req_info": [[{"req_pool_idx": 3}]]}
    )
    norm = normalize_frame(frame)
    assert norm["per_req_info"].to_list() == [
        [{"req_id": None, "req_id_present": None, "req_pool_idx": 3, "extend_len": None, "total_len": None,
          "is_last_chunk": None}]
    ]  # fmt: skip


entry = st.fixed_dictionaries(
    {"req_pool_idx": st.integers(0, 5)},
    optional={
        "req_id": st.one_of(st.none(), st.text(min_size=1, max_size=4)),
        "extend_len": st.integers(0, 10_000),
        "total_len": st.integers(0, 10_000),
        "is_last_chunk": st.booleans(),
    },
)
record = st.fixed_dictionaries(
    {"forward_mode": st.sampled_from(["prefill", "decode"])},
    optional={
        "batch_size": st.integers(0, 512),
        "seq_lens_sum": st.integers(0, 10**6),
        "latency": st.floats(0, 10),
        "expert_activation": st.floats(-1, 256),
        "gpu_num": st.integers(1, 16),
        "gpu_raw_type": st.sampled_from(["NVIDIA-H200-141GB", "NVIDIA-A100-SXM4-80GB"]),
        "per_req_info": st.lists(entry, max_size=3),
        "scheduled_tokens": st.integers(0, 10**5),
    },
)


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=10))
def test_frame_round_trip(records: list[dict]) -> None:
    """records -> frame -> records keeps every field, including an explicit req_id None."""
    assert frame_to_records(records_to_frame(records)) == records
