"""Facts about the live process for the run metadata: GPUs, driver, package versions, git revision.

Everything here is best effort and never raises: a missing NVML, a CPU-only host or a source tree
without git just leaves the field empty. The exception: the torch.distributed collectives at the end
(`tp_group`, `gather_from_ranks`, `broadcast_from_rank0`), which every rank of a multi-GPU run calls at
the same point and which fail as the process group fails.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moecap.schemas import GpuInfo

_PACKAGES = ("moecap", "torch", "transformers", "pyarrow", "numpy", "vllm", "sglang", "nvidia-ml-py")


def parse_release(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a release string; local and pre-release parts are ignored
    ('0.26.0+cu130' -> (0, 26, 0), '0.34.0rc1' -> (0, 34, 0), '0.5.16.post1' -> (0, 5, 16))."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def release_problem(
    label: str, version: str, lowest: tuple[int, int, int], highest: tuple[int, int, int], consequence: str
) -> str | None:
    """Why engine release `version` is outside [`lowest`, `highest`] (one line ending in `consequence`),
    or None inside; shared by the engine adapters' version checks."""
    supported = f"{'.'.join(map(str, lowest))} – {'.'.join(map(str, highest))}"
    try:
        v = parse_release(version)
    except ValueError:
        return (
            f"{label} version {version!r} is not a release this adapter understands (supported: {supported})"
        )
    if v < lowest or v > highest:
        return f"{label} {version} is outside the range the moecap {label} adapter supports ({supported}); {consequence}"
    return None


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a run (absent ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def collector_version() -> str:
    try:
        return importlib.metadata.version("moecap")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree on PYTHONPATH
        return "0+unknown"


def git_revision(start: str | Path | None = None) -> str | None:
    """`git describe --always --dirty` of the source tree holding this package, or None."""
    here = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def _nvml_info() -> tuple[str, dict[int, dict[str, Any]]]:
    """(driver version, {cuda index: {uuid, name, memory_bytes}}) from NVML, or ("", {})."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return "", {}
    try:
        pynvml.nvmlInit()
    except Exception:
        return "", {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        found: dict[int, dict[str, Any]] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = pynvml.nvmlDeviceGetName(h)
            found[i] = {
                "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            }
        return driver, found
    except Exception:
        return "", {}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def gpu_infos() -> list[GpuInfo]:
    """One `GpuInfo` per CUDA device visible to torch (name, UUID, memory, driver); [] without CUDA.

    NVML indexes all GPUs of the host while torch sees CUDA_VISIBLE_DEVICES; the two are joined by
    UUID (torch >= 2.1 reports it), falling back to the index.
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    driver, nvml = _nvml_info()
    by_uuid = {v["uuid"]: v for v in nvml.values()}
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid and not uuid.startswith("GPU-"):
            uuid = f"GPU-{uuid}"
        info = by_uuid.get(uuid) or nvml.get(i) or {}
        gpus.append(
            GpuInfo(
                index=i,
                name=str(info.get("name") or props.name),
                uuid=str(info.get("uuid") or uuid),
                memory_bytes=int(info.get("memory_bytes") or props.total_memory),
                driver=driver,
            )
        )
    return gpus


def host_cpu() -> dict[str, Any]:
    """The host's CPU model and logical CPU count: step times of a host-bound engine depend on it, so
    comparing runs on two machines needs it (`RunMetadata.extra["host_cpu"]`)."""
    info: dict[str, Any] = {"logical_cpus": os.cpu_count(), "machine": platform.machine()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
    if "model" not in info and platform.processor():
        info["model"] = platform.processor()
    return info


def host_facts() -> dict[str, Any]:
    """Package versions, git revision, the torch/CUDA build and the host CPU, for `RunMetadata.extra`."""
    facts: dict[str, Any] = {"packages": package_versions(), "host_cpu": host_cpu()}
    rev = git_revision()
    if rev:
        facts["git_rev"] = rev
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return facts


# -- several ranks (torch.distributed) ------------------------------------------------------------
@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group (every rank of the job is one TP rank)."""

    size: int
    rank: int
    gpus: list[GpuInfo]
    """Each rank's GPU, in rank order ([] on CPUs)."""
    backend: str


def local_gpu(device: Any) -> GpuInfo | None:
    """The GPU this process computes on (`device`, a torch device), or None on a CPU."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    for gpu in gpu_infos():
        if gpu.index == index:
            return gpu
    return None


def tp_group(device: Any) -> TPGroup | None:
    """The TP group of this process when torch.distributed runs with more than one rank, else None.

    A collective: every rank must call it, at the same point. It gathers each rank's GPU (so each
    rank's files list all of the group's GPUs by UUID)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    mine = local_gpu(device)
    gathered = gather_from_ranks(asdict(mine) if mine is not None else None)
    gpus = [GpuInfo(**g) for g in gathered if g]
    return TPGroup(
        size=dist.get_world_size(), rank=dist.get_rank(), gpus=gpus, backend=str(dist.get_backend())
    )


def gather_from_ranks(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a collective; [obj] without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective; `obj` itself without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
