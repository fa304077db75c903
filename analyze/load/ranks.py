"""Which of a run's files feed the views: the reader's consistency checks, duplicate files left out,
and the element-wise sum of the expert counts of ranks that each counted their own share (the rank
rules of `moecap.analyze.load`). The sum is cached like a converted file, keyed by all its files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moecap.schemas import RunMetadata, TraceError, file_name_error, mixed_run_error_among

from .cache import CACHE_LAYOUT, ParquetSink, identity_of, identity_schema, with_identity
from .convert import file_layer_ids, read_phase_map
from .expert_pass import ExpertSummary, StepStatistics
from .runs import LoadedFile, LoadedRun
from .views import listing


def file_conflict(existing: LoadedRun | None, kind: str, run: RunMetadata, path: Path) -> str | None:
    """The reader's own consistency checks (file name vs metadata; one run id, one run)."""
    named = file_name_error(path, kind, run)
    if named:
        return named
    if existing is None or not existing.files:
        return None
    return mixed_run_error_among([(f.run, f.path) for f in existing.files], run, path)


def drop_duplicate_files(run: LoadedRun, strict: bool) -> None:
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
    from ..validity import KEYS

    key = KEYS.get(f.table_kind)
    view = {"steps": "step_scalars", "experts": "expert_step_stats"}.get(f.table_kind, f.table_kind)
    if key is None or view not in f.parquet or view not in kept.parquet:
        return f.rows
    mine = pq.read_table(f.parquet[view], columns=[key]).column(key).combine_chunks()
    theirs = pq.read_table(kept.parquet[view], columns=[key]).column(key).combine_chunks()
    return int(pc.sum(pc.invert(pc.is_in(mine, value_set=theirs))).as_py() or 0)


# -- ranks that each counted their own share: summed ---------------------------------------------
SUM_OVER_RANKS = "sum_over_ranks"
SUM_BLOCK_VALUES = 1 << 22
"""Count values summed per block (32 MB of int64 sums): bounds memory whatever the trace length."""


def counts_scope(run: RunMetadata) -> str:
    """How a rank's expert counts relate to the other ranks of its (dp, pp), from
    `run.extra.<engine>.counts_scope`: `sum_over_ranks` (each rank counted only its own share, e.g.
    SGLang under an all-to-all MoE backend) or `replicated` (each counted every token: TP duplicates;
    also when the metadata does not say)."""
    block = (run.extra or {}).get(run.engine.name)
    scope = block.get("counts_scope") if isinstance(block, dict) else None
    return str(scope) if scope else "replicated"


def sum_rank_counts(
    run: LoadedRun, cache: Path, step_statistics: StepStatistics, write_raw: bool = True
) -> str | None:
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
        layouts = {(tuple(file_layer_ids(f.run)), int(f.run.moe.num_experts)) for f in experts}
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
        summed, lacking = _load_rank_sum(experts, ranks, recorder, cache, step_statistics, write_raw)
        run.summed.append(summed)
        run.warnings.extend(_left_out_warnings(label, summed, experts, lacking))
        if recorder is not None:
            run.warnings.extend(_composition_warnings(label, recorder, steps_files))
    return problem


def _load_rank_sum(
    experts: list[LoadedFile],
    ranks: list[int],
    recorder: LoadedFile | None,
    cache: Path,
    step_statistics: StepStatistics,
    write_raw: bool,
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
        phase_map = read_phase_map(recorder.parquet["step_scalars"]) if recorder else None
        by_rank = {f.run.rank.tp: f for f in experts}
        out, union, summed_steps, lacking = _sum_counts(
            [by_rank.get(t) for t in ranks],
            ident_run,
            identity_of(ident_run),
            phase_map,
            cache,
            key,
            step_statistics,
            write_raw,
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
    steps, phases = read_phase_map(step_scalars)
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
    step_statistics: StepStatistics,
    write_raw: bool,
) -> tuple[dict[str, Path], int, int, list[list[int]]]:
    """Sum the ranks' cached raw counts (`files`, None for a rank without an experts file) over the
    steps every rank recorded, block by block in step order, and summarise the sums. Returns (parquet
    by view, steps any rank recorded, steps summed, per rank [steps it lacks, first, last])."""
    n_experts = max(1, int(run.moe.num_experts))
    layer_ids = np.asarray(file_layer_ids(run), dtype=np.int32)
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
    summary = ExpertSummary(
        identity, layer_ids, n_experts, phase_map, cache / f"{key}.expert_step_stats.parquet", step_statistics
    )
    raw_sink = ParquetSink(cache / f"{key}.experts.parquet") if write_raw else None
    if width and len(common):
        rows = max(1, SUM_BLOCK_VALUES // width)
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
                    with_identity(pa.record_batch({"step": pa.array(keys), "counts": counts}), identity)
                )
    out = summary.close(cache / f"{key}.expert_totals.parquet")
    if raw_sink is not None:
        schema = pa.schema([pa.field("step", pa.int64()), pa.field("counts", pa.list_(pa.int32()))])
        out["experts"] = raw_sink.close(identity_schema(schema))
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
            query = f"SELECT step, counts FROM read_parquet({listing([str(parquet)])}) ORDER BY step"
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
