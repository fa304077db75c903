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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

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


def slow_steps(rows: Iterable[Mapping[str, Any]] | pl.DataFrame) -> list[SlowStep]:
    """The steps the module docstring's rule names, in rank and step order. `rows`: `steps` rows (dp, pp,
    tp, step, phase, num_tokens, gpu/host start and end ns), as mappings or a Polars frame (vectorised:
    `check` runs it over every step of a run)."""
    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows), infer_schema_length=None)
    if df.is_empty():
        return []
    for name in ("dp", "pp", "tp"):
        if name not in df.columns:
            df = df.with_columns(pl.lit(0).alias(name))
    for name in ("gpu_start_ns", "gpu_end_ns", "t_start_ns", "t_end_ns", "num_tokens"):
        if name not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Int64).alias(name))
    if "is_draft" in df.columns:
        df = df.filter(~pl.col("is_draft").fill_null(False))
    per_token = pl.col("phase").cast(pl.String).is_in(PER_TOKEN_PHASES)
    rank = pl.format(
        "dp{}-pp{}-tp{}", pl.col("dp").fill_null(0), pl.col("pp").fill_null(0), pl.col("tp").fill_null(0)
    )
    df = (
        df.with_columns(
            rank=rank,
            phase=pl.col("phase").cast(pl.String),
            # GPU span where recorded, else the host span (ms)
            d=pl.coalesce(
                pl.col("gpu_end_ns") - pl.col("gpu_start_ns"), pl.col("t_end_ns") - pl.col("t_start_ns")
            )
            / 1e6,
            tokens=pl.max_horizontal(pl.col("num_tokens").fill_null(0), pl.lit(1)),
        )
        .drop_nulls("d")
        .with_columns(scale=pl.when(per_token).then(pl.col("tokens")).otherwise(1))
        .with_columns(cost=pl.col("d") / pl.col("scale"))
        .with_columns(med=pl.col("cost").median().over("rank", "phase"), peers=pl.len().over("rank", "phase"))
        .with_columns(typical=pl.col("med") * pl.col("scale"))
        .filter(
            (pl.col("peers") >= MIN_PEERS)
            & (pl.col("cost") >= FACTOR * pl.col("med"))
            & (pl.col("d") - pl.col("typical") >= MIN_EXCESS_MS)
        )
        .sort("rank", "step")
    )
    return [
        SlowStep(r["rank"], int(r["step"]), r["phase"], round(r["d"], 1), round(r["typical"], 1))
        for r in df.iter_rows(named=True)
    ]


def slow_step_findings(rows: Iterable[Mapping[str, Any]] | pl.DataFrame, *, show: int = 3) -> list[str]:
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
