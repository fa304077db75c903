"""Fixtures for the SQL tests: three synthetic runs (batch sizes 2, 4, 8) loaded once per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sql_helpers import RawRun, read_raw, write_runs

from moecap.analyze.sql import Tables, tables


@pytest.fixture(scope="session")
def sql_trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sql-traces")
    write_runs(out)
    return out


@pytest.fixture(scope="session")
def sql_trace_files(sql_trace_dir: Path) -> list[Path]:
    return sorted(sql_trace_dir.glob("*.arrow"))


@pytest.fixture(scope="session")
def sql_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sql-cache")


@pytest.fixture(scope="session")
def raw(sql_trace_files: list[Path]) -> dict[str, RawRun]:
    return read_raw(sql_trace_files)


@pytest.fixture(scope="session")
def t(sql_trace_files: list[Path], sql_cache: Path) -> Iterator[Tables]:
    with tables([str(p) for p in sql_trace_files], cache_dir=sql_cache) as loaded:
        yield loaded
