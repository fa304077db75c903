"""Steps that took far longer than their peers: kernel compilation (Triton JIT of an MoE kernel for a shape
met for the first time, ~1 s on an H100), a CUDA-graph capture, an allocator growth — one-off costs a
benchmark should keep out of its window (`moecap-collect run --warmup`).

Rule (per recording rank, i.e. per (dp, pp, tp) stream of steps): a step's duration is its GPU span
(`gpu_end_ns - gpu_start_ns`), else its host span; its cost is that duration for decode / verify / idle
steps (flat in the batch size) and duration per token for prefill / mixed steps (which scale with the
tokens they compute). A step is named when its cost is at least `FACTOR` x the median cost of its phase on
that rank AND its duration exceeds the phase's typical duration (median cost, times its tokens where per
token) by at least `MIN_EXCESS_MS` — so a 16k-token prefill among 256-token ones is not named (same cost
per token), a 1.3 s JIT step among 12 ms decodes is. A phase with fewer than `MIN_PEERS` steps on a rank
has no median of its own to speak of: a prefill or mixed step there is judged against the median cost per
token of the rank's prefill and mixed steps together when they are at least `MIN_POOLED`, its typical
duration being no less than the rank's median decode step (a small mixed step reads the weights as a decode
does: HF's 23-token mixed steps take what its decodes take, ~110 ms, not 23 x 0.03 ms). That names vLLM's one
mixed step that compiles its MoE kernel (0.95 s for 1,162 tokens against ~80 ms at its prefills' cost per
token); other phases with too few steps are not judged.

Second rule, first use (`WARMUP_FACTOR`, `MIN_WARMUP_EXCESS_MS`): engines pay one-off costs the first
time they meet a step shape — Triton JIT-compiles a kernel specialization, an autotuner tries its configs,
the first step after the engine starts runs cold host paths — and another step of at least its size shows
what the warm one costs, which is direct evidence where the per-token median above is an extrapolation. So
a step that is the first of its phase with its token count on its rank is named when it took at least
`WARMUP_FACTOR` x, and `MIN_WARMUP_EXCESS_MS` more than, the median of the OTHER steps of its phase group
(prefill and mixed together, else the phase; idle steps are not judged) whose token count is at least its
own and at most twice it (a warm step is no slower than one of at least its size, before or after it —
an earlier peer that was itself cold only raises the median, so it can hide a slow step, never invent
one; the factor-2 window keeps the comparison tight). On the shipped H100 vLLM sweep that names the
engine's first prefill after a start (1024 tokens: 139.5 ms against 68.9 ms for the run's second one;
8192 tokens: 166.6 vs 81.6 ms) and a 15,425-token mixed step that compiled its MoE kernel (1,258 ms
against 157-159 ms for the 16,384-token steps around it; 8.5x its per-token typical, under the first
rule's 10x); on the H100 SGLang sweep, c16's 7,167-token prefill chunk (the second wave's remainder, the
run's only token count not divisible by 16, for which Triton compiles another specialization): 498 ms
against 103 ms for the three 8,192-token chunks BEFORE it (there are none after). 1.5x: warm steps of one
shape agree within about +-15 % there (the two prefills of c2, c4, c16; the 16,384-token mixed steps
155-175 ms); 20 ms keeps ms-scale jitter (a decode step of 3 ms taking 4.5 ms after a prefill) out.

This is the one definition: `moecap-analyze check` names these steps, and the report's per-step charts
leave them out (analyze/report/steps.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from .metrics.steps import step_time_s

FACTOR = 10.0
MIN_EXCESS_MS = 100.0
MIN_PEERS = 5
MIN_POOLED = 3
PER_TOKEN_PHASES = ("prefill", "mixed")
WARMUP_FACTOR = 1.5
MIN_WARMUP_EXCESS_MS = 20.0
WARMUP_SIZE_WINDOW = 2.0
"""First-use rule: peers (earlier or later steps) have between 1 and this many times the step's tokens."""


@dataclass(frozen=True)
class SlowStep:
    rank: str
    step: int
    phase: str
    duration_ms: float
    typical_ms: float
    """What a step of this phase and size usually takes on this rank (the median cost, scaled)."""
    dp: int = 0
    pp: int = 0
    tp: int = 0
    rule: str = "compile"
    """Which rule named it: "compile" (>= FACTOR x its phase's typical cost) or "first use" (the first
    step of its shape, >= WARMUP_FACTOR x the other steps of 1-2x its size)."""


def _duration_ms(df: pl.DataFrame) -> pl.Series:
    """Each step's time_s (metrics/steps.py `step_time_s`: GPU span, else host span) in ms; null
    where neither span is known."""
    import numpy as np

    def ns(name: str) -> np.ndarray:
        return df[name].cast(pl.Float64).fill_null(np.nan).to_numpy()

    host = df["t_start_ns"].is_not_null() & df["t_end_ns"].is_not_null()
    t0 = df["t_start_ns"].fill_null(0).cast(pl.Int64).to_numpy()
    t1 = df["t_end_ns"].fill_null(0).cast(pl.Int64).to_numpy()
    time_s, has_gpu = step_time_s(ns("gpu_start_ns"), ns("gpu_end_ns"), t0, t1)
    known = has_gpu | host.to_numpy()
    return pl.Series("d", np.where(known, time_s * 1e3, np.nan)).fill_nan(None)


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
    # The step's time_s as step_metrics has it (GPU span where recorded, else the host span), in ms;
    # null where neither span is known.
    df = (
        df.with_columns(
            rank=rank,
            phase=pl.col("phase").cast(pl.String),
            d=_duration_ms(df),
            tokens=pl.max_horizontal(pl.col("num_tokens").fill_null(0), pl.lit(1)),
        )
        .drop_nulls("d")
        .with_columns(scale=pl.when(per_token).then(pl.col("tokens")).otherwise(1))
        .with_columns(cost=pl.col("d") / pl.col("scale"), per_token=per_token)
        .with_columns(
            phase_med=pl.col("cost").median().over("rank", "phase"),
            peers=pl.len().over("rank", "phase"),
            pooled_med=pl.col("cost").filter(pl.col("per_token")).median().over("rank"),
            pooled=pl.col("per_token").sum().over("rank"),
            decode_d=pl.col("d").filter(pl.col("phase") == "decode").median().over("rank"),
        )
        .with_columns(
            typical=pl.when(pl.col("peers") >= MIN_PEERS)
            .then(pl.col("phase_med") * pl.col("scale"))
            .when(pl.col("per_token") & (pl.col("pooled") >= MIN_POOLED))
            .then(pl.max_horizontal(pl.col("pooled_med") * pl.col("scale"), pl.col("decode_d")))
        )
    )
    named = df.filter(
        pl.col("typical").is_not_null()
        & (pl.col("d") >= FACTOR * pl.col("typical"))
        & (pl.col("d") - pl.col("typical") >= MIN_EXCESS_MS)
    ).with_columns(rule=pl.lit("compile"))
    first = _first_use(df).join(named.select("rank", "step"), on=["rank", "step"], how="anti")
    found = pl.concat([named.select(_OUT), first.select(_OUT)]).sort("rank", "step")
    return [
        SlowStep(
            r["rank"],
            int(r["step"]),
            r["phase"],
            round(r["d"], 1),
            round(r["typical"], 1),
            int(r["dp"] or 0),
            int(r["pp"] or 0),
            int(r["tp"] or 0),
            r["rule"],
        )
        for r in found.iter_rows(named=True)
    ]


_OUT = ["rank", "step", "phase", "d", "typical", "dp", "pp", "tp", "rule"]


def _first_use(df: pl.DataFrame) -> pl.DataFrame:
    """The first-use rule of the module doc over the frame `slow_steps` builds (rank, step, phase, d, tokens,
    per_token): the first step of each (rank, phase, token count) set against the median duration of the
    other steps of its phase group with 1-WARMUP_SIZE_WINDOW x its tokens."""
    steps = df.filter(pl.col("phase") != "idle").with_columns(
        group=pl.when(pl.col("per_token")).then(pl.lit("per-token")).otherwise(pl.col("phase")),
        n=pl.col("num_tokens").fill_null(0),
    )
    cand = steps.filter(
        (pl.col("step") == pl.col("step").min().over("rank", "phase", "n"))
        & (pl.col("d") >= MIN_WARMUP_EXCESS_MS)
    )
    if cand.is_empty():
        return cand.with_columns(typical=pl.lit(None, pl.Float64), rule=pl.lit("first use"))
    typical = _peer_medians(steps, cand)
    return (
        cand.drop("typical")
        .join(typical, on=["rank", "step"])
        .rename({"typical_b": "typical"})
        .filter(
            (pl.col("d") >= WARMUP_FACTOR * pl.col("typical"))
            & (pl.col("d") - pl.col("typical") >= MIN_WARMUP_EXCESS_MS)
        )
        .with_columns(rule=pl.lit("first use"))
    )


def _peer_medians(steps: pl.DataFrame, cand: pl.DataFrame) -> pl.DataFrame:
    """(rank, step, typical_b): for each candidate, the median duration of the OTHER steps of its (rank,
    group) with n to WARMUP_SIZE_WINDOW x n tokens; candidates without such peers are absent. Per group the
    steps are sorted by tokens once, so a candidate's size window is one slice (searchsorted) without the
    candidate itself: memory O(steps), where a candidate x step join grew as their product (1,500 first
    uses x 22,755 mixed steps at 1e5 engine-like steps)."""
    import numpy as np

    out_rank: list[str] = []
    out_step: list[int] = []
    out_med: list[float] = []
    wanted = cand.select("rank", "group").unique()
    peers = steps.join(wanted, on=["rank", "group"], how="semi")
    for (rank, group), rows in peers.partition_by("rank", "group", as_dict=True).items():
        order = rows["n"].arg_sort()
        n = rows["n"].gather(order).to_numpy()
        step = rows["step"].gather(order).to_numpy()
        d = rows["d"].gather(order).to_numpy()
        mine = cand.filter((pl.col("rank") == rank) & (pl.col("group") == group))
        c_n, c_step = mine["n"].to_numpy(), mine["step"].to_numpy()
        lo = np.searchsorted(n, c_n, side="left")
        hi = np.searchsorted(n, WARMUP_SIZE_WINDOW * c_n, side="right")
        for i in range(len(c_n)):
            window = slice(lo[i], hi[i])
            others = d[window][step[window] != c_step[i]]
            if others.size:
                out_rank.append(rank)
                out_step.append(int(c_step[i]))
                out_med.append(float(np.median(others)))
    return pl.DataFrame(
        {"rank": out_rank, "step": out_step, "typical_b": out_med},
        schema={"rank": pl.String, "step": steps.schema["step"], "typical_b": pl.Float64},
    )


def slow_step_findings(rows: Iterable[Mapping[str, Any]] | pl.DataFrame, *, show: int = 3) -> list[str]:
    """One line for `moecap-analyze check` (empty when no step stands out)."""
    found = slow_steps(rows)
    if not found:
        return []
    first = ", ".join(
        f"{s.rank} step {s.step} ({s.phase}, {s.duration_ms:g} ms vs ~{s.typical_ms:g} ms"
        + (", first of its shape" if s.rule == "first use" else "")
        + ")"
        for s in found[:show]
    )
    return [
        f"{len(found)} step(s) took >= {FACTOR:g}x their phase's median on their rank, or, the first of their "
        f"shape, >= {WARMUP_FACTOR:g}x the other steps of their size (likely kernel compilation / JIT, "
        f"autotuning, a cold first step or graph capture inside the recorded window; `run --warmup` keeps it "
        f"out): {first}"
    ]


STEP_COLUMNS = "dp, pp, tp, step, phase, num_tokens, is_draft, gpu_start_ns, gpu_end_ns, t_start_ns, t_end_ns"
"""The `steps` columns the rule reads."""

SLOW_STEPS_SCHEMA = {
    "run_id": pl.String,
    "dp": pl.Int64,
    "pp": pl.Int64,
    "step": pl.Int64,
    "phase": pl.String,
    "duration_s": pl.Float64,
    "rule": pl.String,
}
"""`slow_steps_frame`'s columns: one row per named step; `rule` is "compile" or "first use"."""


def slow_steps_frame(db: Any, run_ids: list[str]) -> pl.DataFrame:
    """The slow steps (both rules) of `run_ids` over their `steps` rows in `db` (a TraceDB), one row per
    (run, dp, pp, step): the TP ranks of a stage share the step, so the first rank's naming stands for it.
    Columns: SLOW_STEPS_SCHEMA."""
    found: list[dict[str, Any]] = []
    if run_ids:
        marks = ", ".join("?" * len(run_ids))
        rows = db.con.sql(
            f"SELECT run_id, {STEP_COLUMNS} FROM steps WHERE run_id IN ({marks})", params=list(run_ids)
        ).pl()
        for (rid,), part in rows.partition_by("run_id", as_dict=True).items():
            seen = set()
            for s in slow_steps(part.drop("run_id")):
                if (s.dp, s.pp, s.step) not in seen:
                    seen.add((s.dp, s.pp, s.step))
                    found.append(
                        {"run_id": rid, "dp": s.dp, "pp": s.pp, "step": s.step, "phase": s.phase,
                         "duration_s": s.duration_ms / 1e3, "rule": s.rule}
                    )  # fmt: skip
    return pl.DataFrame(found, schema=SLOW_STEPS_SCHEMA)
