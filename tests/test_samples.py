"""The shipped MoE-CAP sample (traces/moecap-reference/batch_data.json) gives the reference's numbers.

Its records are those of one oracle case (values computed by running the MoE-CAP reference, not by
this code); the README's reference example, run on it, must publish the oracle's values.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import readme_commands
from typer.testing import CliRunner

from moecap.analyze.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "traces" / "moecap-reference" / "batch_data.json"
CASE = "chunked|deepseek-ai/DeepSeek-V2-Lite|H100-80GB-SXM|tp1|bf16"
#: Need --num-requests / --total-time-s, which a batch_data.json does not hold.
RUN_FACTS = ("e2e_s", "request_per_s")


def _case() -> dict:
    cases = json.loads((ROOT / "tests" / "data" / "oracle_cases.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == CASE)


def test_the_sample_is_the_oracle_cases_records():
    case = _case()
    assert json.loads(SAMPLE.read_text()) == case["records"]
    assert case["reference_exception"] is None
    modes = [r["forward_mode"] for r in case["records"]]
    assert modes.count("prefill") >= 5 and modes.count("decode") >= 2
    assert any(not r.get("per_req_info", [{}])[0].get("is_last_chunk", True) for r in case["records"])


def test_the_readme_reference_example_gives_the_oracles_numbers(tmp_path, monkeypatch):
    command = readme_commands.find("moecap-analyze traces/moecap-reference/batch_data.json")
    args = shlex.split(command)[1:]
    assert "--formula" in args and args[args.index("--formula") + 1] == "reference"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "traces").symlink_to(ROOT / "traces")
    result = CliRunner().invoke(app, ["summary", *args])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "ref" / "metrics.json").read_text())["runs"][0]
    got = {**run["batch_metrics"], **run["run_level"]}
    expected = {k: v for k, v in _case()["expected"].items() if k not in RUN_FACTS}
    assert len(expected) >= 15
    wrong = {
        k: (got.get(k), v)
        for k, v in expected.items()
        if not (
            (v is None and got.get(k) is None)
            or (v is not None and got.get(k) is not None and math.isclose(got[k], v, rel_tol=1e-9))
        )
    }
    assert not wrong, wrong
    assert all(got[k] is None for k in RUN_FACTS)
