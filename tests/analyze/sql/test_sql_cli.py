"""`moecap-analyze sql`: prints what pyarrow reads, writes every format, fails in one line with exit 2."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from sql_helpers import RawRun
from typer.testing import CliRunner

from moecap.analyze.sql.cli import register
from moecap.schemas import read_trace_file

CLI = Path(sys.executable).parent / "moecap-analyze"


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


@pytest.fixture
def invoke(app: typer.Typer, sql_trace_dir: Path, sql_cache: Path):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(
            app,
            [*args, str(sql_trace_dir), "--cache-dir", str(sql_cache)],
            input=input,
            catch_exceptions=False,
        )

    return run


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args, "--cache-dir", str(cache)], capture_output=True, text=True, timeout=120, check=False
    )


def test_count_of_steps_is_the_row_count_pyarrow_reads(sql_trace_files: list[Path], sql_cache: Path) -> None:
    """The issue's acceptance check, through the installed entry point on a list of files."""
    steps = [p for p in sql_trace_files if p.name.endswith(".steps.arrow")]
    expected = sum(read_trace_file(p).table.num_rows for p in steps)
    proc = _cli("sql", "select count(*) from steps", *map(str, sql_trace_files), cache=sql_cache)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].strip() == "count_star()" and int(lines[2]) == expected
    assert proc.stderr.strip().endswith("(1 row)")


@pytest.mark.parametrize(
    ("query", "prefix"),
    [
        ("SELEC count(*) FROM steps", "Parser Error: syntax error"),
        ("SELECT * FROM no_such_view", "Catalog Error: Table with name no_such_view does not exist!"),
        ("SELECT no_such_column FROM steps", "Binder Error"),
        ("SELECT 1/0::INT, 'x'::INTEGER FROM steps", "Conversion Error"),
    ],
)
def test_bad_sql_is_one_line_and_exit_2(
    sql_trace_dir: Path, sql_cache: Path, query: str, prefix: str
) -> None:
    proc = _cli("sql", query, str(sql_trace_dir), cache=sql_cache)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"moecap-analyze: error: {prefix}")
    assert "Traceback" not in proc.stderr


def test_missing_input_is_one_line_and_exit_2(tmp_path: Path, sql_cache: Path) -> None:
    proc = _cli("sql", "select 1", str(tmp_path / "nothing-here.arrow"), cache=sql_cache)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_csv_to_stdout(invoke, raw: dict[str, RawRun]) -> None:  # type: ignore[no-untyped-def]
    result = invoke(
        "sql", "SELECT run_id, count(*) AS n FROM steps GROUP BY run_id ORDER BY run_id", "--format", "csv"
    )
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["run_id"]: int(r["n"]) for r in rows} == {rid: r.steps.height for rid, r in raw.items()}


def test_json_and_jsonl(invoke, raw: dict[str, RawRun]) -> None:  # type: ignore[no-untyped-def]
    q = "SELECT run_id, req_id, ttft_s, itl_tokens FROM request_metrics ORDER BY run_id, req_id"
    as_json = json.loads(invoke("sql", q, "-f", "json").stdout)
    lines = [json.loads(x) for x in invoke("sql", q, "-f", "jsonl").stdout.splitlines()]
    assert as_json == lines
    assert len(as_json) == sum(r.requests.height for r in raw.values())
    assert isinstance(as_json[0]["itl_tokens"], int) and isinstance(as_json[0]["ttft_s"], float)


def test_lists_and_nulls_in_csv_and_json(invoke) -> None:  # type: ignore[no-untyped-def]
    q = "SELECT [1, 2] AS xs, NULL::INT AS nothing, 'nan'::DOUBLE AS nan"
    row = next(csv.DictReader(io.StringIO(invoke("sql", q, "-f", "csv").stdout)))
    assert row == {"xs": "[1, 2]", "nothing": "", "nan": "nan"}
    assert json.loads(invoke("sql", q, "-f", "json").stdout) == [{"xs": [1, 2], "nothing": None, "nan": None}]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_out_infers_the_format_from_the_suffix(invoke, tmp_path: Path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / f"steps{suffix}"
    result = invoke("sql", "SELECT run_id, step, num_tokens FROM steps", "--out", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    n = invoke("sql", "SELECT count(*) FROM steps", "-f", "csv").stdout.splitlines()[1]
    if suffix == ".parquet":
        assert pq.read_table(out).num_rows == int(n)
    elif suffix == ".csv":
        assert len(out.read_text().splitlines()) == int(n) + 1
    elif suffix == ".json":
        assert len(json.loads(out.read_text())) == int(n)
    else:
        assert len(out.read_text().splitlines()) == int(n)


def test_parquet_needs_out(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("sql", "SELECT 1", "--format", "parquet")
    assert result.exit_code == 2 and "needs --out" in result.stderr


def test_query_from_file_and_stdin(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    q = tmp_path / "q.sql"
    q.write_text("CREATE TEMP VIEW n_runs AS SELECT count(*) AS n FROM runs;\nSELECT n FROM n_runs;\n")
    assert invoke("sql", f"@{q}", "-f", "csv").stdout == "n\n3\n"
    assert invoke("sql", "-", "-f", "csv", input="SELECT count(*) AS n FROM runs").stdout == "n\n3\n"


def test_table_stops_at_max_rows(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("sql", "SELECT step FROM steps ORDER BY run_id, step", "--max-rows", "5")
    assert len(result.stdout.splitlines()) == 2 + 5
    assert "more not shown" in result.stderr


def test_gpu_option_retargets_the_metrics(invoke) -> None:  # type: ignore[no-untyped-def]
    out = invoke(
        "sql", "SELECT DISTINCT gpu, retargeted FROM run_metrics", "-f", "csv", "--gpu", "H200"
    ).stdout
    assert out.splitlines()[1].startswith("H200") and out.splitlines()[1].endswith("True")


def test_statements_that_return_no_rows_succeed(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("sql", "CREATE VIEW scratch AS SELECT 1 AS x; CREATE TEMP TABLE y AS SELECT 2 AS z")
    assert result.exit_code == 0, result.stderr


def test_out_with_a_suffix_that_names_no_format_is_refused(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "x.xlsx"
    result = invoke("sql", "SELECT 1 AS a", "-o", str(out))
    assert result.exit_code == 2 and not out.exists()
    assert (
        "cannot tell the format from '.xlsx'" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    txt = tmp_path / "x.txt"  # .txt asks for the text table on purpose
    assert invoke("sql", "SELECT 1 AS a", "-o", str(txt)).exit_code == 0 and "a" in txt.read_text()


def test_several_statements_print_every_result(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("sql", "SELECT 1 AS a; SELECT 'x;y' AS b", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "a\n1\n\nb\nx;y\n"


def test_out_refuses_several_results(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.csv"
    result = invoke("sql", "SELECT 1 AS a; SELECT 2 AS b", "-o", str(out))
    assert result.exit_code == 2 and "holds one result; the query has 2 statements" in result.stderr
    assert not out.exists()


def test_settings_are_locked_unless_writes_are_allowed(invoke) -> None:  # type: ignore[no-untyped-def]
    # Read-only mode locks DuckDB's configuration (a setting could point its profiler at a file).
    refused = invoke("sql", "SET threads = 1; SELECT 1 AS x", "-f", "csv")
    assert refused.exit_code == 2 and "locked" in refused.stderr and "--allow-writes" in refused.stderr
    allowed = invoke("sql", "SET threads = 1; SELECT 1 AS x", "-f", "csv", "--allow-writes")
    assert allowed.exit_code == 0 and allowed.stdout == "x\n1\n", allowed.stderr
