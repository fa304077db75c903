"""Aggregation invariants on synthetic traces (docs/metrics.md §6, §9): S-MBU / S-MFU are ratios of
sums over GPU time, scale as 1 / time and with the GPU's bandwidth; expert counts obey routing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metrics_helpers import (
    QWEN15_MOE_CONFIG,
    SimConfig,
    analysis,
    rewrite_steps,
    run_document,
    scale_times,
    simulate_run,
)

from moecap.analyze.specs import model_spec_from_config, resolve_gpu

PHASES = ("all", "prefill", "decode", "mixed")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "trace"
    simulate_run(out, SimConfig())
    return out


def _steps(doc: dict) -> dict:
    (run,) = doc["runs"]
    return run["metrics"]["steps"]


def test_smbu_and_smfu_scale_as_one_over_time(trace: Path, tmp_path: Path) -> None:
    slow = rewrite_steps(trace, tmp_path / "slow", lambda t: scale_times(t, 2))
    base, twice = (
        _steps(run_document([trace], tmp_path / "c1")),
        _steps(run_document([slow], tmp_path / "c2")),
    )
    assert set(base) == set(twice) == set(PHASES)
    for phase in PHASES:
        a, b = base[phase], twice[phase]
        assert b["bytes_total"] == a["bytes_total"] and b["flops_total"] == a["flops_total"]
        assert b["gpu_seconds"] == pytest.approx(2 * a["gpu_seconds"], rel=1e-12)
        assert b["s_mbu"] == pytest.approx(a["s_mbu"] / 2, rel=1e-12), phase
        assert b["s_mfu"] == pytest.approx(a["s_mfu"] / 2, rel=1e-12), phase


def test_half_the_bandwidth_doubles_smbu_and_keeps_smfu(trace: Path, tmp_path: Path) -> None:
    h100 = resolve_gpu("NVIDIA H100 80GB HBM3")  # the GPU the synthetic trace names
    half = {
        "name": "H100-half-bandwidth",
        "memory_gb": h100.memory_bytes / 1e9,
        "memory_bandwidth_tb_s": h100.memory_bandwidth / 2 / 1e12,
        "tflops_dense": {k: None if v is None else v / 1e12 for k, v in h100.dense_flops.items()},
    }
    overrides = tmp_path / "gpus.yaml"
    overrides.write_text(yaml.safe_dump({"gpus": [half]}))
    base = run_document([trace], tmp_path / "c1")
    doc = run_document([trace], tmp_path / "c2", gpu="H100-half-bandwidth", gpu_overrides=str(overrides))
    assert doc["runs"][0]["constants"]["gpu"]["name"] == "H100-half-bandwidth"
    assert doc["runs"][0]["constants"]["gpu"]["retargeted"] is True
    for phase in PHASES:
        a, b = _steps(base)[phase], _steps(doc)[phase]
        assert b["s_mbu"] == pytest.approx(2 * a["s_mbu"], rel=1e-12), phase
        assert b["s_mfu"] == pytest.approx(a["s_mfu"], rel=1e-12), phase


def _set_gpu_spans(table: pa.Table, spans_ns: list[int]) -> pa.Table:
    start = table.column("gpu_start_ns").to_pylist()
    i = table.schema.get_field_index("gpu_end_ns")
    ends = [s + spans_ns[k % len(spans_ns)] for k, s in enumerate(start)]
    return table.set_column(i, "gpu_end_ns", pa.array(ends, pa.int64()))


def _per_step(an, phase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    where = "" if phase == "all" else f"AND phase = '{phase}'"
    rows = an.db.con.execute(
        f"SELECT s_mbu, s_mfu, time_s FROM step_metrics WHERE NOT is_draft AND time_s > 0 {where}"
    ).fetchnumpy()
    return rows["s_mbu"], rows["s_mfu"], rows["time_s"]


def test_ratio_of_sums_is_the_mean_of_per_step_values_when_times_are_equal(
    trace: Path, tmp_path: Path
) -> None:
    """Equal GPU spans: Σ bytes / (BW · N · t) = mean(bytes_i / (BW · t)), whatever the bytes."""
    equal = rewrite_steps(trace, tmp_path / "equal", lambda t: _set_gpu_spans(t, [5_000_000]))
    an = analysis([equal], tmp_path / "c")
    steps = _steps(an.document)
    for phase in PHASES:
        s_mbu, s_mfu, time_s = _per_step(an, phase)
        assert np.all(time_s == 0.005)
        assert steps[phase]["s_mbu"] == pytest.approx(s_mbu.mean(), rel=1e-12), phase
        assert steps[phase]["s_mfu"] == pytest.approx(s_mfu.mean(), rel=1e-12), phase


def test_ratio_of_sums_weights_steps_by_time_not_by_count(trace: Path, tmp_path: Path) -> None:
    """Unequal spans (1 ms, 9 ms alternating): the aggregate is the time-weighted mean of the
    per-step values, and differs from their plain mean."""
    uneven = rewrite_steps(trace, tmp_path / "uneven", lambda t: _set_gpu_spans(t, [1_000_000, 9_000_000]))
    an = analysis([uneven], tmp_path / "c")
    s_mbu, _, time_s = _per_step(an, "all")
    weighted = float((s_mbu * time_s).sum() / time_s.sum())
    assert _steps(an.document)["all"]["s_mbu"] == pytest.approx(weighted, rel=1e-12)
    assert abs(weighted - s_mbu.mean()) > 0.1 * weighted


def test_per_step_smbu_is_bytes_over_bandwidth_time_gpus(trace: Path, tmp_path: Path) -> None:
    an = analysis([trace], tmp_path / "c")
    rows = an.db.con.execute(
        "SELECT bytes_total, flops_total, time_s, gpus, s_mbu, s_mfu FROM step_metrics"
    ).fetchnumpy()
    gpu = resolve_gpu("H100")
    np.testing.assert_allclose(
        rows["s_mbu"],
        rows["bytes_total"] / (gpu.memory_bandwidth * rows["time_s"] * rows["gpus"]),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        rows["s_mfu"],
        rows["flops_total"] / (gpu.peak_flops("bf16") * rows["time_s"] * rows["gpus"]),
        rtol=1e-12,
    )
    total = _steps(an.document)["all"]
    assert total["s_mbu"] == pytest.approx(
        rows["bytes_total"].sum() / (gpu.memory_bandwidth * (rows["time_s"] * rows["gpus"]).sum()), rel=1e-12
    )


_ROUTING_SQL = """
SELECT e.step, e.layer, s.num_tokens,
       sum(e.tokens) AS routed, count(*) FILTER (WHERE e.tokens > 0) AS active
FROM expert_tokens e JOIN steps s USING (run_id, dp, pp, step)
GROUP BY e.step, e.layer, s.num_tokens
"""


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    concurrency=st.integers(1, 6),
    token_budget=st.integers(8, 96),
    seed=st.integers(0, 2**16),
)
def test_expert_counts_obey_routing(concurrency: int, token_budget: int, seed: int) -> None:
    """Per step and MoE layer: Σ expert tokens = tokens × top_k; activated experts ≤ min(tokens ×
    top_k, experts); the step's activated experts (bytes) are the per-layer counts summed."""
    spec = model_spec_from_config(QWEN15_MOE_CONFIG)
    k, e = spec.top_k, spec.num_experts
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace"
        sim = SimConfig(
            num_requests=6, concurrency=concurrency, token_budget=token_budget, output_len=4, seed=seed
        )
        simulate_run(out, sim)
        an = analysis([out], Path(tmp) / "c")
        rows = an.db.con.execute(_ROUTING_SQL).fetchnumpy()
        assert len(rows["step"]) == len(set(rows["step"].tolist())) * spec.num_moe_layers
        np.testing.assert_array_equal(rows["routed"], rows["num_tokens"] * k)
        assert np.all(rows["active"] <= np.minimum(rows["num_tokens"] * k, e))
        assert np.all(rows["active"] >= 1)
        per_step = an.db.con.execute(
            """SELECT m.step, m.active_experts, m.bytes_routed_experts, a.active
               FROM step_metrics m JOIN (
                   SELECT step, count(*) FILTER (WHERE tokens > 0) AS active FROM expert_tokens GROUP BY step
               ) a USING (step) ORDER BY m.step"""
        ).fetchnumpy()
        np.testing.assert_array_equal(per_step["active_experts"], per_step["active"])
        expert_bytes = spec.precision.classes["routed_expert"].bytes_per_unit
        np.testing.assert_allclose(per_step["bytes_routed_experts"], per_step["active"] * expert_bytes)
        mean = _steps(an.document)["all"]["activated_experts_per_step_mean"]
        assert mean == pytest.approx(per_step["active"].mean())
