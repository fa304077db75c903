"""Which steps the per-step charts leave out, and why: idle steps (no tokens) and slow (compile) steps.

An idle step (0 batch tokens) has no place on a batch-token axis (log scales cannot show 0) and
no throughput; a compile step (vLLM's first mixed step, 1.1 s against ~7 ms decodes) would bend a
mean or a line by itself. The slow steps are the ones `moecap-analyze check` names, by the one rule
in `analyze/slow_steps.py` (≥ 10x what a step of its phase and size usually takes on its rank, and
≥ 100 ms over it; or the first step of its shape at ≥ 1.5x, and 20 ms over, the other steps of
1-2x its size); this module only applies it to every run and turns it into SQL and a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from ..slow_steps import FACTOR, MIN_EXCESS_MS, MIN_WARMUP_EXCESS_MS, WARMUP_FACTOR, slow_steps_frame


@dataclass
class Excluded:
    """Steps of one run left out of its per-step charts."""

    idle: int = 0
    outliers: list[tuple[int, int, int, float]] = field(default_factory=list)
    """(dp, pp, step, duration in s) of each slow step (slow_steps' rules)."""
    warmups: set[tuple[int, int, int]] = field(default_factory=set)
    """(dp, pp, step) of the slow steps named by the first-use rule (the rest by the compile rule)."""

    def predicate(self, idle: bool = True) -> str:
        """SQL over step_metrics keeping every step that is neither idle nor slow (`idle=False`:
        keeping idle steps, for charts over time where an idle step's time is time spent)."""
        keep = ["num_tokens > 0"] if idle else []
        if self.outliers:
            keys = ", ".join(f"({dp}, {pp}, {step})" for dp, pp, step, _ in self.outliers)
            keep.append(f"(dp, pp, step) NOT IN ({keys})")
        return " AND ".join(keep) or "TRUE"

    def note(self, idle: bool = True) -> str:
        """One sentence naming what was left out ("" when nothing was); `idle=False`: the slow
        steps only (what `predicate(idle=False)` leaves out)."""
        parts = []
        if self.idle and idle:
            parts.append(f"{self.idle} idle (0-token) step{'s' if self.idle != 1 else ''}")
        compile_ = [o for o in self.outliers if o[:3] not in self.warmups]
        warmup = [o for o in self.outliers if o[:3] in self.warmups]
        if compile_:
            parts.append(
                f"compile outlier {_steps(compile_)} (≥ {FACTOR:g}× a typical step of its phase and "
                f"≥ {MIN_EXCESS_MS:g} ms over it, as `check` names them)"
            )
        if warmup:
            parts.append(
                f"warm-up {_steps(warmup)} (the first of its shape, ≥ {WARMUP_FACTOR:g}× and "
                f"≥ {MIN_WARMUP_EXCESS_MS:g} ms over the other steps of 1–2× its size, as `check` names them)"
            )
        return ("Left out: " + "; ".join(parts) + ".") if parts else ""


def _steps(outliers: list[tuple[int, int, int, float]]) -> str:
    """'step 1 (0.95 s)' / 'steps 1 (0.95 s), 7 (0.2 s) and 3 more'."""
    steps = ", ".join(f"{step} ({d:.2g} s)" for _, _, step, d in outliers[:5])
    more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
    return f"step{'s' if len(outliers) != 1 else ''} {steps}{more}"


def excluded_steps_all(db: Any, run_ids: list[str], slow: pl.DataFrame | None = None) -> dict[str, Excluded]:
    """run_id -> its idle steps (non-draft, positive duration, 0 tokens, from step_metrics) and its
    slow steps (`slow`: `slow_steps.slow_steps_frame`'s rows, e.g. the façade's `Analysis.slow_steps()`,
    computed here when not given — as `check` reads them)."""
    out = {rid: Excluded() for rid in run_ids}
    if not run_ids:
        return out
    marks = ", ".join("?" * len(run_ids))
    for rid, idle in db.con.sql(
        f"""SELECT run_id, count(*) FROM step_metrics
            WHERE run_id IN ({marks}) AND NOT is_draft AND time_s > 0 AND num_tokens = 0 GROUP BY run_id""",
        params=list(run_ids),
    ).fetchall():
        out[rid].idle = int(idle)
    found = slow if slow is not None else slow_steps_frame(db, run_ids)
    for s in found.filter(pl.col("run_id").is_in(run_ids)).iter_rows(named=True):
        key = (s["dp"], s["pp"], s["step"])
        out[s["run_id"]].outliers.append((*key, s["duration_s"]))
        if s["rule"] != "compile":
            out[s["run_id"]].warmups.add(key)
    return out


def excluded_steps(db: Any, run_id: str) -> Excluded:
    """The idle and slow steps of `run_id`."""
    return excluded_steps_all(db, [run_id])[run_id]


def steps_predicate(
    db: Any, run_ids: list[str], lost: dict[str, Excluded] | None = None, *, idle: bool = True
) -> tuple[str, dict[str, Excluded]]:
    """One SQL predicate over step_metrics leaving out every run's idle (unless `idle=False`) and
    slow steps, and what each run lost (`lost`: already computed by excluded_steps_all)."""
    lost = lost if lost is not None else excluded_steps_all(db, run_ids)
    clauses = []
    for rid, ex in lost.items():
        quoted = rid.replace("'", "''")
        clauses.append(f"(run_id = '{quoted}' AND {ex.predicate(idle=idle)})")
    return ("(" + " OR ".join(clauses) + ")") if clauses else "TRUE", lost
