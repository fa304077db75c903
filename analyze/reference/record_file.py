"""Reading a MoE-CAP record file (`batch_data.json`) into Python records, with the standard library.

No frame library: `records.load_reference_frame` decodes a JSON list straight into polars columns, and
reference mode without polars (`moecap.analyze.lean`) reads the records here and takes their columns
with `columns.record_columns`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moecap.analyze.errors import InputError

_EXPECTED = 'a JSON list of records, {"records": [...]}, or JSON Lines (one record object per line)'


def load_reference_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a MoE-CAP `batch_data.json`: a JSON list, ``{"records": [...]}``, or JSONL; one dict per pass.

    Raises InputError (one line naming the file) for a missing, empty or differently shaped file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{p}: cannot read ({exc.__class__.__name__}: {exc}); expected {_EXPECTED}"
        ) from None
    return parse_reference_records(p, text)


def parse_reference_records(p: Path, text: str) -> list[dict[str, Any]]:
    """`load_reference_records` of a file whose text is `text` (for a caller that read the file's
    bytes itself)."""
    if not text.strip():
        raise InputError(f"{p}: empty file; expected {_EXPECTED}")
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError:
        doc = _read_json_lines(p, text)
    except RecursionError:
        raise InputError(f"{p}: JSON nested too deeply to read; expected {_EXPECTED}") from None
    if isinstance(doc, Mapping):
        if "records" in doc:
            doc = doc["records"]
        elif "forward_mode" in doc:  # JSON Lines with a single record
            doc = [doc]
        else:
            raise InputError(f"{p}: a JSON object without a 'records' list; expected {_EXPECTED}")
    if not isinstance(doc, list):
        raise InputError(f"{p}: top-level JSON {type(doc).__name__}; expected {_EXPECTED}")
    if not all(type(r) is dict for r in doc):
        bad = next(i for i, r in enumerate(doc) if type(r) is not dict)
        raise InputError(
            f"{p}: record {bad} is a {type(doc[bad]).__name__}, not an object; expected {_EXPECTED}"
        )
    records: list[dict[str, Any]] = doc
    return records


def _read_json_lines(p: Path, text: str) -> list[Any]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: line {lineno} is not JSON ({exc.msg}); expected {_EXPECTED}") from None
        except RecursionError:
            raise InputError(
                f"{p}: line {lineno}: JSON nested too deeply to read; expected {_EXPECTED}"
            ) from None
    return out
