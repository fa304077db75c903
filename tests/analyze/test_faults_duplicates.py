"""Fault injection: the same data twice. A copy of a file under another name, a truncated copy beside
the complete file, repeated step keys or request ids inside a file: by default each duplicate is left
out with a warning and the metrics equal the clean run's exactly (recovered); `--strict` refuses it
in one line; `check` names it (and `report` runs with duplicates in steps and experts alike)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from faults_helpers import (
    ONE_LINE,
    RECOVERED,
    assert_one_line,
    base_run,
    cli,
    metrics_json,
    rewrite,
    trace_file,
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_run(tmp_path_factory.mktemp("faults") / "clean")


@pytest.fixture(scope="module")
def clean_metrics(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("clean_out")
    return metrics_json(clean, tmp / "out", tmp / "c")


def _copy(clean: Path, dst: Path) -> Path:
    shutil.copytree(clean, dst)
    return dst


def _with_copy(kind: str):
    def make(clean: Path, dst: Path) -> Path:
        _copy(clean, dst)
        shutil.copy(trace_file(dst, kind), dst / f"backup copy of the {kind}.arrow")
        return dst

    return make


def _with_truncated_copy(clean: Path, dst: Path) -> Path:
    rewrite(clean, dst, "steps", lambda t: t, batch_rows=8)  # the same rows, in batches of 8
    data = trace_file(dst, "steps").read_bytes()
    (dst / "partial.steps.arrow").write_bytes(data[: len(data) * 2 // 3])
    return dst


def _repeat_rows(kind: str, rows: int = 10):
    def make(clean: Path, dst: Path) -> Path:
        return rewrite(clean, dst, kind, lambda t: pa.concat_tables([t, t.slice(0, rows)]))

    return make


def _repeat_both(clean: Path, dst: Path) -> Path:
    rewrite(clean, dst, "steps", lambda t: pa.concat_tables([t.slice(0, 25), t.slice(20, 10), t.slice(25)]))
    tmp = dst.with_name(dst.name + "_e")
    rewrite(dst, tmp, "experts", lambda t: pa.concat_tables([t, t.slice(5, 3)]))
    shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


# (case, how to make it, what check and the warning say)
CASES = [
    ("copy_of_steps_file", _with_copy("steps"), "an identical copy of"),
    ("copy_of_experts_file", _with_copy("experts"), "an identical copy of"),
    ("copy_of_requests_file", _with_copy("requests"), "an identical copy of"),
    ("copy_of_gpu_samples_file", _with_copy("gpu_samples"), "an identical copy of"),
    ("truncated_copy_of_steps_file", _with_truncated_copy, "; every one of its keys is in the kept file"),
    (
        "repeated_step_keys",
        _repeat_rows("steps"),
        "10 row(s) left out of every view and metric: a step an earlier",
    ),
    (
        "repeated_expert_rows",
        _repeat_rows("experts"),
        "10 row(s) left out of every view and metric: a step an",
    ),
    (
        "repeated_request_ids",
        _repeat_rows("requests", 4),
        "4 row(s) left out of every view and metric: a req_id",
    ),
    ("repeated_steps_and_experts", _repeat_both, "10 row(s) left out of every view and metric: a step"),
]
OUTCOMES = {case[0]: RECOVERED for case in CASES} | {f"strict_{case[0]}": ONE_LINE for case in CASES}


@pytest.mark.parametrize(("case", "make", "said"), CASES, ids=[c[0] for c in CASES])
def test_duplicates_count_once_with_a_warning(
    clean: Path, clean_metrics: dict, tmp_path: Path, case: str, make, said: str
) -> None:
    trace = make(clean, tmp_path / "t")
    got = metrics_json(trace, tmp_path / "out", tmp_path / "c")
    assert got["metrics"] == clean_metrics["metrics"]  # throughput, cost, S-MBU: exactly the clean run's
    assert any(said in w for w in got["warnings"]), got["warnings"]

    r = cli("check", trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert sum(said in line for line in r.stdout.splitlines()) == 1, r.stdout

    refused = "truncated stream" if "truncated" in case else "--strict refuses"
    assert_one_line(cli(trace, "--strict", "--cache-dir", tmp_path / "c"), refused)


def test_report_runs_with_duplicates_in_steps_and_experts(clean: Path, tmp_path: Path) -> None:
    trace = _repeat_both(clean, tmp_path / "t")
    r = cli(
        "report", trace, "--out", tmp_path / "report", "--whatif-gpu", "none", "--cache-dir", tmp_path / "c"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "report" / "report.html").exists()


def test_duplicate_step_keys_are_described_as_duplicates_not_gaps(clean: Path, tmp_path: Path) -> None:
    trace = _repeat_both(clean, tmp_path / "t")
    r = cli("check", trace, "--cache-dir", tmp_path / "c")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  - ")]
    # the repeated rows of each file, and nothing else: no gap, no token mismatch, no count mismatch
    assert len(lines) == 2, r.stdout
    assert "steps.arrow: 10 row(s)" in lines[0] and "experts.arrow: 3 row(s)" in lines[1]


OUTCOMES["report_with_duplicates_in_steps_and_experts"] = RECOVERED


def test_compare_counts_takes_repeated_steps_once() -> None:
    import numpy as np

    from moecap.analyze.checks import compare_counts

    # rank A recorded step 1 twice (the first row counts), rank B has step 3 that A lacks
    a = (np.array([0, 1, 1, 2]), np.array([[1, 1], [2, 0], [9, 9], [0, 2]]))
    b = (np.array([0, 1, 2, 3]), np.array([[1, 1], [2, 0], [0, 3], [5, 5]]))
    assert compare_counts(a, b) == (3, 1, 1, 2)  # 3 common steps, step 2 differs, step 3 unmatched
