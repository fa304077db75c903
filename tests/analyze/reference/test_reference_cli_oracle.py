"""Issue 4's acceptance check: every public oracle metrics case through the public CLI.

`moecap-analyze <records.json> --formula reference --model-config <config.json> --gpu <hardware>
--num-gpus <n> --precision <p> --out DIR`, then DIR/metrics.json compared with the reference's values
(within 1e-9 relative) under the reference's names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moecap.analyze.cli import app

CASES = [
    c for c in json.loads((Path(__file__).parents[2] / "data" / "oracle_cases.json").read_text())["cases"]
]
METRICS = [c for c in CASES if c["kind"] == "metrics"]


def _close(got: Any, want: Any) -> bool:
    if want is None or got is None:
        return got is want
    if isinstance(want, bool) or not isinstance(want, (int, float)):
        return got == want
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300)


@pytest.mark.parametrize("case", METRICS, ids=[c["name"] for c in METRICS])
def test_oracle_case_through_the_cli(case: dict[str, Any], tmp_path: Path) -> None:
    records = tmp_path / "batch_data.json"
    records.write_text(json.dumps(case["records"]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(case["model_config"]))
    out = tmp_path / "out"
    args = [
        "summary",
        str(records),
        "--formula", "reference",
        "--model-config", str(config),
        "--model-name", case["model_id"],
        "--gpu", case["hardware"],
        "--num-gpus", str(case["num_gpus"]),
        "--precision", case["precision"],
        "--num-requests", str(case["num_requests"]),
        "--total-time-s", repr(case["total_time_s"]),
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    published = {**run["batch_metrics"], **run["run_level"]}
    if case["reference_exception"]:
        # The reference crashed: the nine batch metrics are null and the reason is stated.
        assert all(run["batch_metrics"][k] is None for k in run["batch_metrics"])
        assert run["warnings"] and "raises" in run["warnings"][0]
    wrong = {
        k: (published.get(k), v)
        for k, v in case["expected"].items()
        if not (case["reference_exception"] and k in run["batch_metrics"]) and not _close(published.get(k), v)
    }
    assert not wrong, wrong
