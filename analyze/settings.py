"""What an analysis is asked for (`Settings`), kept apart from the analysis so a command can build
it without importing the data stack (reference mode on record files needs neither DuckDB nor the
trace loader)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .metrics.window import WindowSpec

if TYPE_CHECKING:
    from .cost.constants import CostSettings

METRICS_SCHEMA = "moecap.metrics/1"
"""Schema name of the metrics document (metrics.json)."""


@dataclass
class Settings:
    """What the user chose. gpu: re-analyse as this GPU (default: the trace's). window: a
    `WindowSpec` or its text (steady | all | steps:A-B | time:A-B, seconds from the run's first
    step). cost: the cost constants and model (None: the bundled ones, with $MOECAP_COST_OVERRIDES)."""

    gpu: str | None = None
    gpu_overrides: str | None = None
    window: str | WindowSpec = "steady"
    steady_fraction: float = 0.9
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    model_config: dict[str, Any] | None = None
    num_gpus: int | None = None
    cost: CostSettings | None = None

    @property
    def window_spec(self) -> WindowSpec:
        """The window, parsed (a one-line InputError for bad text)."""
        return WindowSpec.parse(self.window, self.steady_fraction)


Options = Settings
"""The former name of `Settings`."""
