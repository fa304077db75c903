"""Terminal output: one row per run by default, --detail for each run's tables, whole rows when
piped, the window as asked, a warning for an empty window, --version and mistyped commands."""

from __future__ import annotations

from conftest import RUNS

from moecap.analyze.report.terminal import COLUMNS, empty_window_warning, gpu_text, window_text


def test_several_runs_print_one_row_per_run_with_whole_run_ids(cli, trace_dir, cache_dir):
    r = cli(trace_dir, "--cache-dir", cache_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for run_id, *_ in RUNS:  # piped: each run on one line, its id whole (no wrap at 80 columns)
        assert sum(run_id in ln for ln in lines) == 1, run_id
    assert max(len(ln) for ln in lines) > 80
    header = next(ln for ln in lines if "run id" in ln)
    for _, heading, _ in COLUMNS:  # one unit per column label, as declared
        assert heading in header, heading
    assert len(lines) < 12 + len(RUNS)  # a table, not a page per run
    assert "window: steps with >=" not in r.stdout or r.stdout.count("window:") == 1


def test_detail_prints_each_runs_own_tables(cli, trace_dir, cache_dir):
    r = cli(trace_dir, "--cache-dir", cache_dir, "--detail")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("window: ") == len(RUNS) and r.stdout.count("S-MBU") >= len(RUNS)


def test_window_range_is_in_the_header_and_an_empty_window_is_warned(cli, trace_dir, cache_dir):
    one = sorted(trace_dir.glob(f"{RUNS[1][0]}*.arrow"))
    r = cli(*one, "--cache-dir", cache_dir, "--window", "steps:5000-6000")
    assert r.returncode == 0, r.stderr
    assert "window: steps 5000–6000" in r.stdout
    assert f"the window (steps 5000–6000) holds no step of {RUNS[1][0]}" in r.stdout


def test_version_and_a_mistyped_command(cli):
    from moecap.analyze import __version__

    v = cli("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"moecap-analyze {__version__}"
    m = cli("sumary", "traces/")
    assert m.returncode == 2
    assert m.stderr.strip().splitlines() == [
        "moecap-analyze: error: no command or file 'sumary'; did you mean 'summary'? "
        "(moecap-analyze --help lists the commands)"
    ]
    assert cli("leaderbord").stderr.count("did you mean 'leaderboard'") == 1


def test_a_path_is_never_taken_for_a_mistyped_command(cli, tmp_path):
    r = cli(tmp_path / "summry")  # a path (has a /): the usual one-line "no such file"
    assert r.returncode == 2 and "did you mean" not in r.stderr


def test_cpu_trace_header_and_window_texts():
    cpu = {"run_id": "r", "gpu": {"name": None, "count": 1}, "constants": {}}
    assert gpu_text(cpu) == "no GPU recorded (CPU trace)"
    assert gpu_text(
        {"gpu": {"name": "NVIDIA H100", "count": 2}, "constants": {"gpu": {"name": "H100-SXM"}}}
    ) == ("H100-SXM ×2")
    assert window_text({"kind": "time", "start_s": 1.5, "end_s": 3.0}) == "time 1.5–3 s from the first step"
    assert (
        window_text({"kind": "steady", "description": "steps with >= 15 requests"})
        == "steps with >= 15 requests"
    )
    empty = {
        "run_id": "r",
        "window": {"kind": "steps", "first_step": 50, "last_step": 10},
        "metrics": {"steps": {}},
    }
    assert empty_window_warning(empty).startswith("the window (steps 50–10) holds no step of r")
    full = {**empty, "metrics": {"steps": {"all": {"steps": 3}}}}
    assert empty_window_warning(full) is None


def test_a_cpu_trace_says_why_its_step_table_is_empty(cli, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from synthetic_traces import SimConfig, simulate_run

    simulate_run(tmp_path / "cpu", SimConfig(gpu_name=""))  # a trace that records no GPU
    r = cli(tmp_path / "cpu", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "no GPU recorded (CPU trace)" in r.stdout and "None ×" not in r.stdout
    assert (
        "step table of 20260101T000000Z-synthetic-qwen15moe-0000 is empty: step metrics need a GPU spec"
        in r.stdout
    )
    assert "holds no step" not in r.stdout  # not blamed on the window
    gpu_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: gpu spec:")]
    assert len(gpu_lines) == 1 and gpu_lines[0].count("pass --gpu") == 1  # the hint once


def test_check_speaks_json_and_csv_too(cli, trace_dir, cache_dir):
    import csv
    import io
    import json

    table = cli("check", trace_dir, "--cache-dir", cache_dir)
    as_json = cli("check", trace_dir, "--cache-dir", cache_dir, "--format", "json")
    as_csv = cli("check", trace_dir, "--cache-dir", cache_dir, "--format", "csv")
    assert table.returncode == as_json.returncode == as_csv.returncode  # same verdict in every format
    doc = json.loads(as_json.stdout)
    assert sorted(r["run_id"] for r in doc["runs"]) == sorted(r[0] for r in RUNS)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert {r["run_id"] for r in rows} == {r[0] for r in RUNS}
    for run in doc["runs"]:  # the CSV holds each finding once, or "ok"
        mine = [r["finding"] for r in rows if r["run_id"] == run["run_id"]]
        assert mine == (run["findings"] or ["ok"])
