"""The reference's GPU tables and GPU-name normalisation (MoE-CAP `hardware_utils.py`).

The tables live in `data/moecap_reference_tables.json`, copied verbatim from the reference at the
commit named there. Nothing here corrects them: reference mode reproduces what MoE-CAP publishes.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

TABLES_PATH = Path(__file__).parent / "data" / "moecap_reference_tables.json"

#: Precision strings whose peak-FLOPS row the oracle pins (the seven table sections plus the labels
#: that resolve to another section or to no section at all).
LOOKUP_PRECISIONS = (
    "float32",
    "float16",
    "bfloat16",
    "fp8",
    "int8",
    "int4",
    "fp4",
    "mxfp4",
    "nvfp4",
    "gptq",
    "awq",
)


@cache
def reference_tables() -> dict[str, Any]:
    """Every constant table of the reference, as loaded from the data file (read-only by convention)."""
    with TABLES_PATH.open(encoding="utf-8") as fh:
        tables: dict[str, Any] = json.load(fh)
    return tables


def resolve_reference_gpu(gpu: str | None) -> str | None:
    """The reference GPU key for `gpu`.

    A string that is already a key of the reference's bandwidth or price table is returned as is;
    a moecap GPU name (e.g. ``H100-SXM-80GB``) is mapped to the string the reference's
    `get_gpu_details()` records on that GPU (``NVIDIA-H100-HBM3-80GB``); anything else is returned
    unchanged, so an unknown GPU behaves as in the reference (bandwidth and peak 0, no price).
    """
    if gpu is None:
        return None
    t = reference_tables()
    if gpu in t["MEM_BW_DICT"] or gpu in t["GPU_COST_DICT"]:
        return gpu
    aliased: str = t["GPU_ALIASES"].get(gpu, gpu)
    return aliased


def reference_peak_bw(gpu: str | None) -> float:
    """Peak memory bandwidth in bytes/s (`get_peak_bw`); 0 for an unknown GPU or None."""
    if gpu is None:
        return 0
    value: float = reference_tables()["MEM_BW_DICT"].get(gpu, 0)
    return value


def reference_peak_flops(gpu: str | None, precision: str | None) -> float:
    """Peak tensor FLOP/s from the table section named by `precision` (`get_peak_flops`).

    `mxfp4` reads the `fp4` section; a precision without a section (`awq`, `gptq`, `nvfp4`, ...) or an
    unknown GPU gives 0, as in the reference.
    """
    if gpu is None:
        return 0
    t = reference_tables()
    section = t["PRECISION_ALIASES"].get(precision, precision)
    value: float = t["PEAK_FLOPS_DICT"].get(section, {}).get(gpu, 0)
    return value


def reference_hardware_lookup(gpu: str) -> dict[str, float]:
    """`peak_bw` (bytes/s) and `peak_flops[<precision>]` (FLOP/s) for every precision in LOOKUP_PRECISIONS.

    `gpu` is used exactly as given (no alias mapping), like the reference's lookups.
    """
    out: dict[str, float] = {"peak_bw": reference_peak_bw(gpu)}
    for p in LOOKUP_PRECISIONS:
        out[f"peak_flops[{p}]"] = reference_peak_flops(gpu, p)
    return out


def reference_gpu_raw_type(torch_name: str, mem_mib: float | str | None) -> str:
    """The reference's `gpu_raw_type` string for a GPU, as `get_gpu_details()` builds it.

    `torch_name` is the device name as GPUtil / nvidia-smi report it (``NVIDIA H100 80GB HBM3``),
    `mem_mib` its total memory in MiB. Spaces become dashes, every ``-NNGB`` part is removed, and
    ``-<round(MiB/1024)>GB`` is appended (Python's round, half to even); memory that is missing,
    not a number, NaN or <= 0 gives ``-UnknownGB`` (the GB10 case).
    """
    name = torch_name.replace(" ", "-")
    try:
        total = float(mem_mib)  # type: ignore[arg-type]
        if math.isnan(total) or total <= 0:
            raise ValueError(mem_mib)
        memory = f"{round(total / 1024)}GB"
    except (TypeError, ValueError, OverflowError):
        # OverflowError (infinite memory) would escape the reference; we treat it as unknown too.
        memory = "UnknownGB"
    # The reference iterates over the parts of the *original* name while editing the name itself.
    for part in name.split("-"):
        if part.endswith("GB") and part[:-2].isdigit():
            name = name.replace(f"-{part}", "").replace(part, "")
    return f"{name}-{memory}"
