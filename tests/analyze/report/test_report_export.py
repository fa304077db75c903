"""Chart exports: a PNG and an SVG named after the chart, whatever dots the run id holds."""

from __future__ import annotations

import polars as pl
import pytest

from moecap.analyze.report import charts as C
from moecap.analyze.report.export import export_chart


def test_export_names_keep_dots_of_run_ids(tmp_path):
    chart = C.layer_imbalance(pl.DataFrame({"phase": ["decode"], "layer": [0], "imbalance": [1.5]}))
    stem = tmp_path / "charts" / "run8-h100-Qwen1.5-MoE-A2.7B-bs1-layer_imbalance"
    written = export_chart(chart, stem, ("png", "svg"))
    assert sorted(p.name for p in written) == [
        "run8-h100-Qwen1.5-MoE-A2.7B-bs1-layer_imbalance.png",
        "run8-h100-Qwen1.5-MoE-A2.7B-bs1-layer_imbalance.svg",
    ]
    png, svg = sorted(written)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in svg.read_text() and "Load imbalance per layer" in svg.read_text()


def test_export_formats_are_checked_and_can_be_none(tmp_path):
    chart = C.layer_imbalance(pl.DataFrame({"phase": ["decode"], "layer": [0], "imbalance": [1.5]}))
    assert export_chart(chart, tmp_path / "x", ()) == [] and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="png and/or svg"):
        export_chart(chart, tmp_path / "x", ("gif",))
