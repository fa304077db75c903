"""Fixtures for the report tests: four synthetic runs written once per session, in a folder whose
name holds HTML, one run with a `<script>` model id, one without expert counts; the report and
the leaderboard are built once through the real CLI (a subprocess, like a user)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EVIL_MODEL = 'evil/<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
EVIL_DATASET = "<b>gsm8k</b>&amp;"
# A trace folder name with markup in it: paths are user strings too.
TRACE_DIR_NAME = 'traces-<i>x&"q'
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"

RUNS = (
    # (run_id, concurrency, evil, write_experts)
    ("20260101T000000Z-synthetic-qwen15moe-c2", 2, True, True),
    ("20260101T000001Z-synthetic-qwen15moe-c4", 4, False, True),
    ("20260101T000002Z-synthetic-qwen1.5moe-c8", 8, False, True),  # a dot, as real run ids have
    ("20260101T000003Z-synthetic-qwen15moe-nocounts", 3, False, False),
)


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    code = "from moecap.analyze.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import synthetic_traces
    from synthetic_traces import SimConfig, simulate_run

    out = tmp_path_factory.mktemp("report") / TRACE_DIR_NAME
    original = synthetic_traces.run_metadata
    for run_id, concurrency, evil, experts in RUNS:
        with pytest.MonkeyPatch.context() as mp:
            if evil:

                def evil_metadata(sim, cfg):  # type: ignore[no-untyped-def]
                    md = original(sim, cfg)
                    return dataclasses.replace(
                        md,
                        model=dataclasses.replace(md.model, id=EVIL_MODEL),
                        workload={**md.workload, "dataset": EVIL_DATASET},
                    )

                mp.setattr(synthetic_traces, "run_metadata", evil_metadata)
            simulate_run(
                out,
                SimConfig(
                    concurrency=concurrency,
                    num_requests=12,
                    run_id=run_id,
                    seed=concurrency,
                    write_experts=experts,
                ),
            )
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report-cache")


@pytest.fixture(scope="session")
def analysis(trace_dir: Path, cache_dir: Path):  # type: ignore[no-untyped-def]
    from moecap.analyze.analysis import Options
    from moecap.analyze.pipeline import analyze_paths

    return analyze_paths([trace_dir], Options(), cache_dir=cache_dir)


@pytest.fixture(scope="session")
def report_run(trace_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`moecap-analyze report <trace files> --out DIR`, run once; (process, out dir)."""
    out = tmp_path_factory.mktemp("report-out") / "out"
    files = sorted(trace_dir.glob("*.arrow"))
    proc = _cli("report", *files, "--out", out, "--cache-dir", cache_dir)
    return proc, out


@pytest.fixture(scope="session")
def leaderboard_run(trace_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`moecap-analyze leaderboard DIR --format csv --out DIR`, run once; (process, out dir)."""
    out = tmp_path_factory.mktemp("leaderboard-out") / "board"
    proc = _cli("leaderboard", trace_dir, "--format", "csv", "--out", out, "--cache-dir", cache_dir)
    return proc, out


@pytest.fixture(scope="session")
def cli():  # type: ignore[no-untyped-def]
    return _cli
