"""What `moecap-analyze`'s light commands import, checked in fresh interpreters (start-up time follows
from it; benchmarks/startup.py measures it): no data library for any of them, no command-line
framework for `--version` and a mistyped command, only the asked command's module for `CMD --help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from moecap.analyze import entry

ROOT = Path(__file__).resolve().parents[2]
DATA = {"polars", "duckdb", "pyarrow", "pandas", "numpy", "altair", "yaml"}
FRAMEWORK = {"typer", "rich", "pydantic", "click"}
MODULES = sorted({m for m in entry.COMMAND_MODULES.values() if m})

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
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(),
                  "modules": sorted(sys.modules)}))
"""


def _run(*args: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, cwd=cwd, check=True
    )
    return json.loads(proc.stdout)


def _top(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_version_and_a_mistyped_command_load_no_framework_and_no_data_library(tmp_path):
    version = _run("--version", cwd=tmp_path)
    assert version["code"] == 0 and version["out"].startswith("moecap-analyze ")
    mistyped = _run("sumary", "traces/", cwd=tmp_path)
    assert mistyped["code"] == 2 and "did you mean 'summary'?" in mistyped["err"]
    for result in (version, mistyped):
        assert not _top(result["modules"]) & (DATA | FRAMEWORK), sorted(
            _top(result["modules"]) & (DATA | FRAMEWORK)
        )


@pytest.mark.parametrize("command", ["summary", "sql", "whatif", "leaderboard", "fleet"])
def test_a_commands_help_imports_its_own_module_only_and_no_pydantic(command, tmp_path):
    result = _run(command, "--help", cwd=tmp_path)
    assert result["code"] == 0 and f"moecap-analyze {command} [OPTIONS]" in result["out"]
    loaded = set(result["modules"])
    assert not _top(result["modules"]) & (DATA | {"pydantic"})
    home = entry.COMMAND_MODULES[command]
    assert {m for m in MODULES if m in loaded} == ({home} if home else set())
    # Help is never the lean reference path's: it neither loads nor consults it.
    assert not {m for m in loaded if m.startswith(("moecap.analyze.lean", "moecap.analyze.reference"))}


def test_the_command_list_imports_every_command_module_and_no_data_library(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result["code"] == 0
    assert set(MODULES) <= set(result["modules"])
    assert not _top(result["modules"]) & DATA
    listed = [name for name in entry.COMMAND_MODULES if f"│ {name} " in result["out"]]
    assert listed == list(entry.COMMAND_MODULES)  # every command, in the table's order


def test_the_command_table_says_which_module_registers_which_command():
    import importlib

    for module in MODULES:
        app = typer.Typer()
        importlib.import_module(module).register(app)
        names = {info.name for info in app.registered_commands}
        assert names == {c for c, m in entry.COMMAND_MODULES.items() if m == module}, module
    from moecap.analyze import cli

    own = {info.name or info.callback.__name__ for info in cli.app.registered_commands[:3]}
    assert own == {c for c, m in entry.COMMAND_MODULES.items() if m is None}


def test_the_installed_script_runs_the_light_entry_point():
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    assert 'moecap-analyze = "moecap.analyze.entry:main"' in lines


def test_the_command_list_keeps_its_order_when_one_command_ran_first(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from moecap.analyze import cli\n"
        "for argv in (['fleet', '--help'], ['--help']):\n"
        "    sys.argv = ['moecap-analyze', *argv]\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out): cli.main()\n"
        "    except SystemExit: pass\n"
        "print(out.getvalue())\n"
    )
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout
    listed = [
        name for line in out.splitlines() for name in entry.COMMAND_MODULES if line.startswith(f"│ {name} ")
    ]
    assert listed == list(entry.COMMAND_MODULES)


def test_the_entry_point_raises_the_young_generation_threshold_and_keeps_collecting_cycles():
    """The analyzer process collects its young generation every GC_GEN0_THRESHOLD allocations, not
    CPython's 700; garbage collection stays on (reference cycles are still freed)."""
    code = (
        "import gc, sys\n"
        "from moecap.analyze import entry\n"
        "default = gc.get_threshold()\n"
        "sys.argv = ['moecap-analyze', 'summary', '--help']\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(default[0], gc.get_threshold()[0], gc.isenabled(), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    default, now, enabled = done.stderr.split()[-3:]
    assert int(default) == 700 and int(now) == 100_000 and enabled == "True"
