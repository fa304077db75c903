"""Object-store paths: listing prefixes and globs, staging copies once per object version, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from moecap.analyze import storage
from moecap.analyze.errors import InputError

TRACES = Path(__file__).resolve().parents[2] / "traces"
RUN = "h100-OLMoE-1B-7B-0924-cb-bs1-syn160x128-n1"


@pytest.fixture
def bucket_run(s3_bucket):
    """One shipped run's four files under s3://fleet/storage/a/b/."""
    fs, base = pafs.FileSystem.from_uri(f"{s3_bucket}/storage/a/b")
    for f in sorted(TRACES.glob(f"{RUN}.*.arrow")):
        with fs.open_output_stream(f"{base}/{f.name}") as out:
            out.write(f.read_bytes())
    with fs.open_output_stream(f"{base}/notes.txt") as out:
        out.write(b"not a trace")
    return f"{s3_bucket}/storage"


def test_is_uri():
    assert storage.is_uri("s3://b/p") and storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("traces/*.arrow")


def test_a_prefix_lists_its_trace_objects_recursively(bucket_run):
    objects = storage.list_objects(bucket_run)
    assert [o.name for o in objects] == sorted(f.name for f in TRACES.glob(f"{RUN}.*.arrow"))
    assert all(o.uri.startswith(f"{bucket_run}/a/b/") for o in objects)
    assert [o.size for o in objects] == [(TRACES / o.name).stat().st_size for o in objects]


def test_a_glob_matches_inside_the_prefix(bucket_run):
    objects = storage.list_objects(f"{bucket_run}/*/b/*.steps.arrow")
    assert [o.name for o in objects] == [f"{RUN}.dp0-pp0-tp0.steps.arrow"]


def test_nothing_there_is_one_clear_line(s3_bucket):
    with pytest.raises(InputError, match=rf"^{s3_bucket}/no/such: no such object, prefix or glob match"):
        storage.list_objects(f"{s3_bucket}/no/such")
    with pytest.raises(InputError, match=r"^nosuch://x: no filesystem for this URI"):
        storage.resolve("nosuch://x")


def test_staging_copies_each_object_version_once(bucket_run, tmp_path, monkeypatch):
    (obj,) = storage.list_objects(f"{bucket_run}/a/b/{RUN}.dp0-pp0-tp0.steps.arrow")
    local = storage.stage(obj, tmp_path)
    assert local.read_bytes() == (TRACES / obj.name).read_bytes()
    assert local.stat().st_mtime_ns == obj.mtime_ns  # so the Parquet cache key of the copy is stable
    # A second stage of the same version reads nothing from the store.
    monkeypatch.setattr(storage, "resolve", lambda uri: (_ for _ in ()).throw(AssertionError(uri)))
    assert storage.stage(obj, tmp_path) == local
    monkeypatch.undo()
    # A changed object (other size or mtime) is another version: another key.
    changed = storage.ObjectInfo(obj.uri, obj.size, obj.mtime_ns + 1)
    assert changed.key != obj.key


def test_localize_leaves_local_paths_alone(bucket_run, tmp_path):
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    shutil.copy(TRACES / f"{RUN}.client.requests.arrow", local_dir)
    paths = storage.localize([str(local_dir), f"{bucket_run}/a"], tmp_path / "objects")
    assert paths[0] == str(local_dir)
    assert sorted(Path(p).name for p in paths[1:]) == sorted(f.name for f in TRACES.glob(f"{RUN}.*.arrow"))
    assert all(Path(p).is_file() for p in paths[1:])


def test_load_traces_reads_a_bucket_like_a_directory(bucket_run, tmp_path):
    from moecap.analyze.load import load_traces

    remote = load_traces([bucket_run], cache_dir=tmp_path / "remote")
    local = load_traces([str(p) for p in TRACES.glob(f"{RUN}.*.arrow")], cache_dir=tmp_path / "local")
    for view in ("steps", "experts", "requests", "expert_totals"):
        q = f"SELECT * FROM {view} ORDER BY ALL"
        assert remote.con.sql(q).fetchall() == local.con.sql(q).fetchall(), view
    assert remote.errors == local.errors == []
