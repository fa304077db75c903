"""`moecap-analyze shell`: a SQL prompt that also runs piped input, and a database file for other clients."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import duckdb
from sql_helpers import RawRun

from moecap.analyze.sql import VIEWS, Tables
from moecap.analyze.sql.shell import SqlShell, save_database

CLI = Path(sys.executable).parent / "moecap-analyze"


def _shell(t: Tables, text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = SqlShell(t, stdout=out, stderr=err).loop(io.StringIO(text), interactive=False)
    return code, out.getvalue(), err.getvalue()


def test_statements_span_lines_and_end_with_a_semicolon(t: Tables, raw: dict[str, RawRun]) -> None:
    code, out, err = _shell(t, "SELECT count(*) AS n\n  FROM steps;\n.mode csv\nSELECT 1 AS a, 2 AS b;\n")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].strip() == "n" and int(lines[2]) == sum(r.steps.height for r in raw.values())
    assert lines[-2:] == ["a,b", "1,2"]


def test_a_last_statement_without_semicolon_still_runs(t: Tables) -> None:
    code, out, _ = _shell(t, ".mode csv\nSELECT 42 AS x")
    assert code == 0 and out == "x\n42\n"


def test_errors_are_one_line_and_the_shell_goes_on(t: Tables) -> None:
    code, out, err = _shell(t, "SELEC 1;\n.mode csv\nSELECT 7 AS y;\n.nonsense\n")
    assert code == 2
    assert out == "y\n7\n"
    errors = err.splitlines()
    assert errors[0].startswith("error: Parser Error") and errors[1].startswith(
        "error: unknown command .nonsense"
    )


def test_dot_commands(t: Tables) -> None:
    code, out, err = _shell(
        t,
        ".tables\n.schema request_metrics\n.examples\n.maxrows 2\n.example steps_per_phase\n.help\n.quit\nSELEC;\n",
    )
    assert code == 0, err
    for view in VIEWS:
        assert f"\n{view} " in "\n" + out
    assert "ttft_s" in out and "tpot_by_batch_size" in out and "FROM steps" in out and ".maxrows" in out
    assert "more not shown" in err  # .maxrows 2 cut the example's result


def test_piped_into_the_cli(sql_trace_dir: Path, sql_cache: Path) -> None:
    proc = subprocess.run(
        [str(CLI), "shell", str(sql_trace_dir), "--cache-dir", str(sql_cache)],
        input=".mode csv\nSELECT count(*) AS runs FROM runs;\nSELECT count(DISTINCT run_id) AS n FROM run_metrics;\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "runs\n3\nn\n3\n"  # run_metrics computed on first use


def test_saved_database_has_the_views(t: Tables, tmp_path: Path) -> None:
    path = tmp_path / "runs.duckdb"
    saved, left_out = save_database(t, path)
    assert set(saved) | set(left_out) == set(VIEWS)
    # only views over data the loader registers from Python (raw expert counts) may be left out
    assert set(left_out) <= {"experts", "expert_tokens"}
    con = duckdb.connect(str(path), read_only=True)
    try:
        for view in sorted(
            set(saved) & {"steps", "expert_totals", "request_metrics", "window_steps", "run_metrics"}
        ):
            assert (
                con.sql(f"SELECT count(*) FROM {view}").fetchall()
                == t.sql(f"SELECT count(*) FROM {view}").fetchall()
            )
    finally:
        con.close()
    # the in-memory connection is unchanged and still the default database
    assert t.sql("SELECT count(*) FROM runs").fetchall() == [(3,)]
    save_database(t, path)  # overwrites


def test_schema_of_run_metrics_says_it_is_computing_first(
    sql_trace_files: list[Path], sql_cache: Path
) -> None:
    from moecap.analyze.sql import tables

    # The shell defers the run-level metrics (metrics=False) until a query names them.
    with tables([str(p) for p in sql_trace_files], cache_dir=sql_cache, metrics=False) as fresh:
        n = len(fresh.runs)
        code, out, err = _shell(fresh, ".schema run_metrics\n.schema run_metrics\n")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"computing the run-level metrics of {n} run(s) (once per session)…"
    assert lines[1].startswith("run-level metrics ready (")
    assert sum("computing" in ln for ln in lines) == 1  # the second .schema reuses them
    assert out.count("s_mbu") >= 2 or out.count("run_id") >= 2


def test_several_statements_print_every_result(t: Tables) -> None:
    code, out, _ = _shell(t, ".mode csv\nSELECT 1 AS a; SET threads = 2; SELECT 2 AS b;\n")
    assert code == 0 and out == "a\n1\nb\n2\n"
