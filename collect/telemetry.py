"""GPU telemetry: an NVML sampler writing the `gpu_samples` table off the engine's hot path.

`GpuSampler` reads board power, the total-energy counter, SM / memory clocks, memory in use and
utilisation of each selected GPU every `interval_s` seconds on its own daemon thread and hands the
rows to a `TraceWriter` (whose own thread compresses and writes them). The serving loop never
waits for it: NVML calls go through ctypes, which releases the GIL.

Where NVML is missing (no `nvidia-ml-py`, no driver library, no GPU) the sampler is *absent*, not
an error: `start()` returns False, no file is written, and `unavailable_reason` says why. A field a
GPU does not support (e.g. the energy counter before Volta) is left null in every row; any other
NVML error nulls that field in that one row and is counted in `stats`.

Example::

    with GpuSampler(out_dir / trace_file_name(run, "gpu_samples"), run, interval_s=0.1) as sampler:
        serve_the_workload()
    print(sampler.stats)          # samples written, read errors, or why there was no NVML

Units follow the table schema: power W (NVML reports mW), energy mJ (NVML's counter since the
driver loaded), clocks MHz, memory bytes, utilisation % over NVML's last sample period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import RunMetadata, TraceWriter, WriterStats

log = logging.getLogger("moecap.collect.telemetry")

DEFAULT_INTERVAL_S = 0.1
"""Ten samples a second: enough to integrate power over steps of tens of ms; the energy counter
(preferred by the analyzer) makes the sampling rate matter little for energy."""

# (column, reader) for every per-GPU field; readers take (nvml module, handle).
_FIELDS: tuple[tuple[str, Callable[[Any, Any], Any]], ...] = (
    ("power_w", lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
    ("energy_mj", lambda nv, h: int(nv.nvmlDeviceGetTotalEnergyConsumption(h))),
    ("sm_clock_mhz", lambda nv, h: int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
    ("mem_clock_mhz", lambda nv, h: int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM))),
    ("memory_used_bytes", lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).used)),
    ("_utilization", lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h)),
)


@dataclass
class SamplerStats:
    """What a sampler did. `unavailable_reason` is set when NVML could not be used at all."""

    available: bool = False
    unavailable_reason: str | None = None
    gpus: list[str] = field(default_factory=list)
    """UUIDs of the sampled GPUs."""
    ticks: int = 0
    rows: int = 0
    read_errors: int = 0
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    """GPU UUID -> fields NVML reports as not supported (null in every row)."""
    late_ticks: int = 0
    """Ticks that started more than one interval late (the sampler fell behind)."""
    writer: WriterStats | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_nvml() -> tuple[Any | None, str | None]:
    """(the pynvml module initialised, None) or (None, why NVML cannot be used)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
        return None, f"NVML could not be initialised ({type(exc).__name__}: {exc})"
    return pynvml, None


class GpuSampler:
    """Samples NVML on a background thread into a `gpu_samples` trace file.

    path: the trace file to write (created only if NVML works); run: the run metadata the file
    carries. interval_s: seconds between samples. gpu_uuids: GPUs to sample (default: the run's
    `rank.gpu_uuids`, else its `gpus` UUIDs, else every GPU NVML sees; UUIDs NVML does not list are
    reported and skipped). nvml: an NVML module (default: `pynvml`, initialised here); tests pass a
    fake with pynvml's function names. clock: monotonic ns clock (the schema's time base).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        run: RunMetadata,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        gpu_uuids: Iterable[str] | None = None,
        nvml: Any | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        rows_per_batch: int = 256,
        flush_interval_s: float = 2.0,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.path = Path(path)
        self.run = run
        self.interval_s = float(interval_s)
        self._wanted = list(gpu_uuids) if gpu_uuids is not None else None
        self._nvml = nvml
        self._clock = clock
        self._rows_per_batch = rows_per_batch
        self._flush_interval_s = flush_interval_s
        self._writer: TraceWriter | None = None
        self._devices: list[tuple[int, str, Any]] = []
        self._unsupported: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = SamplerStats()

    @property
    def available(self) -> bool:
        return self.stats.available

    @property
    def unavailable_reason(self) -> str | None:
        return self.stats.unavailable_reason

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> bool:
        """Open NVML, pick the GPUs, write a first sample and start the thread.

        Returns False (and writes nothing) when NVML or the GPUs are unavailable; never raises for
        that. Calling start twice is an error.
        """
        if self._thread is not None or self.stats.unavailable_reason is not None:
            raise RuntimeError("GpuSampler.start() called twice")
        nvml = self._nvml
        if nvml is None:
            nvml, reason = load_nvml()
            if nvml is None:
                return self._absent(reason or "NVML unavailable")
            self._nvml = nvml
        else:
            try:
                nvml.nvmlInit()
            except Exception as exc:
                return self._absent(f"NVML could not be initialised ({type(exc).__name__}: {exc})")
        try:
            self._devices = self._select_devices(nvml)
        except Exception as exc:
            self._shutdown_nvml()
            return self._absent(f"NVML could not list GPUs ({type(exc).__name__}: {exc})")
        if not self._devices:
            self._shutdown_nvml()
            return self._absent("no GPU to sample (NVML lists none of the requested GPUs)")
        self._writer = TraceWriter(
            self.path,
            "gpu_samples",
            self.run,
            rows_per_batch=self._rows_per_batch,
            flush_interval_s=self._flush_interval_s,
        )
        self.stats.available = True
        self.stats.gpus = [uuid for _, uuid, _ in self._devices]
        self._tick()  # a sample at the start, so energy covers the whole run
        self._thread = threading.Thread(target=self._loop, name="moecap-gpu-sampler", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> SamplerStats:
        """Take a last sample, stop the thread, close the file and NVML. Idempotent."""
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._tick()  # a sample at the end, so energy covers the whole run
        if self._writer is not None:
            self.stats.writer = self._writer.close()
            self._writer = None
            self._shutdown_nvml()
        self.stats.unsupported = {u: sorted(f) for u, f in self._unsupported.items() if f}
        return self.stats

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------------
    def _absent(self, reason: str) -> bool:
        self.stats.available = False
        self.stats.unavailable_reason = reason
        log.info("moecap GPU telemetry off: %s", reason)
        return False

    def _shutdown_nvml(self) -> None:
        # Nothing to do about a failing shutdown at the end of a run.
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _default_uuids(self) -> list[str] | None:
        if self._wanted is not None:
            return self._wanted
        if self.run.rank.gpu_uuids:
            return list(self.run.rank.gpu_uuids)
        uuids = [g.uuid for g in self.run.gpus if g.uuid]
        return uuids or None

    def _select_devices(self, nvml: Any) -> list[tuple[int, str, Any]]:
        found = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            found.append((index, _text(nvml.nvmlDeviceGetUUID(handle)), handle))
        wanted = self._default_uuids()
        if wanted is None:
            return found
        by_uuid = {uuid: (i, uuid, h) for i, uuid, h in found}
        missing = [u for u in wanted if u not in by_uuid]
        if missing:
            log.warning("moecap GPU telemetry: NVML does not list %s; not sampled", ", ".join(missing))
        return [by_uuid[u] for u in wanted if u in by_uuid]

    def _loop(self) -> None:
        # Ticks on a fixed grid (start + k·interval): a slow tick delays the next, never the grid.
        start = time.monotonic()
        k = 1
        while not self._stop.wait(max(0.0, start + k * self.interval_s - time.monotonic())):
            self._tick()
            now = time.monotonic()
            behind = int((now - start) / self.interval_s)
            if behind > k:
                self.stats.late_ticks += 1
                k = behind
            k += 1

    def _tick(self) -> None:
        nvml = self._nvml
        writer = self._writer
        if writer is None:
            return
        self.stats.ticks += 1
        for index, uuid, handle in self._devices:
            row: dict[str, Any] = {"t_ns": self._clock(), "gpu_index": index, "gpu_uuid": uuid}
            skip = self._unsupported.setdefault(uuid, set())
            for name, read in _FIELDS:
                if name in skip:
                    continue
                try:
                    value = read(nvml, handle)
                except Exception as exc:
                    if getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", object()):
                        skip.add(name)
                    else:
                        self.stats.read_errors += 1
                    continue
                if name == "_utilization":
                    row["gpu_util_pct"] = float(value.gpu)
                    row["mem_util_pct"] = float(value.memory)
                else:
                    row[name] = value
            writer.write(row)
            self.stats.rows += 1
