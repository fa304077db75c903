"""Both programs' `--help` command lists show each command's one-line summary.

typer's rich help prints the first paragraph of a command's help as it stands, single line breaks
included, so a docstring whose first paragraph spans two source lines printed as a ragged, broken row.
Checked on the rendered output, wide enough that no summary wraps: every row of the Commands panel starts
with a command name, none is a continuation line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

PROGRAMS = {
    "moecap-analyze": "from moecap.analyze.cli import main; main()",
    "moecap-collect": "from moecap.collect.cli import main; main()",
}


def _command_rows(program: str) -> list[str]:
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    p = subprocess.run(
        [sys.executable, "-c", PROGRAMS[program], "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    panel = p.stdout.split("Commands")[1].split("╰")[0]
    return [line.strip("│ ").rstrip() for line in panel.splitlines()[1:] if line.strip("│ ").strip()]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_command_row_is_one_line(program):
    rows = _command_rows(program)
    names = [row.split()[0] for row in rows]
    assert len(rows) >= 7  # every command is listed (analyze 8, collect 7)
    assert all(re.fullmatch(r"[a-z][a-z-]*", name) for name in names), rows
    assert len(set(names)) == len(names)
    assert all(len(row.split(None, 1)) == 2 for row in rows)  # a name and its summary
