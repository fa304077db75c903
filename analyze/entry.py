"""`moecap-analyze`'s console-script entry point, and the command table `cli` registers from.

What needs no command-line framework is answered here before typer, rich and pydantic are imported:
`--version` alone, a mistyped command (the one-line "did you mean" error), and reference mode on
MoE-CAP record files with the options `lean` knows (it also does without polars). Everything else goes to
`cli.main`, which imports only the module of the command asked for (every module for the command
list of `--help`). Measured by `benchmarks/startup.py`.
"""

from __future__ import annotations

import gc
import sys

#: Every sub-command, in `--help` order, and the module that registers it with `register(app)`
#: (None: defined in `moecap.analyze.cli` itself).
COMMAND_MODULES: dict[str, str | None] = {
    "summary": None,
    "report": None,
    "check": None,
    "leaderboard": "moecap.analyze.report.cli",
    "sql": "moecap.analyze.sql.cli",
    "shell": "moecap.analyze.sql.cli",
    "whatif": "moecap.analyze.whatif.cli",
    "fleet": "moecap.analyze.fleet.cli",
}
#: What may come first on the command line without meaning `summary PATHS…`.
COMMANDS = frozenset({*COMMAND_MODULES, "--help", "-h", "--version"})
_MAX_ERROR_CHARS = 1000
GC_GEN0_THRESHOLD = 100_000
"""Allocations between young-generation collections for the analyzer process (CPython default: 700)."""


def mistyped_command(word: str) -> str | None:
    """The command `word` was probably meant to be ("sumary" -> "summary"), when `word` is no file,
    directory or glob and is close to a command name; None otherwise."""
    import difflib
    import glob
    from pathlib import Path

    if "/" in word or "." in word or word.startswith("-") or Path(word).exists() or glob.glob(word):
        return None
    match = difflib.get_close_matches(word, sorted(COMMAND_MODULES), n=1, cutoff=0.6)
    return match[0] if match else None


def fail(message: object, code: int = 2) -> None:
    """Print `message` as the one-line `moecap-analyze: error: …` on stderr and exit with `code`."""
    from .terminal import one_line

    line = one_line(message)
    if len(line) > _MAX_ERROR_CHARS:  # a message quoting a huge value (a parser's): its ends suffice
        half = _MAX_ERROR_CHARS // 2
        line = f"{line[:half]} … {line[-half:]}"
    sys.stderr.write(f"moecap-analyze: error: {line}\n")
    sys.stderr.flush()
    sys.exit(code)


def fail_if_mistyped(argv: list[str]) -> None:
    """Exit 2 with the "did you mean" line when the first word is a near-miss of a command name."""
    if argv and argv[0] not in COMMANDS:
        meant = mistyped_command(argv[0])
        if meant is not None:
            fail(
                f"no command or file {argv[0]!r}; did you mean '{meant}'? (moecap-analyze --help lists the commands)"
            )


def main() -> None:
    """`moecap-analyze`: `--version`, mistyped commands and lean reference mode here, everything else
    in `cli.main`."""
    argv = sys.argv[1:]
    if argv == ["--version"]:
        from . import __version__

        sys.stdout.write(f"moecap-analyze {__version__}\n")
        sys.stdout.flush()
        sys.exit(0)
    fail_if_mistyped(argv)
    # A one-shot command that builds many long-lived objects (imported modules, typer's adapters, batch
    # metadata): CPython's default gen-0 threshold (700) runs ~0.1 CPU s of collections that free
    # nothing at 5e4 trace steps (benchmarks/README.md). Reference cycles are still collected.
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    if any("reference" in arg for arg in argv):  # `--formula reference`: perhaps a lean command line
        from .lean import main as lean_main

        if lean_main(argv):  # reference mode on record files, without typer, pydantic or polars
            sys.exit(0)
    from .cli import main as cli_main

    cli_main()
