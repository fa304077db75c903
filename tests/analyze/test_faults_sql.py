"""Fault injection: hazardous SQL. `moecap-analyze sql` / `shell` are read-only by default: every
statement that would read a file outside the trace views, write a file, attach a database or fetch
an extension is refused in one line and leaves no file behind; the views (the cached Parquet) keep
working; `--allow-writes` restores the old behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_helpers import ONE_LINE, RECOVERED, assert_one_line, base_run, cli

OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_run(tmp_path_factory.mktemp("faults") / "clean")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


# (case, query with {tmp} and {cache} filled in, what the one line says, a file it must not create)
HAZARDS = [
    ("read_text_etc", "SELECT * FROM read_text('/etc/passwd')", "disabled by configuration", None),
    ("read_csv_etc", "SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration", None),
    ("glob_etc", "SELECT * FROM glob('/etc/*')", "disabled by configuration", None),
    (
        "copy_to_file",
        "COPY (SELECT * FROM steps) TO '{tmp}/leak.csv'",
        "COPY writes or reads files",
        "leak.csv",
    ),
    ("copy_into_cache", "COPY (SELECT 1) TO '{cache}/leak.parquet'", "COPY writes or reads files", None),
    ("copy_after_select", "SELECT 1; COPY steps TO '{tmp}/leak2.csv'", "statement 2 refused", "leak2.csv"),
    ("attach_new_db", "ATTACH '{tmp}/new.duckdb' AS x", "ATTACH opens or creates", "new.duckdb"),
    ("export_database", "EXPORT DATABASE '{tmp}/dump'", "EXPORT DATABASE writes", "dump"),
    ("install_httpfs", "INSTALL httpfs", "INSTALL / LOAD", None),
    ("force_install_url", "FORCE INSTALL httpfs FROM 'http://127.0.0.1:9/'", "INSTALL / LOAD", None),
    ("load_extension", "LOAD httpfs", "INSTALL / LOAD", None),
    (
        "read_remote",
        "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
        "disabled by configuration",
        None,
    ),
    ("enable_external_access", "SET enable_external_access = true", "locked", None),
    ("profiler_to_file", "SET profiling_output = '{cache}/profile.json'", "locked", None),
]
OUTCOMES |= {c[0]: ONE_LINE for c in HAZARDS}


@pytest.mark.parametrize(("case", "query", "said", "leaves"), HAZARDS, ids=[c[0] for c in HAZARDS])
def test_hazard_is_refused_in_one_line(
    trace: Path, cache: Path, tmp_path: Path, case: str, query: str, said: str, leaves: str | None
) -> None:
    text = query.format(tmp=tmp_path, cache=cache)
    line = assert_one_line(cli("sql", text, trace, "--cache-dir", cache), said)
    assert "--allow-writes" in line  # the way out is named
    if leaves:
        assert not (tmp_path / leaves).exists()
    assert not (cache / "leak.parquet").exists() and not (cache / "profile.json").exists()


def test_hazard_in_the_shell_is_refused_and_the_session_goes_on(
    trace: Path, cache: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    statements = f"COPY steps TO '{tmp_path}/leak.csv';\nSELECT count(*) AS n FROM steps;\n"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from moecap.analyze.cli import main; main()",
            "shell",
            str(trace),
            "--cache-dir",
            str(cache),
        ],
        input=statements,
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "leak.csv").exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "COPY writes or reads files" in errors[0]
    assert "50" in r.stdout  # the next statement ran


OUTCOMES["shell_copy_refused"] = ONE_LINE


# Every documented view, read through the locked connection (request lists and run metrics are
# cached into the cache directory on first use, after the lock).
VIEWS = [
    ("SELECT count(*) FROM steps", "50"),
    ("SELECT count(*) FROM (SELECT unnest(req_ids) FROM steps)", None),
    ("SELECT count(*) FROM expert_tokens", None),
    ("SELECT count(*) FROM requests", "16"),
    ("SELECT count(*) FROM gpu_samples", None),
    ("SELECT count(*) FROM step_metrics", "50"),
    ("SELECT count(*) FROM run_metrics", None),
    ("SELECT count(*) FROM request_metrics", "16"),
    ("CREATE TEMP TABLE mine AS SELECT step FROM steps; SELECT count(*) FROM mine", "50"),
]
OUTCOMES["views_work_read_only"] = RECOVERED


def test_the_views_keep_working_read_only(trace: Path, tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"  # nothing cached yet: every lazy cache is filled after the lock
    for query, expected in VIEWS:
        r = cli("sql", query, trace, "--cache-dir", cache, "--format", "csv")
        assert r.returncode == 0 and "Traceback" not in r.stderr, (query, r.stderr)
        value = r.stdout.splitlines()[-1]
        assert int(value) > 0 and (expected is None or value == expected), (query, r.stdout)


def test_out_file_is_written_read_only(trace: Path, cache: Path, tmp_path: Path) -> None:
    for name in ("steps.parquet", "steps.csv", "steps.json"):
        r = cli("sql", "SELECT step FROM steps", trace, "--cache-dir", cache, "--out", tmp_path / name)
        assert r.returncode == 0 and (tmp_path / name).stat().st_size > 0, r.stderr


OUTCOMES["out_file_read_only"] = RECOVERED


def test_allow_writes_restores_copy_attach_and_settings(trace: Path, cache: Path, tmp_path: Path) -> None:
    query = (
        f"SET threads = 1; COPY (SELECT step FROM steps) TO '{tmp_path}/steps.csv'; "
        f"ATTACH '{tmp_path}/mine.duckdb' AS mine; CREATE TABLE mine.s AS SELECT 1 AS x; "
        "SELECT count(*) AS n FROM read_csv('" + str(tmp_path / "steps.csv") + "')"
    )
    r = cli("sql", query, trace, "--cache-dir", cache, "--allow-writes", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "50" and (tmp_path / "mine.duckdb").exists()


OUTCOMES["allow_writes_restores"] = RECOVERED
