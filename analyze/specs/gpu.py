"""GPU specs from the bundled, sourced table (data/gpus.yaml) plus optional user YAML overrides.

`resolve_gpu(name)` accepts table names ("H100-SXM-80GB"), short names ("H100", "h200", "B200",
"A100-80GB"), what torch.cuda.get_device_name() / nvidia-smi print ("NVIDIA H100 80GB HBM3") and
MoE-CAP `gpu_raw_type` keys ("NVIDIA-H200-140GB"). Matching is by the `aliases:` lists of the
table, after `normalize_gpu_name`; there is no per-GPU code here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, SpecError
from .quant import normalize_dtype

#: The YAML loader for the files shipped with moecap: libyaml's safe loader where PyYAML was built with it
#: (~10x faster: 25 ms -> 3 ms for gpus.yaml, paid by every command that resolves a GPU), else PyYAML's
#: own. Both build the same objects from these files (tests/analyze/specs/test_bundled_yaml.py); files
#: users write still go through `yaml.safe_load`, whose error messages the one-line errors quote.
BUNDLED_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Dtype keys of `tflops_dense` in the table.
FLOPS_DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")
_REQUIRED = ("name", "memory_gb", "memory_bandwidth_tb_s", "tflops_dense")
_KNOWN = (*_REQUIRED, "aliases", "vendor", "arch", "tdp_w", "price_usd", "usd_per_gpu_hour", "source")


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model, per GPU.

    memory_bytes: marketed capacity in decimal bytes (memory_gb × 1e9; nvidia-smi shows less).
    memory_bandwidth: peak memory bandwidth, bytes/s.
    dense_flops: peak dense (no 2:4 sparsity) tensor FLOP/s per dtype (OP/s for int8); None where
        the GPU lacks the dtype or no figure is published. fp32 is the non-tensor peak.
    tdp_w: max board power, W. price_usd: purchase price per GPU, $; usd_per_gpu_hour: cloud
        price, $/GPU-hour (None unless the table or an override gives them).
    extra: every other field of the entry (interconnect, mamf_* measured matmul peaks, ...).
    """

    name: str
    memory_bytes: int
    memory_bandwidth: float
    dense_flops: Mapping[str, float | None]
    tdp_w: float | None = None
    price_usd: float | None = None
    usd_per_gpu_hour: float | None = None
    vendor: str | None = None
    arch: str | None = None
    source: str | None = None
    aliases: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def peak_flops(self, dtype: str, *, fallback: str | None = None) -> float:
        """Dense peak FLOP/s for GEMMs whose inputs are `dtype` (bf16, fp16, fp8, int8, fp4, tf32, fp32).

        If the GPU has no figure for `dtype` and `fallback` is given, the fallback dtype's peak is
        returned (e.g. an fp8 checkpoint on A100 runs weight-only, at the bf16 peak); otherwise
        SpecError.
        """
        key = dtype if dtype == "tf32" else normalize_dtype(dtype)
        value = self.dense_flops.get(key)
        if value is None and fallback is not None:
            return self.peak_flops(fallback)
        if value is None:
            raise SpecError(f"GPU {self.name} has no dense {key} peak in the GPU table")
        return value


def normalize_gpu_name(name: str) -> str:
    """Canonical lookup key: upper case, runs of spaces/underscores/dashes as one '-', and a
    leading vendor word ("NVIDIA", "AMD") dropped. "NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3"."""
    key = re.sub(r"[\s_\-]+", "-", str(name).strip().upper()).strip("-")
    return re.sub(r"^(NVIDIA|AMD)-", "", key)


def _number(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field {key} must be a number, got {value!r}")
    # A NaN, an infinity or a non-positive rate, size or price makes every figure computed from it
    # meaningless (and a non-finite value's repr is not SQL): refused, not carried into the metrics.
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: field {key} must be a finite number above 0, got {value!r}")
    return float(value)


def _parse_entry(entry: Any, where: str) -> GpuSpec:
    if not isinstance(entry, Mapping):
        raise InputError(f"{where}: each entry of `gpus` must be a mapping, got {entry!r}")
    missing = [k for k in _REQUIRED if entry.get(k) is None]
    if missing:
        raise InputError(
            f"{where}: GPU entry {entry.get('name', '?')!r} lacks field(s): {', '.join(missing)}"
        )
    name = str(entry["name"])
    where = f"{where}: GPU {name}"
    flops = entry["tflops_dense"]
    if not isinstance(flops, Mapping):
        raise InputError(f"{where}: tflops_dense must be a mapping of dtype to TFLOP/s")
    unknown = sorted(set(flops) - set(FLOPS_DTYPES))
    if unknown:
        raise InputError(
            f"{where}: unknown tflops_dense dtype(s) {unknown}; known: {', '.join(FLOPS_DTYPES)}"
        )
    dense: dict[str, float | None] = {}
    for dtype in FLOPS_DTYPES:
        tflops = _number(flops, dtype, f"{where}: tflops_dense")
        dense[dtype] = None if tflops is None else tflops * 1e12
    memory_gb = _number(entry, "memory_gb", where)
    bandwidth = _number(entry, "memory_bandwidth_tb_s", where)
    assert memory_gb is not None and bandwidth is not None  # checked by _REQUIRED
    aliases = entry.get("aliases") or []
    if isinstance(aliases, str) or not isinstance(aliases, list):
        raise InputError(f"{where}: aliases must be a list of names")
    return GpuSpec(
        name=name,
        memory_bytes=round(memory_gb * 1e9),
        memory_bandwidth=bandwidth * 1e12,
        dense_flops=dense,
        tdp_w=_number(entry, "tdp_w", where),
        price_usd=_number(entry, "price_usd", where),
        usd_per_gpu_hour=_number(entry, "usd_per_gpu_hour", where),
        vendor=None if entry.get("vendor") is None else str(entry["vendor"]),
        arch=None if entry.get("arch") is None else str(entry["arch"]),
        source=None if entry.get("source") is None else str(entry["source"]),
        aliases=tuple(str(a) for a in aliases),
        extra={k: v for k, v in entry.items() if k not in _KNOWN},
    )


def _parse_table(data: Any, where: str) -> list[GpuSpec]:
    entries = data.get("gpus") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise InputError(f"{where}: expected a top-level `gpus:` list of GPU entries")
    return [_parse_entry(e, f"{where} entry {i}") for i, e in enumerate(entries)]


@functools.cache
def _bundled() -> tuple[GpuSpec, ...]:
    text = resources.files("moecap.analyze.specs.data").joinpath("gpus.yaml").read_text(encoding="utf-8")
    return tuple(_parse_table(yaml.load(text, Loader=BUNDLED_YAML_LOADER), "bundled gpus.yaml"))


def _keys(spec: GpuSpec) -> set[str]:
    return {normalize_gpu_name(n) for n in (spec.name, *spec.aliases)}


def _load_overrides(path: str | Path) -> list[GpuSpec]:
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read GPU override file {path}: {exc}") from None
    return _parse_table(data, str(path))


def gpu_table(overrides_yaml: str | Path | None = None) -> dict[str, GpuSpec]:
    """All GPU specs by name: the bundled table, then the entries of `overrides_yaml` (a path to a
    YAML file with a `gpus:` list laid out like data/gpus.yaml). An override whose name or alias
    matches a bundled entry replaces it (the bundled aliases still lead to it); others are added."""
    specs = list(_bundled())
    for new in _load_overrides(overrides_yaml) if overrides_yaml is not None else []:
        new_keys = _keys(new)
        replaced = [s for s in specs if _keys(s) & new_keys]
        inherited = tuple(a for s in replaced for a in (s.name, *s.aliases))
        specs = [s for s in specs if s not in replaced]
        specs.append(dataclasses.replace(new, aliases=tuple(dict.fromkeys(new.aliases + inherited))))
    return {s.name: s for s in specs}


def gpu_names(overrides_yaml: str | Path | None = None) -> list[str]:
    """Names of the GPUs in the table (with overrides applied)."""
    return sorted(gpu_table(overrides_yaml), key=str.casefold)


def resolve_gpu(name: str, *, overrides_yaml: str | Path | None = None) -> GpuSpec:
    """The GpuSpec a GPU name stands for (see the module docstring for accepted spellings).

    Raises SpecError naming the known GPUs when nothing matches, InputError for a bad override file.
    """
    key = normalize_gpu_name(name)
    table = gpu_table(overrides_yaml)
    # Overrides come last in the table, so on a shared alias the user's entry wins.
    match = None
    for spec in table.values():
        if key in _keys(spec):
            match = spec
    if match is None:
        raise SpecError(
            f"unknown GPU {name!r}; known: {', '.join(gpu_names(overrides_yaml))}. "
            "To use another GPU, pass a YAML file with a `gpus:` list (fields as in "
            "moecap/analyze/specs/data/gpus.yaml: name, memory_gb, memory_bandwidth_tb_s, tflops_dense, ...) "
            "(moecap-analyze --gpu-overrides FILE)"
        )
    return match
