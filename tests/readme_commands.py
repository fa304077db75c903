"""The shell commands of README.md, as a reader copies them (shared by tests/ and .ci/wheel-jobs.sh).

    python3 tests/readme_commands.py setup N       # the N-th set-up command of the first bash block (1-based)
    python3 tests/readme_commands.py find PREFIX   # the one example command that starts with PREFIX
    python3 tests/readme_commands.py notebooks     # the commands of notebooks/README.md, one a line

An example is a line of a ```bash block with its backslash continuations joined and its trailing
`# comment` dropped; comment-only lines are skipped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_blocks(text: str | None = None) -> list[str]:
    text = README.read_text() if text is None else text
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """The commands of one bash block: continuations joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        line = _strip_comment(line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        out.append((pending + line.strip()).strip())
        pending = ""
    if pending:
        out.append(pending.strip())
    return out


def _strip_comment(line: str) -> str:
    """`cmd   # note` -> `cmd` (a # outside quotes that follows whitespace starts a comment)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def setup_commands() -> list[str]:
    """The set-up commands of the README's first bash block."""
    return commands(bash_blocks()[0])


def examples() -> list[str]:
    """Every command of the README's bash blocks after the first."""
    return [c for block in bash_blocks()[1:] for c in commands(block)]


def find(prefix: str) -> str:
    matches = [c for c in examples() if c.startswith(prefix)]
    if len(matches) != 1:
        raise SystemExit(f"README.md: {len(matches)} example commands start with {prefix!r}, expected 1")
    return matches[0]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "setup":
        print(setup_commands()[int(sys.argv[2]) - 1])
    elif len(sys.argv) == 3 and sys.argv[1] == "find":
        print(find(sys.argv[2]))
    elif sys.argv[1:] == ["notebooks"]:
        (block,) = bash_blocks((README.parent / "notebooks" / "README.md").read_text())
        print("\n".join(commands(block)))
    else:
        raise SystemExit(__doc__)
