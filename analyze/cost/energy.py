"""GPU energy over a time interval from `gpu_samples` (metrics.md 8.9), else TDP x time.

Per GPU, over [t0, t1] (ns, the recording host's monotonic clock):
  * energy counter (preferred): the NVML total-energy counter (mJ), linearly interpolated at the
    interval's ends, differenced. Used when the GPU's counter is present and never decreases.
  * power samples: the trapezoid integral of board power (W) over the interval, with the power
    interpolated at the ends.
Only the part of [t0, t1] that the GPU's samples cover is integrated; the rest is filled at that
GPU's mean measured power over the covered part, and `coverage` says how much was measured. A GPU
with less than `min_coverage` of the interval covered (or no samples) counts at its TDP.

All inputs are numpy arrays or a polars frame; the loop is over GPUs (a handful), never over samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

MIN_COVERAGE = 0.5
"""Below this share of the interval measured, a GPU's energy falls back to TDP x time."""


@dataclass(frozen=True)
class GpuEnergyReading:
    """One GPU's energy over the interval. method: energy_counter | power_samples | tdp | unknown."""

    gpu_uuid: str
    joules: float | None
    method: str
    coverage: float
    samples: int


@dataclass(frozen=True)
class EnergyResult:
    """Energy of the run's GPUs over [t0, t1]: total joules and how each GPU was measured."""

    duration_s: float
    joules: float | None
    """Sum over GPUs; None when some GPU has neither samples nor a TDP."""
    source: str
    """measured | tdp | partly measured (k of n GPUs) | unknown."""
    gpus: list[GpuEnergyReading] = field(default_factory=list)

    @property
    def kwh(self) -> float | None:
        return None if self.joules is None else self.joules / 3.6e6

    @property
    def mean_power_w(self) -> float | None:
        """Mean power per GPU over the interval, W."""
        if self.joules is None or not self.gpus or self.duration_s <= 0:
            return None
        return self.joules / self.duration_s / len(self.gpus)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "gpu_joules": self.joules,
            "gpu_kwh": self.kwh,
            "duration_s": self.duration_s,
            "mean_power_w_per_gpu": self.mean_power_w,
            "per_gpu": [
                {
                    "gpu_uuid": g.gpu_uuid,
                    "joules": g.joules,
                    "method": g.method,
                    "coverage": g.coverage,
                    "samples": g.samples,
                }
                for g in self.gpus
            ],
        }


def _interp_at(t: np.ndarray, y: np.ndarray, x: float) -> float:
    return float(np.interp(x, t, y))


def integrate_power_j(t_ns: np.ndarray, power_w: np.ndarray, t0_ns: float, t1_ns: float) -> float:
    """Trapezoid integral of power over [t0, t1] ∩ [t_ns[0], t_ns[-1]], joules. t_ns ascending."""
    a, b = max(float(t0_ns), float(t_ns[0])), min(float(t1_ns), float(t_ns[-1]))
    if b <= a:
        return 0.0
    inside = (t_ns > a) & (t_ns < b)
    t = np.concatenate([[a], t_ns[inside].astype(np.float64), [b]])
    p = np.concatenate([[_interp_at(t_ns, power_w, a)], power_w[inside], [_interp_at(t_ns, power_w, b)]])
    return float(np.sum((p[1:] + p[:-1]) * np.diff(t)) / 2 / 1e9)


def counter_energy_j(t_ns: np.ndarray, energy_mj: np.ndarray, t0_ns: float, t1_ns: float) -> float | None:
    """Energy-counter difference over [t0, t1] ∩ the samples' span, joules; None if the counter
    ever decreases there (driver reload / wrap)."""
    a, b = max(float(t0_ns), float(t_ns[0])), min(float(t1_ns), float(t_ns[-1]))
    if b <= a:
        return 0.0
    lo = max(int(np.searchsorted(t_ns, a, side="right")) - 1, 0)
    hi = min(int(np.searchsorted(t_ns, b, side="left")) + 1, len(t_ns))
    if np.any(np.diff(energy_mj[lo:hi]) < 0):
        return None
    return (_interp_at(t_ns, energy_mj, b) - _interp_at(t_ns, energy_mj, a)) / 1e3


def _covered_ns(t: np.ndarray, t0_ns: float, t1_ns: float) -> float:
    return max(0.0, min(t1_ns, float(t[-1])) - max(t0_ns, float(t[0]))) if len(t) >= 2 else 0.0


def _one_gpu(
    uuid: str, df: pl.DataFrame, t0_ns: float, t1_ns: float, min_coverage: float
) -> GpuEnergyReading:
    duration = t1_ns - t0_ns
    df = df.sort("t_ns")
    best_coverage = 0.0
    for method, column in (("energy_counter", "energy_mj"), ("power_samples", "power_w")):
        part = df.filter(pl.col(column).is_not_null())
        t = part["t_ns"].to_numpy().astype(np.float64)
        covered = _covered_ns(t, t0_ns, t1_ns)
        coverage = covered / duration if duration > 0 else 0.0
        best_coverage = max(best_coverage, coverage)
        if coverage < min_coverage or covered <= 0:
            continue
        y = part[column].to_numpy().astype(np.float64)
        if method == "energy_counter":
            joules = counter_energy_j(t, y, t0_ns, t1_ns)
            if joules is None:  # the counter went backwards: integrate power instead
                continue
        else:
            joules = integrate_power_j(t, y, t0_ns, t1_ns)
        # The uncovered part of the interval at this GPU's mean measured power.
        return GpuEnergyReading(uuid, joules * duration / covered, method, coverage, df.height)
    return GpuEnergyReading(uuid, None, "tdp", best_coverage, df.height)


def gpu_energy(
    samples: pl.DataFrame | None,
    t0_ns: float,
    t1_ns: float,
    *,
    gpu_uuids: Iterable[str] | None,
    num_gpus: int,
    tdp_w: float | None,
    min_coverage: float = MIN_COVERAGE,
) -> EnergyResult:
    """Energy of `num_gpus` GPUs over [t0_ns, t1_ns].

    samples: rows of `gpu_samples` (t_ns, gpu_uuid, power_w, energy_mj) or None. gpu_uuids: the
    run's GPUs (None = every GPU in the samples, padded to num_gpus with TDP). GPUs without usable
    samples count at tdp_w (None = unknown -> joules None).
    """
    duration_s = max(0.0, (t1_ns - t0_ns) / 1e9)
    wanted = list(dict.fromkeys(gpu_uuids or []))
    present: dict[str, pl.DataFrame] = {}
    if samples is not None and samples.height:
        for (uuid,), part in samples.group_by("gpu_uuid"):
            present[str(uuid)] = part
    if not wanted:
        wanted = sorted(present)[:num_gpus] if present else []
    readings = [
        _one_gpu(u, present[u], t0_ns, t1_ns, min_coverage)
        if u in present
        else GpuEnergyReading(u, None, "tdp", 0.0, 0)
        for u in wanted
    ]
    readings += [GpuEnergyReading(f"gpu{i}", None, "tdp", 0.0, 0) for i in range(len(readings), num_gpus)]
    measured = sum(1 for r in readings if r.joules is not None)
    total = 0.0
    filled = []
    for r in readings:
        if r.joules is None:
            if tdp_w is None:
                filled.append(GpuEnergyReading(r.gpu_uuid, None, "unknown", r.coverage, r.samples))
                continue
            r = GpuEnergyReading(r.gpu_uuid, tdp_w * duration_s, "tdp", r.coverage, r.samples)
        filled.append(r)
        total += r.joules or 0.0
    unknown = any(r.joules is None for r in filled)
    if unknown:
        source = "unknown"
    elif measured == len(filled):
        source = "measured"
    elif measured == 0:
        source = "tdp"
    else:
        source = f"partly measured ({measured} of {len(filled)} GPUs; TDP for the rest)"
    return EnergyResult(duration_s, None if unknown else total, source, filled)
