"""Charts, the self-contained HTML report and the leaderboard.

    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.report import frames, charts, write_report, write_leaderboard

    analysis = analyze_paths(["traces/"])
    run_id = next(iter(analysis.windows))
    charts.expert_heatmap(frames.expert_share_frame(analysis.db, run_id))   # an Altair chart
    write_report(analysis, "report/")            # report/report.html + report/charts/*.png|svg
    write_leaderboard(analysis, "board/")        # board/leaderboard.{csv,json,html}

Modules: `frames` (SQL over the analyzer's views → small, aggregated Polars frames), `charts`
(frame → Altair chart), `figures` (which charts a report holds), `export` (PNG/SVG via
vl-convert), `html` (the page), `leaderboard`, `cli` (the `leaderboard` command). Names below are
imported lazily so `moecap-analyze` starts without loading Altair.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "write_report": "html",
    "render_report": "html",
    "write_leaderboard": "leaderboard",
    "leaderboard_frame": "leaderboard",
    "report_sections": "figures",
    "export_chart": "export",
}

__all__ = ["charts", "export", "figures", "frames", "html", "leaderboard", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("charts", "export", "figures", "frames", "html", "leaderboard"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
