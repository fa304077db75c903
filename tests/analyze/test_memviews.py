"""memviews.in_memory: the views read the same rows from memory inside the block, their files again
after it; a view too large or absent is left alone; a shadowed `experts` has no counts to read."""

from __future__ import annotations

import duckdb
import pytest

from moecap.analyze import memviews
from moecap.analyze.memviews import in_memory


def _con(tmp_path):  # type: ignore[no-untyped-def]
    con = duckdb.connect()
    path = tmp_path / "steps.parquet"
    con.execute(f"COPY (SELECT 'r' AS run_id, range AS step FROM range(5)) TO '{path}' (FORMAT parquet)")
    con.execute(f"CREATE VIEW step_metrics AS SELECT * FROM read_parquet('{path}')")
    con.execute("CREATE VIEW experts AS SELECT 'r' AS run_id, 1 AS step, [1, 2] AS counts")
    return con, path


def test_views_read_memory_inside_and_their_files_after(tmp_path):
    con, path = _con(tmp_path)
    with in_memory(con, extra_cursors=1) as cons:
        assert len(cons) == 2
        path.unlink()  # the file is gone: only a copy in memory can answer now
        for c in cons:
            assert c.execute("SELECT count(*), sum(step) FROM step_metrics").fetchall() == [(5, 10)]
        assert con.execute("SELECT step FROM experts").fetchall() == [(1,)]
        with pytest.raises(duckdb.Error):
            con.execute("SELECT counts FROM experts").fetchall()
    with pytest.raises(duckdb.Error):  # the view is back, reading its (now missing) file
        con.execute("SELECT count(*) FROM step_metrics").fetchall()
    assert con.execute("SELECT counts FROM experts").fetchall() == [([1, 2],)]
    assert con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '_moecap_mem_%'"
    ).fetchall() == [(0,)]


def test_a_view_above_max_rows_or_absent_is_left_alone(tmp_path, monkeypatch):
    con, path = _con(tmp_path)
    monkeypatch.setattr(memviews, "MAX_ROWS", 4)
    with in_memory(con):
        path.unlink()
        with pytest.raises(duckdb.Error):  # 5 rows > 4: still the view over the file
            con.execute("SELECT count(*) FROM step_metrics").fetchall()
        # `requests` and `expert_totals` do not exist here: nothing was made of them.
        assert con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'requests'").fetchall() == [
            (0,)
        ]


def test_the_metrics_are_the_same_to_the_last_bit_with_the_views_in_memory(tmp_path, monkeypatch):
    # Two synthetic runs analysed with the pipeline's in-memory views and without them (a no-op in
    # their place): metrics.json's runs must be equal, float for float.
    import contextlib
    import json

    from synthetic_traces import SimConfig, simulate_run

    import moecap.analyze.pipeline as P

    for i, c in enumerate((2, 5)):
        simulate_run(tmp_path / "t", SimConfig(concurrency=c, num_requests=10, run_id=f"r{i}", seed=c))

    def runs() -> str:
        doc = P.analyze_paths([tmp_path / "t"], cache_dir=tmp_path / "c").document
        return json.dumps(doc["runs"], sort_keys=True, default=str)

    with_memory = runs()

    @contextlib.contextmanager
    def files_only(con, extra_cursors=0, views=None):  # type: ignore[no-untyped-def]
        yield [con]

    monkeypatch.setattr(P, "in_memory", files_only)
    assert runs() == with_memory
