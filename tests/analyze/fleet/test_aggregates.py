"""fleet_hourly: a group holding one run within one hour reproduces that run's own metrics.json numbers
(window `all`), so the fleet aggregates are the run-level definitions over a larger group; over several
runs they are sums of the runs' parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecap.analyze.analysis import Options
from moecap.analyze.fleet import open_dataset
from moecap.analyze.fleet.discover import discover
from moecap.analyze.fleet.task import analyze_group

TRACES = Path(__file__).resolve().parents[3] / "traces"
RUNS = ("h100-OLMoE-1B-7B-0924-cb-bs16-syn160x128-n16", "h100-OLMoE-1B-7B-0924-cb-bs64-syn160x128-n64")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    for rid in RUNS:
        (group,) = discover([str(TRACES / f"{rid}.*")])
        assert analyze_group(group, str(out), Options(window="all")).ok
    return str(out)


def test_one_run_in_one_hour_gives_its_own_numbers(dataset):
    import json

    with open_dataset(dataset) as t:
        docs = {r: json.loads(d) for r, d in t.con.sql("SELECT run_id, metrics_json FROM runs").fetchall()}
        for rid, doc in docs.items():
            hours = t.con.sql(
                f"SELECT DISTINCT hour FROM _fleet_step_metrics WHERE run_id = '{rid}'"
            ).fetchall()
            assert len(hours) == 1  # each shipped run lasted minutes, inside one hour
            t.con.execute(
                f"CREATE OR REPLACE VIEW step_metrics AS SELECT * FROM _fleet_step_metrics WHERE run_id = '{rid}'"
            )
            t.con.execute(
                f"CREATE OR REPLACE VIEW requests AS SELECT * FROM _fleet_requests WHERE run_id = '{rid}'"
            )
            (row,) = t.con.sql("SELECT * FROM fleet_hourly").pl().to_dicts()
            steps = doc["metrics"]["steps"]["all"]
            assert row["runs"] == 1
            assert row["steps"] == steps["steps"]
            assert row["tokens"] == steps["tokens"]
            assert row["output_tokens"] == steps["output_tokens"]
            assert row["gpu_seconds"] == pytest.approx(steps["gpu_seconds"], rel=1e-12)
            assert row["s_mbu"] == pytest.approx(steps["s_mbu"], rel=1e-12)
            assert row["s_mfu"] == pytest.approx(steps["s_mfu"], rel=1e-12)
            tpot = doc["metrics"]["requests"]["tpot_s"]
            assert [row["tpot_s_p50"], row["tpot_s_p90"], row["tpot_s_p99"]] == pytest.approx(
                [tpot["p50"], tpot["p90"], tpot["p99"]], rel=1e-12
            )
            cost = doc["metrics"]["cost"]
            assert cost["headline_scope"] == "window"
            assert row["usd_per_1m_output_tokens"] == pytest.approx(
                cost["usd_per_1m_output_tokens"], rel=1e-9
            )


def test_two_runs_in_one_hour_add_up(dataset):
    with open_dataset(dataset) as t:
        rows = t.con.sql("SELECT * FROM fleet_hourly").pl().to_dicts()
        per_run = t.con.sql(
            "SELECT run_id, sum(bytes_total) b, sum(gpu_bandwidth * time_s * gpus) d, count(*) n "
            "FROM step_metrics WHERE NOT is_draft AND time_s > 0 GROUP BY run_id"
        ).fetchall()
    assert len(rows) == 1 and rows[0]["runs"] == 2  # same model, GPU, engine and hour
    assert rows[0]["steps"] == sum(n for _, _, _, n in per_run)
    # Ratio of the sums, not the mean of the two runs' ratios.
    assert rows[0]["s_mbu"] == pytest.approx(
        sum(b for _, b, _, _ in per_run) / sum(d for _, _, d, _ in per_run)
    )


def test_a_copied_dataset_reads_the_same(dataset, tmp_path):
    """Manifests name their files relative to the dataset, so a copy (another bucket, a laptop) reads."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    query = "SELECT run_id, count(*) FROM step_metrics GROUP BY ALL ORDER BY ALL"
    with open_dataset(dataset) as a, open_dataset(str(copy)) as b:
        assert a.con.sql(query).fetchall() == b.con.sql(query).fetchall() != []


def _rows(con, query: str) -> list[dict]:
    return con.sql(query).pl().to_dicts()


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float) and value == value:
                assert g[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert g[key] == value or (g[key] != g[key] and value != value), key


def test_run_level_views_over_the_dataset_are_the_local_ones(dataset, tmp_path):
    """run_metrics, request_metrics and window_steps over the dataset give the local analysis' rows
    (`moecap.analyze.tables` on the same files, same window), under the same column names."""
    from moecap.analyze.sql.tables import tables
    from moecap.analyze.sql.views import REQUEST_METRICS_COLUMNS

    files = [str(p) for rid in RUNS for p in sorted(TRACES.glob(f"{rid}.*"))]
    local = tables(files, window="all", cache_dir=tmp_path)
    try:
        run_metrics = "SELECT * FROM run_metrics ORDER BY run_id, phase"
        requests = f"SELECT {', '.join(REQUEST_METRICS_COLUMNS)} FROM request_metrics ORDER BY run_id, req_id"
        window = "SELECT run_id, phase, count(*) n, sum(time_s) t FROM window_steps GROUP BY ALL ORDER BY ALL"
        with open_dataset(dataset) as t:
            assert t.con.sql(run_metrics).columns == local.con.sql(run_metrics).columns
            assert "window_output_throughput" in t.con.sql(run_metrics).columns
            _same(_rows(t.con, run_metrics), _rows(local.con, run_metrics))
            _same(_rows(t.con, requests), _rows(local.con, requests))
            _same(_rows(t.con, window), _rows(local.con, window))
    finally:
        local.close()
