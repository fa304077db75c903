"""GPU telemetry sampler (collect/telemetry.py): the absent-NVML path for real, the sampling loop
against a fake NVML that has pynvml's function names, arguments and return types."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pynvml
import pytest

from moecap.collect.telemetry import GpuSampler, load_nvml
from moecap.schemas import GpuInfo, read_trace_file, trace_file_name

# -- a fake NVML ------------------------------------------------------------------------------------
# Return types are what nvidia-ml-py returns: ints (mW, mJ, MHz), `str` UUIDs (its convertStrBytes
# decorator decodes them), the ctypes structs c_nvmlMemory_t / c_nvmlUtilization_t, and errors raised
# as pynvml.NVMLError(code) (which builds the code's subclass, e.g. NVMLError_NotSupported). Each fake
# GPU draws a constant power and its energy counter is the exact integral of it on the given clock.


@dataclass
class FakeGpu:
    uuid: str
    power_w: float = 300.0
    energy_start_mj: int = 1_000_000_000
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    memory_total: int = 80 * 2**30
    memory_used: int = 20 * 2**30
    util_gpu: int = 87
    util_mem: int = 41
    unsupported: set[str] = field(default_factory=set)
    """pynvml function names that raise NVMLError_NotSupported on this GPU."""
    fail_once: set[str] = field(default_factory=set)
    """pynvml function names that raise NVMLError_Unknown on their next call only."""
    read_delay_s: float = 0.0


class FakeNVML:
    """Stands in for the `pynvml` module (only what moecap's sampler and runtime call)."""

    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        gpus: list[FakeGpu],
        clock: Callable[[], int] = time.monotonic_ns,
        *,
        init_error: int | None = None,
    ) -> None:
        self.gpus = gpus
        self.clock = clock
        self.t0_ns = clock()
        self.init_error = init_error
        self.initialised = 0
        self.calls: list[str] = []

    # -- library ----------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if self.initialised <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    # -- per device -------------------------------------------------------------------------------
    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._check("nvmlDeviceGetUUID", handle)
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._check("nvmlDeviceGetName", handle)
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._check("nvmlDeviceGetPowerUsage", handle)
        return round(handle.power_w * 1000)  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        self._check("nvmlDeviceGetTotalEnergyConsumption", handle)
        elapsed_s = (self.clock() - self.t0_ns) / 1e9
        return handle.energy_start_mj + round(handle.power_w * elapsed_s * 1000)  # millijoules

    def nvmlDeviceGetClockInfo(self, handle: FakeGpu, type: int) -> int:
        self._check("nvmlDeviceGetClockInfo", handle)
        if type == pynvml.NVML_CLOCK_SM:
            return handle.sm_clock_mhz
        if type == pynvml.NVML_CLOCK_MEM:
            return handle.mem_clock_mhz
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: int | None = None) -> pynvml.c_nvmlMemory_t:
        self._check("nvmlDeviceGetMemoryInfo", handle)
        info = pynvml.c_nvmlMemory_t()
        info.total = handle.memory_total
        info.used = handle.memory_used
        info.free = handle.memory_total - handle.memory_used
        return info

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> pynvml.c_nvmlUtilization_t:
        self._check("nvmlDeviceGetUtilizationRates", handle)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = handle.util_gpu
        util.memory = handle.util_mem
        return util

    def _check(self, name: str, handle: FakeGpu | None = None) -> None:
        self.calls.append(name)
        if self.initialised <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return
        if handle.read_delay_s:
            time.sleep(handle.read_delay_s)
        if name in handle.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if name in handle.fail_once:
            handle.fail_once.discard(name)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)


def _sample_for(sampler: GpuSampler, seconds: float) -> None:
    assert sampler.start()
    time.sleep(seconds)
    sampler.stop()


def _rows(path) -> list[dict]:
    return read_trace_file(path).table.to_pylist()


# -- the fake is faithful to pynvml ----------------------------------------------------------------
def test_fake_nvml_uses_only_names_that_pynvml_has(tmp_path, run_meta):
    fake = FakeNVML([FakeGpu("GPU-a")])
    _sample_for(GpuSampler(tmp_path / "s.arrow", run_meta, interval_s=0.01, nvml=fake), 0.03)
    called = set(fake.calls)
    assert {"nvmlInit", "nvmlShutdown", "nvmlDeviceGetTotalEnergyConsumption"} <= called
    for name in called | {"NVML_CLOCK_SM", "NVML_CLOCK_MEM", "NVML_ERROR_NOT_SUPPORTED"}:
        assert hasattr(pynvml, name), name
    # Same argument names as the real functions (the sampler may pass them by keyword one day).
    import inspect

    for name in called:
        real = inspect.signature(getattr(pynvml, name)).parameters
        ours = inspect.signature(getattr(fake, name)).parameters
        assert list(ours)[: len(real)] == list(real), name


# -- absent NVML -------------------------------------------------------------------------------------
def test_absent_nvml_for_real_writes_nothing_and_says_why(tmp_path, run_meta):
    nvml, _ = load_nvml()
    if nvml is not None:
        nvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    path = tmp_path / trace_file_name(run_meta, "gpu_samples")
    sampler = GpuSampler(path, run_meta)
    assert sampler.start() is False
    assert not sampler.available
    assert "NVML" in sampler.unavailable_reason
    stats = sampler.stop()  # stop after a failed start is harmless
    assert stats.rows == 0 and stats.writer is None
    assert not path.exists()
    assert not [t for t in threading.enumerate() if t.name == "moecap-gpu-sampler"]


def test_missing_nvidia_ml_py_is_absent_not_an_error(tmp_path, run_meta, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    sampler = GpuSampler(tmp_path / "s.arrow", run_meta)
    assert sampler.start() is False
    assert "nvidia-ml-py" in sampler.unavailable_reason
    assert not (tmp_path / "s.arrow").exists()


def test_nvml_init_failure_is_absent(tmp_path, run_meta):
    fake = FakeNVML([FakeGpu("GPU-a")], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    sampler = GpuSampler(tmp_path / "s.arrow", run_meta, nvml=fake)
    assert sampler.start() is False
    assert "Driver Not Loaded" in sampler.unavailable_reason
    assert not (tmp_path / "s.arrow").exists()


def test_requested_gpu_that_nvml_lacks_is_absent(tmp_path, run_meta):
    fake = FakeNVML([FakeGpu("GPU-a")])
    sampler = GpuSampler(tmp_path / "s.arrow", run_meta, nvml=fake, gpu_uuids=["GPU-zzz"])
    assert sampler.start() is False
    assert "no GPU to sample" in sampler.unavailable_reason
    assert fake.initialised == 0  # NVML shut down again


# -- the sampling loop -------------------------------------------------------------------------------
def test_samples_every_gpu_on_its_own_thread_with_units_of_the_schema(tmp_path, run_meta):
    gpus = [FakeGpu("GPU-a", power_w=312.5), FakeGpu("GPU-b", power_w=95.25, memory_used=7 * 2**30)]
    fake = FakeNVML(gpus)
    path = tmp_path / trace_file_name(run_meta, "gpu_samples")
    sampler = GpuSampler(path, run_meta, interval_s=0.01, nvml=fake)
    assert sampler.start()
    assert [t for t in threading.enumerate() if t.name == "moecap-gpu-sampler"]
    time.sleep(0.2)
    stats = sampler.stop()
    assert not [t for t in threading.enumerate() if t.name == "moecap-gpu-sampler"]
    assert fake.initialised == 0
    tf = read_trace_file(path)
    assert tf.table_kind == "gpu_samples" and tf.complete and tf.run.run_id == run_meta.run_id
    rows = tf.table.to_pylist()
    assert stats.rows == len(rows) and stats.writer.rows_written == len(rows)
    by_gpu = {u: [r for r in rows if r["gpu_uuid"] == u] for u in ("GPU-a", "GPU-b")}
    # ~20 ticks in 0.2 s plus the start and stop samples; a loaded CI box may fall behind a little.
    assert all(len(r) >= 8 for r in by_gpu.values()), {u: len(r) for u, r in by_gpu.items()}
    a, b = by_gpu["GPU-a"], by_gpu["GPU-b"]
    assert {r["gpu_index"] for r in a} == {0} and {r["gpu_index"] for r in b} == {1}
    assert {r["power_w"] for r in a} == {312.5}  # NVML mW -> W
    assert {r["sm_clock_mhz"] for r in a} == {1980} and {r["mem_clock_mhz"] for r in a} == {2619}
    assert {r["memory_used_bytes"] for r in b} == {7 * 2**30}
    assert {(r["gpu_util_pct"], r["mem_util_pct"]) for r in a} == {(87.0, 41.0)}
    for series in (a, b):
        t = [r["t_ns"] for r in series]
        assert t == sorted(t)
        assert t[-1] - t[0] >= 0.19e9  # first sample at start, last at stop
    # Energy counter (mJ) grows by power x time between samples.
    for series, gpu in ((a, gpus[0]), (b, gpus[1])):
        de = series[-1]["energy_mj"] - series[0]["energy_mj"]
        dt = (series[-1]["t_ns"] - series[0]["t_ns"]) / 1e9
        assert de == pytest.approx(gpu.power_w * dt * 1000, rel=0.05)


def test_unsupported_field_is_null_everywhere_and_a_transient_error_only_once(tmp_path, run_meta):
    gpu = FakeGpu(
        "GPU-a",
        unsupported={"nvmlDeviceGetTotalEnergyConsumption"},
        fail_once={"nvmlDeviceGetPowerUsage"},
    )
    fake = FakeNVML([gpu])
    sampler = GpuSampler(tmp_path / "s.arrow", run_meta, interval_s=0.01, nvml=fake)
    _sample_for(sampler, 0.05)
    rows = _rows(tmp_path / "s.arrow")
    assert len(rows) >= 3
    assert all(r["energy_mj"] is None for r in rows)
    assert [r["power_w"] is None for r in rows].count(True) == 1
    assert rows[0]["power_w"] is None  # the first read failed; later ones succeeded
    assert sampler.stats.unsupported == {"GPU-a": ["energy_mj"]}
    assert sampler.stats.read_errors == 1
    # A not-supported field is asked once, not on every tick.
    assert fake.calls.count("nvmlDeviceGetTotalEnergyConsumption") == 1


def test_samples_the_runs_gpus_by_uuid(tmp_path, run_meta):
    fake = FakeNVML([FakeGpu("GPU-a"), FakeGpu("GPU-b"), FakeGpu("GPU-c")])
    run = run_meta.with_rank(gpu_uuids=["GPU-c"])
    _sample_for(GpuSampler(tmp_path / "s.arrow", run, interval_s=0.01, nvml=fake), 0.03)
    rows = _rows(tmp_path / "s.arrow")
    assert {(r["gpu_index"], r["gpu_uuid"]) for r in rows} == {(2, "GPU-c")}

    run_meta.gpus = [GpuInfo(index=0, name="H100", uuid="GPU-b")]
    _sample_for(GpuSampler(tmp_path / "t.arrow", run_meta, interval_s=0.01, nvml=fake), 0.03)
    assert {r["gpu_uuid"] for r in _rows(tmp_path / "t.arrow")} == {"GPU-b"}


def test_slow_nvml_delays_the_sampler_not_the_caller(tmp_path, run_meta):
    fake = FakeNVML([FakeGpu("GPU-a", read_delay_s=0.01)])  # 6 reads -> ~60 ms per tick
    sampler = GpuSampler(tmp_path / "s.arrow", run_meta, interval_s=0.01, nvml=fake)
    assert sampler.start()
    t0 = time.perf_counter()
    work = sum(i * i for i in range(200_000))  # the "engine" keeps running meanwhile
    caller_s = time.perf_counter() - t0
    time.sleep(0.25)
    stats = sampler.stop()
    assert work > 0 and caller_s < 0.25
    assert stats.late_ticks >= 1  # it fell behind its 10 ms grid and said so
    assert stats.rows >= 3


def test_interval_must_be_positive(tmp_path, run_meta):
    with pytest.raises(ValueError, match="interval_s"):
        GpuSampler(tmp_path / "s.arrow", run_meta, interval_s=0)
