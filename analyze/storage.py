"""Object-store paths: `s3://bucket/prefix` (and any URI pyarrow's or fsspec's filesystems resolve)
wherever a local path works.

The loader memory-maps trace files and keeps a Parquet cache beside them, so a remote trace is first
*staged*: copied, streaming, into `<cache>/objects/<key>/<file name>`, where the key hashes the object's
URI, size and modification time. A second analysis of the same objects reuses the staged copies (and,
because the copy keeps the object's mtime, the Parquet cache entries built from them); a changed
object gets a new key. Local paths pass through untouched.

Resolution: `pyarrow.fs.FileSystem.from_uri` (S3, GCS, HDFS, local; credentials and endpoint from the
usual environment, e.g. AWS_ENDPOINT_URL, or URI options such as `?endpoint_override=…`), else fsspec
(whatever fsspec implementations are installed, e.g. gcsfs, adlfs, memory://).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .errors import InputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS = "*?["
_COPY_CHUNK = 8 << 20
"""Bytes per read while staging (memory per copy stays at one chunk)."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a filesystem by URI scheme (`s3://…`, `gs://…`, `file://…`)."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI; InputError naming the URI when nothing resolves it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        pyarrow_error = exc
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(uri)
        return PyFileSystem(FSSpecHandler(fs)), path
    except (ImportError, ValueError, OSError) as exc:
        raise InputError(
            f"{uri}: no filesystem for this URI ({_first_line(pyarrow_error)}; fsspec: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class ObjectInfo:
    """One object (file) in a filesystem: its URI, size in bytes and modification time in ns."""

    uri: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def key(self) -> str:
        """Identity of this version of the object: URI + size + mtime, hashed (20 hex digits)."""
        raw = f"{self.uri}|{self.size}|{self.mtime_ns}"
        return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _uri_prefix(uri: str, path: str) -> str:
    """The part of `uri` before the filesystem path (e.g. `s3://`), so listed paths become URIs again."""
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return ""
    return scheme.group(0) if scheme.group(1) != "file" else "file://"


def _info(uri_prefix: str, info: pafs.FileInfo) -> ObjectInfo:
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return ObjectInfo(uri=f"{uri_prefix}{info.path}", size=int(info.size or 0), mtime_ns=int(mtime))


def list_objects(uri: str, suffix: str = ".arrow") -> list[ObjectInfo]:
    """Objects named by `uri`: the object itself, every `*suffix` object under it (a prefix /
    directory, recursively), or the matches of a glob in its last parts. Sorted by URI.
    InputError (one line) when nothing matches or the store cannot be listed."""
    fs, path = resolve(uri)
    prefix = _uri_prefix(uri, path)
    try:
        if any(c in path for c in _GLOB_CHARS):
            parts = path.split("/")
            fixed = "/".join(p for p in _until_glob(parts))
            selector = pafs.FileSelector(fixed, recursive=True, allow_not_found=True)
            found = [
                i
                for i in fs.get_file_info(selector)
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
            ]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [info]
            elif info.type == pafs.FileType.Directory:
                selector = pafs.FileSelector(path, recursive=True)
                found = [
                    i
                    for i in fs.get_file_info(selector)
                    if i.type == pafs.FileType.File and i.path.endswith(suffix)
                ]
            else:
                found = []
    except OSError as exc:
        raise InputError(f"{uri}: cannot list ({_first_line(exc)})") from None
    if not found:
        raise InputError(f"{uri}: no such object, prefix or glob match (expected {suffix} trace files)")
    return sorted((_info(prefix, i) for i in found), key=lambda o: o.uri)


def _until_glob(parts: list[str]) -> Iterable[str]:
    for p in parts:
        if any(c in p for c in _GLOB_CHARS):
            return
        yield p


def stage(obj: ObjectInfo, objects_dir: str | os.PathLike[str]) -> Path:
    """A local copy of `obj` under `objects_dir/<obj.key>/<name>` (copied once, streaming; the copy
    carries the object's mtime). A partial copy is never left under the final name."""
    target = Path(objects_dir) / obj.key / obj.name
    if target.exists() and target.stat().st_size == obj.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(obj.uri)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{obj.uri}: cannot read ({_first_line(exc)})") from None
    if obj.mtime_ns:
        os.utime(tmp, ns=(obj.mtime_ns, obj.mtime_ns))
    os.replace(tmp, target)
    return target


def localize(paths: Iterable[str | os.PathLike[str]], objects_dir: str | os.PathLike[str]) -> list[str]:
    """`paths` with every URI replaced by local staged copies of the trace objects it names (local
    paths, directories and globs are returned as given, for the loader to expand)."""
    out: list[str] = []
    for p in paths:
        if is_uri(p) and not str(p).startswith("file://"):
            out.extend(str(stage(o, objects_dir)) for o in list_objects(str(p)))
        elif is_uri(p):
            out.append(str(p)[len("file://") :])
        else:
            out.append(str(p))
    return out


def join(base: str, *parts: str) -> str:
    """`base` (a URI or a local path) joined with `parts` by '/'."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
