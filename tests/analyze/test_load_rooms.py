"""The loading layer's rooms compute no metric: none imports `moecap.analyze.metrics`; the package's
front door (`load/__init__.py`) is the one place that hands the metric layer's per-batch sums in."""

from __future__ import annotations

import ast
from pathlib import Path

import moecap.analyze.load as load

ROOMS = Path(load.__file__).parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_loading_room_imports_metric_code():
    rooms = sorted(p for p in ROOMS.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in rooms} >= {"cache", "convert", "expert_pass", "ranks", "views", "db", "runs"}
    for p in rooms:
        metric = {m for m in _imports(p) if "metrics" in m}
        assert not metric, f"{p.name} imports {metric}"


def test_front_door_imports_metric_code_only_inside_metric_reducers():
    tree = ast.parse((ROOMS / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("metrics" in (getattr(n, "module", "") or "") for n in top)
    reducers = load.metric_reducers()
    assert reducers.step_statistics.__module__.endswith("analyze.metrics.experts")
    assert reducers.request_sums.__module__.endswith("analyze.metrics.step_costs")
