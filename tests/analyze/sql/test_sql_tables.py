"""The Python API: connect(paths) is a DuckDB connection with the views; tables(paths) adds LazyFrames."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from sql_helpers import RawRun

import moecap.analyze
from moecap.analyze.analysis import Options
from moecap.analyze.sql import VIEWS, Tables, tables

DOCUMENTED = set(VIEWS)


def test_connect_returns_a_duckdb_connection_with_every_view(
    sql_trace_dir: Path, sql_cache: Path, raw: dict[str, RawRun]
) -> None:
    con = moecap.analyze.connect([str(sql_trace_dir)], cache_dir=sql_cache)
    assert isinstance(con, duckdb.DuckDBPyConnection)
    names = {
        r[0]
        for r in con.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()"
        ).fetchall()
    }
    assert names == DOCUMENTED
    assert con.sql("SELECT count(*) FROM steps").fetchall()[0][0] == sum(r.steps.height for r in raw.values())
    con.close()


def test_tables_lists_the_documented_views(t: Tables) -> None:
    assert set(t.views) == DOCUMENTED
    assert len(t.runs) == 3 and not t.errors


@pytest.mark.parametrize("view", sorted(DOCUMENTED))
def test_lazy_frame_equals_the_sql_result(t: Tables, view: str) -> None:
    lazy = t.lazy(view).collect()
    eager = t.pl(f"SELECT * FROM {view}")
    assert lazy.columns == eager.columns
    assert lazy.height == eager.height
    if view not in ("runs",):  # metadata_json holds a creation-time field per file
        key = [
            c
            for c in ("run_id", "phase", "dp", "step", "req_id", "engine_req_id", "layer", "expert")
            if c in lazy.columns
        ]
        # Sums of doubles are not bit-stable across DuckDB's parallel aggregation (run_metrics
        # differs by ~1e-16 relative between two runs of the same SQL): equal to 1e-12.
        assert_frame_equal(lazy.sort(key), eager.sort(key), check_exact=False, rel_tol=1e-12, abs_tol=0)


def test_lazy_frames_push_filters_and_columns_into_duckdb(t: Tables) -> None:
    got = t.lazy("step_metrics").filter(pl.col("phase") == "decode").select("run_id", "time_s").collect()
    expected = t.pl("SELECT run_id, time_s FROM step_metrics WHERE phase = 'decode'")
    assert got.columns == ["run_id", "time_s"]
    assert sorted(got.rows()) == sorted(expected.rows())
    assert t.lazy("steps").head(3).collect().height == 3


def test_lazy_frames_join_each_other_and_themselves(t: Tables) -> None:
    steps = t.lazy("steps")
    metrics = t.lazy("step_metrics")
    joined = steps.join(
        metrics.select("run_id", "dp", "step", "s_mbu"), on=["run_id", "dp", "step"]
    ).collect()
    assert joined.height == t.sql("SELECT count(*) FROM steps").fetchall()[0][0]
    self_join = steps.join(
        steps.select("run_id", "step", later=pl.col("t_start_ns")), on=["run_id", "step"]
    ).collect()
    assert self_join.height == joined.height
    # the connection is free again afterwards
    assert t.sql("SELECT 1").fetchall() == [(1,)]


def test_lazy_accepts_a_query(t: Tables) -> None:
    got = t.lazy("SELECT run_id, count(*) AS n FROM steps GROUP BY run_id").sort("run_id").collect()
    assert got["n"].sum() == t.sql("SELECT count(*) FROM steps").fetchall()[0][0]


def test_options_or_keywords_not_both(sql_trace_dir: Path, sql_cache: Path) -> None:
    with pytest.raises(TypeError):
        tables([str(sql_trace_dir)], Options(gpu="H200"), cache_dir=sql_cache, window="all")


def test_window_all_and_memory_limit(sql_trace_dir: Path, sql_cache: Path) -> None:
    with moecap.analyze.tables(
        [str(sql_trace_dir)], cache_dir=sql_cache, window="all", memory_limit="256MB"
    ) as t:
        assert (
            t.sql("SELECT count(*) FROM window_steps").fetchall()
            == t.sql("SELECT count(*) FROM step_metrics").fetchall()
        )
        limit = t.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
        assert limit.replace(" ", "") in ("256.0MiB", "244.1MiB", "256MB", "244.1MB")
        spill = t.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]
        assert spill == str(sql_cache / "spill")


def test_run_level_metrics_are_computed_on_first_use(sql_trace_dir: Path, sql_cache: Path, t: Tables) -> None:
    with tables([str(sql_trace_dir)], cache_dir=sql_cache, metrics=False) as lazy:
        assert not lazy.has_run_metrics
        assert (
            lazy.sql("SELECT count(*) FROM step_metrics").fetchall()
            == t.sql("SELECT count(*) FROM step_metrics").fetchall()
        )
        assert (
            lazy.sql("SELECT count(*) FROM request_steps").fetchall()
            == t.sql("SELECT count(*) FROM request_steps").fetchall()
        )
        assert not lazy.has_run_metrics
        assert "run_metrics" in lazy.views and "window_steps" in lazy.views
        first_con = lazy.con
        got = lazy.pl("SELECT run_id, phase, s_mbu FROM RUN_METRICS ORDER BY run_id, phase")
        assert lazy.has_run_metrics and lazy.con is not first_con
        assert got.equals(t.pl("SELECT run_id, phase, s_mbu FROM run_metrics ORDER BY run_id, phase"))
        assert lazy.document["runs"][0]["run_id"] == t.document["runs"][0]["run_id"]
        assert (
            lazy.sql("SELECT count(*) FROM window_steps").fetchall()
            == t.sql("SELECT count(*) FROM window_steps").fetchall()
        )


def test_lazy_frame_of_a_run_level_view_computes_it(sql_trace_dir: Path, sql_cache: Path) -> None:
    with tables([str(sql_trace_dir)], cache_dir=sql_cache, metrics=False) as lazy:
        assert lazy.lazy("window_steps").select(pl.len()).collect().item() > 0
        assert lazy.has_run_metrics
