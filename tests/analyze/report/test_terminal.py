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


def _in_a_terminal(args: list, columns: int) -> str:
    """The CLI's stdout on a real pseudo-terminal `columns` wide (its window size set with TIOCSWINSZ,
    and $COLUMNS), escape codes stripped."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import sys
    import termios

    argv = [sys.executable, "-c", "from moecap.analyze.cli import main; main()", *map(str, args)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, its stdout and stderr the terminal
        env = {**os.environ, "COLUMNS": str(columns), "LINES": "60", "TERM": "xterm-256color"}
        os.execvpe(argv[0], argv, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    out = b""
    while select.select([fd], [], [], 120)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace")).replace("\r", "")


def test_in_a_real_terminal_the_run_table_fits_and_breaks_no_word(trace_dir, cache_dir):
    """Under a pseudo-terminal of 60, 80, 120 and 200 columns: every line fits, one row per run, each
    cell whole (no "…"), the run id wrapped only after - _ : /, and the columns left out named."""
    import re

    ids = [run_id for run_id, *_ in RUNS]
    for columns in (60, 80, 120, 200):
        text = _in_a_terminal([trace_dir, "--cache-dir", cache_dir], columns)
        lines = text.splitlines()
        assert max(len(ln) for ln in lines) <= columns, (columns, text)
        table = [ln for ln in lines if ln.startswith("│")]
        cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in table]
        assert [row[0] for row in cells if row[0]] == [str(i) for i in range(1, len(RUNS) + 1)], text
        assert "…" not in "".join(table), text
        # The run id column (2nd) of each run's lines, joined, is the run id; each line but the last
        # ends at a separator, so no id is cut inside a word.
        starts = [i for i, row in enumerate(cells) if row[0]] + [len(cells)]
        for run_id, a, b in zip(sorted(ids), starts, starts[1:], strict=False):
            parts = [row[1] for row in cells[a:b] if row[1]]
            assert "".join(parts) == run_id, (columns, parts)
            assert all(re.search(r"[-_:/]$", p) for p in parts[:-1]), (columns, parts)
        header = " ".join(ln for ln in lines if ln.startswith("┃"))
        left_out = next((ln for ln in lines if ln.startswith("left out to fit")), None)
        if columns >= 200:
            assert left_out is None and "warnings" in header, text
        else:  # the least needed columns go first, and the note says which
            assert left_out is not None and f"fit {columns} columns" in left_out, text
            assert "warnings" in text.split("left out to fit")[1]
            assert "run id" in header and "#" in header
