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


# --- msgspec's typed decoding (`reference.typed_read`): the same columns as Python's json, or none ---

typed_read = pytest.importorskip("moecap.analyze.reference.typed_read")


def _json_columns(data: bytes) -> Any:
    """The columns of Python's json path alone (msgspec left out), as `read_record_columns` takes them."""
    from moecap.analyze.reference.columns import json_record_columns

    return json_record_columns(Path("batch_data.json"), data)


def _assert_same_columns(a: Any, b: Any) -> None:
    import numpy as np

    from moecap.analyze.reference.columns import _NUMERIC

    assert a.n == b.n and a._modes == b._modes and list(a.prefill_index) == list(b.prefill_index)
    assert {k: a.first.get(k) for k in ("gpu_num", "gpu_raw_type")} == {
        k: b.first.get(k) for k in ("gpu_num", "gpu_raw_type")
    }
    for name in _NUMERIC:
        x, y = a.column(name), b.column(name)
        assert np.array_equal(x.values, y.values, equal_nan=True), name
        assert np.array_equal(x.nulls, y.nulls) and x.null_count == y.null_count, name
    assert a._info == [None if i is None else len(i) for i in b._info] or len(a._info) == len(b._info)
    ea, eb = a._entries, b._entries
    assert ea.n == eb.n and ea.pool == eb.pool and ea.last == eb.last
    assert [r is ea.absent for r in ea.req_id] == [r is eb.absent for r in eb.req_id]
    assert [None if r is ea.absent else r for r in ea.req_id] == [
        None if r is eb.absent else r for r in eb.req_id
    ]
    assert np.array_equal(ea.extend, eb.extend) and np.array_equal(ea.total, eb.total, equal_nan=True)
    assert np.array_equal(ea.total_null, eb.total_null)


def _text(records: list[dict[str, Any]]) -> str:
    return json.dumps(records)


def test_typed_decoding_gives_json_columns_for_every_generated_variant_and_oracle_case() -> None:
    cases = [_text(records) for records in _variants().values()]
    cases += [_text(c["records"]) for c in METRICS if isinstance(c["records"], list)]
    taken = 0
    for text in cases:
        data = text.encode()
        typed, plain = typed_read.typed_record_columns(data), _json_columns(data)
        if typed is None:
            continue
        taken += 1
        assert plain is not None
        _assert_same_columns(typed, plain)
    assert taken == len(cases), (taken, len(cases))  # all plain, all known keys: msgspec takes each


def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


_BASE = json.dumps(load_loop_module().synthetic_records(60, seed=5))

#: (case, file text, whether Python's json path takes it): msgspec leaves each of these to json.
_LEFT_TO_JSON = {
    "key-twice": (_edit(_BASE, '"latency": ', '"latency": 1.0, "latency": '), False),
    "key-twice-in-entry": (_edit(_BASE, '"extend_len": ', '"extend_len": 1, "extend_len": '), False),
    "nan-number": (_edit(_BASE, '"latency": ', '"latency": NaN, "x1": '), False),
    "nan-gpu-num": (_edit(_BASE, '"gpu_num": 8', '"gpu_num": NaN'), True),
    "infinity-gpu-num": (_edit(_BASE, '"gpu_num": 8', '"gpu_num": -Infinity'), True),
    "beyond-float64": (_edit(_BASE, '"latency": ', '"latency": 1e400, "x1": '), False),
    "huge-int": (_edit(_BASE, '"latency": ', '"latency": 123456789012345678901234567890, "x1": '), False),
    "non-ascii-id": (_BASE.replace('_1"', '_\u00e9"').replace("\\u00e9", "\u00e9"), True),
    "escaped-id": (_BASE.replace('_1"', '_\\u0031"'), True),
    "unknown-key": (_BASE.replace('"gpu_num": ', '"rank": 0, "gpu_num": '), True),
    "records-object": ('{"records": ' + _BASE + "}", False),
    "json-lines": ("\n".join(json.dumps(r) for r in json.loads(_BASE)) + "\n", True),
    "bool-number": (_edit(_BASE, '"latency": ', '"latency": true, "x1": '), False),
    "text-number": (_edit(_BASE, '"batch_size": ', '"batch_size": "4", "x1": '), False),
    "int-id": (_edit(_BASE, '"req_id": "', '"req_id": 7, "x1": "'), False),
    "trailing": (_BASE + " x", False),
    "form-feed": (_edit(_BASE, '"latency": ', '"latency": \f'), False),  # not JSON whitespace to either
    "empty": ("[]", False),
}


@pytest.mark.parametrize("case", list(_LEFT_TO_JSON))
def test_typed_decoding_leaves_what_json_might_read_otherwise_to_json(case: str, tmp_path: Path) -> None:
    text, json_takes = _LEFT_TO_JSON[case]
    data = text.encode()
    assert typed_read.typed_record_columns(data) is None
    path = tmp_path / "batch_data.json"
    path.write_bytes(data)
    got = read_record_columns(path)
    assert (got is not None) == json_takes
    if json_takes:
        _assert_same_columns(got, _json_columns(data))


def test_typed_decoding_reads_nulls_and_absent_fields_as_json_does() -> None:
    records = json.loads(_BASE)
    records[2]["latency"] = None
    records[3]["forward_mode"] = None
    records[4]["per_req_info"] = None
    del records[5]["batch_size"]
    del records[6]["gpu_num"]
    records[0]["gpu_num"] = None
    entries = [e for r in records[1:] for e in r.get("per_req_info") or []]
    assert len(entries) >= 4
    entries[0]["req_id"] = None  # a null id (keyed by it) and an absent one (keyed by the slot)
    del entries[1]["req_id"]
    entries[2]["is_last_chunk"] = None
    entries[3]["total_len"] = None
    data = json.dumps(records).encode()
    typed = typed_read.typed_record_columns(data)
    assert typed is not None
    _assert_same_columns(typed, _json_columns(data))
    assert typed.first == {"gpu_raw_type": "NVIDIA-H200-141GB", "gpu_num": None}


def test_typed_decoding_rounds_numbers_as_python_does() -> None:
    import random
    import struct

    rng = random.Random(11)
    texts = []
    while len(texts) < 3000:
        kind = rng.random()
        if kind < 0.4:  # any float64, subnormals included, shortest repr
            value = struct.unpack("d", rng.randbytes(8))[0]
            text = repr(abs(value))
        elif kind < 0.7:  # 17-25 significant digits: rounding matters
            text = f"{rng.randint(1, 10**25)}.{rng.randint(0, 10**20)}e{rng.randint(-320, 300)}"
        else:
            text = f"{rng.random() * 10 ** rng.randint(-8, 8):.{rng.randint(1, 20)}f}"
        if "n" not in text and float(text) < 2.0**53 and float(text) > 0:
            texts.append(text)
    raw = ("[" + ",".join(f'{{"forward_mode": "decode", "latency": {t}}}' for t in texts) + "]").encode()
    typed, plain = typed_read.typed_record_columns(raw), _json_columns(raw)
    assert typed is not None and plain is not None
    assert typed.column("latency").values.tobytes() == plain.column("latency").values.tobytes()


def test_without_msgspec_the_json_path_reads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _files(tmp_path, _synthetic(300), CONFIG)
    with_msgspec = read_record_columns(path)
    monkeypatch.setattr(typed_read, "msgspec", None)
    assert typed_read.typed_record_columns(path.read_bytes()) is None
    without = read_record_columns(path)
    assert with_msgspec is not None and without is not None
    _assert_same_columns(with_msgspec, without)


_NO_MSGSPEC = "import sys; sys.modules['msgspec'] = None\n"


def test_the_lean_process_without_msgspec_prints_the_full_commands_output(tmp_path: Path) -> None:
    path, config = _files(tmp_path, _synthetic(300), CONFIG)
    args = [str(path), "--formula", "reference", "--model-config", str(config), "--format", "json"]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MSGSPEC + _PROBE, json.dumps(args)],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout)
    assert (
        result["code"] == 0 and "msgspec._core" not in result["modules"] and "polars" not in result["modules"]
    )
    assert result["out"] == _full_process(args, tmp_path).stdout


@pytest.mark.parametrize("case", ["bool-number", "text-number", "int-id", "key-twice", "nan-number"])
def test_records_msgspec_rejects_give_the_full_commands_output_or_one_line_error(
    case: str, tmp_path: Path
) -> None:
    path, config = _files(tmp_path, [], CONFIG)
    path.write_text(_LEFT_TO_JSON[case][0])
    args = [str(path), "--formula", "reference", "--model-config", str(config), "--format", "json"]
    got, want = _entry(args, tmp_path), _full_process(args, tmp_path)
    assert (got["code"], got["out"], got["err"]) == (want.returncode, want.stdout, want.stderr)
    assert "Traceback" not in got["err"] and got["err"].count("\n") <= 1
