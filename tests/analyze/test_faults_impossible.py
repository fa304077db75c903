"""Fault injection: values no measurement can give. Each bad row is named by `check`, left out of every
metric with a warning that says how many rows, and the metrics equal those of the same trace with that
row deleted (the oracle); metrics.json stays strict JSON. Outcome of every case: warned exclusion."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from faults_helpers import (
    WARNED,
    base_run,
    cli,
    drop_rows,
    metrics_json,
    rewrite,
    set_value,
    trace_file,
)

from moecap.schemas import TraceWriter, read_trace_file

ROW = 30  # a step / request in the middle of the run


def _list_with_first(table: pa.Table, column: str, value: int) -> pa.Table:
    values = table.column(column)[ROW].as_py()
    return set_value(table, column, ROW, [value, *values[1:]])


def _first_token_before_arrival(t: pa.Table) -> pa.Table:
    arrival = t.column("arrival_ns")[3].as_py()
    return set_value(t, "first_token_ns", 3, arrival - 62 * 10**9 // 100)  # 0.62 s early, still > 0


def _finish_before_first_token(t: pa.Table) -> pa.Table:
    return set_value(t, "finish_ns", 3, t.column("first_token_ns")[3].as_py() - 1)


def _negative_count(t: pa.Table) -> pa.Table:
    counts = t.column("counts")[ROW].as_py()
    counts[0] = -(2**31) + 7
    return set_value(t, "counts", ROW, counts)


# (case id, table, edit, rows of that table it breaks (request index 3 or step row ROW), reason in check)
CASES: list[tuple[str, str, Callable[[pa.Table], pa.Table], str]] = [
    ("step_time_2^62", "steps", lambda t: set_value(t, "t_end_ns", ROW, 2**62), "a timestamp outside"),
    (
        "step_gpu_time_negative",
        "steps",
        lambda t: set_value(t, "gpu_start_ns", ROW, -5),
        "a timestamp outside",
    ),
    (
        "step_negative_new_tokens",
        "steps",
        lambda t: _list_with_first(t, "req_new_tokens", -500),
        "a negative token or request count",
    ),
    (
        "step_num_tokens_wrapped",
        "steps",
        lambda t: set_value(t, "num_tokens", ROW, 3_000_000_000 - 2**32),
        "a negative token or request count",
    ),
    (
        "step_prefix_2^31-1",
        "steps",
        lambda t: _list_with_first(t, "req_prefix_lens", 2**31 - 1),
        "a context above 16,777,216 tokens",
    ),
    ("experts_count_wrapped", "experts", _negative_count, "a negative expert count"),
    (
        "request_first_token_before_arrival",
        "requests",
        _first_token_before_arrival,
        "first_token_ns before arrival_ns",
    ),
    (
        "request_finish_before_first_token",
        "requests",
        _finish_before_first_token,
        "finish_ns before first_token_ns",
    ),
    (
        "request_output_tokens_wrapped",
        "requests",
        lambda t: set_value(t, "output_tokens", 3, 3_000_000_000 - 2**32),
        "a negative token count",
    ),
    (
        "request_arrival_2^62",
        "requests",
        lambda t: set_value(t, "arrival_ns", 3, 2**62),
        "a timestamp outside",
    ),
    ("power_nan", "gpu_samples", lambda t: set_value(t, "power_w", 40, math.nan), "a power that is NaN"),
    ("power_inf", "gpu_samples", lambda t: set_value(t, "power_w", 40, math.inf), "a power that is NaN"),
    ("power_negative", "gpu_samples", lambda t: set_value(t, "power_w", 40, -350.0), "a power that is NaN"),
]
OUTCOMES = {case[0]: WARNED for case in CASES}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_run(tmp_path_factory.mktemp("faults") / "clean")


def _bad_row(kind: str, case: str) -> int:
    return {"steps": ROW, "experts": ROW, "requests": 3, "gpu_samples": 40}[kind]


def _oracle(clean: Path, dst: Path, kind: str, row: int) -> Path:
    """The clean trace with the bad row deleted (and, for a step, its expert counts with it; a bad
    experts row leaves its step without counts, as a truncated experts file would)."""
    rewrite(clean, dst, kind, lambda t: drop_rows(t, [row]))
    if kind == "steps":
        other = "experts"
        path = trace_file(dst, other)
        trace = read_trace_file(path)
        table = drop_rows(trace.table, [row])
        path.unlink()
        with TraceWriter(path, other, trace.run) as w:
            for b in table.to_batches():
                w.write_batch(b)
    return dst


@pytest.mark.parametrize(("case", "kind", "edit", "reason"), CASES, ids=[c[0] for c in CASES])
def test_impossible_value_is_named_left_out_and_counted(
    clean: Path, tmp_path: Path, case: str, kind: str, edit: Callable[[pa.Table], pa.Table], reason: str
) -> None:
    bad = rewrite(clean, tmp_path / "bad", kind, edit)
    row = _bad_row(kind, case)
    oracle = _oracle(clean, tmp_path / "oracle", kind, row)

    # check names it (and does not crash): one line with the reason and the count
    r = cli("check", bad, "--cache-dir", tmp_path / "c")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    named = [ln for ln in r.stdout.splitlines() if reason in ln]
    assert len(named) == 1 and "1 row(s) left out" in named[0], r.stdout

    got = metrics_json(bad, tmp_path / "out", tmp_path / "c")  # parsed strictly: no NaN / Infinity
    want = metrics_json(oracle, tmp_path / "out_oracle", tmp_path / "c")
    assert got["metrics"] == want["metrics"]
    warned = [w for w in got["warnings"] if reason in w]
    assert len(warned) == 1 and "1 row(s) left out" in warned[0] and trace_file(bad, kind).name in warned[0]


def test_nan_power_costs_a_number_not_nan(clean: Path, tmp_path: Path) -> None:
    bad = rewrite(clean, tmp_path / "bad", "gpu_samples", lambda t: set_value(t, "power_w", 40, math.nan))
    r = cli(bad, "--window", "all", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "$nan" not in r.stdout and "energy from measured" in r.stdout.replace("\n", " ")


def test_strict_refuses_an_impossible_value_in_one_line(clean: Path, tmp_path: Path) -> None:
    from faults_helpers import assert_one_line

    bad = rewrite(clean, tmp_path / "bad", "steps", lambda t: set_value(t, "t_end_ns", ROW, 2**62))
    assert_one_line(cli(bad, "--strict", "--cache-dir", tmp_path / "c"), "a timestamp outside", "--strict")


OUTCOMES["strict_refuses_impossible_value"] = "one line"
OUTCOMES["nan_power_cost_is_a_number"] = WARNED
