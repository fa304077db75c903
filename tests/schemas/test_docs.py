"""docs/trace-format.md is generated from the schema objects and must be current."""

from __future__ import annotations

from pathlib import Path

from moecap.schemas import TABLES
from moecap.schemas.docs import render_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "trace-format.md"


def test_trace_format_doc_is_current():
    assert DOC.read_text() == render_markdown(), (
        "regenerate: python -m moecap.schemas.docs > docs/trace-format.md"
    )


def test_doc_names_every_column_with_its_unit():
    text = render_markdown()
    for table, columns in TABLES.items():
        assert f"## Table `{table}`" in text
        for c in columns:
            assert f"| `{c.name}` | `{c.type}` |" in text
