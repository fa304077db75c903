"""Loading: trace files -> validated, cached Parquet -> DuckDB views (a documented public interface).

One room per job: `cache` (where the Parquet cache lives, how an entry is keyed and written),
`convert` (one streaming pass per trace file, Arrow batches -> Parquet), `expert_pass` (per-step
summaries and per-(phase, layer, expert) totals of the expert counts, on flat numpy blocks),
`ranks` (which files of a run feed the views; the sum over ranks that each counted their own share),
`views` (the documented views over the cache), `db` (`TraceDB`, the connection handed out), `runs`
(what loading found, per file and run). None of them computes a metric: the per-batch sums the
conversion runs (`Reducers`) are the metric layer's functions, and this front door is the one place
that hands them in (`metric_reducers`).

DuckDB cannot re-scan an Arrow IPC stream, so every trace file is converted once to Parquet in a
cache keyed by (absolute path, size, mtime, schema version, cache layout version), streaming batch by
batch (memory stays bounded for traces larger than memory). Expert counts are summarised during that
pass: per step (activated experts, routed tokens, imbalance) and per (phase, layer, expert) totals,
so reports never unnest millions of count vectors. Steps files are cached the same way: the scalar
columns plus the per-step sums over each step's request lists that the step costs need
(`metrics.step_costs.request_sums`); the request lists themselves (the largest part of a steps file)
are cached on first use of the `steps` view's list columns (`TraceDB.con`), as the raw expert counts
are on first use of `experts` / `expert_tokens`.

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

import os
from collections import Counter
from collections.abc import Callable, Iterable

import duckdb

from moecap.schemas import TraceError, expand_paths, read_trace_header

from ..storage import localize
from .cache import CACHE_LAYOUT, default_cache_dir, prepare_cache_dir
from .convert import Reducers, load_file, step_request_sums
from .db import TraceDB, require_runs
from .expert_pass import step_stats_schema
from .ranks import SUM_OVER_RANKS, counts_scope, drop_duplicate_files, file_conflict, sum_rank_counts
from .runs import LoadedFile, LoadedRun
from .views import define_steps_view, define_views

__all__ = [
    "CACHE_LAYOUT",
    "SUM_OVER_RANKS",
    "LoadedFile",
    "LoadedRun",
    "Reducers",
    "TraceDB",
    "counts_scope",
    "default_cache_dir",
    "define_steps_view",
    "define_views",
    "load_traces",
    "metric_reducers",
    "prepare_cache_dir",
    "require_runs",
    "step_request_sums",
]


def metric_reducers() -> Reducers:
    """The metric layer's per-batch sums: request sums of the step costs, per-step expert statistics."""
    from ..metrics.experts import step_statistics
    from ..metrics.step_costs import request_sums

    return Reducers(request_sums=request_sums, step_statistics=step_statistics)


def load_traces(
    paths: Iterable[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    memory_limit: str | None = None,
    expert_counts: bool = True,
    reducers: Reducers | None = None,
) -> TraceDB:
    """Load trace files (files, directories, globs) into a DuckDB connection with the views.

    Each unusable file adds one line to `errors` and the others still load; `strict=True` raises
    the first as `TraceError`. `progress(done, total, path)` is called per file.
    `expert_counts=False` skips caching the raw per-step counts behind the `experts` and
    `expert_tokens` views (then empty); every metric uses the per-step summaries and totals, which
    are always built. Raw counts are the largest part of a trace, so metrics-only loads are faster
    (the ranks of a (dp, pp) whose counts are summed still cache theirs: the sum reads them).
    `reducers`: the per-batch sums the conversion runs (default: the metric layer's, `metric_reducers`).
    """
    reducers = reducers or metric_reducers()
    cache = prepare_cache_dir(cache_dir)
    files = expand_paths(localize(paths, cache / "objects"))  # URIs -> staged local copies
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
        conflict = file_conflict(runs.get(run.run_id), header.table_kind, header.run, path)
        if conflict:
            if strict:
                raise TraceError(conflict)
            errors.append(conflict)
            continue
        try:
            raw = expert_counts or (run.run_id, run.rank.dp, run.rank.pp) in summing
            loaded = load_file(path, header.table_kind, run, cache, rank_steps, reducers, raw)
        except TraceError as exc:
            if strict:
                raise
            errors.append(str(exc))
            continue
        if strict and not loaded.complete:
            raise TraceError(loaded.warnings[0])
        if strict and loaded.corrupt_batches:
            raise TraceError(f"{loaded.warnings[0]}; --strict refuses it")
        if strict and loaded.left_out:
            raise TraceError(f"{loaded.left_out[0]}; --strict refuses it")
        warnings.extend(loaded.warnings)
        runs.setdefault(run.run_id, LoadedRun(run.run_id)).files.append(loaded)
    if progress:
        progress(len(headers), len(headers), "")
    for loaded_run in runs.values():
        drop_duplicate_files(loaded_run, strict)
        for f in loaded_run.files:
            loaded_run.findings.extend(f.left_out)
            if f.corrupt_batches or f.rows_dropped:
                # data that never reached the views: `check` names it and the run's warnings carry it
                loaded_run.findings.extend(f.warnings)
        loaded_run.warnings.extend(loaded_run.findings)
        problem = sum_rank_counts(loaded_run, cache, reducers.step_statistics, expert_counts)
        if problem and strict:
            raise TraceError(problem)
        warnings.extend(loaded_run.warnings)
    con = duckdb.connect(config={"memory_limit": memory_limit} if memory_limit else {})
    define_views(con, runs, {"expert_step_stats": step_stats_schema(reducers.step_statistics)})
    return TraceDB(con=con, runs=runs, errors=errors, warnings=warnings, cache_dir=cache)
