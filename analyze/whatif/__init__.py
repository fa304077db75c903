"""What-if: project a measured run onto other GPUs, and validate projections against measurements.

    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.whatif import whatif, compare_runs
    from moecap.analyze.cost import load_cost_settings
    from moecap.analyze.specs import resolve_gpu

    doc = whatif(analyze_paths(["traces/h100/"]), [resolve_gpu("H200")], load_cost_settings())
    doc["runs"][0]["targets"]["H200-SXM-141GB"]["models"]["projection"]["requests"]["tpot_s"]["mean"]

`roofline.py` fits t = max(B/(BW·η_bw), F/(P·η_f)) + c; `project.py` re-times the steps and
recomputes the metrics (and the two naive baselines); `compare.py` sets projections against runs
of the same workload measured on the target. docs/whatif.md states the model and its assumptions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Submodules load on first use, so `moecap-analyze --help` does not import polars/duckdb for them.
_EXPORTS = {
    "compare_runs": ".compare",
    "pair_runs": ".compare",
    "ASSUMPTIONS": ".project",
    "MODELS": ".project",
    "Calibration": ".project",
    "TimeWarp": ".project",
    "calibrate": ".project",
    "project_times": ".project",
    "whatif": ".project",
    "whatif_run": ".project",
    "RooflineFit": ".roofline",
    "fit_roofline": ".roofline",
}

if TYPE_CHECKING:
    from .compare import compare_runs, pair_runs
    from .project import (
        ASSUMPTIONS,
        MODELS,
        Calibration,
        TimeWarp,
        calibrate,
        project_times,
        whatif,
        whatif_run,
    )
    from .roofline import RooflineFit, fit_roofline

__all__ = [
    "ASSUMPTIONS",
    "MODELS",
    "Calibration",
    "RooflineFit",
    "TimeWarp",
    "calibrate",
    "compare_runs",
    "fit_roofline",
    "pair_runs",
    "project_times",
    "whatif",
    "whatif_run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
