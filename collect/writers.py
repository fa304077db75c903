"""The trace files of one recorded run: steps (+ experts) from the engine side, requests + outputs from the client side.

Engine-agnostic: an adapter hands `step(row, counts)` its rows, the workload loop hands `request(row)` and
`output(row)`. Every file flushes every `rows_per_batch` rows or `flush_interval_s` seconds, so a killed
process loses at most its last unflushed batch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from moecap.schemas import RunMetadata, TraceWriter, WriterStats, trace_file_name

from .errors import CollectError

log = logging.getLogger("moecap.collect.writers")


def prepare_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create `out` if needed and prove it is writable; a `CollectError` (one line) if not."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".moecap-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CollectError(f"--out {str(out)!r} is not a writable directory ({reason})") from None
    return path


class RunWriters:
    """Open writers for the tables of one run; `close()` returns each file's `WriterStats`."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        run: RunMetadata,
        *,
        experts: bool,
        client_tables: bool = True,
        rows_per_batch: int = 256,
        flush_interval_s: float = 1.0,
        gpu_sample_interval_s: float | None = 0.2,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.run = run
        self.client_tables = client_tables
        """Whether this process writes the run's requests + outputs (one rank of a multi-rank run does)."""
        tables = (
            ["steps"] + (["experts"] if experts else []) + (["requests", "outputs"] if client_tables else [])
        )
        self.writers: dict[str, TraceWriter] = {}
        self.steps = 0
        self.requests = 0
        self.sampler = None
        try:
            for table in tables:
                self.writers[table] = TraceWriter(
                    self.out_dir / trace_file_name(run, table),
                    table,
                    run,
                    rows_per_batch=rows_per_batch,
                    flush_interval_s=flush_interval_s,
                )
            # GPU telemetry (power, energy, clocks) for the cost model, from the process that writes the
            # run's client tables; on its own thread, and absent (no file) where NVML is missing.
            if client_tables and gpu_sample_interval_s:
                from .telemetry import GpuSampler

                self.sampler = GpuSampler(
                    self.out_dir / trace_file_name(run, "gpu_samples"), run, interval_s=gpu_sample_interval_s
                )
                self.sampler.start()
        except OSError as exc:
            self.close()
            raise CollectError(
                f"cannot write trace files in {str(self.out_dir)!r} ({exc.strerror or exc})"
            ) from None
        except BaseException:  # Ctrl-C / SIGTERM while opening: close what is open, leave no file unfinished
            self.close()
            raise

    @property
    def paths(self) -> dict[str, Path]:
        return {table: w.path for table, w in self.writers.items()}

    def step(self, row: dict[str, Any], counts: Any | None) -> None:
        """One `steps` row and, when counts are recorded, its `experts` row (same step key)."""
        self.writers["steps"].write(row)
        experts = self.writers.get("experts")
        if experts is not None and counts is not None:
            experts.write({"step": row["step"], "counts": counts})
        self.steps += 1

    def request(self, row: dict[str, Any]) -> None:
        self.writers["requests"].write(row)
        self.requests += 1

    def output(self, row: dict[str, Any]) -> None:
        self.writers["outputs"].write(row)

    def close(self) -> dict[str, WriterStats]:
        if getattr(self, "sampler", None) is not None:
            self.sampler.stop()
        return {table: w.close() for table, w in self.writers.items()}


def open_engine_writers(
    trace_dir: str, meta: RunMetadata, *, experts: bool, rows_per_batch: int, flush_interval_s: float
) -> RunWriters | None:
    """An engine process's `steps` (+ `experts`) writers, or None (logged) when they cannot be opened:
    an in-engine tracer stops tracing then, never the engine. A run id whose steps file already
    exists (a restarted engine with a pinned run id) gets this process's pid appended, in `meta` too,
    so a run is never overwritten."""
    try:
        target = os.path.join(trace_dir, trace_file_name(meta, "steps"))
        if os.path.exists(target):
            meta.run_id = f"{meta.run_id}-pid{os.getpid()}"
            log.warning("moecap: %s exists; this process writes run %s instead", target, meta.run_id)
        writers = RunWriters(
            trace_dir,
            meta,
            experts=experts,
            client_tables=False,
            rows_per_batch=rows_per_batch,
            flush_interval_s=flush_interval_s,
        )
    except Exception as exc:
        log.error("moecap: cannot open trace files in %s (%s); tracing is off", trace_dir, exc)
        return None
    log.info("moecap: tracing %s -> %s", meta.rank.tag(), trace_dir)
    return writers


class EngineTraceFiles:
    """Mixin of an in-engine tracer (vLLM worker, SGLang scheduler): `open_writers()` opens its
    `steps` (+ `experts`) files once, through `open_engine_writers`. The tracer provides `settings`
    (trace_dir, rows_per_batch, flush_interval_s), `counting`, `build_metadata()`, and starts with
    `writers = None`, `metadata = None`, `_closed = False`."""

    writers: RunWriters | None
    metadata: RunMetadata | None
    _closed: bool
    settings: Any
    counting: bool

    def build_metadata(self) -> RunMetadata:  # pragma: no cover - provided by the tracer
        raise NotImplementedError

    def open_writers(self) -> RunWriters | None:
        """This process's trace files (opened once); None when they cannot be written (tracing stops)."""
        if self.writers is not None or self._closed:
            return self.writers
        try:
            meta = self.build_metadata()
        except Exception as exc:
            log.error("moecap: cannot build the run metadata (%s); tracing is off", exc)
            self._closed = True
            return None
        self.metadata = meta
        self.writers = open_engine_writers(
            self.settings.trace_dir,
            meta,
            experts=self.counting,
            rows_per_batch=self.settings.rows_per_batch,
            flush_interval_s=self.settings.flush_interval_s,
        )
        self._closed = self.writers is None
        return self.writers


def drop_lines(stats: dict[str, WriterStats]) -> list[str]:
    """One line per table whose writer dropped rows, naming the causes (the same counts are in the
    file): for a command to print after `RunWriters.close()`."""
    lines = []
    for table, s in stats.items():
        if s.rows_dropped:
            causes = "; ".join(
                f"{d['rows']} x {d['field']}: {d['reason']}"
                + (f" (e.g. {d['example']})" if "example" in d else "")
                for d in s.drops.values()
            )
            lines.append(f"{s.path}: {s.rows_dropped} {table} row(s) dropped ({causes or 'after close'})")
    return lines
