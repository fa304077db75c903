"""Bad or incomplete input: the analyzer computes what it can, says what it could not and why,
and raises only typed, one-line user errors (never a traceback-worthy crash)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest
from metrics_helpers import (
    QWEN15_MOE_CONFIG,
    SimConfig,
    rewrite_steps,
    run_document,
    run_metadata,
    simulate_run,
)

from moecap.analyze.errors import AnalyzeError, SpecError
from moecap.schemas import TraceWriter, trace_file_name


def _only_run(doc: dict) -> dict:
    (run,) = doc["runs"]
    return run


def _warnings(run: dict) -> str:
    return "\n".join(run["warnings"])


def test_trace_without_expert_counts_nulls_smbu_only(tmp_path: Path) -> None:
    simulate_run(tmp_path / "t", SimConfig(write_experts=False))
    run = _only_run(run_document([tmp_path / "t"], tmp_path / "c"))
    assert re.search(r"no expert counts \(the run has no experts table\).*S-MBU", _warnings(run))
    steps = run["metrics"]["steps"]
    assert set(steps) == {"all", "prefill", "decode", "mixed"}
    for phase, values in steps.items():
        assert values["s_mbu"] is None and values["s_mbu_p50_p90_p99"] is None, phase
        assert values["s_mfu"] > 0 and values["flops_total"] > 0, phase
        assert values["bytes_kv_read"] is not None, phase  # KV traffic needs no counts
    assert steps["all"]["window_total_token_throughput"] > 0
    assert run["metrics"]["requests"]  # request metrics are computed
    assert run["metrics"]["experts"] == {}


def test_unknown_gpu_in_the_trace_warns_and_names_the_gpu_flag(tmp_path: Path) -> None:
    simulate_run(tmp_path / "t", SimConfig(gpu_name="Acme Tensor X1"))
    run = _only_run(run_document([tmp_path / "t"], tmp_path / "c"))
    warning = _warnings(run)
    assert "Acme Tensor X1" in warning and "--gpu" in warning
    assert run["metrics"]["steps"] == {}  # no bandwidth or peak: no utilisation
    assert run["metrics"]["requests"] and run["metrics"]["experts"]
    assert run["constants"]["model"]["family"] == "qwen2_moe"


def test_gpu_named_by_the_user_must_exist(tmp_path: Path) -> None:
    simulate_run(tmp_path / "t", SimConfig())
    with pytest.raises(SpecError, match="unknown GPU 'nope'"):
        run_document([tmp_path / "t"], tmp_path / "c", gpu="nope")


def test_unknown_model_family_warns_and_computes_the_rest(tmp_path: Path) -> None:
    config = dict(QWEN15_MOE_CONFIG, model_type="mystery_moe", architectures=["MysteryMoeForCausalLM"])
    simulate_run(tmp_path / "t", SimConfig(), cfg=config)
    run = _only_run(run_document([tmp_path / "t"], tmp_path / "c"))
    assert re.search(r"model spec: unsupported model family: model_type 'mystery_moe'", _warnings(run))
    assert run["metrics"]["steps"] == {}
    assert "model" not in run["constants"]
    assert run["metrics"]["requests"] and run["metrics"]["experts"]  # from the trace alone


def _zero_spans(table: pa.Table, steps: set[int]) -> pa.Table:
    start = table.column("gpu_start_ns").to_pylist()
    end = table.column("gpu_end_ns").to_pylist()
    step = table.column("step").to_pylist()
    ends = [s if k in steps else e for s, e, k in zip(start, end, step)]
    return table.set_column(
        table.schema.get_field_index("gpu_end_ns"), "gpu_end_ns", pa.array(ends, pa.int64())
    )


def test_zero_latency_steps_are_left_out_with_a_warning(tmp_path: Path) -> None:
    truth = simulate_run(tmp_path / "t", SimConfig())
    edited = rewrite_steps(tmp_path / "t", tmp_path / "zero", lambda t: _zero_spans(t, {3, 7}))
    base = _only_run(run_document([tmp_path / "t"], tmp_path / "c1"))
    run = _only_run(run_document([edited], tmp_path / "c2"))
    assert "2 step(s) with zero or negative duration were left out of every metric" in _warnings(run)
    steps = run["metrics"]["steps"]["all"]
    assert steps["steps"] == len(truth["steps"]) - 2
    left_out = {s["step"]: s for s in truth["steps"]}
    assert (
        steps["tokens"]
        == sum(s["tokens"] for s in truth["steps"]) - left_out[3]["tokens"] - left_out[7]["tokens"]
    )
    assert 0 < steps["s_mbu"] < 1 and 0 < steps["s_mfu"] < 1
    assert steps["s_mbu"] != base["metrics"]["steps"]["all"]["s_mbu"]


_NO_STEP_BUG = (
    "bug: analysis.step_aggregates, GROUP BY ROLLUP over no selected step still yields the grand-total "
    "row with NULL quantile lists; `[_num(x) for x in r['smfu_q']]` raises TypeError"
)


def test_every_step_zero_latency_gives_no_utilisation_and_no_crash(tmp_path: Path) -> None:
    truth = simulate_run(tmp_path / "t", SimConfig(num_requests=2, output_len=3))
    every = {s["step"] for s in truth["steps"]}
    edited = rewrite_steps(tmp_path / "t", tmp_path / "zero", lambda t: _zero_spans(t, every))
    run = _only_run(run_document([edited], tmp_path / "c"))
    assert f"{len(every)} step(s) with zero or negative duration" in _warnings(run)
    assert run["metrics"]["steps"] == {}
    assert run["metrics"]["requests"]


def test_a_window_that_selects_no_step_gives_no_utilisation_and_no_crash(tmp_path: Path) -> None:
    simulate_run(tmp_path / "t", SimConfig(num_requests=2, output_len=3))
    run = _only_run(run_document([tmp_path / "t"], tmp_path / "c", window="steps:9000-9999"))
    assert run["metrics"]["steps"] == {}
    assert run["metrics"]["requests"]


_EMPTY_BUG = (
    "bug: analysis._compute_step_metrics raises InputError('no steps to analyse') for a steps file "
    "with no rows, which aborts analyze_paths for every run instead of warning for that one"
)


def _empty_steps_run(out: Path, run_id: str) -> Path:
    """A run whose steps file holds no rows (the server died before its first step), with the
    client's requests file intact."""
    sim = SimConfig(run_id=run_id, num_requests=2, output_len=3)
    simulate_run(out, sim)
    steps = out / trace_file_name(run_metadata(sim, QWEN15_MOE_CONFIG), "steps")
    for extra in out.glob(f"{run_id}.*.experts.arrow"):
        extra.unlink()
    TraceWriter(steps, "steps", run_metadata(sim, QWEN15_MOE_CONFIG)).close()
    return steps


def test_empty_steps_file_never_crashes_and_says_why(tmp_path: Path) -> None:
    steps = _empty_steps_run(tmp_path / "t", "20260101T000000Z-synthetic-empty-0000")
    try:
        doc = run_document([tmp_path / "t"], tmp_path / "c")
    except AnalyzeError as exc:  # a typed error: the CLI prints it as one line
        message = str(exc)
    else:
        message = _warnings(_only_run(doc))
    assert steps.name in message
    assert re.search(r"no steps|no rows|empty", message)


def test_empty_steps_file_is_a_warning_and_requests_are_still_analysed(tmp_path: Path) -> None:
    steps = _empty_steps_run(tmp_path / "t", "20260101T000000Z-synthetic-empty-0000")
    run = _only_run(run_document([tmp_path / "t"], tmp_path / "c"))
    assert steps.name in _warnings(run)
    assert run["metrics"]["steps"] == {}
    assert run["metrics"]["requests"]


def test_empty_steps_file_does_not_stop_other_runs(tmp_path: Path) -> None:
    _empty_steps_run(tmp_path / "t", "20260101T000000Z-synthetic-empty-0000")
    simulate_run(tmp_path / "t", SimConfig(run_id="20260101T000000Z-synthetic-good-0000"))
    doc = run_document([tmp_path / "t" / "*.arrow"], tmp_path / "c")
    runs = {r["run_id"]: r for r in doc["runs"]}
    assert runs["20260101T000000Z-synthetic-good-0000"]["metrics"]["steps"]["all"]["s_mbu"] > 0


def test_two_runs_in_one_glob_are_two_run_objects(tmp_path: Path) -> None:
    a = simulate_run(tmp_path / "t", SimConfig(run_id="20260101T000000Z-synthetic-a-0000"))
    b = simulate_run(
        tmp_path / "t", SimConfig(run_id="20260101T000000Z-synthetic-b-0000", seed=1, num_requests=10)
    )
    doc = run_document([tmp_path / "t" / "*.arrow"], tmp_path / "c")
    runs = {r["run_id"]: r for r in doc["runs"]}
    assert sorted(runs) == ["20260101T000000Z-synthetic-a-0000", "20260101T000000Z-synthetic-b-0000"]
    for run_id, truth in (("20260101T000000Z-synthetic-a-0000", a), ("20260101T000000Z-synthetic-b-0000", b)):
        steps = runs[run_id]["metrics"]["steps"]["all"]
        assert steps["steps"] == len(truth["steps"])
        assert steps["tokens"] == sum(s["tokens"] for s in truth["steps"])
        assert runs[run_id]["warnings"] == []
    assert doc["load_errors"] == []
