"""Every public oracle case (computed by running the MoE-CAP reference) is reproduced within 1e-9."""

from __future__ import annotations

from typing import Any

import pytest
from reference_helpers import mismatches, oracle_cases

from moecap.analyze.reference import (
    CONTINUOUS_KEYS,
    reference_cost,
    reference_cost_constants,
    reference_gpu_raw_type,
    reference_hardware_lookup,
    reference_metrics,
    reference_model_sizes,
    reference_precision,
    reference_tables,
)

ALL_CASES = oracle_cases()
METRICS_CASES = [c for c in ALL_CASES if c["kind"] == "metrics"]


def run_metrics(case: dict[str, Any]) -> dict[str, Any]:
    return reference_metrics(
        case["records"],
        model_config=case["model_config"],
        model_name=case["model_id"],
        gpu=case["hardware"],
        num_gpus=case["num_gpus"],
        precision=case["precision"],
        num_requests=case["num_requests"],
        total_time_s=case["total_time_s"],
    )


def test_oracle_file_is_complete() -> None:
    kinds = {c["kind"] for c in ALL_CASES}
    assert kinds == {"metrics", "cost", "cost_constants", "hardware_lookup", "gpu_name", "precision"}
    assert len(ALL_CASES) == 79


@pytest.mark.parametrize("case", ALL_CASES, ids=[c["name"] for c in ALL_CASES])
def test_oracle_case(case: dict[str, Any]) -> None:
    kind = case["kind"]
    got: dict[str, Any]
    if kind == "metrics":
        got = run_metrics(case)
    elif kind == "cost":
        got = {"cost": reference_cost(case["e2e_latency_s"], case["hardware"], case["num_gpus"])}
    elif kind == "cost_constants":
        got = reference_cost_constants()
    elif kind == "hardware_lookup":
        got = reference_hardware_lookup(case["hardware"])
    elif kind == "gpu_name":
        raw = reference_gpu_raw_type(case["gputil_name"], case["gputil_memory_mib"])
        tables = reference_tables()
        got = {
            "gpu_raw_type": raw,
            "in_MEM_BW_DICT": raw in tables["MEM_BW_DICT"],
            "in_GPU_COST_DICT": raw in tables["GPU_COST_DICT"],
        }
    else:
        got = reference_precision(case["config"], case["cli_precision"])
    assert mismatches(case["expected"], got) == []


@pytest.mark.parametrize("case", METRICS_CASES, ids=[c["name"] for c in METRICS_CASES])
def test_crash_behaviour_is_null_metrics_with_reason(case: dict[str, Any]) -> None:
    """Where the reference raised, the continuous values are None and `reason` names the exception;
    elsewhere `reason` is None. The run-level values are checked by test_oracle_case either way."""
    got = run_metrics(case)
    if case["reference_exception"] is None:
        assert got["reason"] is None
        return
    assert all(got[k] is None for k in CONTINUOUS_KEYS)
    exception_name = case["reference_exception"].split(":")[0]
    assert exception_name in got["reason"]
    assert "\n" not in got["reason"]
    assert got["cost"] is None


@pytest.mark.parametrize("case", METRICS_CASES, ids=[c["name"] for c in METRICS_CASES])
def test_static_sizes_match_derived_sizes(case: dict[str, Any]) -> None:
    sizes = reference_model_sizes(case["model_config"], case["model_id"])
    expected = {k: v for k, v in case["derived_sizes"].items() if k != "hardware_specs"}
    assert sizes.derived_sizes() == expected
    dims = sizes.dims
    di = case["derived_inputs"]
    got = (dims.d_model, dims.n_layers, dims.d_ff, dims.n_kv_heads, dims.n_attn_heads, dims.d_head)
    want = (di["d_model"], di["n_layers"], di["d_ff"], di["n_kv_heads"], di["n_attn_heads"], di["d_head"])
    assert got == want
