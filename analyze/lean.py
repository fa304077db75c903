"""Reference mode on MoE-CAP record files without typer, pydantic or polars.

`moecap-analyze [summary] FILE.json … --formula reference --model-config C [options]` spends most of a
1e5-record run importing libraries that this case does not need: typer and rich (the command line),
pydantic (typer validates options with it) and polars (the record frame), ~0.3-0.4 CPU s against the
~1 s of the MoE-CAP reference's whole process (benchmarks/README.md). `entry.main` hands such a command
line here first. It is answered here only when every argument is one this module knows
(`LEAN_OPTIONS`, each of them an option of `cli.summary` with the same name, type and default, which
tests/analyze/reference/test_reference_lean.py checks), its values are plain, and the records are plain
(`reference.columns`); the document is then built by the same `reference_bridge` function and
`reference.metrics` formulas as in the full command, and printed by the same `output` functions.
Anything else - another option, `--help`, an unusual value, a record the columns do not take, any
error - goes to the full command line (`cli.main`), which gives its own output or one-line error: the
lean path never prints an error of its own.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

#: The `summary` options answered here: flag -> (parameter of `cli.summary`, value type). Paths must
#: be record files (`is_record_file`) and --formula must be reference.
LEAN_OPTIONS: dict[str, tuple[str, type]] = {
    "--formula": ("formula", str),
    "--model-config": ("model_config", str),
    "--model-name": ("model_name", str),
    "--gpu": ("gpu", str),
    "--num-gpus": ("num_gpus", int),
    "--precision": ("precision", str),
    "--num-requests": ("num_requests", int),
    "--total-time-s": ("total_time_s", float),
    "--format": ("format", str),
    "--out": ("out", Path),
}
#: Defaults of those parameters in `cli.summary` (checked by the same test).
DEFAULTS: dict[str, Any] = {name: None for name, _ in LEAN_OPTIONS.values()} | {
    "formula": "moecap",
    "format": "table",
}
#: Number texts whose meaning no parser disputes (no sign, exponent, underscore or leading zero).
_PLAIN_VALUE = {
    int: re.compile(r"(0|[1-9][0-9]{0,17})"),
    float: re.compile(r"(0|[1-9][0-9]{0,14})(\.[0-9]{1,15})?"),
}


def is_record_file(path: str) -> bool:
    """A MoE-CAP record file (batch_data.json, JSON Lines) rather than a trace path."""
    return path.endswith((".json", ".jsonl"))


class _NotLean(Exception):
    """This command line or input is left to the full command line."""


def parse(argv: list[str]) -> dict[str, Any] | None:
    """The parameters of a lean command line, or None when it is not one (see module docstring)."""
    if argv and argv[0] == "summary":
        argv = argv[1:]
    values: dict[str, Any] = {}
    paths: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            paths.append(arg)
            i += 1
            continue
        flag, eq, value = arg.partition("=")
        if flag not in LEAN_OPTIONS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        name, kind = LEAN_OPTIONS[flag]
        if name in values or not value or value.startswith("-"):
            return None  # a repeated option, an empty or dash-led value: as click and typer decide
        if kind in _PLAIN_VALUE:
            if not _PLAIN_VALUE[kind].fullmatch(value):
                return None
            values[name] = kind(value)
        else:
            values[name] = kind(value)
    params = DEFAULTS | values
    if (
        not paths
        or not all(map(is_record_file, paths))
        or params["formula"] != "reference"
        or params["format"] not in ("table", "json", "csv")
        or params["model_config"] is None
        or (params["out"] is not None and params["format"] == "table")
    ):
        return None
    params["paths"] = paths
    return params


def _read_columns(path: Path) -> Any:
    from .reference.columns import read_record_columns

    columns = read_record_columns(path)
    if columns is None:
        raise _NotLean
    return columns


def run(params: dict[str, Any]) -> dict[str, Any]:
    """The metrics document of a lean command line (raises where the full command line decides)."""
    from .reference_bridge import reference_document_for_records
    from .settings import METRICS_SCHEMA

    runs = [
        reference_document_for_records(
            Path(p),
            model_config=params["model_config"],
            model_name=params["model_name"],
            gpu=params["gpu"],
            num_gpus=params["num_gpus"],
            precision=params["precision"],
            num_requests=params["num_requests"],
            total_time_s=params["total_time_s"],
            read=_read_columns,
        )
        for p in params["paths"]
    ]
    return {"schema": METRICS_SCHEMA, "formula": "reference", "runs": runs}


def main(argv: list[str]) -> bool:
    """Answer a lean command line (True), or do nothing and return False for `cli.main`."""
    params = parse(argv)
    if params is None:
        return False
    try:
        document = run(params)
    except Exception:
        return False
    from types import SimpleNamespace

    from .output import print_document, write_outputs

    if params["out"] is not None:
        analysis = SimpleNamespace(db=None, contexts=[], document=document, windows={})
        try:
            write_outputs(analysis, params["out"], "csv" if params["format"] == "csv" else "parquet")
        except Exception:
            return False
    if params["format"] == "table":
        from .report.terminal import print_runs

        print_runs(document, detail=False)
    else:
        print_document(document, params["format"])
    sys.stdout.flush()
    return True
