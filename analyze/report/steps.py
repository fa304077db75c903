"""Which steps the per-step charts leave out, and why: idle steps (no tokens) and compile outliers.

An idle step (0 batch tokens) has no place on a batch-token axis (log scales cannot show 0) and
no throughput; a compile step (vLLM's first mixed step, 1.1 s against ~7 ms) would bend a mean
or a line by itself. A step is a compile outlier when its time over its own roofline bound is
more than `COMPILE_OUTLIER_FACTOR` times the run's median of that ratio: a ratio, so a large
prefill is not taken for an outlier (its bound is large too). Measured on the shipped traces:
the vLLM runs' first steps sit at 50–90× their median, every HF and SGLang step below 8× (HF
eager warm-up steps included), so 20 separates them with room on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COMPILE_OUTLIER_FACTOR = 20.0
"""time / roofline bound above this many times the run's median marks a compile outlier."""


@dataclass
class Excluded:
    """Steps of one run left out of its per-step charts."""

    idle: int = 0
    outliers: list[tuple[int, int, int, float]] = field(default_factory=list)
    """(dp, pp, step, wall time in s) of each compile outlier."""

    def predicate(self) -> str:
        """SQL over step_metrics keeping every step that is neither idle nor an outlier."""
        keep = "num_tokens > 0"
        if self.outliers:
            keys = ", ".join(f"({dp}, {pp}, {step})" for dp, pp, step, _ in self.outliers)
            keep += f" AND (dp, pp, step) NOT IN ({keys})"
        return keep

    def note(self) -> str:
        """One sentence naming what was left out ("" when nothing was)."""
        parts = []
        if self.idle:
            parts.append(f"{self.idle} idle (0-token) step{'s' if self.idle != 1 else ''}")
        if self.outliers:
            steps = ", ".join(f"{step} ({wall:.2g} s)" for _, _, step, wall in self.outliers[:5])
            more = f" and {len(self.outliers) - 5} more" if len(self.outliers) > 5 else ""
            parts.append(
                f"compile outlier step{'s' if len(self.outliers) != 1 else ''} {steps}{more} "
                f"(> {COMPILE_OUTLIER_FACTOR:g}× the run's median time / roofline bound)"
            )
        return ("Left out: " + "; ".join(parts) + ".") if parts else ""


def excluded_steps_all(
    db: Any, run_ids: list[str], factor: float = COMPILE_OUTLIER_FACTOR
) -> dict[str, Excluded]:
    """run_id -> its idle steps and compile outliers (non-draft steps with a positive duration),
    for every run in `run_ids`, in one query."""
    out = {rid: Excluded() for rid in run_ids}
    if not run_ids:
        return out
    rows = db.con.sql(
        f"""
        WITH s AS (
            SELECT run_id, dp, pp, step, num_tokens, wall_s,
                   time_s / nullif(greatest(bytes_total / (gpu_bandwidth * gpus),
                                            flops_total / (gpu_peak_flops * gpus)), 0) AS r
            FROM step_metrics
            WHERE run_id IN ({", ".join("?" * len(run_ids))}) AND NOT is_draft AND time_s > 0
        ), m AS (SELECT run_id, median(r) AS med FROM s WHERE num_tokens > 0 AND r > 0 GROUP BY run_id)
        SELECT s.run_id, dp, pp, step, num_tokens, wall_s, coalesce(r > ? * m.med, false) AS outlier
        FROM s LEFT JOIN m USING (run_id)
        WHERE num_tokens = 0 OR r > ? * m.med ORDER BY s.run_id, step
        """,
        params=[*run_ids, factor, factor],
    ).fetchall()
    for rid, dp, pp, step, tokens, wall, outlier in rows:
        if not tokens:
            out[rid].idle += 1
        elif outlier:
            out[rid].outliers.append((int(dp), int(pp), int(step), float(wall or 0.0)))
    return out


def excluded_steps(db: Any, run_id: str, factor: float = COMPILE_OUTLIER_FACTOR) -> Excluded:
    """The idle steps and compile outliers of `run_id`."""
    return excluded_steps_all(db, [run_id], factor)[run_id]


def steps_predicate(
    db: Any, run_ids: list[str], lost: dict[str, Excluded] | None = None
) -> tuple[str, dict[str, Excluded]]:
    """One SQL predicate over step_metrics leaving out every run's idle steps and compile
    outliers, and what each run lost (`lost`: already computed by excluded_steps_all)."""
    lost = lost if lost is not None else excluded_steps_all(db, run_ids)
    clauses = []
    for rid, ex in lost.items():
        quoted = rid.replace("'", "''")
        clauses.append(f"(run_id = '{quoted}' AND {ex.predicate()})")
    return ("(" + " OR ".join(clauses) + ")") if clauses else "TRUE", lost
