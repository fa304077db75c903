"""The loop baseline (benchmarks/reference_loop.py, the reference's own per-record structure) and the
vectorised `reference_metrics` agree: on every oracle metrics case, and on random record lists."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_helpers import close, load_loop_module, mismatches, oracle_cases

from moecap.analyze.reference import reference_metrics

METRICS_CASES = oracle_cases("metrics")
LOOP = load_loop_module()


def kwargs_of(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_config": case["model_config"],
        "model_name": case["model_id"],
        "gpu": case["hardware"],
        "num_gpus": case["num_gpus"],
        "precision": case["precision"],
        "num_requests": case["num_requests"],
        "total_time_s": case["total_time_s"],
    }


@pytest.mark.parametrize("case", METRICS_CASES, ids=[c["name"] for c in METRICS_CASES])
def test_loop_reproduces_oracle(case: dict[str, Any]) -> None:
    got = LOOP.reference_loop_metrics(case["records"], **kwargs_of(case))
    assert mismatches(case["expected"], got) == []
    assert (got["reason"] is None) == (case["reference_exception"] is None)


# One config per formula family, taken from the oracle (Mixtral = generic, DeepSeek with MLA).
MODELS = {}
for _case in METRICS_CASES:
    MODELS.setdefault(_case["model_id"], _case["model_config"])
MODEL_IDS = sorted(MODELS)

entry = st.fixed_dictionaries(
    {"req_pool_idx": st.integers(0, 3)},
    optional={
        "req_id": st.one_of(st.none(), st.sampled_from(["a", "b", "c", "0_1", "1_1"])),
        "extend_len": st.integers(0, 4000),
        "total_len": st.integers(0, 8000),
        "is_last_chunk": st.booleans(),
    },
)
# Mostly positive; 0.0 now and then (the reference's ZeroDivisionError, or the generic path's `or 1`).
latency = st.integers(0, 39).flatmap(lambda k: st.just(0.0) if k == 0 else st.floats(1e-4, 2.0))


@st.composite
def record(draw: st.DrawFn) -> dict[str, Any]:
    """A pass; latency / seq_lens_sum are occasionally absent (the reference then raises or filters)."""
    rec: dict[str, Any] = {
        "forward_mode": draw(st.sampled_from(["prefill", "prefill", "decode", "mixed", "decoding"])),
        "batch_size": draw(st.integers(0, 64)),
        "expert_activation": draw(st.one_of(st.none(), st.just(-1.0), st.floats(0, 64), st.floats(0, 64))),
        "seq_lens_sum": draw(st.integers(0, 20000)),
        "latency": draw(latency),
    }
    for key in ("seq_lens_sum", "latency"):
        if draw(st.integers(0, 19)) == 0:
            del rec[key]
    if draw(st.booleans()):
        rec["ttft"] = draw(latency)
    if rec["forward_mode"] == "prefill" and draw(st.integers(0, 2)) > 0:
        rec["per_req_info"] = draw(st.lists(entry, max_size=3))
    if draw(st.booleans()):
        rec["scheduled_tokens"] = draw(st.integers(0, 8000))
    return rec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(record(), min_size=1, max_size=25),
    model_id=st.sampled_from(MODEL_IDS),
    gpu=st.sampled_from(
        ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H200-141GB", "H100-SXM-80GB", "NVIDIA-Unknown-1GB"]
    ),
    num_gpus=st.sampled_from([None, 1, 8, 0]),
    precision=st.sampled_from([None, "fp8", "gptq"]),
    num_requests=st.one_of(st.none(), st.integers(0, 10)),
    total_time_s=st.one_of(st.none(), st.floats(0, 100)),
)
def test_loop_and_vectorised_agree(
    records: list[dict[str, Any]],
    model_id: str,
    gpu: str,
    num_gpus: int | None,
    precision: str | None,
    num_requests: int | None,
    total_time_s: float | None,
) -> None:
    kwargs = {
        "model_config": MODELS[model_id],
        "model_name": model_id,
        "gpu": gpu,
        "num_gpus": num_gpus,
        "precision": precision,
        "num_requests": num_requests,
        "total_time_s": total_time_s,
    }
    loop = LOOP.reference_loop_metrics(records, **kwargs)
    vec = reference_metrics(records, **kwargs)
    assert (loop["reason"] is None) == (vec["reason"] is None), (loop["reason"], vec["reason"])
    diff = [(k, v, vec[k]) for k, v in loop.items() if k != "reason" and not close(v, vec[k], rel_tol=1e-9)]
    assert diff == []


def test_hash_collision_fallback_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request keys are 64-bit hashes checked for collisions; the exact fallback must agree."""
    from moecap.analyze.reference import arrays

    case = next(c for c in METRICS_CASES if c["name"].startswith("chunked|"))
    expected = reference_metrics(case["records"], **kwargs_of(case))
    monkeypatch.setattr(arrays, "_hashes_are_exact", lambda exact: False)
    assert mismatches(expected, reference_metrics(case["records"], **kwargs_of(case))) == []
