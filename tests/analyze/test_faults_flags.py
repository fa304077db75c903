"""Fault injection: bad flags, bad places, bad text, and traces that lack a table. A user error is one
line on stderr (exit 2, no traceback); text from a trace reaches the terminal escaped, never raw; a
trace of driver tables alone gets every output that needs no steps, and a note for the rest."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from faults_helpers import (
    ONE_LINE,
    RECOVERED,
    assert_one_line,
    base_run,
    cli,
    metrics_json,
    rewrite_metadata,
    strict_json,
)

OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_run(tmp_path_factory.mktemp("faults") / "clean")


# -- flags and places -----------------------------------------------------------------------------
def _file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a directory")
    return path


CACHE_CASES = [
    ("cache_dir_is_a_file", lambda tmp: (["--cache-dir", _file(tmp)], {}), "is not a directory"),
    (
        "cache_dir_under_a_file",
        lambda tmp: (["--cache-dir", _file(tmp) / "sub"], {}),
        "cannot write the Parquet cache",
    ),
    (
        "cache_dir_unwritable",
        lambda tmp: (["--cache-dir", "/proc/moecap-cache"], {}),
        "cannot write the Parquet cache",
    ),
    ("env_cache_dir_is_a_file", lambda tmp: ([], {"MOECAP_CACHE_DIR": str(_file(tmp))}), "MOECAP_CACHE_DIR"),
]
OUTCOMES |= {c[0]: ONE_LINE for c in CACHE_CASES}


@pytest.mark.parametrize("command", ["summary", "check", "sql"])
@pytest.mark.parametrize(("case", "make", "said"), CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_unusable_cache_dir_is_one_line(
    clean: Path, tmp_path: Path, command: str, case: str, make, said: str
) -> None:
    args, env = make(tmp_path)
    head = [command, "SELECT 1"] if command == "sql" else [command]
    assert_one_line(cli(*head, clean, *args, env=env), said)


GPU_OVERRIDES = [
    (
        "gpu_override_nan",
        "memory_bandwidth_tb_s: .nan",
        "memory_bandwidth_tb_s must be a finite number above 0",
    ),
    (
        "gpu_override_inf",
        "memory_bandwidth_tb_s: .inf",
        "memory_bandwidth_tb_s must be a finite number above 0",
    ),
    ("gpu_override_negative", "memory_bandwidth_tb_s: -3.35", "must be a finite number above 0, got -3.35"),
    ("gpu_override_zero", "memory_bandwidth_tb_s: 0", "must be a finite number above 0, got 0"),
    (
        "gpu_override_nan_flops",
        "memory_bandwidth_tb_s: 3.35\n    tflops_dense: {bf16: .nan}",
        "tflops_dense: field bf16",
    ),
]
OUTCOMES |= {c[0]: ONE_LINE for c in GPU_OVERRIDES}


@pytest.mark.parametrize(("case", "field", "said"), GPU_OVERRIDES, ids=[c[0] for c in GPU_OVERRIDES])
def test_gpu_override_must_be_finite_and_positive(
    clean: Path, tmp_path: Path, case: str, field: str, said: str
) -> None:
    yaml = tmp_path / "gpus.yaml"
    if "tflops_dense" not in field:
        field += "\n    tflops_dense: {bf16: 989.4}"
    yaml.write_text(f"gpus:\n  - name: H100-SXM-80GB\n    memory_gb: 80\n    {field}\n")
    for command in (["summary"], ["report", "--out", tmp_path / "r"], ["whatif", "--gpu", "H100-SXM-80GB"]):
        assert_one_line(cli(*command, clean, "--gpu-overrides", yaml, "--cache-dir", tmp_path / "c"), said)


FLAG_CASES = [
    ("strict_true", ["--strict", "true"], "--strict takes no value"),
    ("strict_equals_true", ["--strict=true"], "--strict"),
    ("unknown_option", ["--no-such-flag"], "No such option: --no-such-flag"),
    ("bad_formula", ["--formula", "nope"], "expected moecap or reference"),
    ("bad_window", ["--window", "bogus"], "--window 'bogus'"),
]
OUTCOMES |= {c[0]: ONE_LINE for c in FLAG_CASES}


@pytest.mark.parametrize(("case", "args", "said"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags_are_one_line(clean: Path, tmp_path: Path, case: str, args: list[str], said: str) -> None:
    assert_one_line(cli(clean, *args, "--cache-dir", tmp_path / "c"), said)


def test_strict_true_on_check_and_sql_too(clean: Path, tmp_path: Path) -> None:
    assert_one_line(
        cli("check", clean, "--strict", "true", "--cache-dir", tmp_path / "c"), "--strict takes no value"
    )
    assert_one_line(cli("sql", "SELECT 1", clean, "--strict", "yes"), "--strict takes no value")


OUTCOMES["strict_true_check_sql"] = ONE_LINE


# -- reference-mode record files ------------------------------------------------------------------
RECORD_FILES = [
    ("records_not_utf8", b'\xff\xfe[{"forward_mode": "decode"}]', "cannot read"),
    ("records_nested_too_deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (
        "records_nested_too_deep_jsonl",
        b'{"forward_mode": "decode"}\n' + b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
        "line 2: JSON nested too deeply",
    ),
    (
        "records_null_request_entry",
        b'[{"forward_mode": "decode", "batch_size": 1, "seq_lens_sum": 9, "latency": 0.01,'
        b' "expert_activation": 2.0, "gpu_num": 1, "gpu_raw_type": "H100",'
        b' "per_req_info": [{"req_id": "a", "extend_len": 1, "total_len": 9}, null]}]',
        "record 0: per_req_info[1] is null, not an object",
    ),
]
OUTCOMES |= {c[0]: ONE_LINE for c in RECORD_FILES}


@pytest.mark.parametrize(("case", "data", "said"), RECORD_FILES, ids=[c[0] for c in RECORD_FILES])
def test_bad_batch_data_json_is_one_line(tmp_path: Path, case: str, data: bytes, said: str) -> None:
    records = tmp_path / "batch_data.json"
    records.write_bytes(data)
    r = cli(records, "--formula", "reference", "--model-config", "Qwen/Qwen1.5-MoE-A2.7B", "--gpu", "H100")
    assert_one_line(r, "batch_data.json", said)


def test_a_long_error_stays_one_line(tmp_path: Path) -> None:
    # a record whose field holds 500 nested lists: the parser's message quotes the value
    records = tmp_path / "batch_data.json"
    records.write_text(
        '{"records": [{"forward_mode": "decode", "batch_size": ' + "[" * 500 + "1" + "]" * 500 + "}]}"
    )
    r = cli(records, "--formula", "reference", "--model-config", "Qwen/Qwen1.5-MoE-A2.7B", "--gpu", "H100")
    assert len(assert_one_line(r)) <= 1200


OUTCOMES["long_error_one_line"] = ONE_LINE


# -- text from traces on the terminal -------------------------------------------------------------
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def _raw_control(text: str) -> bool:
    return any(c in text for c in "\x1b\x07\x9b")


def test_rich_markup_in_a_model_id_prints_literally(clean: Path, tmp_path: Path) -> None:
    model = "evil[/red]model[bold]x"
    trace = rewrite_metadata(
        clean, tmp_path / "t", lambda r: dataclasses.replace(r, model=dataclasses.replace(r.model, id=model))
    )
    r = cli(trace, "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert model in r.stdout.replace("\n", "")
    r = cli("report", trace, "--out", tmp_path / "r", "--whatif-gpu", "none", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and model in r.stdout.replace("\n", ""), r.stderr[-2000:]
    r = cli("whatif", trace, "--gpu", "H200", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and model in r.stdout.replace("\n", ""), r.stderr[-2000:]


OUTCOMES["rich_markup_in_model_id"] = RECOVERED


def test_escape_sequences_in_a_run_id_are_escaped_on_the_terminal(clean: Path, tmp_path: Path) -> None:
    run_id = f"20260101T000000Z-x{ESCAPES}-0000"
    trace = rewrite_metadata(clean, tmp_path / "t", lambda r: dataclasses.replace(r, run_id=run_id))
    shown = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m"
    for args in (
        [trace],
        ["check", trace],
        ["report", trace, "--out", tmp_path / "r", "--whatif-gpu", "none"],
        ["sql", "SELECT run_id FROM runs", trace],
        ["whatif", trace, "--gpu", "H200"],
    ):
        r = cli(*args, "--cache-dir", tmp_path / "c")
        assert r.returncode == 0 and not _raw_control(r.stdout + r.stderr), (
            args,
            r.stdout[-500:],
            r.stderr[-500:],
        )
        assert shown in r.stdout.replace("\n", ""), (args, r.stdout[-1000:])
    # the JSON on stdout carries it as JSON escapes, and parses back to the exact id
    r = cli(trace, "--format", "json", "--cache-dir", tmp_path / "c")
    assert not _raw_control(r.stdout) and strict_json(r.stdout)["runs"][0]["run_id"] == run_id


OUTCOMES["escape_sequences_in_run_id"] = RECOVERED


# -- a trace of driver tables alone ---------------------------------------------------------------
@pytest.fixture(scope="module")
def drive_only(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("drive") / "t"
    shutil.copytree(clean, out)
    for path in out.glob("*.dp0-pp0-tp0.*.arrow"):
        path.unlink()  # steps and experts: what the engine records
    return out


def test_drive_only_trace_gets_every_output_that_needs_no_steps(
    clean: Path, drive_only: Path, tmp_path: Path
) -> None:
    got = metrics_json(drive_only, tmp_path / "out", tmp_path / "c")
    want = metrics_json(clean, tmp_path / "out_clean", tmp_path / "c")
    want["metrics"]["requests"].pop("client_engine_join")  # joins the client's requests to steps
    assert got["metrics"]["requests"] == want["metrics"]["requests"]
    assert got["metrics"]["cost"]["usd_per_1m_output_tokens"] > 0  # cost needs requests and time only
    assert got["metrics"]["steps"] == {} and any(
        w.startswith("the run has no steps table") for w in got["warnings"]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "requests.parquet"]

    r = cli(
        "report", drive_only, "--out", tmp_path / "r", "--whatif-gpu", "none", "--cache-dir", tmp_path / "c"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "note: no run has a steps table" in r.stderr
    assert (tmp_path / "r" / "report.html").exists()
    assert strict_json((tmp_path / "r" / "metrics.json").read_text())["runs"][0]["metrics"]["requests"]

    r = cli(drive_only, "--format", "csv", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and "requests,,ttft_s.mean" in r.stdout, r.stderr[-3000:]
    r = cli("check", drive_only, "--cache-dir", tmp_path / "c")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr


OUTCOMES["drive_only_summary_report_check"] = RECOVERED


def test_drive_only_whatif_is_one_line(drive_only: Path, tmp_path: Path) -> None:
    assert_one_line(cli("whatif", drive_only, "--gpu", "H200", "--cache-dir", tmp_path / "c"), "steps")


OUTCOMES["drive_only_whatif"] = ONE_LINE


def test_metrics_json_is_strict_json_where_a_value_is_not_finite(clean: Path, tmp_path: Path) -> None:
    # A run with no experts table: S-MBU and the expert statistics are NaN inside, null outside.
    trace = tmp_path / "t"
    shutil.copytree(clean, trace)
    next(trace.glob("*.experts.arrow")).unlink()
    doc = metrics_json(trace, tmp_path / "out", tmp_path / "c")
    assert doc["metrics"]["steps"]["all"]["s_mbu"] is None
    text = cli(trace, "--format", "json", "--window", "all", "--cache-dir", tmp_path / "c").stdout
    assert strict_json(text)["runs"][0]["metrics"] == doc["metrics"]
    assert "NaN" not in text and "Infinity" not in text
    json.loads((tmp_path / "out" / "metrics.json").read_text())


OUTCOMES["metrics_json_strict"] = RECOVERED


def _on_a_terminal(*args: object) -> str:
    """stdout of `moecap-analyze ARGS…` written to a pseudo-terminal (as a user's shell shows it)."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    code = "from moecap.analyze.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_sql_csv_is_escaped_on_a_terminal_and_exact_in_a_pipe(clean: Path, tmp_path: Path) -> None:
    run_id = f"20260101T000000Z-x{ESCAPES}-0000"
    trace = rewrite_metadata(clean, tmp_path / "t", lambda r: dataclasses.replace(r, run_id=run_id))
    args = ("sql", "SELECT run_id FROM runs", trace, "-f", "csv", "--cache-dir", tmp_path / "c")
    shown = _on_a_terminal(*args)
    assert "\\x1b]0;pwned" in shown and not _raw_control(shown), shown
    piped = cli(*args)
    assert piped.returncode == 0 and piped.stdout.splitlines()[1] == run_id  # data for a program: exact


OUTCOMES["sql_csv_on_terminal"] = RECOVERED


COST_FLAGS = [
    ("gpu_price_nan", ["--gpu-price-usd", "nan"], "price_usd must be a finite number"),
    ("gpu_hour_inf", ["--usd-per-gpu-hour", "inf"], "usd_per_gpu_hour must be a finite number"),
    ("gpu_price_negative", ["--gpu-price-usd", "-1"], "price_usd must be >= 0"),
]
OUTCOMES |= {c[0]: ONE_LINE for c in COST_FLAGS}


@pytest.mark.parametrize(("case", "args", "said"), COST_FLAGS, ids=[c[0] for c in COST_FLAGS])
def test_cost_flags_must_be_finite(
    clean: Path, tmp_path: Path, case: str, args: list[str], said: str
) -> None:
    assert_one_line(cli(clean, *args, "--cache-dir", tmp_path / "c"), said)


def test_empty_step_metrics_view_has_the_real_views_columns(clean: Path, tmp_path: Path) -> None:
    """A run without steps gets a `step_metrics` view of no rows but every column (so the report's
    queries run); kept equal to the view a real run gets."""
    from moecap.analyze.analysis import EMPTY_STEP_METRICS_COLUMNS, Options
    from moecap.analyze.pipeline import analyze_paths

    a = analyze_paths([str(clean)], Options(window="all"), cache_dir=tmp_path / "c")
    real = [(name, kind) for name, kind, *_ in a.db.con.execute("DESCRIBE step_metrics").fetchall()]
    assert real == list(EMPTY_STEP_METRICS_COLUMNS)
