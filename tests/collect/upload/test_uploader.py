"""moecap-collect upload: closed files go up under date/host/run, stale unclosed ones flagged recovered,
files still being written wait; to a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from moecap.collect.upload import BackgroundUploader, is_closed, object_key, plan
from moecap.schemas import read_trace_header

TRACES = Path(__file__).resolve().parents[3] / "traces"
RUN = "h100-OLMoE-1B-7B-0924-cb-bs1-syn160x128-n1"


@pytest.fixture
def trace_dir(tmp_path):
    """A closed steps file, an unclosed (truncated) experts file written just now, and one unclosed
    requests file last touched an hour ago (its writer died)."""
    d = tmp_path / "traces"
    d.mkdir()
    shutil.copy(TRACES / f"{RUN}.dp0-pp0-tp0.steps.arrow", d)
    raw = (TRACES / f"{RUN}.dp0-pp0-tp0.experts.arrow").read_bytes()
    (d / f"{RUN}.dp0-pp0-tp0.experts.arrow").write_bytes(raw[:-100])
    raw = (TRACES / f"{RUN}.client.requests.arrow").read_bytes()
    stale = d / f"{RUN}.client.requests.arrow"
    stale.write_bytes(raw[:-8])  # everything but the end-of-stream marker
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    return d


def test_closed_means_the_end_of_stream_marker(trace_dir):
    assert is_closed(trace_dir / f"{RUN}.dp0-pp0-tp0.steps.arrow")
    assert not is_closed(trace_dir / f"{RUN}.dp0-pp0-tp0.experts.arrow")
    assert not is_closed(trace_dir / f"{RUN}.client.requests.arrow")


def test_key_comes_from_the_files_metadata(trace_dir):
    path = trace_dir / f"{RUN}.dp0-pp0-tp0.steps.arrow"
    run = read_trace_header(path).run
    assert object_key(path) == (
        f"date={run.created_at[:10]}/host={run.host}/run={RUN}/{RUN}.dp0-pp0-tp0.steps.arrow"
    )
    assert object_key(path, recovered=True).endswith(f"run={RUN}/recovered/{path.name}")


def test_plan_waits_for_files_still_being_written(trace_dir):
    planned = {p.path.name: p for p in plan(trace_dir, stale_after_s=600)}
    assert set(planned) == {f"{RUN}.dp0-pp0-tp0.steps.arrow", f"{RUN}.client.requests.arrow"}
    assert not planned[f"{RUN}.dp0-pp0-tp0.steps.arrow"].recovered
    assert planned[f"{RUN}.client.requests.arrow"].recovered
    assert "/recovered/" in planned[f"{RUN}.client.requests.arrow"].key


def _keys(bucket: str, prefix: str) -> dict[str, int]:
    s3 = boto3.client("s3")
    listing = s3.list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def test_upload_to_s3_then_nothing_twice(trace_dir, s3_bucket):
    up = BackgroundUploader(f"{s3_bucket}/raw")
    up.scan(trace_dir, stale_after_s=600)
    stats = up.close(timeout_s=60)
    assert len(stats.uploaded) == 2 and not stats.failed
    keys = _keys(s3_bucket, "raw/")
    steps = trace_dir / f"{RUN}.dp0-pp0-tp0.steps.arrow"
    assert keys == {
        f"raw/{object_key(steps)}": steps.stat().st_size,
        f"raw/{object_key(trace_dir / f'{RUN}.client.requests.arrow', recovered=True)}": (
            trace_dir / f"{RUN}.client.requests.arrow"
        )
        .stat()
        .st_size,
    }
    again = BackgroundUploader(f"{s3_bucket}/raw")
    again.scan(trace_dir, stale_after_s=600)
    stats = again.close(timeout_s=60)
    assert stats.uploaded == [] and len(stats.unchanged) == 2


def test_submit_never_waits_for_the_network(trace_dir, tmp_path):
    """The engine-side call only queues: with an unreachable endpoint it still returns at once, and
    the failure is recorded (the file stays on disk for a later scan)."""
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x"}
    code = f"""
import time, sys
from moecap.collect.upload import BackgroundUploader, plan
up = BackgroundUploader("s3://nowhere/raw", retries=0)
items = plan({str(trace_dir)!r}, stale_after_s=600)
t = time.perf_counter()
for p in items:
    up.submit(p)
print(time.perf_counter() - t)
stats = up.close(timeout_s=120)
print(len(stats.failed))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    submit_s, failed = out.stdout.split()
    assert float(submit_s) < 0.05
    assert int(failed) == 2


def test_cli_uploads_to_a_directory(trace_dir, tmp_path):
    dest = tmp_path / "bucket"
    code = "from moecap.collect.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, "upload", str(trace_dir), str(dest), "--stale-after", "600"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "2 uploaded, 0 already there, 0 failed" in out.stdout
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.arrow"))
    assert len(files) == 2 and any("/recovered/" in f for f in files)
