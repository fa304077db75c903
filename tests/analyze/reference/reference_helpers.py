"""Shared helpers for the reference-mode tests: the oracle cases, the loop baseline, tolerant compare."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[3]
ORACLE_PATH = REPO / "tests" / "data" / "oracle_cases.json"
REL_TOL = 1e-9


def oracle_cases(kind: str | None = None) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(ORACLE_PATH.read_text(encoding="utf-8"))["cases"]
    return [c for c in cases if kind is None or c["kind"] == kind]


def load_loop_module() -> ModuleType:
    """benchmarks/reference_loop.py (benchmarks/ is not a package)."""
    name = "moecap_benchmarks_reference_loop"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "reference_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def close(expected: Any, got: Any, rel_tol: float = REL_TOL) -> bool:
    """Equal, or within rel_tol for numbers (bools and None must match exactly)."""
    if expected is None or got is None or isinstance(expected, bool) or isinstance(got, bool):
        return expected is got or (type(expected) is type(got) and expected == got)
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if math.isnan(expected) or math.isnan(got):
            return math.isnan(expected) and math.isnan(got)
        return math.isclose(expected, got, rel_tol=rel_tol, abs_tol=0.0)
    return bool(expected == got)


def mismatches(expected: dict[str, Any], got: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [
        (k, v, got.get(k, "<missing>")) for k, v in expected.items() if not close(v, got.get(k, "<missing>"))
    ]
