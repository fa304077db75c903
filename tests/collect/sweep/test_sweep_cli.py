"""`moecap-collect sweep` end to end in subprocesses (the real CLI, the real HF engine on the CPU, a tiny
random-weight MoE): a 2x2 matrix whose table equals each point's own analysis, and a sweep stopped by
SIGTERM and then SIGKILL whose re-runs record only the missing points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moecap.collect.sweep.state import file_closed
from moecap.schemas import open_traces

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "collect" / "models" / "tiny-qwen2-moe" / "config.json")
CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # the analyzer the sweep runs at the end is the one installed beside this interpreter
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}

pytest.importorskip("transformers")


def _sweep_args(out: Path, *extra: str) -> list[str]:
    return [*CLI, "sweep", "--engine", "hf", "--model", TINY, "--random-weights", "--out", str(out), *extra]


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "sweep.json").read_text())["points"]
    except (OSError, ValueError, KeyError):
        return {}


def test_two_by_two_matrix_table_equals_each_points_own_analysis(tmp_path):
    from moecap.analyze.analysis import Options
    from moecap.analyze.pipeline import analyze_paths

    out = tmp_path / "sweep"
    proc = subprocess.run(
        _sweep_args(
            out, "--task", "synthetic:24x6", "--task", "synthetic:40x6", "--batch-sizes", "1,2", "--waves", "2",
            "--analyze-args", "--gpu H100 --format json",
        ),
        capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("sweep: starting hf") == 1  # the model is loaded once for the four points
    table = json.loads(proc.stdout)  # the analyzer's matrix, as the sweep printed it
    assert [(r["task"], r["batch_size"]) for r in table] == [
        ("synthetic:24x6", 1), ("synthetic:24x6", 2), ("synthetic:40x6", 1), ("synthetic:40x6", 2),
    ]  # fmt: skip
    assert len({r["run_id"] for r in table}) == 4
    for row in table:
        files = sorted(out.glob(f"{row['run_id']}.*.arrow"))
        assert {f.name.split(".")[-2] for f in files} == {"steps", "experts", "requests", "outputs"}
        doc = analyze_paths(files, Options(gpu="H100"), cache_dir=tmp_path / "cache").document
        (run,) = doc["runs"]
        assert run["workload"]["sweep"]["task"] == row["task"]
        assert run["workload"]["concurrency"] == row["batch_size"]
        m = run["metrics"]
        steps, req = m["steps"], m["requests"]
        # exactly the per-point numbers (same float, not approximately)
        assert row["ttft_ms"] == req["ttft_s"]["mean"] * 1e3
        assert row["tpot_ms"] == req["tpot_s"]["mean"] * 1e3
        assert row["output_tokens_per_s"] == steps["all"]["throughput_output_tokens_per_s"]
        for phase in ("prefill", "decode"):
            assert row[f"{phase}_smbu"] == steps[phase]["s_mbu"]
            assert row[f"{phase}_smfu"] == steps[phase]["s_mfu"]
        assert row["cost_usd_per_m_output_tokens"] == m["cost"]["usd_per_1m_output_tokens"]
        assert row["ttft_ms"] > 0 and row["decode_smbu"] > 0
    # the points calibrate a what-if across concurrencies (fit on batch size 1, project batch size 2)
    target = sorted(out.glob(f"{table[1]['run_id']}.*.arrow"))
    proc = subprocess.run(
        ["moecap-analyze", "whatif", *map(str, target), "--calibrate-on", str(out), "--calibrate-batch-sizes", "1",
         "--source-gpu", "H100", "--gpu", "H200", "--format", "json", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calibrated = json.loads(proc.stdout)["runs"][0]["calibration"]["calibrated_on"]
    assert sorted(calibrated["runs"]) == sorted(r["run_id"] for r in table) and calibrated["batch_sizes"] == [
        1
    ]


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before the moment to stop it")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the sweep")


def _running_with_files(out: Path, min_done: int):
    """(key, run_id) of the running point once `min_done` points are done and it has written a file."""
    state = _state(out)
    if sum(p["status"] == "done" for p in state.values()) < min_done:
        return None
    for key, p in state.items():
        if p["status"] == "running" and list(out.glob(f"{p['run_id']}.*steps.arrow")):
            return key, p["run_id"]
    return None


def test_stopped_sweeps_resume_with_only_the_missing_points(tmp_path):
    out = tmp_path / "sweep"
    # 1 task x 4 batch sizes; points long enough (64 output tokens) to be stopped in the middle
    args = _sweep_args(
        out, "--task", "synthetic:16x64", "--batch-sizes", "1,2,3,4", "--waves", "2", "--no-table"
    )

    # 1. SIGTERM in the middle of the second point: the first is kept, the second's files are closed
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(proc, lambda: _running_with_files(out, 1))
    key, run_id = _running_with_files(out, 1)
    time.sleep(0.1)  # into the point's requests
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = _state(out)
    done_1 = {k: p["run_id"] for k, p in state.items() if p["status"] == "done"}
    assert state[key]["status"] == "interrupted" and len(done_1) >= 1
    set_aside = [out / f for f in state[key]["attempts"][-1]["files"]]
    assert set_aside and all(f.parent.name == "incomplete" and file_closed(f) for f in set_aside)
    assert not list(out.glob(f"{run_id}.*"))  # out of the folder the analyzer reads
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")}
    assert {n.split(".")[0] for n in kept} == set(done_1.values())
    assert all(file_closed(out / n) for n in kept)

    # 2. SIGKILL in the middle of a later point: nothing closes its files; the state says "running"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(proc, lambda: _running_with_files(out, len(done_1) + 1))
    killed_key, killed_run = _running_with_files(out, len(done_1) + 1)
    proc.kill()
    proc.communicate(timeout=60)
    state = _state(out)
    done_2 = {k: p["run_id"] for k, p in state.items() if p["status"] == "done"}
    assert state[killed_key]["status"] == "running" and len(done_2) < 4
    assert {k: done_2[k] for k in done_1} == done_1  # the first run's points were not recorded again

    # 3. the re-run records exactly the points not recorded before, and sets the killed attempt aside
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done_2)} of 4 point(s) already recorded, skipped" in proc.stderr
    state = _state(out)
    assert all(p["status"] == "done" for p in state.values())
    assert {k: state[k]["run_id"] for k in done_2} == done_2
    assert all(len(state[k]["attempts"]) == 1 for k in done_1)
    assert [a["status"] for a in state[key]["attempts"]] == ["interrupted", "done"]
    assert [a["status"] for a in state[killed_key]["attempts"]] == ["killed", "done"]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # untouched
    # the killed attempt's files left the analyzer's folder (kept in incomplete/ unless still empty)
    assert not list(out.glob(f"{killed_run}.*"))
    assert all((out / f).parent.name == "incomplete" for f in state[killed_key]["attempts"][0]["files"])
    traces = open_traces([out])
    assert not traces.errors and len(traces.runs) == 4
    assert sorted(r.metadata.workload["batch_size"] for r in traces.runs.values()) == [1, 2, 3, 4]
    assert all(f.complete for r in traces.runs.values() for f in r.files)
