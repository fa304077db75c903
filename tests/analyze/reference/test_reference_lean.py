"""Reference mode without typer, pydantic or polars (`moecap.analyze.lean`, `reference.columns`).

The lean path must print exactly what the full command line prints (`cli.main` through typer, the
record frame through polars) for the same arguments, load none of those libraries, and leave every
other command line, unusual record and error to the full command line, whose one-line errors and exit
codes are then the ones the user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from reference_helpers import load_loop_module, oracle_cases
from typer.testing import CliRunner

from moecap.analyze import lean
from moecap.analyze.cli import app
from moecap.analyze.output import document_json
from moecap.analyze.reference.columns import read_record_columns

METRICS = oracle_cases("metrics")
CONFIG = {
    "_name_or_path": "Qwen/Qwen3-30B-A3B",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
}  # fmt: skip


def _full(args: list[str]) -> str:
    """stdout of the full command line (typer, and the frame for the records)."""
    result = CliRunner().invoke(app, ["summary", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def _lean(args: list[str]) -> str | None:
    """stdout of the lean path as `lean.main` prints it (JSON / CSV), or None where it declines."""
    params = lean.parse(args)
    assert params is not None, args
    try:
        document = lean.run(params)
    except lean._NotLean:
        return None
    if params["format"] == "json":
        return document_json(document, ascii_only=True) + "\n"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from moecap.analyze.output import print_csv

        print_csv(document)
    return out.getvalue().replace("\r\n", "\n")  # as click's test runner gives the full command's


def _files(
    tmp_path: Path, records: Any, config: dict[str, Any], name: str = "batch_data.json"
) -> tuple[Path, Path]:
    path, config_path = tmp_path / name, tmp_path / "config.json"
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    config_path.write_text(json.dumps(config))
    return path, config_path


@pytest.mark.parametrize("case", METRICS, ids=[c["name"] for c in METRICS])
def test_oracle_case_lean_output_is_the_full_commands(case: dict[str, Any], tmp_path: Path) -> None:
    path, config = _files(tmp_path, case["records"], case["model_config"])
    args = [
        str(path), "--formula", "reference", "--model-config", str(config), "--model-name", case["model_id"],
        "--gpu", case["hardware"], "--num-gpus", str(case["num_gpus"]), "--precision", case["precision"],
        "--num-requests", str(case["num_requests"]), "--format", "json",
    ]  # fmt: skip
    got = _lean(args)
    if got is None:  # records the columns do not take: the full command line reads them
        assert read_record_columns(path) is None
        return
    assert got == _full(args)


def test_most_oracle_cases_take_the_lean_path(tmp_path: Path) -> None:
    taken = 0
    for i, case in enumerate(METRICS):
        path, _ = _files(tmp_path, case["records"], case["model_config"], f"case{i}.json")
        taken += read_record_columns(path) is not None
    assert taken >= len(METRICS) * 2 // 3, (taken, len(METRICS))


def _synthetic(n: int) -> list[dict[str, Any]]:
    return load_loop_module().synthetic_records(n, seed=3)


def _variants() -> dict[str, list[dict[str, Any]]]:
    base = _synthetic(3000)
    plain_prefill = [{k: v for k, v in r.items() if k != "per_req_info"} for r in base]
    with_nulls = [dict(r) for r in base]
    for i in (5, 77, 901):  # decode steps without an activation, one without a batch size
        with_nulls[i]["expert_activation"] = None
    del with_nulls[1203]["batch_size"]
    mixed = [
        dict(r, forward_mode="mixed") if i % 7 == 3 and r["forward_mode"] == "decode" else r
        for i, r in enumerate(base)
    ]
    slots = [dict(r) for r in base]  # entries keyed by slot (no req_id) or by an explicit null id
    for r in slots[:600]:
        if "per_req_info" in r:
            r["per_req_info"] = [
                {k: v for k, v in e.items() if k != "req_id"} if j % 2 else dict(e, req_id=None)
                for j, e in enumerate(r["per_req_info"])
            ]
    warm_up = [dict(r) for r in base]  # a warm-up probe with per_req_info: only some passes' entries
    warm_up[20] = dict(warm_up[20], seq_lens_sum=8)
    zero_latency = [dict(r) for r in base]
    zero_latency[41]["latency"] = 0
    return {
        "chunked": base,
        "plain_prefill": plain_prefill,
        "nulls": with_nulls,
        "mixed_modes": mixed,
        "slots_and_null_ids": slots,
        "warm_up_pass": warm_up,
        "zero_latency": zero_latency,
    }


@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_generated_records_lean_output_is_the_full_commands(variant: str, fmt: str, tmp_path: Path) -> None:
    records = _variants()[variant]
    name = "batch_data.jsonl" if variant == "mixed_modes" else "batch_data.json"
    path, config = _files(tmp_path, records, CONFIG, name)
    args = [
        str(path), "--formula", "reference", "--model-config", str(config), "--gpu", "NVIDIA-H200-141GB",
        "--num-requests", "900", "--total-time-s", "61.5", "--format", fmt,
    ]  # fmt: skip
    assert read_record_columns(path) is not None  # the lean path takes these records
    got = _lean(args)
    assert got is not None and got == _full(args)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r[3].update(latency=True),  # a bool where a number belongs
        lambda r: r[3].update(latency="0.02"),  # a number as text
        lambda r: r[3].update(latency=2**60),  # an integer beyond float64's exact range
        lambda r: r[3].update(forward_mode=1),
        lambda r: r[3].update(per_req_info=[]),  # per_req_info on a decode step
        lambda r: r[0]["per_req_info"][0].update(req_id=7),  # an integer request id
        lambda r: r[0]["per_req_info"][0].update(extend_len=512.0),
        lambda r: r[0]["per_req_info"].append(None),
        lambda r: r.clear(),
    ],
    ids=[
        "bool",
        "text",
        "huge-int",
        "mode-int",
        "info-on-decode",
        "int-id",
        "float-len",
        "null-entry",
        "empty",
    ],
)
def test_records_that_are_not_plain_are_left_to_the_frame(change: Any, tmp_path: Path) -> None:
    records = _synthetic(60)
    change(records)
    path, _ = _files(tmp_path, records, CONFIG)
    assert read_record_columns(path) is None


def test_a_key_written_twice_or_a_nan_is_left_to_the_frame(tmp_path: Path) -> None:
    text = json.dumps(_synthetic(60))
    twice = tmp_path / "twice.json"
    twice.write_text(text.replace('"latency": ', '"latency": 1.0, "latency": ', 1))
    nan = tmp_path / "nan.json"
    nan.write_text(text.replace('"expert_activation": ', '"expert_activation": NaN, "x": ', 1))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"records": ' + text + "}")
    assert read_record_columns(twice) is None
    assert read_record_columns(nan) is None
    assert read_record_columns(wrapped) is None  # its one extra key: left to the frame as well
    assert read_record_columns(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["summary", "--help"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--window", "all"],
        ["r.json", "--model-config", "c.json", "--format", "json"],  # formula moecap
        ["r.json", "t.arrow", "--formula", "reference", "--model-config", "c.json"],
        ["r.json", "--formula", "reference"],  # no model config
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--num-gpus", "1e3"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--num-gpus", "08"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--gpu"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--gpu", "-x"],
        ["r.json", "--formula", "reference", "--formula", "reference", "--model-config", "c.json"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--format", "yaml"],
        ["r.json", "--formula", "reference", "--model-config", "c.json", "--out", "o"],  # table + --out
        ["sql", "r.json"],
    ],
)
def test_command_lines_the_lean_path_leaves_to_the_full_one(args: list[str]) -> None:
    assert lean.parse(args) is None


def test_lean_command_lines_parse_as_click_would() -> None:
    params = lean.parse(
        ["summary", "a.json", "--formula=reference", "--model-config", "c.json", "b.jsonl", "--num-gpus", "4",
         "--total-time-s", "12.5", "--format", "csv", "--out", "o"]
    )  # fmt: skip
    assert params is not None
    assert params["paths"] == ["a.json", "b.jsonl"]
    assert (params["num_gpus"], params["total_time_s"], params["format"]) == (4, 12.5, "csv")
    assert params["out"] == Path("o") and params["gpu"] is None and params["precision"] is None


def test_the_lean_options_are_the_summary_commands_own() -> None:
    """Same flag, parameter name, value type and default as `cli.summary` (one definition: the lean
    table may only name a subset)."""
    import typer.main

    summary = typer.main.get_command(app).commands["summary"]  # type: ignore[attr-defined]
    by_flag = {opt: p for p in summary.params for opt in p.opts}
    for flag, (name, kind) in lean.LEAN_OPTIONS.items():
        param = by_flag[flag]
        assert param.name == name, flag
        assert param.type_descriptor.annotation is kind, flag
        assert param.default == lean.DEFAULTS[name], flag


_PROBE = """
import contextlib, io, json, sys
sys.argv = ['moecap-analyze', *json.loads(sys.argv[1])]
from moecap.analyze.entry import main
out, err = io.StringIO(), io.StringIO()
code = 0
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "modules": sorted(sys.modules)}))
"""


def _entry(args: list[str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, cwd=cwd, check=True
    )
    return json.loads(proc.stdout)


def _full_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from moecap.analyze.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_the_lean_path_loads_no_framework_and_no_frame_library(tmp_path: Path) -> None:
    path, config = _files(tmp_path, _synthetic(400), CONFIG)
    args = [str(path), "--formula", "reference", "--model-config", str(config), "--format", "json"]
    result = _entry(args, tmp_path)
    assert result["code"] == 0, result["err"]
    top = {m.split(".")[0] for m in result["modules"]}
    assert not top & {"typer", "click", "pydantic", "rich", "polars", "pyarrow", "pandas", "duckdb", "yaml"}
    assert result["out"] == _full_process(args, tmp_path).stdout


def test_the_table_through_the_lean_path_is_the_full_commands(tmp_path: Path) -> None:
    path, config = _files(tmp_path, _synthetic(400), CONFIG)
    args = [str(path), "--formula", "reference", "--model-config", str(config)]
    result = _entry(args, tmp_path)
    assert result["code"] == 0 and "polars" not in result["modules"] and "typer" not in result["modules"]
    assert result["out"] == _full_process(args, tmp_path).stdout


@pytest.mark.parametrize(
    "setup",
    ["missing", "not-json", "no-records", "bad-config"],
)
def test_bad_input_gives_the_full_commands_one_line_error(setup: str, tmp_path: Path) -> None:
    path, config = _files(tmp_path, _synthetic(50), CONFIG)
    if setup == "missing":
        path = tmp_path / "nope.json"
    elif setup == "not-json":
        path.write_text("[{'forward_mode': 'decode'}]")
    elif setup == "no-records":
        path.write_text("[]")
    else:
        config.write_text("[1, 2]")
    args = [str(path), "--formula", "reference", "--model-config", str(config), "--format", "json"]
    got, want = _entry(args, tmp_path), _full_process(args, tmp_path)
    assert (got["code"], got["out"], got["err"]) == (want.returncode, want.stdout, want.stderr)
    assert (
        got["code"] == 2 and got["err"].startswith("moecap-analyze: error: ") and got["err"].count("\n") == 1
    )
