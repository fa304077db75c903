"""The README's two set-up commands are what CI runs, and they name real things."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must open with a bash block of set-up commands"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    commands = _commands()
    assert len(commands) == 2
    assert "moecap-analyze traces/*.arrow" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_main_job_has_sample_traces_to_read():
    assert len(list((ROOT / "traces").glob("*.steps.arrow"))) >= 2


def test_every_analyze_and_collect_command_is_in_the_readme():
    """A user finds each command in the README: the analyzer's and the collector's sub-commands."""
    text = (ROOT / "README.md").read_text()
    for command in ("report", "leaderboard", "whatif", "check", "sql"):
        assert f"moecap-analyze {command} " in text, command
    for command in ("run", "serve", "sweep", "import-moecap", "import-sglang-dump"):
        assert f"moecap-collect {command} " in text, command
