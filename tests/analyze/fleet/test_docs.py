"""docs/fleet-dataset.md is generated from the dataset layout and must be current; the layout it
documents is the one the writer produces."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from moecap.analyze.fleet.discover import discover
from moecap.analyze.fleet.docs import render_markdown
from moecap.analyze.fleet.layout import PARTITION_KEYS, TABLES
from moecap.analyze.fleet.task import analyze_group
from moecap.analyze.sql.catalog import VIEWS

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "fleet-dataset.md"


def test_fleet_dataset_doc_is_current():
    assert DOC.read_text() == render_markdown(), (
        "regenerate: python -m moecap.analyze.fleet.docs > docs/fleet-dataset.md"
    )


def test_written_files_have_exactly_the_documented_columns(tmp_path):
    """Each table's Parquet holds its view's documented columns plus the fleet's added ones, laid out
    under the documented partition keys."""
    (group,) = discover([str(ROOT / "traces" / "h100-OLMoE-1B-7B-0924-cb-bs1-syn160x128-n1.*")])
    result = analyze_group(group, str(tmp_path / "ds"))
    assert result.ok, result.errors
    for name, table in TABLES.items():
        (path,) = [p for p in result.outputs if p.startswith(str(tmp_path / "ds" / name) + "/")]
        rel = Path(path).relative_to(tmp_path / "ds" / name).parts
        assert [p.split("=")[0] for p in rel[:-1]] == list(PARTITION_KEYS)
        columns = set(pq.read_schema(path).names)
        expected = {c.name for c in VIEWS[table.view].columns} | {c.name for c in table.added}
        assert columns == expected, (name, columns ^ expected)
