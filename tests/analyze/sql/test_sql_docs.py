"""docs/sql.md is generated from the view definitions and is current; every column is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecap.analyze.sql import EXAMPLES, VIEWS
from moecap.analyze.sql.docs import catalog_problems, describe_views, render_markdown

DOCS = Path(__file__).resolve().parents[3] / "docs" / "sql.md"


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    return describe_views(tmp_path_factory.mktemp("docs"))


def test_every_view_and_column_is_documented(described: dict[str, list[tuple[str, str]]]) -> None:
    assert catalog_problems(described) == []


def test_docs_page_is_current(described: dict[str, list[tuple[str, str]]]) -> None:
    assert DOCS.read_text(encoding="utf-8") == render_markdown(described), (
        "docs/sql.md is stale: python -m moecap.analyze.sql.docs --write docs/sql.md"
    )


def test_docs_page_shows_every_view_and_example() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for view in VIEWS:
        assert f"\n### `{view}`\n" in text
    for e in EXAMPLES:
        assert e.sql.strip() in text


def test_catalog_problems_name_the_column() -> None:
    fake = {name: [(c.name, "INTEGER") for c in doc.columns] for name, doc in VIEWS.items()}
    fake["steps"].append(("new_column", "INTEGER"))
    fake["scratch"] = [("x", "INTEGER")]
    del fake["runs"]
    assert catalog_problems(fake) == [
        "view scratch is not documented in analyze/sql/catalog.py",
        "catalog documents view runs, which the connection does not define",
        "steps.new_column is not documented",
    ]
