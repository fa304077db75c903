"""A fleet analysed on a local Ray cluster, from an S3 endpoint on loopback, equals the local analysis.

One Ray cluster (`ray.init(num_cpus=2)`) and one moto server for the module. The fleet: shipped
traces (an SGLang serve+drive run, HF runs with and without pipeline-free DeepSeek MLA) and synthetic
runs, uploaded by `moecap-collect upload`'s library and analysed by `moecap-analyze fleet`. The
reference is `moecap-analyze PATHS --out` on the same files, locally.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from moecap.analyze.fleet import open_dataset, run_fleet  # noqa: E402
from moecap.analyze.fleet.discover import discover  # noqa: E402
from moecap.analyze.pipeline import analyze_paths  # noqa: E402
from moecap.collect.upload import BackgroundUploader  # noqa: E402

TRACES = Path(__file__).resolve().parents[3] / "traces"
SHIPPED = (
    "20261204T044925Z-sglang-Qwen1.5-MoE-A2.7B-10a9",
    "h100-DeepSeek-V2-Lite-generate-bs16-syn160x64-n16",
    "h100-OLMoE-1B-7B-0924-cb-bs16-syn160x128-n16",
)
# Per run, what must be identical between the laptop and the cluster (everything but file paths).
SAME = (
    "model",
    "engine",
    "gpu",
    "parallelism",
    "workload",
    "random_weights",
    "window",
    "constants",
    "metrics",
)


def _cli(capsys, *args: str) -> tuple[int, str]:
    from moecap.analyze.cli import main

    saved = sys.argv
    sys.argv = ["moecap-analyze", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = saved
    return code, capsys.readouterr().out


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    """Local trace files of the fleet: 3 shipped runs + 2 synthetic ones."""
    from synthetic_traces import SimConfig, simulate_run

    d = tmp_path_factory.mktemp("fleet-traces")
    for rid in SHIPPED:
        for f in TRACES.glob(f"{rid}.*.arrow"):
            shutil.copy(f, d)
    for i in range(2):
        simulate_run(
            d, SimConfig(run_id=f"20260101T000000Z-synthetic-qwen15moe-{i:04d}", seed=i, concurrency=2 + i)
        )
    return d


@pytest.fixture(scope="module")
def cluster(s3_bucket):
    """A local Ray cluster whose workers see the loopback S3 endpoint."""
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        configure_logging=False,
    )
    yield s3_bucket
    ray.shutdown()


@pytest.fixture(scope="module")
def uploaded(cluster, fleet_dir):
    """The fleet's files in the bucket, as `moecap-collect upload` lays them out."""
    up = BackgroundUploader(f"{cluster}/raw")
    up.scan(fleet_dir, stale_after_s=600)
    stats = up.close(timeout_s=120)
    assert not stats.failed and len(stats.uploaded) == len(list(fleet_dir.glob("*.arrow")))
    return f"{cluster}/raw"


@pytest.fixture(scope="module")
def local_metrics(fleet_dir, tmp_path_factory):
    """metrics.json of `moecap-analyze <the same files> --out`, by run id."""
    out = tmp_path_factory.mktemp("local-out")
    cache = tmp_path_factory.mktemp("local-cache")
    from moecap.analyze.cli import main

    saved = sys.argv
    sys.argv = ["moecap-analyze", str(fleet_dir), "--out", str(out), "--cache-dir", str(cache)]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    finally:
        sys.argv = saved
    doc = json.loads((out / "metrics.json").read_text())
    return {r["run_id"]: r for r in doc["runs"]}


@pytest.fixture(scope="module")
def local_rows(fleet_dir, tmp_path_factory):
    """Rows per run of the local views the dataset copies."""
    a = analyze_paths([str(fleet_dir)], cache_dir=tmp_path_factory.mktemp("rows-cache"))
    out = {}
    for view in ("step_metrics", "requests", "expert_totals"):
        for rid, n in a.db.con.sql(f"SELECT run_id, count(*) FROM {view} GROUP BY run_id").fetchall():
            out.setdefault(rid, {})[view] = n
    a.db.close()
    return out


def _dataset_rows(dataset: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with open_dataset(dataset) as t:
        for view in ("step_metrics", "requests", "expert_totals"):
            for rid, n in t.con.sql(f"SELECT run_id, count(*) FROM {view} GROUP BY run_id").fetchall():
                out.setdefault(rid, {})[view] = n
    return out


def test_fleet_from_the_bucket_equals_the_local_analysis(
    uploaded, cluster, local_metrics, local_rows, capsys
):
    dataset = f"{cluster}/dataset"
    code, out = _cli(capsys, "fleet", uploaded, "--dataset", dataset)
    assert code == 0, out
    assert f"{len(local_metrics)} run(s) analysed, 0 unchanged and skipped, 0 failed" in out
    with open_dataset(dataset) as t:
        stored = {
            rid: json.loads(doc) for rid, doc in t.con.sql("SELECT run_id, metrics_json FROM runs").fetchall()
        }
        assert set(stored) == set(local_metrics)
        for rid, local in local_metrics.items():
            for key in SAME:
                assert _canonical(stored[rid][key]) == _canonical(local[key]), (rid, key)
            # The stored file report names the objects in the bucket.
            assert all(f["path"].startswith(uploaded) for f in stored[rid]["files"])
        # run_metrics over the dataset is the local analysis' metrics.json, row for row.
        s_mbu = dict(t.con.sql("SELECT run_id, s_mbu FROM run_metrics WHERE phase = 'all'").fetchall())
        assert s_mbu == {rid: m["metrics"]["steps"]["all"]["s_mbu"] for rid, m in local_metrics.items()}
        # The dataset's step rows reproduce the run's window aggregate (same rows, nothing twice).
        for rid, local in local_metrics.items():
            steps = t.con.sql(
                f"SELECT count(*) FROM window_steps WHERE run_id = '{rid}' AND pp = 0"
            ).fetchall()
            assert steps[0][0] == local["metrics"]["steps"]["all"]["steps"]
        hourly = t.con.sql("SELECT sum(steps), sum(requests) FROM fleet_hourly").fetchall()[0]
    assert _dataset_rows(dataset) == local_rows
    assert hourly[0] == t_steps(local_rows) - _zero_time_or_draft(local_metrics, dataset)
    assert hourly[1] == sum(r.get("requests", 0) for r in local_rows.values())


def t_steps(rows) -> int:
    return sum(r["step_metrics"] for r in rows.values())


def _zero_time_or_draft(local_metrics, dataset) -> int:
    """Step rows fleet_hourly leaves out by the run-level rule (drafts, zero duration, later pp stages)."""
    with open_dataset(dataset) as t:
        return t.con.sql(
            "SELECT count(*) FROM step_metrics WHERE is_draft OR time_s <= 0 OR pp > 0"
        ).fetchall()[0][0]


def test_sql_and_summary_read_the_bucket(uploaded, cluster, local_metrics, capsys, tmp_path):
    dataset = f"{cluster}/dataset"
    run_fleet([uploaded], dataset)  # committed by the test above, or now
    code, out = _cli(
        capsys, "sql", "SELECT count(DISTINCT run_id) AS n FROM request_metrics", dataset, "-f", "csv"
    )
    assert code == 0 and out.split() == [
        "n",
        str(sum(1 for m in local_metrics.values() if m["metrics"]["requests"])),
    ]
    # `moecap-analyze s3://…` (no Ray): the same numbers as the local path.
    rid = "h100-OLMoE-1B-7B-0924-cb-bs16-syn160x128-n16"
    code, out = _cli(
        capsys, f"{uploaded}/*/*/run={rid}/*.arrow", "--format", "json", "--cache-dir", str(tmp_path)
    )
    assert code == 0
    (run,) = json.loads(out)["runs"]
    assert _canonical(run["metrics"]) == _canonical(local_metrics[rid]["metrics"])


def test_incremental_rerun_skips_what_is_done(uploaded, cluster, fleet_dir, tmp_path):
    dataset = f"{cluster}/incremental"
    first = run_fleet([uploaded], dataset)
    assert first.skipped == [] and len(first.analysed) == len(discover([uploaded]))
    again = run_fleet([uploaded], dataset)
    assert again.analysed == [] and sorted(again.skipped) == sorted(r.run_id for r in first.analysed)
    # A new run in the bucket (another prefix, so the module's other tests keep their fleet): only
    # it is analysed.
    from synthetic_traces import SimConfig, simulate_run

    new = tmp_path / "new"
    simulate_run(new, SimConfig(run_id="20260101T000000Z-synthetic-qwen15moe-0099", seed=99))
    up = BackgroundUploader(f"{cluster}/raw-later")
    up.scan(new, stale_after_s=600)
    up.close(timeout_s=60)
    third = run_fleet([uploaded, f"{cluster}/raw-later"], dataset)
    assert [r.run_id for r in third.analysed] == ["20260101T000000Z-synthetic-qwen15moe-0099"]
    assert len(third.skipped) == len(first.analysed)


def test_a_killed_worker_is_retried_and_nothing_is_counted_twice(uploaded, cluster, local_rows, tmp_path):
    """Two tasks' first attempts write every data file of their run, then their worker process dies
    before the manifest; Ray retries each on a new worker, which rewrites the same files."""
    markers = str(tmp_path / "markers")
    os.makedirs(markers)
    victims = {SHIPPED[0], "20260101T000000Z-synthetic-qwen15moe-0001"}

    def dies_once(group, dataset, options=None, cost_settings=None):
        import os as _os

        from moecap.analyze.fleet import task as fleet_task

        marker = _os.path.join(markers, fleet_task.partition_value(group.run_id))
        if group.run_id in victims and not _os.path.exists(marker):
            open(marker, "w").close()
            fleet_task._commit = lambda *a, **k: _os._exit(1)
        return fleet_task.analyze_group(group, dataset, options, cost_settings)

    dataset = f"{cluster}/killed"
    report = run_fleet([uploaded], dataset, task=dies_once, max_retries=1)
    assert not report.failed, report.errors
    assert sorted(os.listdir(markers)) == sorted(victims)  # both died once
    assert len(report.analysed) == len(local_rows)
    assert _dataset_rows(dataset) == local_rows


def test_a_task_that_keeps_dying_fails_alone_and_leaves_nothing_counted(uploaded, cluster, local_rows):
    victim = "h100-DeepSeek-V2-Lite-generate-bs16-syn160x64-n16"

    def dies_for_one_run(group, dataset, options=None, cost_settings=None):
        import os as _os

        from moecap.analyze.fleet import task as fleet_task

        if group.run_id == victim:
            fleet_task._commit = lambda *a, **k: _os._exit(1)
        return fleet_task.analyze_group(group, dataset, options, cost_settings)

    dataset = f"{cluster}/dying"
    report = run_fleet([uploaded], dataset, task=dies_for_one_run, max_retries=1)
    assert [r.run_id for r in report.failed] == [victim]
    assert report.errors[0].startswith(f"run {victim}: task failed")
    # Its data files were written (twice) but never committed: the dataset does not count them.
    expected = {rid: rows for rid, rows in local_rows.items() if rid != victim}
    assert _dataset_rows(dataset) == expected


def test_a_corrupt_file_is_reported_not_fatal(uploaded, cluster, local_metrics, capsys, tmp_path):
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(f"{cluster}/corrupt")
    # A run whose only file is garbage, and a good run whose experts file is garbage.
    garbage = b"\x00not an arrow stream" * 64
    with fs.open_output_stream(f"{base}/x/20260102T000000Z-bad-0000.dp0-pp0-tp0.steps.arrow") as f:
        f.write(garbage)
    good = "h100-OLMoE-1B-7B-0924-cb-bs16-syn160x128-n16"
    for src in TRACES.glob(f"{good}.*.arrow"):
        data = garbage if src.name.endswith(".experts.arrow") else src.read_bytes()
        with fs.open_output_stream(f"{base}/x/{src.name}") as f:
            f.write(data)
    code, out = _cli(
        capsys, "fleet", f"{cluster}/corrupt/x", "--dataset", f"{cluster}/corrupt-ds", "--show", "0"
    )
    assert code == 1
    assert "1 run(s) analysed, 0 unchanged and skipped, 1 failed" in out
    skipped = [line for line in out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2
    assert any(f"{cluster}/corrupt/x/20260102T000000Z-bad-0000.dp0-pp0-tp0.steps.arrow" in s for s in skipped)
    assert any(f"{good}.dp0-pp0-tp0.experts.arrow" in s for s in skipped)
    with open_dataset(f"{cluster}/corrupt-ds") as t:
        (doc,) = [json.loads(d) for (d,) in t.con.sql("SELECT metrics_json FROM runs").fetchall()]
    assert doc["run_id"] == good
    assert doc["metrics"]["steps"]["all"]["steps"] == local_metrics[good]["metrics"]["steps"]["all"]["steps"]
    assert any("no expert counts" in w for w in doc["warnings"])
