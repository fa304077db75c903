"""Reading a results document (metrics.json, whatif.json) by key path: the one helper the report,
the leaderboard and `whatif`'s tables use to look values up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def at(doc: Any, *keys: str) -> Any:
    """doc[k1][k2]…, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def number_at(doc: Any, path: Sequence[str]) -> float | None:
    """`at(doc, *path)` when it is a number, else None."""
    value = at(doc, *path)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
