"""Steps that took far longer than their peers: kernel compilation (Triton JIT of an MoE kernel for a shape
met for the first time, ~1 s on an H100), a CUDA-graph capture, an allocator growth — one-off costs a
benchmark should keep out of its window (`moecap-collect run --warmup`).

Rule (per recording rank, i.e. per (dp, pp, tp) stream of steps): a step's duration is its GPU span
(`gpu_end_ns - gpu_start_ns`), else its host span; its cost is that duration for decode / verify / idle
steps (flat in the batch size) and duration per token for prefill / mixed steps (which scale with the
tokens they compute). A step is named when its cost is at least `FACTOR` x the median cost of its phase on
that rank AND its duration exceeds the phase's typical duration (median cost, times its tokens where per
token) by at least `MIN_EXCESS_MS` — so a 16k-token prefill among 256-token ones is not named (same cost
per token), a 1.3 s JIT step among 12 ms decodes is. Phases with fewer than `MIN_PEERS` steps on a rank
are not judged (no median to speak of).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FACTOR = 10.0
MIN_EXCESS_MS = 100.0
MIN_PEERS = 5
PER_TOKEN_PHASES = ("prefill", "mixed")


@dataclass(frozen=True)
class SlowStep:
    rank: str
    step: int
    phase: str
    duration_ms: float
    typical_ms: float
    """What a step of this phase and size usually takes on this rank (the phase median, scaled)."""


def _duration_ms(row: Mapping[str, Any]) -> float | None:
    if row.get("gpu_start_ns") is not None and row.get("gpu_end_ns") is not None:
        return (row["gpu_end_ns"] - row["gpu_start_ns"]) / 1e6
    if row.get("t_start_ns") is not None and row.get("t_end_ns") is not None:
        return (row["t_end_ns"] - row["t_start_ns"]) / 1e6
    return None


def slow_steps(rows: Iterable[Mapping[str, Any]]) -> list[SlowStep]:
    """The steps the module docstring's rule names, in rank and step order. `rows`: `steps` rows (dp, pp,
    tp, step, phase, num_tokens, gpu/host start and end ns)."""
    groups: dict[tuple[str, str], list[tuple[int, float, float, int]]] = {}
    for r in rows:
        d = _duration_ms(r)
        if d is None or r.get("is_draft"):
            continue
        phase = str(r["phase"])
        tokens = max(1, int(r.get("num_tokens") or 0))
        cost = d / tokens if phase in PER_TOKEN_PHASES else d
        rank = f"dp{r.get('dp', 0)}-pp{r.get('pp', 0)}-tp{r.get('tp', 0)}"
        groups.setdefault((rank, phase), []).append((int(r["step"]), d, cost, tokens))
    found = []
    for (rank, phase), items in groups.items():
        if len(items) < MIN_PEERS:
            continue
        med = statistics.median(c for _, _, c, _ in items)
        for step, d, cost, tokens in items:
            typical = med * tokens if phase in PER_TOKEN_PHASES else med
            if cost >= FACTOR * med and d - typical >= MIN_EXCESS_MS:
                found.append(SlowStep(rank, step, phase, round(d, 1), round(typical, 1)))
    return sorted(found, key=lambda s: (s.rank, s.step))


def slow_step_findings(rows: Iterable[Mapping[str, Any]], *, show: int = 3) -> list[str]:
    """One line for `moecap-analyze check` (empty when no step stands out)."""
    found = slow_steps(rows)
    if not found:
        return []
    first = ", ".join(
        f"{s.rank} step {s.step} ({s.phase}, {s.duration_ms:g} ms vs ~{s.typical_ms:g} ms)"
        for s in found[:show]
    )
    return [
        f"{len(found)} step(s) took >= {FACTOR:g}x their phase's median on their rank (likely kernel compilation "
        f"/ JIT or graph capture inside the recorded window; `run --warmup` keeps it out): {first}"
    ]
