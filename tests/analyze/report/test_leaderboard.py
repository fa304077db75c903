"""`moecap-analyze leaderboard`: one row per configuration, ranked, as CSV/JSON/HTML + charts."""

from __future__ import annotations

import csv
import io
import json

import polars as pl
import pytest
from conftest import EVIL_MODEL, RUNS

from moecap.analyze.errors import InputError
from moecap.analyze.report.frames import runs_frame
from moecap.analyze.report.leaderboard import COLUMNS, grouping_note, leaderboard_frame, rank_runs


def test_cli_ranks_every_configuration_by_throughput(leaderboard_run, analysis):
    proc, out = leaderboard_run
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    tps = [float(r["window_output_throughput"]) for r in rows]
    assert tps == sorted(tps, reverse=True)
    assert {r["run_id"] for r in rows} == {r[0] for r in RUNS}
    assert EVIL_MODEL in {r["model"] for r in rows}  # CSV keeps the string as it is
    doc = {r["run_id"]: r for r in analysis.document["runs"]}
    for r in rows:
        expected = doc[r["run_id"]]["metrics"]["steps"]["all"]["window_output_throughput"]
        assert float(r["window_output_throughput"]) == pytest.approx(expected)
        assert r["batch_size"] == str(doc[r["run_id"]]["workload"]["batch_size"])
    # Files: CSV, JSON, HTML and the two charts in both formats.
    assert (out / "leaderboard.csv").read_text().splitlines()[0].split(",") == [c for c, _, _ in COLUMNS]
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["sort"] == {
        "by": "throughput",
        "column": "window_output_throughput",
        "higher_is_better": True,
    }
    assert [r["run_id"] for r in board["rows"]] == [r["run_id"] for r in rows]
    charts = sorted(p.name for p in (out / "charts").iterdir())
    assert charts == [
        "leaderboard-cap_radar.png",
        "leaderboard-cap_radar.svg",
        "leaderboard-pareto_cost.png",
        "leaderboard-pareto_cost.svg",
    ]


def test_sort_direction_follows_the_metric(analysis):
    tpot = leaderboard_frame(analysis, sort="tpot")["tpot_ms"].to_list()
    assert tpot == sorted(tpot)
    cost = leaderboard_frame(analysis, sort="cost")["cost_usd_per_m_output_tokens"].to_list()
    assert cost == sorted(cost)
    with pytest.raises(InputError, match="--sort 'speed'"):
        leaderboard_frame(analysis, sort="speed")


def test_runs_without_the_sort_figure_rank_last(analysis):
    runs = runs_frame(analysis).with_columns(accuracy=pl.Series([0.25, 0.9, None, None], dtype=pl.Float64))
    board = rank_runs(runs, sort="accuracy")
    assert board["accuracy"].to_list() == [0.9, 0.25, None, None]
    assert board["rank"].to_list() == [1, 2, 3, 4]


def _with_rerun(analysis) -> pl.DataFrame:  # type: ignore[no-untyped-def]
    """The analysis' runs plus a later rerun of the second run's configuration (slower)."""
    runs = runs_frame(analysis)
    newer = runs.slice(1, 1).with_columns(
        run_id=pl.lit("20270101T000000Z-rerun"),
        window_output_throughput=pl.lit(1.0),
        created_at=pl.lit("2027-01-01T00:00:00+00:00"),
    )
    return pl.concat([runs, newer])


def test_runs_sharing_a_configuration_keep_their_own_rows_by_default(analysis):
    runs = _with_rerun(analysis)
    board = rank_runs(runs)
    assert board.height == len(RUNS) + 1
    assert sorted(board["run_id"].to_list()) == sorted([r[0] for r in RUNS] + ["20270101T000000Z-rerun"])
    assert board["other_runs"].null_count() == board.height
    assert grouping_note(board, runs.height) is None


def test_one_row_per_configuration_with_group_the_latest_run_stands_for_it(analysis):
    runs = _with_rerun(analysis)
    board = rank_runs(runs, group=True)
    assert board.height == len(RUNS)
    assert grouping_note(board, runs.height).startswith(f"{len(RUNS) + 1} runs grouped into {len(RUNS)} rows")
    row = board.filter(board["run_id"] == "20270101T000000Z-rerun").row(0, named=True)
    assert row["other_runs"] == RUNS[1][0] and row["rank"] == len(RUNS)
    # created_at decides (the traces' unless given), not the run id.
    board = rank_runs(
        runs,
        created_at={"20270101T000000Z-rerun": "2020-01-01T00:00:00+00:00", RUNS[1][0]: "2026-01-01"},
        group=True,
    )
    assert RUNS[1][0] in board["run_id"].to_list()


def test_created_at_is_the_trace_metadatas(analysis):
    created = {ctx.run.run_id: ctx.run.metadata.created_at for ctx in analysis.contexts}
    assert dict(runs_frame(analysis).select("run_id", "created_at").iter_rows()) == created


def test_cli_user_errors_are_one_line(cli, trace_dir, cache_dir):
    r = cli("leaderboard", trace_dir, "--export", "gif", "--cache-dir", cache_dir)
    assert r.returncode == 2
    assert r.stderr.strip() == "moecap-analyze: error: --export 'gif': expected png, svg, png,svg or none"


def test_terminal_table_shows_whole_run_ids_and_says_when_it_groups(cli, trace_dir, cache_dir):
    r = cli("leaderboard", trace_dir, "--cache-dir", cache_dir, "--export", "none")
    assert r.returncode == 0, r.stderr
    for run_id, *_ in RUNS:  # piped: no column cut, the run id whole on its row
        assert any(run_id in line for line in r.stdout.splitlines()), run_id
    assert "grouped" not in r.stderr
    g = cli("leaderboard", trace_dir, "--cache-dir", cache_dir, "--export", "none", "--group")
    assert g.returncode == 0 and "grouped" not in g.stderr  # 4 distinct configurations: nothing folded


def test_runs_holding_compile_steps_are_marked_as_check_names_them(tmp_path):
    # The shipped H100 vLLM sweep: four of its eight runs hold steps `check` names (a ~1.2 s Triton JIT
    # at c32 and c64, a slow first prefill at c1 and c8). The leaderboard marks their throughput with †
    # and carries the count and seconds in CSV; both agree with `check --format json`, read on its own.
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    sweep = str(Path(__file__).resolve().parents[3] / "traces" / "h100-vllm-sweep")
    cli = [sys.executable, "-c", "from moecap.analyze.cli import main; main()"]
    cache = ["--cache-dir", str(tmp_path)]
    checked = json.loads(
        subprocess.run(
            [*cli, "check", sweep, "--format", "json", *cache], capture_output=True, text=True
        ).stdout
    )
    named = {}
    for run in checked["runs"]:
        ms = [float(m) for note in run["notes"] for m in re.findall(r"step \d+ \(\w+, ([\d.]+) ms", note)]
        named[run["run_id"]] = (len(ms), sum(ms) / 1e3)
    assert sum(1 for n, _ in named.values() if n) == 4
    raw = subprocess.run(
        [*cli, "leaderboard", sweep, "--format", "csv", *cache], capture_output=True, text=True
    )
    rows = list(csv.DictReader(io.StringIO(raw.stdout)))
    assert len(rows) == 8
    for r in rows:
        n, seconds = named[r["run_id"]]
        assert int(r["compile_steps"]) == n
        assert float(r["compile_s"]) == pytest.approx(seconds, abs=1e-3)
    env = {**os.environ, "COLUMNS": "300"}
    table = subprocess.run([*cli, "leaderboard", sweep, *cache], capture_output=True, text=True, env=env)
    marked = {line.split("│")[2].strip() for line in table.stdout.splitlines() if "†" in line}
    assert marked == {rid for rid, (n, _) in named.items() if n}
    assert re.search(r"note: † 4 run\(s\) hold compile / JIT .*\(5 in all, ", table.stderr)
