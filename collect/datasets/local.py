"""Rows of a dataset from a local copy in the hub's format, for hosts without network or `datasets`.

A local copy is one file (.jsonl, .json, .parquet or .csv) or a directory such as a hub snapshot
(`main/test-00000-of-00001.parquet`, `data/test.jsonl`, …); in a directory the files of the requested
split are used (their name starts with the split, or one of their folders is named after it), under the
dataset's config folder when it has one. Parquet needs only pyarrow; JSON and CSV only the stdlib.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import CollectError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_local_rows(path: str, *, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """All rows of `split` in the file or directory `path`, as dicts, in file order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CollectError(f"--dataset-path {path}: no such file or directory")
    files = [p] if p.is_file() else _split_files(p, split, config)
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_read_file(f))
    return rows


def _split_files(root: Path, split: str, config: str | None) -> list[Path]:
    candidates = sorted(f for f in root.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
    if not candidates:
        raise CollectError(f"--dataset-path {root}: no {', '.join(SUFFIXES)} files in this directory")

    def matches_split(f: Path) -> bool:
        rel = f.relative_to(root)
        return f.name.startswith(split) or split in rel.parts[:-1]

    chosen = [f for f in candidates if matches_split(f)]
    if config and len({f.relative_to(root).parts[0] for f in chosen}) > 1:
        in_config = [f for f in chosen if config in f.relative_to(root).parts[:-1]]
        chosen = in_config or chosen
    if not chosen and len(candidates) == 1:
        chosen = candidates
    if not chosen:
        names = ", ".join(str(f.relative_to(root)) for f in candidates[:8])
        raise CollectError(f"--dataset-path {root}: no file of split {split!r} (found {names})")
    return chosen


def _read_file(f: Path) -> list[dict[str, Any]]:
    try:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(f).to_pylist()
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".csv":
            return [dict(r) for r in csv.DictReader(text.splitlines())]
        if f.suffix == ".jsonl":
            return [
                _obj(json.loads(line), f, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()
            ]
        doc = json.loads(text)
    except CollectError:
        raise
    except (OSError, ValueError) as exc:
        raise CollectError(f"--dataset-path {f}: cannot read ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pyarrow's own errors for a bad parquet file
        raise CollectError(f"--dataset-path {f}: cannot read ({type(exc).__name__}: {exc})") from None
    if isinstance(doc, dict):
        for key in ("rows", "data", "records", "examples"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
    if not isinstance(doc, list):
        raise CollectError(f"--dataset-path {f}: expected a JSON list of rows (or JSON Lines)")
    return [_obj(r, f, i) for i, r in enumerate(doc, 1)]


def _obj(row: Any, f: Path, i: int) -> dict[str, Any]:
    # Hub "rows" API dumps wrap each row as {"row_idx": .., "row": {...}}.
    if isinstance(row, dict) and isinstance(row.get("row"), dict) and "row_idx" in row:
        row = row["row"]
    if not isinstance(row, dict):
        raise CollectError(f"--dataset-path {f}: row {i} is a {type(row).__name__}, not an object")
    return row
