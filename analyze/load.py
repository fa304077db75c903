"""Loading: trace files -> validated, cached Parquet -> DuckDB views (a documented public interface).

DuckDB cannot re-scan an Arrow IPC stream, so every trace file is converted once to Parquet in a
cache keyed by (absolute path, size, mtime, schema version, cache layout version), streaming batch by
batch (memory stays bounded for traces larger than memory). Expert counts are summarised on flat
numpy buffers during that pass: per step (activated experts, routed tokens, imbalance) and per
(phase, layer, expert) totals, so reports never unnest millions of count vectors. Steps files are
cached the same way: the scalar columns plus the per-step sums over each step's request lists that
the step costs need (`metrics.step_costs.request_sums`); the request lists themselves (the largest
part of a steps file) are cached on first use of the `steps` view's list columns (`TraceDB.con`),
as the raw expert counts are on first use of `experts` / `expert_tokens`.

Views (columns documented in docs/sql.md):
  runs, steps, experts, expert_tokens (long form, lazy), expert_step_stats, expert_totals,
  requests, outputs, gpu_samples.
Rank rules, from the metadata (`LoadedRun.recording_files`, `LoadedRun.counting_files`):
- TP duplicates: of several TP ranks of one (run, dp, pp) only the lowest writes rows into the views
  (TP ranks route the same tokens: `counts_scope` `replicated`, or none given).
- Per-rank shares: where each rank counted only its own share of the expert counts
  (`run.extra.<engine>.counts_scope = "sum_over_ranks"`: SGLang under an all-to-all MoE backend, its
  dump importer's `--sum-ranks`), the ranks' counts of one (run, dp, pp) are summed element-wise by
  (step, layer, expert) and every summary and total (activated experts, imbalance, dead experts,
  routed-expert bytes) is computed from the sums, never added up per rank (the union of activated
  experts is not the sum of their numbers). Steps join by the step key; a step some rank has no counts
  for is left out of the sum and said so in a warning (a partial sum would under-count). Batch
  composition (`steps`) stays the lowest TP rank's (the ranks record the same passes; a warning says
  where their phase or num_tokens differ). The sum is cached like a file, keyed by all its files.
- PP stages keep their own layer ranges; DP ranks are separate step streams of one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moecap.schemas import (
    PHASES,
    SCHEMA_VERSION,
    TABLES,
    RunMetadata,
    TraceError,
    expand_paths,
    file_name_error,
    mixed_run_error_among,
    read_trace_header,
    scan_trace_file,
)

from .errors import InputError, SpecError
from .metrics.step_costs import request_sums
from .parquet_writer import BackgroundParquetWriter
from .validity import RowFilter

CACHE_LAYOUT = "7"
"""Bump when the cached Parquet layout changes (invalidates every cache entry)."""

_RANK_COLUMNS = ("run_id", "dp", "pp", "tp", "ep")
_SLICE_ROWS = 8192
# Cache files are written once per trace and read often: zstd level 1, dictionaries only where values
# repeat (ids, phases), no statistics on the per-request list columns (nothing filters on them).
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["run_id", "phase", "req_ids", "time_source", "finish_reason", "dataset", "gpu_uuid"],
    "write_statistics": ["run_id", "dp", "pp", "tp", "ep", "step", "t_start_ns", "arrival_ns", "t_ns"],
}
# The step scalars are read back whole by every cold analysis: lz4 and delta-encoded step / ns
# columns (monotonic) write and read faster than zstd-1 over plain integers, and are smaller.
_STEP_SCALARS_OPTIONS: dict[str, Any] = {
    **_PARQUET_OPTIONS,
    "compression": "lz4",
    "compression_level": None,
    "column_encoding": {
        c: "DELTA_BINARY_PACKED" for c in ("step", "t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns")
    },
    "write_batch_size": 65536,
}
_VIEW_TABLES = (
    "steps",
    "experts",
    "expert_step_stats",
    "expert_totals",
    "requests",
    "outputs",
    "gpu_samples",
)


def default_cache_dir() -> Path:
    """`$MOECAP_CACHE_DIR`, else `$XDG_CACHE_HOME/moecap`, else `~/.cache/moecap`."""
    if os.environ.get("MOECAP_CACHE_DIR"):
        return Path(os.environ["MOECAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moecap"


def prepare_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory (`cache_dir`, else `default_cache_dir()`), created if missing; InputError
    (one line) when it cannot be: a file is in the way, no permission, a read-only disk."""
    given = cache_dir is not None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = (
        "--cache-dir"
        if given
        else ("MOECAP_CACHE_DIR" if os.environ.get("MOECAP_CACHE_DIR") else "cache dir")
    )
    if cache.exists() and not cache.is_dir():
        raise InputError(f"{source} {cache}: is not a directory (the Parquet cache needs one)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"{source} {cache}: cannot write the Parquet cache there ({exc.strerror or exc}); "
            "pass --cache-dir DIR or set MOECAP_CACHE_DIR to a writable directory"
        ) from None
    return cache


@dataclass
class LoadedFile:
    """One trace file as loaded: where its cached Parquet lives and what the scan said."""

    path: Path
    table_kind: str
    run: RunMetadata
    rows: int
    complete: bool
    lost_bytes: int
    rows_dropped: int
    parquet: dict[str, Path]
    """View name -> cached Parquet file (an experts file yields experts, expert_step_stats, expert_totals;
    a steps file `step_scalars` (scalar columns + per-step request sums, not a view) and, once its
    request lists are cached, `steps`)."""
    warnings: list[str] = field(default_factory=list)
    from_cache: bool = False
    cache_key: str = ""
    """The cache entry's key (files `<key>.*` in the cache directory)."""
    summed_ranks: list[int] = field(default_factory=list)
    """For the element-wise sum of several ranks' expert counts (`LoadedRun.summed`): the TP ranks
    summed; empty for a trace file."""
    steps_left_out: int = 0
    """For a sum: steps some rank has no counts for, left out of it (a partial sum under-counts)."""
    left_out: list[str] = field(default_factory=list)
    """Rows left out of the views (impossible values, repeated keys: `validity`), one line per reason."""
    excluded_steps: list[int] = field(default_factory=list)
    """A steps file's step keys left out for an impossible value (its experts rows go with them)."""


@dataclass
class LoadedRun:
    """All loaded files of one run."""

    run_id: str
    files: list[LoadedFile] = field(default_factory=list)
    summed: list[LoadedFile] = field(default_factory=list)
    """Per (dp, pp) whose ranks each counted their own share of the expert counts: the sum over its
    ranks (an experts "file" in the cache, not a trace file)."""
    sum_stages: set[tuple[int, int]] = field(default_factory=set)
    """(dp, pp) under the sum rule (summed, or left out where the ranks cannot be summed)."""
    warnings: list[str] = field(default_factory=list)
    """What loading found about this run: rows left out, duplicate files, what summing its ranks
    found (also in `TraceDB.warnings`)."""
    findings: list[str] = field(default_factory=list)
    """Rows and files left out of this run's views (impossible values, duplicates): `check` names them."""

    @property
    def metadata(self) -> RunMetadata:
        engine = [f for f in self.files if f.table_kind in ("steps", "experts")]
        return (engine or self.files)[0].run

    def files_of(self, kind: str) -> list[LoadedFile]:
        return [f for f in self.files if f.table_kind == kind]

    @property
    def recording_files(self) -> list[LoadedFile]:
        """Steps files that feed the views (one TP rank per (dp, pp))."""
        return [f for f in self.files_of("steps") if _is_recorder(f, self.files_of("steps"))]

    @property
    def counting_files(self) -> list[LoadedFile]:
        """Experts files that feed the views: per (dp, pp), the sum over its ranks where each counted
        its own share (`summed`), else the recording TP rank's file (the others are duplicates)."""
        recorders = {(f.run.rank.dp, f.run.rank.pp, f.run.rank.tp) for f in self.recording_files}
        out = list(self.summed)
        for f in self.files_of("experts"):
            r = f.run.rank
            if (r.dp, r.pp) in self.sum_stages or (recorders and (r.dp, r.pp, r.tp) not in recorders):
                continue
            out.append(f)
        return out

    def counting_file_for(self, steps_file: LoadedFile) -> LoadedFile | None:
        """The experts file (or sum) whose counts go with a recording steps file's steps."""
        r = steps_file.run.rank
        for f in self.counting_files:
            if (f.run.rank.dp, f.run.rank.pp, f.run.rank.tp) == (r.dp, r.pp, r.tp):
                return f
        return None


class TraceDB:
    """A DuckDB connection with the views defined, plus what loading found.

    `con` is the connection with every documented view complete: on first access it caches the
    request lists of steps files loaded without them (one more streaming pass over each trace) and
    redefines `steps` over them. Metric code that reads no request list runs inside
    `defer_request_lists()`, where `con` is handed out as it is and `steps` has only its scalar
    columns (a query naming a list column then fails loudly, never silently).
    """

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        runs: dict[str, LoadedRun],
        errors: list[str],
        warnings: list[str],
        cache_dir: Path | None = None,
    ) -> None:
        self._con = con
        self.runs = runs
        self.errors = errors
        self.warnings = warnings
        self.cache_dir = cache_dir
        self._deferred = 0

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if not self._deferred and self.request_lists_pending:
            self.ensure_request_lists()
        return self._con

    @property
    def request_lists_pending(self) -> bool:
        """Whether some steps file feeding the views has no cached request lists yet."""
        return any("steps" not in f.parquet for run in self.runs.values() for f in run.recording_files)

    def ensure_request_lists(self) -> None:
        """Cache the request lists of every recording steps file that lacks them; redefine `steps`."""
        if not self.request_lists_pending:
            return
        assert self.cache_dir is not None
        for run in self.runs.values():
            for f in run.recording_files:
                if "steps" not in f.parquet:
                    _cache_request_lists(f, self.cache_dir)
        define_steps_view(self._con, self.runs)

    @contextmanager
    def defer_request_lists(self) -> Iterator[TraceDB]:
        """Within: `con` does not cache request lists (for code that reads none)."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query, params=params)

    def close(self) -> None:
        self._con.close()


def load_traces(
    paths: Iterable[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    memory_limit: str | None = None,
    expert_counts: bool = True,
) -> TraceDB:
    """Load trace files (files, directories, globs) into a DuckDB connection with the views.

    Each unusable file adds one line to `errors` and the others still load; `strict=True` raises
    the first as `TraceError`. `progress(done, total, path)` is called per file.
    `expert_counts=False` skips caching the raw per-step counts behind the `experts` and
    `expert_tokens` views (then empty); every metric uses the per-step summaries and totals, which
    are always built. Raw counts are the largest part of a trace, so metrics-only loads are faster
    (the ranks of a (dp, pp) whose counts are summed still cache theirs: the sum reads them).
    """
    files = expand_paths(paths)
    cache = prepare_cache_dir(cache_dir)
    errors: list[str] = []
    warnings: list[str] = []
    runs: dict[str, LoadedRun] = {}
    headers = []
    for path in files:
        try:
            headers.append((path, read_trace_header(path)))
        except TraceError as exc:
            if strict:
                raise
            errors.append(str(exc))
    # Steps before experts: the expert summary needs each step's phase. Per rank, the steps file's
    # cached scalars; its phase map is read only when an experts file of that rank is converted.
    headers.sort(key=lambda h: (h[1].table_kind != "steps", str(h[0])))
    # (run, dp, pp) whose ranks' counts will be summed: the sum reads every rank's raw counts.
    shares = [
        (h.run.run_id, h.run.rank.dp, h.run.rank.pp)
        for _, h in headers
        if h.table_kind == "experts" and counts_scope(h.run) == SUM_OVER_RANKS
    ]
    summing = {stage for stage, n in Counter(shares).items() if n > 1}
    rank_steps: dict[tuple[str, str], LoadedFile] = {}
    for i, (path, header) in enumerate(headers):
        if progress:
            progress(i, len(headers), str(path))
        run = header.run
        conflict = _conflict(runs.get(run.run_id), header.table_kind, header.run, path)
        if conflict:
            if strict:
                raise TraceError(conflict)
            errors.append(conflict)
            continue
        try:
            raw = expert_counts or (run.run_id, run.rank.dp, run.rank.pp) in summing
            loaded = _load_file(path, header.table_kind, run, cache, rank_steps, raw)
        except TraceError as exc:
            if strict:
                raise
            errors.append(str(exc))
            continue
        if strict and not loaded.complete:
            raise TraceError(loaded.warnings[0])
        if strict and loaded.left_out:
            raise TraceError(f"{loaded.left_out[0]}; --strict refuses it")
        warnings.extend(loaded.warnings)
        runs.setdefault(run.run_id, LoadedRun(run.run_id)).files.append(loaded)
    if progress:
        progress(len(headers), len(headers), "")
    for loaded_run in runs.values():
        _drop_duplicate_files(loaded_run, strict)
        for f in loaded_run.files:
            loaded_run.findings.extend(f.left_out)
        loaded_run.warnings.extend(loaded_run.findings)
        problem = _sum_rank_counts(loaded_run, cache, expert_counts)
        if problem and strict:
            raise TraceError(problem)
        warnings.extend(loaded_run.warnings)
    con = duckdb.connect(config={"memory_limit": memory_limit} if memory_limit else {})
    define_views(con, runs)
    return TraceDB(con=con, runs=runs, errors=errors, warnings=warnings, cache_dir=cache)


def _conflict(existing: LoadedRun | None, kind: str, run: RunMetadata, path: Path) -> str | None:
    """The reader's own consistency checks (file name vs metadata; one run id, one run)."""
    named = file_name_error(path, kind, run)
    if named:
        return named
    if existing is None or not existing.files:
        return None
    return mixed_run_error_among([(f.run, f.path) for f in existing.files], run, path)


def _drop_duplicate_files(run: LoadedRun, strict: bool) -> None:
    """Of several files of one run, rank and table (a copy under another name, a second copy of a
    truncated file), keep one: the complete one with the most rows (the first by path on a tie).
    Each other one is left out of the views, so its rows count once, with a line in `run.findings`
    that says whether it is an identical copy and how many of its rows the kept file lacks;
    `strict` refuses it. gpu_samples files are left out only when byte-identical (one sampler
    process may write several)."""
    groups: dict[tuple[str, str], list[LoadedFile]] = {}
    for f in run.files:
        groups.setdefault((f.table_kind, f.run.rank.tag()), []).append(f)
    for (kind, tag), files in groups.items():
        if len(files) < 2:
            continue
        kept = max(files, key=lambda f: (f.complete, f.rows, -files.index(f)))
        for f in files:
            if f is kept:
                continue
            identical = _same_bytes(f.path, kept.path)
            if kind == "gpu_samples" and not identical:
                continue
            if identical:
                line = (
                    f"{f.path}: an identical copy of {kept.path} (run {run.run_id}, {kind}, rank {tag}); "
                    "left out, so its rows count once"
                )
            else:
                lacking = _rows_not_in(f, kept)
                line = (
                    f"{f.path}: a second {kind} file of run {run.run_id} rank {tag} beside {kept.path} "
                    f"(kept: {'complete, ' if kept.complete else ''}{kept.rows} row(s)); left out, so no row counts "
                    + (
                        f"twice; {lacking} of its {f.rows} row(s) have keys the kept file lacks and are lost"
                        if lacking
                        else "twice; every one of its keys is in the kept file"
                    )
                )
            if strict:
                raise TraceError(f"{line}; --strict refuses duplicate files")
            run.files.remove(f)
            run.findings.append(line)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with a.open("rb") as fa, b.open("rb") as fb:
            return hashlib.file_digest(fa, "sha256").digest() == hashlib.file_digest(fb, "sha256").digest()
    except OSError:
        return False


def _rows_not_in(f: LoadedFile, kept: LoadedFile) -> int:
    """Rows of `f` whose key (step, req_id) `kept` lacks, from their cached Parquet."""
    from .validity import KEYS

    key = KEYS.get(f.table_kind)
    view = {"steps": "step_scalars", "experts": "expert_step_stats"}.get(f.table_kind, f.table_kind)
    if key is None or view not in f.parquet or view not in kept.parquet:
        return f.rows
    mine = pq.read_table(f.parquet[view], columns=[key]).column(key).combine_chunks()
    theirs = pq.read_table(kept.parquet[view], columns=[key]).column(key).combine_chunks()
    return int(pc.sum(pc.invert(pc.is_in(mine, value_set=theirs))).as_py() or 0)


def _is_recorder(f: LoadedFile, steps_files: list[LoadedFile]) -> bool:
    same_stage = [g for g in steps_files if (g.run.rank.dp, g.run.rank.pp) == (f.run.rank.dp, f.run.rank.pp)]
    return f.run.rank.tp == min(g.run.rank.tp for g in same_stage)


# -- conversion -----------------------------------------------------------------------------------
def _cache_key(path: Path, version: str, extra: str = "") -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{version}|{CACHE_LAYOUT}|{extra}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _load_file(
    path: Path,
    kind: str,
    run: RunMetadata,
    cache: Path,
    rank_steps: dict[tuple[str, str], LoadedFile],
    expert_counts: bool = True,
) -> LoadedFile:
    """Convert one trace file into the cache (or find it there). `rank_steps` maps a rank to its
    steps file (filled by steps files, read by experts files: the steps' phases split the expert
    totals, and the steps it left out take their expert counts with them)."""
    rank_key = (run.run_id, run.rank.tag())
    extra = ""
    drop_steps = None
    if kind == "experts":
        steps_file = rank_steps.get(rank_key)
        # The phases (and left-out steps) come from the rank's steps file: its cache entry is in the key.
        extra = f"with-phases-{steps_file.cache_key}" if steps_file is not None else "no-phases"
        if steps_file is not None and steps_file.excluded_steps:
            drop_steps = np.asarray(steps_file.excluded_steps, dtype=np.int64)
            extra += "|drop-" + hashlib.sha1(drop_steps.tobytes()).hexdigest()[:16]
    key = _cache_key(path, SCHEMA_VERSION, extra)
    info_path = cache / f"{key}.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
            parquet = {k: cache / v for k, v in info["parquet"].items()}
            if all(p.exists() for p in parquet.values()):
                if kind == "experts" and expert_counts and "experts" not in parquet:
                    parquet["experts"] = _write_raw_counts(path, _identity(run), cache, key, drop_steps)
                    info["parquet"]["experts"] = parquet["experts"].name
                    info_path.write_text(json.dumps(info))
                loaded = LoadedFile(
                    path=path,
                    table_kind=kind,
                    run=run,
                    rows=info["rows"],
                    complete=info["complete"],
                    lost_bytes=info["lost_bytes"],
                    rows_dropped=info["rows_dropped"],
                    parquet=parquet,
                    warnings=info["warnings"],
                    from_cache=True,
                    cache_key=key,
                    left_out=info["left_out"],
                    excluded_steps=info["excluded_steps"],
                )
                if kind == "steps":
                    _note_steps_file(loaded, rank_key, rank_steps)
                return loaded
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt
    identity = _identity(run)
    rows = RowFilter(kind, drop_steps)
    if kind == "experts":
        steps_file = rank_steps.get(rank_key)
        phase_map = _read_phase_map(steps_file.parquet["step_scalars"]) if steps_file is not None else None
        parquet, scan = _convert_experts(
            path, run, identity, cache, key, phase_map, write_raw=expert_counts, rows=rows
        )
    elif kind == "steps":
        parquet, scan = _convert_steps(path, run, identity, cache, key, rows)
    else:
        parquet, scan = _convert_plain(path, kind, identity, cache, key, rows)
    info = {
        "rows": scan.rows,
        "complete": scan.complete,
        "lost_bytes": scan.lost_bytes,
        "rows_dropped": scan.rows_dropped,
        "warnings": scan.warnings,
        "parquet": {k: v.name for k, v in parquet.items()},
        "left_out": rows.findings(str(path)),
        "excluded_steps": rows.excluded_steps,
    }
    info_path.write_text(json.dumps(info))
    loaded = LoadedFile(
        path=path,
        table_kind=kind,
        run=run,
        rows=scan.rows,
        complete=scan.complete,
        lost_bytes=scan.lost_bytes,
        rows_dropped=scan.rows_dropped,
        parquet=parquet,
        warnings=list(scan.warnings),
        cache_key=key,
        left_out=info["left_out"],
        excluded_steps=rows.excluded_steps,
    )
    if kind == "steps":
        _note_steps_file(loaded, rank_key, rank_steps)
    return loaded


def _note_steps_file(
    f: LoadedFile, rank_key: tuple[str, str], rank_steps: dict[tuple[str, str], LoadedFile]
) -> None:
    """Make `f` its rank's steps file for the experts files converted after it (their phases and
    left-out steps), unless an earlier one of the rank is preferred: complete, then more rows, then
    first by path (`_drop_duplicate_files` keeps the same one of several copies)."""
    best = rank_steps.get(rank_key)
    if best is None or (f.complete, f.rows) > (best.complete, best.rows):
        rank_steps[rank_key] = f


def _identity(run: RunMetadata) -> dict[str, Any]:
    return {"run_id": run.run_id, "dp": run.rank.dp, "pp": run.rank.pp, "tp": run.rank.tp, "ep": run.rank.ep}


def _write_raw_counts(
    path: Path, identity: dict[str, Any], cache: Path, key: str, drop_steps: np.ndarray | None = None
) -> Path:
    """Cache a trace's raw expert counts (for the experts / expert_tokens views) in a second pass,
    leaving out the rows the first pass left out."""
    sink = _ParquetSink(cache / f"{key}.experts.parquet")
    rows = RowFilter("experts", drop_steps)
    scan = scan_trace_file(path, lambda batch: sink.write(_with_identity(rows.apply(batch), identity)))
    return sink.close(_identity_schema(scan.schema))


def _with_identity(batch: pa.RecordBatch, identity: dict[str, Any]) -> pa.RecordBatch:
    n = batch.num_rows
    cols = [
        pa.array(np.full(n, v, dtype=np.int32))
        if k != "run_id"
        else pa.array([v], pa.string()).take(np.zeros(n, np.int32))
        for k, v in identity.items()
    ]
    names = list(identity)
    arrays = [*cols, *batch.columns]
    if "phase" in batch.schema.names:
        i = batch.schema.names.index("phase")
        arrays[len(cols) + i] = batch.column(i).cast(pa.string())
    return pa.RecordBatch.from_arrays(arrays, names=[*names, *batch.schema.names])


def _check_batch_nulls(path: Path, kind: str, batch: pa.RecordBatch) -> None:
    for c in TABLES[kind]:
        if not c.nullable and batch.column(c.name).null_count:
            raise TraceError(f"{path}: column {kind}.{c.name} holds nulls but is not nullable")


class _ParquetSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_suffix(".tmp")
        self.writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, batch.schema, **_PARQUET_OPTIONS)
        self.writer.write_batch(batch)

    def close(self, empty_schema: pa.Schema) -> Path:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, empty_schema, **_PARQUET_OPTIONS)
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path


def _identity_schema(kind_schema: pa.Schema) -> pa.Schema:
    fields = [pa.field("run_id", pa.string())] + [pa.field(k, pa.int32()) for k in _RANK_COLUMNS[1:]]
    for f in kind_schema:
        fields.append(pa.field(f.name, pa.string()) if f.name == "phase" else f.remove_metadata())
    return pa.schema(fields)


def _convert_plain(
    path: Path, kind: str, identity: dict[str, Any], cache: Path, key: str, rows: RowFilter | None = None
):
    sink = _ParquetSink(cache / f"{key}.{kind}.parquet")
    rows = rows or RowFilter(kind)

    def on_batch(batch: pa.RecordBatch) -> None:
        _check_batch_nulls(path, kind, batch)
        sink.write(_with_identity(rows.apply(batch), identity))

    scan = scan_trace_file(path, on_batch)
    out = sink.close(_identity_schema(scan.schema))
    return {kind: out}, scan


def _list_columns(kind: str) -> list[str]:
    return [c.name for c in TABLES[kind] if pa.types.is_list(c.type)]


def _sum_windows(run: RunMetadata) -> set[int]:
    """Attention windows of the trace's embedded model config (0 = full attention): the windows whose
    request sums are cached with the steps. A spec given later with other windows rescans the trace."""
    from .specs import model_spec_from_config

    try:
        spec = model_spec_from_config(run.model.config) if run.model.config else None
    except (SpecError, KeyError, TypeError, ValueError):
        spec = None
    return {0} | ({int(w or 0) for w in spec.attention_windows} if spec else set())


def step_request_sums(path: Path, windows: Iterable[int]) -> pa.Table:
    """(step, request sums per `windows`) of every row of a steps trace file, in file order: one
    streaming pass, for a spec whose windows the cache does not hold."""
    parts: list[pa.Table] = []
    rows = RowFilter("steps")  # the rows the cache holds

    def on_batch(batch: pa.RecordBatch) -> None:
        _check_batch_nulls(path, "steps", batch)
        batch = rows.apply(batch)
        sums = request_sums(batch, windows)
        parts.append(pa.table({"step": batch.column("step"), **sums}))

    scan_trace_file(path, on_batch)
    if not parts:
        return pa.table({"step": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def _convert_steps(
    path: Path, run: RunMetadata, identity: dict[str, Any], cache: Path, key: str, rows: RowFilter
):
    """One pass: scalar columns + per-step request sums -> `<key>.step_scalars.parquet` (written on
    a second thread while the scan computes the next batch's sums); `rows` leaves rows out."""
    target = cache / f"{key}.step_scalars.parquet"
    sink = BackgroundParquetWriter(target.with_suffix(".tmp"), **_STEP_SCALARS_OPTIONS)
    lists = set(_list_columns("steps"))
    windows = _sum_windows(run)

    def on_batch(batch: pa.RecordBatch) -> None:
        _check_batch_nulls(path, "steps", batch)
        try:
            batch = rows.apply(batch)
            sums = request_sums(batch, windows)
        except ValueError as exc:  # lists of one step that do not line up: the file is unusable
            raise TraceError(f"{path}: {exc}") from None
        keep = [i for i, name in enumerate(batch.schema.names) if name not in lists]
        scalars = pa.RecordBatch.from_arrays(
            [batch.column(i) for i in keep] + list(sums.values()),
            names=[batch.schema.names[i] for i in keep] + list(sums),
        )
        sink.write(_with_identity(scalars, identity))

    try:
        scan = scan_trace_file(path, on_batch)
    except BaseException:
        sink.abort()
        raise
    empty = pa.schema([f for f in scan.schema if f.name not in lists])
    empty_sums = request_sums(_empty_steps_batch(), windows)
    empty = pa.schema([*empty, *(pa.field(k, v.type) for k, v in empty_sums.items())])
    sink.close(_identity_schema(empty))
    os.replace(sink.path, target)
    return {"step_scalars": target}, scan


def _empty_steps_batch() -> pa.RecordBatch:
    schema = pa.schema([pa.field(c.name, c.type) for c in TABLES["steps"]])
    return pa.RecordBatch.from_pylist([], schema=schema)


def _cache_request_lists(f: LoadedFile, cache: Path) -> None:
    """Cache a steps file's full table (request lists included) as `<key>.steps.parquet`: a second
    streaming pass over the trace, on first use of the `steps` view."""
    expected = _cache_key(f.path, SCHEMA_VERSION)
    if expected != f.cache_key:
        raise TraceError(f"{f.path}: changed since it was loaded; load it again")
    out, _ = _convert_plain(f.path, "steps", _identity(f.run), cache, f.cache_key)
    f.parquet["steps"] = out["steps"]
    info_path = cache / f"{f.cache_key}.json"
    try:
        info = json.loads(info_path.read_text())
        info["parquet"]["steps"] = out["steps"].name
        info_path.write_text(json.dumps(info))
    except (OSError, ValueError, KeyError):
        pass  # the next load rebuilds the entry


def _read_phase_map(steps_parquet: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted step keys, phase index into PHASES) of a cached steps file."""
    t = pq.read_table(steps_parquet, columns=["step", "phase"])
    steps = np.asarray(t.column("step"))
    encoded = t.column("phase").combine_chunks().dictionary_encode()
    lookup = np.array(
        [PHASES.index(p) if p in PHASES else 0 for p in encoded.dictionary.to_pylist()], dtype=np.int8
    )
    phases = lookup[np.asarray(encoded.indices)] if len(lookup) else np.zeros(len(steps), np.int8)
    order = np.argsort(steps, kind="stable")
    return steps[order], phases[order]


class _ExpertSummary:
    """Per-step summaries (-> `expert_step_stats`) and per (phase, layer, expert) totals (->
    `expert_totals`) of expert counts handed over as [rows, MoE layers, experts] blocks. Used on one
    file's counts, and on the element-wise sums of ranks that each counted their own share."""

    def __init__(
        self,
        identity: dict[str, Any],
        layer_ids: np.ndarray,
        n_experts: int,
        phase_map: tuple[np.ndarray, np.ndarray] | None,
        stats_path: Path,
    ) -> None:
        self.identity = identity
        self.layer_ids = layer_ids
        self.n_layers = len(layer_ids)
        self.n_experts = n_experts
        self.phase_map = phase_map
        self.stats_sink = _ParquetSink(stats_path)
        self.totals = np.zeros((len(PHASES) + 1, max(self.n_layers, 1), n_experts), dtype=np.int64)
        self.active_steps = np.zeros_like(self.totals)

    def add(self, step: np.ndarray, counts: np.ndarray) -> None:
        """Summarise `counts[i]` ([MoE layers, experts], any integer dtype) of step `step[i]`."""
        active = counts > 0
        layer_active = active.sum(axis=2, dtype=np.int32)  # [rows, layers]
        layer_tokens = counts.sum(axis=2, dtype=np.int64)
        layer_max = counts.max(axis=2)
        n_experts = self.n_experts
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            # An idle step routes no token: its imbalance is NaN by definition, not worth a warning.
            warnings.simplefilter("ignore", RuntimeWarning)
            imbalance = np.where(layer_tokens > 0, layer_max * n_experts / layer_tokens, np.nan)
            imbalance_mean = np.nanmean(imbalance, axis=1)
        stats = pa.RecordBatch.from_arrays(
            [
                pa.array(step),
                pa.array(layer_active.sum(axis=1, dtype=np.int32)),
                pa.array(layer_tokens.sum(axis=1)),
                pa.array(imbalance_mean),
                pa.array(np.nanmax(np.where(np.isnan(imbalance), -np.inf, imbalance), axis=1)),
                pa.array(layer_tokens.min(axis=1)),
                pa.array(layer_tokens.max(axis=1)),
            ],
            names=[
                "step",
                "active_experts",
                "routed_tokens",
                "imbalance_mean",
                "imbalance_max",
                "layer_tokens_min",
                "layer_tokens_max",
            ],
        )
        self.stats_sink.write(_with_identity(stats, self.identity))
        if self.phase_map is not None and len(self.phase_map[0]):
            steps_sorted, phases_sorted = self.phase_map
            pos = np.clip(np.searchsorted(steps_sorted, step), 0, len(steps_sorted) - 1)
            phase_idx = np.where(steps_sorted[pos] == step, phases_sorted[pos], len(PHASES))
        else:
            phase_idx = np.full(len(step), len(PHASES))
        for ph in np.unique(phase_idx):
            sel = phase_idx == ph
            if sel.all():
                self.totals[ph] += counts.sum(axis=0, dtype=np.int64)
                self.active_steps[ph] += active.sum(axis=0, dtype=np.int64)
            else:
                self.totals[ph] += counts[sel].sum(axis=0, dtype=np.int64)
                self.active_steps[ph] += active[sel].sum(axis=0, dtype=np.int64)

    def close(self, totals_path: Path) -> dict[str, Path]:
        """Write both tables; their paths by view name."""
        identity, layer_ids, n_layers = self.identity, self.layer_ids, self.n_layers
        totals, active_steps = self.totals, self.active_steps
        out = {
            "expert_step_stats": self.stats_sink.close(
                pa.schema(
                    [pa.field("run_id", pa.string())]
                    + [pa.field(k, pa.int32()) for k in _RANK_COLUMNS[1:]]
                    + [
                        pa.field("step", pa.int64()),
                        pa.field("active_experts", pa.int32()),
                        pa.field("routed_tokens", pa.int64()),
                        pa.field("imbalance_mean", pa.float64()),
                        pa.field("imbalance_max", pa.float64()),
                        pa.field("layer_tokens_min", pa.int64()),
                        pa.field("layer_tokens_max", pa.int64()),
                    ]
                )
            ),
        }
        phase_names = [*PHASES, "unknown"]
        ph, li, ex = np.nonzero(np.ones_like(totals, dtype=bool)) if n_layers else (np.array([]),) * 3
        # Keep every (phase, layer, expert) of phases that occurred, so dead experts show as zeros.
        seen_phase = totals.sum(axis=(1, 2)) > 0 if n_layers else np.array([], bool)
        keep = seen_phase[ph] if n_layers else np.array([], bool)
        n = int(np.count_nonzero(keep))
        totals_table = pa.table(
            {
                "run_id": pa.array([identity["run_id"]] * n, pa.string()),
                **{k: pa.array(np.full(n, identity[k], np.int32)) for k in _RANK_COLUMNS[1:]},
                "phase": pa.array([phase_names[i] for i in ph[keep]], pa.string()),
                "moe_layer": pa.array(li[keep].astype(np.int32)),
                "layer": pa.array(layer_ids[li[keep]] if n_layers else np.array([], np.int32)),
                "expert": pa.array(ex[keep].astype(np.int32)),
                "tokens": pa.array(
                    totals[ph[keep], li[keep], ex[keep]] if n_layers else np.array([], np.int64)
                ),
                "active_steps": pa.array(
                    active_steps[ph[keep], li[keep], ex[keep]] if n_layers else np.array([], np.int64)
                ),
            }
        )
        pq.write_table(totals_table, totals_path.with_suffix(".tmp"), compression="zstd")
        os.replace(totals_path.with_suffix(".tmp"), totals_path)
        out["expert_totals"] = totals_path
        return out


def _convert_experts(
    path: Path,
    run: RunMetadata,
    identity: dict[str, Any],
    cache: Path,
    key: str,
    phase_map: tuple[np.ndarray, np.ndarray] | None,
    *,
    write_raw: bool = True,
    rows: RowFilter | None = None,
):
    rows = rows or RowFilter("experts")
    experts_sink = _ParquetSink(cache / f"{key}.experts.parquet") if write_raw else None
    n_experts = max(1, int(run.moe.num_experts))
    layer_ids = np.asarray(_file_layer_ids(run), dtype=np.int32)
    n_layers = len(layer_ids)
    summary = _ExpertSummary(
        identity, layer_ids, n_experts, phase_map, cache / f"{key}.expert_step_stats.parquet"
    )

    def on_batch(batch: pa.RecordBatch) -> None:
        _check_batch_nulls(path, "experts", batch)
        batch = rows.apply(batch)
        counts_col = batch.column("counts")
        lengths = pc.list_value_length(counts_col).to_numpy(zero_copy_only=False)
        width = n_layers * n_experts
        if n_layers and np.any(lengths != width):
            bad = int(lengths[lengths != width][0])
            raise TraceError(
                f"{path}: experts.counts has {bad} values in a row, expected {n_layers} MoE layers x "
                f"{n_experts} experts = {width} (run.moe.layer_ids / num_experts)"
            )
        if experts_sink is not None:
            experts_sink.write(_with_identity(batch, identity))
        if not n_layers or batch.num_rows == 0:
            return
        # Slices bound memory whatever the writer's batch size; counts stay int32 (no widening copy).
        for start in range(0, batch.num_rows, _SLICE_ROWS):
            part = batch.slice(start, _SLICE_ROWS)
            flat = np.asarray(pc.list_flatten(part.column("counts")))
            summary.add(np.asarray(part.column("step")), flat.reshape(part.num_rows, n_layers, n_experts))

    scan = scan_trace_file(path, on_batch)
    out = summary.close(cache / f"{key}.expert_totals.parquet")
    if experts_sink is not None:
        out["experts"] = experts_sink.close(_identity_schema(scan.schema))
    return out, scan


def _file_layer_ids(run: RunMetadata) -> list[int]:
    """Decoder-layer ids of the MoE layers this file counts (its rank's layer range)."""
    start = run.rank.layer_start
    end = run.rank.layer_end if run.rank.layer_end is not None else 1 << 30
    return [lid for lid in run.moe.layer_ids if start <= lid < end]


# -- ranks that each counted their own share ------------------------------------------------------
SUM_OVER_RANKS = "sum_over_ranks"
_SUM_BLOCK_VALUES = 1 << 22
"""Count values summed per block (32 MB of int64 sums): bounds memory whatever the trace length."""


def counts_scope(run: RunMetadata) -> str:
    """How a rank's expert counts relate to the other ranks of its (dp, pp), from
    `run.extra.<engine>.counts_scope`: `sum_over_ranks` (each rank counted only its own share, e.g.
    SGLang under an all-to-all MoE backend) or `replicated` (each counted every token: TP duplicates;
    also when the metadata does not say)."""
    block = (run.extra or {}).get(run.engine.name)
    scope = block.get("counts_scope") if isinstance(block, dict) else None
    return str(scope) if scope else "replicated"


def _sum_rank_counts(run: LoadedRun, cache: Path, write_raw: bool = True) -> str | None:
    """Sum, element-wise by (step, layer, expert), the expert counts of every (dp, pp) of `run` whose
    ranks each counted their own share, into `run.summed` (one cached "file" per (dp, pp), carrying
    the recording steps file's rank identity, so it joins `steps`); the summaries and totals are
    computed from the sums. A step some rank has no counts for is left out of the sum (it would
    under-count). What was summed and anything doubtful goes to `run.warnings`; returns the first
    problem that leaves a (dp, pp) without counts (None when none did)."""
    engine = [f for f in run.files if f.table_kind in ("steps", "experts")]
    problem = None
    for dp, pp in sorted({(f.run.rank.dp, f.run.rank.pp) for f in engine}):
        files = [f for f in engine if (f.run.rank.dp, f.run.rank.pp) == (dp, pp)]
        experts = sorted((f for f in files if f.table_kind == "experts"), key=lambda f: f.run.rank.tp)
        scopes = sorted({counts_scope(f.run) for f in experts})
        if SUM_OVER_RANKS not in scopes:
            continue
        label = f"run {run.run_id} dp{dp}-pp{pp}"
        ranks = sorted({f.run.rank.tp for f in files})
        run.warnings.extend(_missing_rank_warnings(label, experts[0].run, ranks))
        if len(experts) == 1 and ranks == [experts[0].run.rank.tp]:
            continue  # one rank's share (e.g. attention DP without attention TP): nothing to add to it
        run.sum_stages.add((dp, pp))
        layouts = {(tuple(_file_layer_ids(f.run)), int(f.run.moe.num_experts)) for f in experts}
        if len(scopes) > 1 or len(layouts) > 1:
            why = (
                f"its ranks disagree on counts_scope ({', '.join(scopes)})"
                if len(scopes) > 1
                else "its ranks count different MoE layers or experts"
            )
            line = (
                f"{label}: {why}, so their expert counts can be neither summed nor deduplicated; "
                "they are left out of the views"
            )
            run.warnings.append(line)
            problem = problem or line
            continue
        steps_files = sorted((f for f in files if f.table_kind == "steps"), key=lambda f: f.run.rank.tp)
        recorder = next((f for f in run.recording_files if any(f is g for g in steps_files)), None)
        summed, lacking = _load_rank_sum(experts, ranks, recorder, cache, write_raw)
        run.summed.append(summed)
        run.warnings.extend(_left_out_warnings(label, summed, experts, lacking))
        if recorder is not None:
            run.warnings.extend(_composition_warnings(label, recorder, steps_files))
    return problem


def _load_rank_sum(
    experts: list[LoadedFile], ranks: list[int], recorder: LoadedFile | None, cache: Path, write_raw: bool
) -> tuple[LoadedFile, dict[int, list[int]]]:
    """The cached sum of one (dp, pp)'s ranks (computed when missing) and, per rank, [steps it has no
    counts for, first, last]. Keyed by every summed file's cache key (path, size, mtime, ...), the
    recording steps file's (its phases split the totals) and the ranks, so a change to any of them
    computes it again."""
    parts = [
        "rank-sum",
        CACHE_LAYOUT,
        *(f.cache_key for f in experts),
        recorder.cache_key if recorder else "-",
        ",".join(map(str, ranks)),
    ]
    key = hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]
    ident_run = (recorder or experts[0]).run
    info_path = cache / f"{key}.json"
    info: dict[str, Any] | None = None
    try:
        info = json.loads(info_path.read_text())
        parquet = {k: cache / v for k, v in info["parquet"].items()}
        if not all(p.exists() for p in parquet.values()) or (write_raw and "experts" not in parquet):
            info = None
    except (OSError, ValueError, KeyError):
        info = None  # missing or damaged: computed again
    from_cache = info is not None
    if info is None:
        phase_map = _read_phase_map(recorder.parquet["step_scalars"]) if recorder else None
        by_rank = {f.run.rank.tp: f for f in experts}
        out, union, summed_steps, lacking = _sum_counts(
            [by_rank.get(t) for t in ranks], ident_run, _identity(ident_run), phase_map, cache, key, write_raw
        )
        info = {
            "steps_union": union,
            "steps_summed": summed_steps,
            "lacking": {str(t): v for t, v in zip(ranks, lacking, strict=True)},
            "parquet": {k: v.name for k, v in out.items()},
        }
        info_path.write_text(json.dumps(info))
    summed = LoadedFile(
        path=experts[0].path,
        table_kind="experts",
        run=ident_run,
        rows=int(info["steps_summed"]),
        complete=all(f.complete for f in experts),
        lost_bytes=sum(f.lost_bytes for f in experts),
        rows_dropped=sum(f.rows_dropped for f in experts),
        parquet={k: cache / v for k, v in info["parquet"].items()},
        from_cache=from_cache,
        cache_key=key,
        summed_ranks=list(ranks),
        steps_left_out=int(info["steps_union"]) - int(info["steps_summed"]),
    )
    return summed, {int(t): v for t, v in info["lacking"].items()}


def _missing_rank_warnings(label: str, run: RunMetadata, ranks: list[int]) -> list[str]:
    """Fewer ranks' files than the run's layout has per (dp, pp) (tp / dp): their shares are unseen."""
    par = run.parallelism
    expected = par.tp // par.dp if par.dp > 0 and par.tp % par.dp == 0 else 0
    if len(ranks) >= expected:
        return []
    tags = ", ".join(f"tp{t}" for t in ranks)
    return [
        f"{label}: each rank counted its own share of the expert counts (counts_scope {SUM_OVER_RANKS}) "
        f"and the run has {expected} ranks per (dp, pp) (tp {par.tp} / dp {par.dp}), but the files of "
        f"{len(ranks)} were loaded ({tags}): the summed counts miss the other ranks' shares"
    ]


def _left_out_warnings(
    label: str, summed: LoadedFile, experts: list[LoadedFile], lacking: dict[int, list[int]]
) -> list[str]:
    """Steps some rank has no counts for, left out of the sum: how many, whose, which."""
    if not summed.steps_left_out:
        return []
    ranks = summed.summed_ranks
    truncated = {f.run.rank.tp for f in experts if not f.complete}
    has_file = {f.run.rank.tp for f in experts}
    detail = []
    for t in ranks:
        n, first, last = lacking[t]
        if not n:
            continue
        why = "no experts file" if t not in has_file else f"steps {first}..{last}"
        if t in truncated:
            why += ", its experts file is truncated"
        detail.append(f"tp{t} lacks {n} ({why})")
    tags = ", ".join(f"tp{t}" for t in ranks)
    return [
        f"{label}: expert counts are summed over {len(ranks)} ranks ({tags}) on {summed.rows} step(s); "
        f"{summed.steps_left_out} step(s) lack some rank's counts and are left out of the expert views "
        f"and metrics, not summed partially (that would under-count): {'; '.join(detail)}"
    ]


def _composition_warnings(label: str, recorder: LoadedFile, steps_files: list[LoadedFile]) -> list[str]:
    """Ranks whose steps disagree with the recording rank's on phase or num_tokens (the views take
    both from the recording rank: under the sum rule the ranks record the same passes)."""
    out = []
    ref = _step_composition(recorder.parquet["step_scalars"])
    for f in steps_files:
        if f is recorder:
            continue
        other = _step_composition(f.parquet["step_scalars"])
        common, ia, ib = np.intersect1d(ref[0], other[0], assume_unique=True, return_indices=True)
        differ = (ref[1][ia] != other[1][ib]) | (ref[2][ia] != other[2][ib])
        if differ.any():
            out.append(
                f"{label}: tp{f.run.rank.tp}'s steps differ from tp{recorder.run.rank.tp}'s in phase or "
                f"num_tokens on {int(differ.sum())} of {len(common)} common step(s) (first: step "
                f"{int(common[differ][0])}); the views take both from tp{recorder.run.rank.tp}, the expert "
                "counts from the sum over every rank"
            )
    return out


def _step_composition(step_scalars: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique steps sorted, phase index, num_tokens) of a cached steps file (first row of a step)."""
    steps, phases = _read_phase_map(step_scalars)
    t = pq.read_table(step_scalars, columns=["step", "num_tokens"])
    raw = np.asarray(t.column("step"))
    tokens = np.asarray(t.column("num_tokens"))[np.argsort(raw, kind="stable")]
    keep = np.ones(len(steps), bool)
    keep[1:] = steps[1:] != steps[:-1]
    return steps[keep], phases[keep], tokens[keep]


def _sum_counts(
    files: list[LoadedFile | None],
    run: RunMetadata,
    identity: dict[str, Any],
    phase_map: tuple[np.ndarray, np.ndarray] | None,
    cache: Path,
    key: str,
    write_raw: bool,
) -> tuple[dict[str, Path], int, int, list[list[int]]]:
    """Sum the ranks' cached raw counts (`files`, None for a rank without an experts file) over the
    steps every rank recorded, block by block in step order, and summarise the sums. Returns (parquet
    by view, steps any rank recorded, steps summed, per rank [steps it lacks, first, last])."""
    n_experts = max(1, int(run.moe.num_experts))
    layer_ids = np.asarray(_file_layer_ids(run), dtype=np.int32)
    width = len(layer_ids) * n_experts
    # Steps from the per-step summaries (a row per counts row): the raw counts are read only to sum.
    steps = [_steps_of(f.parquet["expert_step_stats"]) if f is not None else None for f in files]
    present = [s for s in steps if s is not None]
    union = np.unique(np.concatenate(present)) if present else np.zeros(0, np.int64)
    common = union
    for s in steps:
        common = np.intersect1d(common, s) if s is not None else common[:0]
    lacking = []
    for s in steps:
        miss = np.setdiff1d(union, s) if s is not None else union
        first, last = (int(miss[0]), int(miss[-1])) if len(miss) else (-1, -1)
        lacking.append([len(miss), first, last])
    summary = _ExpertSummary(
        identity, layer_ids, n_experts, phase_map, cache / f"{key}.expert_step_stats.parquet"
    )
    raw_sink = _ParquetSink(cache / f"{key}.experts.parquet") if write_raw else None
    if width and len(common):
        rows = max(1, _SUM_BLOCK_VALUES // width)
        readers = [
            _StepOrderedCounts(f.parquet["experts"], s, width, rows)
            for f, s in zip(files, steps, strict=True)
            if f is not None and s is not None
        ]
        for b0 in range(0, len(common), rows):
            keys = common[b0 : b0 + rows]
            acc = np.zeros((len(keys), width), dtype=np.int64)
            for reader in readers:
                s, c = reader.take_through(int(keys[-1]))
                pos = np.minimum(np.searchsorted(keys, s), len(keys) - 1)
                hit = keys[pos] == s  # rows of steps some other rank lacks are dropped here
                if reader.unique:
                    acc[pos[hit]] += c[hit]
                else:  # a step twice in one file: both rows add
                    np.add.at(acc, pos[hit], c[hit])
            # The schema's counts are int32; one step's tokens on one expert summed over ranks fit.
            block = acc.astype(np.int32)
            summary.add(keys, block.reshape(len(keys), len(layer_ids), n_experts))
            if raw_sink is not None:
                offsets = pa.array(np.arange(0, (len(keys) + 1) * width, width, dtype=np.int32))
                counts = pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1)))
                raw_sink.write(
                    _with_identity(pa.record_batch({"step": pa.array(keys), "counts": counts}), identity)
                )
    out = summary.close(cache / f"{key}.expert_totals.parquet")
    if raw_sink is not None:
        schema = pa.schema([pa.field("step", pa.int64()), pa.field("counts", pa.list_(pa.int32()))])
        out["experts"] = raw_sink.close(_identity_schema(schema))
    return out, len(union), len(common), lacking


def _steps_of(parquet: Path) -> np.ndarray:
    return np.asarray(pq.read_table(parquet, columns=["step"]).column("step"), dtype=np.int64)


class _StepOrderedCounts:
    """One rank's cached raw counts handed out in ascending step order, a batch at a time: read in
    file order when the file is in step order (the usual case), else through DuckDB's sort (which
    spills to disk), so memory stays bounded either way."""

    def __init__(self, parquet: Path, steps: np.ndarray, width: int, rows: int) -> None:
        self.width = width
        self.unique = len(np.unique(steps)) == len(steps)
        self._con: duckdb.DuckDBPyConnection | None = None
        if len(steps) < 2 or bool(np.all(steps[1:] >= steps[:-1])):
            self._batches: Iterator[pa.RecordBatch] = pq.ParquetFile(parquet).iter_batches(
                batch_size=rows, columns=["step", "counts"]
            )
        else:
            self._con = duckdb.connect()
            query = f"SELECT step, counts FROM read_parquet({_listing([str(parquet)])}) ORDER BY step"
            self._batches = iter(self._con.sql(query).to_arrow_reader(rows))
        self._steps = np.zeros(0, np.int64)
        self._counts = np.zeros((0, width), np.int32)
        self._done = False

    def take_through(self, last: int) -> tuple[np.ndarray, np.ndarray]:
        """The next rows whose step is <= `last`: (steps, counts [rows, width])."""
        while not self._done and (len(self._steps) == 0 or self._steps[-1] <= last):
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
                if self._con is not None:
                    self._con.close()
                break
            s = np.asarray(batch.column("step"), dtype=np.int64)
            c = np.asarray(pc.list_flatten(batch.column("counts"))).reshape(len(s), self.width)
            self._steps = np.concatenate([self._steps, s])
            self._counts = np.concatenate([self._counts, c])
        n = int(np.searchsorted(self._steps, last, side="right"))
        out = self._steps[:n], self._counts[:n]
        self._steps, self._counts = self._steps[n:], self._counts[n:]
        return out


# -- views ----------------------------------------------------------------------------------------
def _empty_view_sql(view: str) -> str:
    if view in TABLES:
        schema = _identity_schema(pa.schema([pa.field(c.name, c.type) for c in TABLES[view]]))
    elif view == "expert_step_stats":
        return (
            "SELECT NULL::VARCHAR run_id, NULL::INT dp, NULL::INT pp, NULL::INT tp, NULL::INT ep, NULL::BIGINT step, "
            "NULL::INT active_experts, NULL::BIGINT routed_tokens, NULL::DOUBLE imbalance_mean, "
            "NULL::DOUBLE imbalance_max, NULL::BIGINT layer_tokens_min, NULL::BIGINT layer_tokens_max WHERE false"
        )
    else:  # expert_totals
        return (
            "SELECT NULL::VARCHAR run_id, NULL::INT dp, NULL::INT pp, NULL::INT tp, NULL::INT ep, NULL::VARCHAR phase, "
            "NULL::INT moe_layer, NULL::INT layer, NULL::INT expert, NULL::BIGINT tokens, NULL::BIGINT active_steps WHERE false"
        )
    cols = ", ".join(f"NULL::{_duck_type(f.type)} AS {f.name}" for f in schema)
    return f"SELECT {cols} WHERE false"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    return {
        pa.int8(): "TINYINT",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
        pa.string(): "VARCHAR",
    }.get(t, "VARCHAR")


def _view_sources(runs: dict[str, LoadedRun]) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {v: [] for v in (*_VIEW_TABLES, "step_scalars")}
    for run in runs.values():
        feeding = {id(f) for f in (*run.recording_files, *run.counting_files)}
        for f in (*run.files, *run.summed):
            if f.table_kind in ("steps", "experts") and id(f) not in feeding:
                continue  # a non-recording TP rank's duplicate, or one share of a sum
            for view, parquet in f.parquet.items():
                sources[view].append(str(parquet))
    return sources


def _listing(files: list[str]) -> str:
    return ", ".join("'" + p.replace("'", "''") + "'" for p in files)


def define_steps_view(con: duckdb.DuckDBPyConnection, runs: dict[str, LoadedRun]) -> None:
    """(Re)define `steps`: over the full cached tables once every recording file has its request
    lists cached; until then (inside `TraceDB.defer_request_lists`) over the scalar columns only."""
    sources = _view_sources(runs)
    if sources["step_scalars"] and len(sources["steps"]) == len(sources["step_scalars"]):
        body = f"SELECT * FROM read_parquet([{_listing(sources['steps'])}], union_by_name=true)"
    elif sources["step_scalars"]:
        # Every cached column but the request sums (named `_req_*`, see metrics.step_costs).
        body = (
            f"SELECT COLUMNS(lambda c: NOT starts_with(c, '_req_')) "
            f"FROM read_parquet([{_listing(sources['step_scalars'])}], union_by_name=true)"
        )
    else:
        body = _empty_view_sql("steps")
    con.execute(f"CREATE OR REPLACE VIEW steps AS {body}")


def define_views(con: duckdb.DuckDBPyConnection, runs: dict[str, LoadedRun]) -> None:
    """(Re)define every view over the cached Parquet of `runs`."""
    sources = _view_sources(runs)
    define_steps_view(con, runs)
    for view in ("steps", "step_scalars"):
        sources.pop(view)
    for view, files in sources.items():
        if files:
            con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet([{_listing(files)}], union_by_name=true)"
            )
        else:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {_empty_view_sql(view)}")
    con.execute(_RUNS_TABLE_SQL)
    rows = [_run_row(run) for run in runs.values()]
    if rows:
        con.executemany("INSERT INTO runs VALUES (" + ", ".join("?" * len(rows[0])) + ")", rows)
    con.execute(_MOE_LAYERS_SQL)
    layer_rows = [
        (run.run_id, i, lid) for run in runs.values() for i, lid in enumerate(run.metadata.moe.layer_ids)
    ]
    if layer_rows:
        con.executemany("INSERT INTO moe_layers VALUES (?, ?, ?)", layer_rows)
    con.execute(_EXPERT_TOKENS_VIEW)


_RUNS_TABLE_SQL = """
CREATE OR REPLACE TABLE runs (
    run_id VARCHAR, model_id VARCHAR, engine VARCHAR, engine_version VARCHAR, gpu_name VARCHAR,
    num_gpus INTEGER, tp INTEGER, pp INTEGER, dp INTEGER, ep INTEGER, dataset VARCHAR, batch_size INTEGER,
    num_experts INTEGER, top_k INTEGER, num_moe_layers INTEGER, counts_available BOOLEAN,
    random_weights BOOLEAN, created_at VARCHAR, files INTEGER, metadata_json VARCHAR
)
"""

_MOE_LAYERS_SQL = "CREATE OR REPLACE TABLE moe_layers (run_id VARCHAR, moe_layer INTEGER, layer INTEGER)"

# Long form of the expert counts, computed only when queried; filters on run/rank/step columns are
# pushed into the Parquet scan before the unnest.
_EXPERT_TOKENS_VIEW = """
CREATE OR REPLACE VIEW expert_tokens AS
WITH flat AS (
    SELECT e.run_id, e.dp, e.pp, e.tp, e.ep, e.step,
           unnest(e.counts) AS tokens, generate_subscripts(e.counts, 1) - 1 AS idx
    FROM experts e
)
SELECT f.run_id, f.dp, f.pp, f.tp, f.ep, f.step,
       m.layer AS layer, (f.idx % r.num_experts)::INTEGER AS expert, f.tokens
FROM flat f
JOIN runs r USING (run_id)
JOIN moe_layers m ON m.run_id = f.run_id AND m.moe_layer = (f.idx // r.num_experts)
"""


def _run_row(run: LoadedRun) -> tuple[Any, ...]:
    md = run.metadata
    uuids = {g.uuid for g in md.gpus if g.uuid}
    for f in run.files:
        uuids.update(u for u in f.run.rank.gpu_uuids if u)
        uuids.update(g.uuid for g in f.run.gpus if g.uuid)
    num_gpus = len(uuids) or len(md.gpus) or None
    wl = md.workload or {}
    return (
        run.run_id,
        md.model.id,
        md.engine.name,
        md.engine.version,
        md.gpus[0].name if md.gpus else None,
        num_gpus,
        md.parallelism.tp,
        md.parallelism.pp,
        md.parallelism.dp,
        md.parallelism.ep,
        wl.get("dataset"),
        wl.get("batch_size") or wl.get("concurrency"),
        md.moe.num_experts,
        md.moe.top_k,
        len(md.moe.layer_ids),
        bool(md.moe.counts_available) and bool(run.files_of("experts")),
        bool(md.model.random_weights),
        md.created_at,
        len(run.files),
        md.to_json(),
    )


def require_runs(db: TraceDB) -> None:
    """InputError when nothing could be loaded (with the file errors)."""
    if not db.runs:
        detail = f": {db.errors[0]}" if db.errors else ""
        raise InputError(f"no readable moecap trace among the inputs{detail}")
