"""What loading found, per trace file (`LoadedFile`) and per run (`LoadedRun`), and which of a run's
files feed the views (the rank rules of `moecap.analyze.load`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecap.schemas import RunMetadata

RANK_COLUMNS = ("run_id", "dp", "pp", "tp", "ep")
"""The identity columns every cached table starts with."""


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
    corrupt_batches: int = 0
    """Record batches the reader found damaged (checksum, validation) and left out."""
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
        return [f for f in self.files_of("steps") if is_recorder(f, self.files_of("steps"))]

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


def is_recorder(f: LoadedFile, steps_files: list[LoadedFile]) -> bool:
    same_stage = [g for g in steps_files if (g.run.rank.dp, g.run.rank.pp) == (f.run.rank.dp, f.run.rank.pp)]
    return f.run.rank.tp == min(g.run.rank.tp for g in same_stage)
