"""What-if: project a measured run onto other GPUs, and validate projections against measurements.

    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.whatif import whatif, compare_runs
    from moecap.analyze.cost import load_cost_settings
    from moecap.analyze.specs import resolve_gpu

    doc = whatif(analyze_paths(["traces/h100/"]), [resolve_gpu("H200")], load_cost_settings())
    doc["runs"][0]["targets"]["H200-SXM-141GB"]["models"]["projection"]["requests"]["tpot_s_mean"]

`roofline.py` fits t = max(B/(BW·η_bw), F/(P·η_f)) + c; `project.py` re-times the steps and
recomputes the metrics (and the two naive baselines); `compare.py` sets projections against runs
of the same workload measured on the target. docs/whatif.md states the model and its assumptions.
"""

from .compare import compare_runs, pair_runs
from .project import ASSUMPTIONS, MODELS, Calibration, TimeWarp, calibrate, project_times, whatif, whatif_run
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
