"""The metrics window (docs/metrics.md §7): which steps the run-level step metrics cover.

A window is asked for as text (`--window steady|all|steps:A-B|time:A-B`), parsed once into a
`WindowSpec`, and resolved per run into a `Window` (the steady threshold and the time origin need
the run's steps). A resolved window is data, not SQL: the analyzer stores one row per run in the
`run_windows` table and every consumer selects window steps with the one predicate `IN_WINDOW_SQL`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

_PATTERN = re.compile(r"^(all|steady|steps:(\d+)-(\d+)|time:([\d.]+)-([\d.]+))$")

WINDOW_KINDS = ("all", "steady", "steps", "time")


@dataclass(frozen=True)
class WindowSpec:
    """A window as the user asked for it. steady_fraction: share of the target concurrency a
    step's batch must reach to count as steady state."""

    kind: str = "steady"
    first_step: int | None = None
    last_step: int | None = None
    start_s: float | None = None
    end_s: float | None = None
    steady_fraction: float = 0.9

    @classmethod
    def parse(cls, text: str | WindowSpec, steady_fraction: float = 0.9) -> WindowSpec:
        """`steady`, `all`, `steps:A-B` (step keys, inclusive) or `time:A-B` (seconds from the
        run's first step); a one-line InputError otherwise."""
        if isinstance(text, WindowSpec):
            return text
        m = _PATTERN.match(text or "")
        if not m:
            raise InputError(f"--window {text!r}: expected steady, all, steps:A-B or time:A-B (seconds)")
        if m.group(2) is not None:
            return cls("steps", first_step=int(m.group(2)), last_step=int(m.group(3)))
        if m.group(4) is not None:
            return cls("time", start_s=float(m.group(4)), end_s=float(m.group(5)))
        return cls(text, steady_fraction=steady_fraction)


@dataclass(frozen=True)
class Window:
    """One run's resolved window: the kind applied and its bounds (None where the kind has none).

    t0_ns/t1_ns: host-clock bounds of a `time` window; min_requests: the steady threshold."""

    kind: str
    description: str
    first_step: int | None = None
    last_step: int | None = None
    start_s: float | None = None
    end_s: float | None = None
    t0_ns: int | None = None
    t1_ns: int | None = None
    min_requests: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The `window` object of metrics.json (only the fields this kind has)."""
        out: dict[str, Any] = {"kind": self.kind, "description": self.description}
        for key in ("first_step", "last_step", "start_s", "end_s", "min_requests"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def row(self, run_id: str) -> tuple[Any, ...]:
        """This window as a row of `run_windows` (RUN_WINDOWS_COLUMNS order)."""
        return (
            run_id,
            self.kind,
            self.first_step,
            self.last_step,
            self.t0_ns,
            self.t1_ns,
            self.min_requests,
            self.description,
        )


RUN_WINDOWS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("first_step", "BIGINT"),
    ("last_step", "BIGINT"),
    ("t0_ns", "BIGINT"),
    ("t1_ns", "BIGINT"),
    ("min_requests", "BIGINT"),
    ("description", "VARCHAR"),
)

IN_WINDOW_SQL = """(w.kind = 'all'
    OR (w.kind = 'steps' AND s.step BETWEEN w.first_step AND w.last_step)
    OR (w.kind = 'time' AND s.t_start_ns BETWEEN w.t0_ns AND w.t1_ns)
    OR (w.kind = 'steady' AND s.num_reqs >= w.min_requests))"""
"""Whether step row `s` lies in its run's window row `w` (of `run_windows`): the one definition."""

COUNTED_SQL = "(NOT s.is_draft AND s.time_s > 0)"
"""Steps every run-level step metric counts: no draft-model pass, a positive duration."""


def steady_threshold(target: int, fraction: float) -> int:
    """Requests a step must hold to count as steady state: ⌈fraction · target⌉."""
    return math.ceil(fraction * int(target))


def resolve_window(
    spec: WindowSpec,
    *,
    first_t_start_ns: int | None,
    target_concurrency: int | None,
    steps_reaching: Any,
) -> Window:
    """The run's window. `steps_reaching(threshold)` counts the run's counted steps with at least
    `threshold` requests (called for `steady` only)."""
    if spec.kind == "all":
        return Window("all", "every recorded step")
    if spec.kind == "steps":
        return Window(
            "steps",
            f"steps {spec.first_step} to {spec.last_step}",
            first_step=spec.first_step,
            last_step=spec.last_step,
        )
    if spec.kind == "time":
        assert spec.start_s is not None and spec.end_s is not None
        t0 = first_t_start_ns or 0
        return Window(
            "time",
            f"steps starting {spec.start_s:g} s to {spec.end_s:g} s after the run's first step",
            start_s=spec.start_s,
            end_s=spec.end_s,
            t0_ns=t0 + int(spec.start_s * 1e9),
            t1_ns=t0 + int(spec.end_s * 1e9),
        )
    if not target_concurrency:
        return Window("all", "steady state asked, but the trace states no target concurrency")
    threshold = steady_threshold(target_concurrency, spec.steady_fraction)
    if not steps_reaching(threshold):
        return Window(
            "all",
            f"no step reached {threshold} requests ({spec.steady_fraction:.0%} of batch size "
            f"{target_concurrency}); every step used",
        )
    return Window(
        "steady",
        f"steps with >= {threshold} requests ({spec.steady_fraction:.0%} of target concurrency "
        f"{target_concurrency})",
        min_requests=threshold,
    )
