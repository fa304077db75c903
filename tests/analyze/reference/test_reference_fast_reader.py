"""The column decoder for batch_data.json (`load_reference_frame`) gives the frame Python's json path
gives (`records_to_frame(load_reference_records(...))`), or declines (None) and leaves the file to it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from reference_helpers import load_loop_module, oracle_cases

from moecap.analyze.reference import load_reference_records, records_to_frame, reference_metrics
from moecap.analyze.reference.metrics import _first_record_defaults
from moecap.analyze.reference.records import load_reference_frame

ENTRY = {"req_pool_idx": 3, "req_id": "3_1", "extend_len": 512, "total_len": 1024, "is_last_chunk": True}
PREFILL = {
    "gpu_num": 8, "gpu_raw_type": "NVIDIA-H200-141GB", "forward_mode": "prefill", "batch_size": 2,
    "seq_lens_sum": 1536, "latency": 0.139, "expert_activation": 54.5,
    "per_req_info": [ENTRY, {**ENTRY, "req_id": "4_1", "req_pool_idx": 4, "is_last_chunk": False}],
    "scheduled_tokens": 1024,
}  # fmt: skip
DECODE = {"gpu_num": 8, "forward_mode": "decode", "batch_size": 2, "seq_lens_sum": 1538, "latency": 0.0156,
          "expert_activation": 6.59}  # fmt: skip


def _same_as_json(path: Path) -> pl.DataFrame | None:
    """The fast frame, after checking it against the json path (metric columns exactly, and the
    first-record GPU defaults the formulas read); None when the fast reader declined."""
    fast = load_reference_frame(path)
    if fast is None:
        return None
    records = load_reference_records(path)
    slow = records_to_frame(records, gpu_columns=False)
    assert_frame_equal(fast.select(slow.columns), slow, check_exact=True)
    assert _first_record_defaults(fast) == _first_record_defaults(records)
    return fast


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batch_data.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "records",
    [
        [PREFILL, DECODE],
        [DECODE, PREFILL, DECODE],
        [{**PREFILL, "per_req_info": []}, DECODE],  # an empty list is not a null entry
        [{**PREFILL, "gpu_num": "N/A"}, DECODE],  # the client fallback's GPU count
        [{**PREFILL, "gpu_num": "8"}, {**DECODE, "gpu_num": "N/A"}],
        [{k: v for k, v in PREFILL.items() if k != "gpu_num"}, DECODE],
        [{**PREFILL, "batch_size": True, "seq_lens_sum": 9007199254740993, "extra": {"a": [1, None]}}],
        [
            {**DECODE, "latency": x}
            for x in (0.1, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0)
        ],
        [{**PREFILL, "per_req_info": [{**ENTRY, "req_id": 'a"b\n', "req_pool_idx": -3}]}],
        [{**PREFILL, "per_req_info": [{**ENTRY, "extend_len": 512.0}]}],  # an integral float: 512 both
        # A first record longer than the 64 kB the GPU defaults are first looked for in (non-ASCII ids:
        # a character is cut at the prefix's end).
        [
            {**PREFILL, "gpu_num": 4, "per_req_info": [{**ENTRY, "req_id": f"ü{i}€"} for i in range(1500)]},
            DECODE,
        ],
    ],
)
def test_the_column_decoder_reads_what_json_reads(records: list[dict[str, Any]], tmp_path: Path) -> None:
    assert _same_as_json(_write(tmp_path, json.dumps(records, ensure_ascii=False))) is not None


@pytest.mark.parametrize(
    "text",
    [
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "req_id": 17}]}]),  # as text: "17" both, but
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "req_id": -0.0}]}]),  # "-0.0" / "-0"
        json.dumps([{**DECODE, "forward_mode": 2**63}]),  # json's frame refuses it
        json.dumps([{**DECODE, "batch_size": "4"}]),  # json's frame reads "4" as 4.0; the decoder refuses
        json.dumps([{**PREFILL, "gpu_num": 8.0}]),  # a float GPU count stays a float there
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "extend_len": 512.5}]}]),
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "extend_len": 2**70}]}]),
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "is_last_chunk": 1}]}]),
        json.dumps([{**PREFILL, "per_req_info": [{**ENTRY, "req_id": None}]}]),  # null and absent differ
        json.dumps([{**PREFILL, "per_req_info": [{k: v for k, v in ENTRY.items() if k != "req_id"}]}]),
        json.dumps([{**PREFILL, "per_req_info": [None, ENTRY]}]),
        json.dumps([{**PREFILL, "per_req_info": 5}]),
        '[{"forward_mode": "decode", "latency": NaN}]',
        '[{"forward_mode": "decode", "latency": 1e999}]',
        '[{"forward_mode": "d\\u0065code", "latency": 0.1}]',  # escapes are json's
        "\ufeff" + json.dumps([DECODE]),
        json.dumps({"records": [PREFILL, DECODE]}),
        json.dumps(PREFILL) + "\n" + json.dumps(DECODE) + "\n",  # JSON Lines
        json.dumps([PREFILL]) + " x",
        "[]",
        "[5]",
    ],
)
def test_the_column_decoder_declines_what_it_might_read_differently(text: str, tmp_path: Path) -> None:
    assert load_reference_frame(_write(tmp_path, text)) is None


_number = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
_value = st.one_of(_number, st.text(max_size=4), st.lists(st.integers(), max_size=2))
_entry = st.fixed_dictionaries(
    {},
    optional={
        "req_id": st.one_of(st.text(max_size=3), st.integers(0, 9), st.none()),
        "req_pool_idx": _number,
        "extend_len": _number,
        "total_len": _number,
        "is_last_chunk": st.one_of(st.booleans(), st.none(), st.integers(0, 1)),
    },
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "forward_mode": st.one_of(st.sampled_from(["prefill", "decode", "mixed"]), _value),
        "batch_size": st.one_of(_number, _value),
        "seq_lens_sum": _number,
        "latency": _number,
        "expert_activation": _number,
        "gpu_num": st.one_of(st.integers(1, 8), st.just("N/A"), _value),
        "gpu_raw_type": st.one_of(st.just("NVIDIA-H200-141GB"), _value),
        "per_req_info": st.one_of(st.none(), st.lists(_entry, max_size=3), _value),
        "scheduled_tokens": _number,
        "other": _value,
    },
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=6))
def test_random_records_read_the_same_or_are_left_to_json(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = _write(tmp_path, json.dumps(records, ensure_ascii=False))
    try:
        load_reference_records(path) and records_to_frame(load_reference_records(path), gpu_columns=False)
    except Exception:  # the json path refuses it (InputError, or worse): the decoder must decline
        assert load_reference_frame(path) is None
        return
    _same_as_json(path)


def _metrics(records: Any, case: dict[str, Any]) -> dict[str, Any]:
    return reference_metrics(
        records,
        model_config=case["model_config"],
        model_name=case["model_id"],
        gpu=case["hardware"],
        num_gpus=case["num_gpus"],
        precision=case["precision"],
        num_requests=case["num_requests"],
        total_time_s=case["total_time_s"],
    )


def _equal(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_oracle_cases_give_the_same_metrics_through_either_reader(tmp_path: Path) -> None:
    fast_cases = 0
    for case in oracle_cases("metrics"):
        path = _write(tmp_path, json.dumps(case["records"]))
        frame = _same_as_json(path)
        if frame is None:
            continue
        fast_cases += 1
        got, want = _metrics(frame, case), _metrics(load_reference_records(path), case)
        assert got.keys() == want.keys() and all(_equal(got[k], want[k]) for k in want), case["name"]
    assert fast_cases >= 25  # most oracle files take the fast path (29 of 33 on 2026-12-06)


def test_a_large_chunked_prefill_file_takes_the_fast_path_with_the_same_metrics(tmp_path: Path) -> None:
    records = load_loop_module().synthetic_records(3000)
    path = _write(tmp_path, json.dumps(records))
    frame = _same_as_json(path)
    assert frame is not None
    config = {
        "_name_or_path": "Qwen/Qwen3-30B-A3B", "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
    }  # fmt: skip
    kwargs = {"model_config": config, "model_name": config["_name_or_path"], "gpu": None, "num_gpus": None}
    got, want = reference_metrics(frame, **kwargs), reference_metrics(records, **kwargs)
    assert got.keys() == want.keys() and all(_equal(got[k], want[k]) for k in want)
