"""Start-up time of `moecap-analyze`'s light commands beside the interpreter's own floors.

`python benchmarks/startup.py [--repeat N] [--before DIR]` runs each command below as a fresh process,
N rounds (default 15), every round going once through every command in order, so each sees the same
machine load; prints a table of medians (and the best) in seconds:

* floors: `python -c pass` (interpreter start-up) and `python -c "import typer"` (the CLI framework);
* `moecap-analyze --help`, `--version`, `summary --help`, `sql --help`, `whatif --help`, and a
  mistyped command (`sumary traces/`: the one-line "did you mean" error, exit 2).

Each command runs as `python -c "from moecap.analyze.entry import main; main()" ARGS` (`cli.main` for
a version without `entry.py`), which is what the installed `moecap-analyze` script runs. `--before DIR`: also run every command with `DIR` first on
`PYTHONPATH`, where DIR holds a `moecap` folder of another version (e.g. `git worktree add /tmp/old
main && mkdir /tmp/before && ln -s /tmp/old /tmp/before/moecap`), alternating with this version in the
same rounds; the table then has a "before" column. Also prints the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What the installed `moecap-analyze` script runs: `entry.main`, or `cli.main` in versions before entry.py.
ENTRY = "import sys; sys.argv[0] = 'moecap-analyze'; from moecap.analyze.{} import main; main()"
COMMANDS: dict[str, list[str]] = {
    "--help": ["--help"],
    "--version": ["--version"],
    "summary --help": ["summary", "--help"],
    "sql --help": ["sql", "--help"],
    "whatif --help": ["whatif", "--help"],
    "mistyped (sumary traces/)": ["sumary", "traces/"],
}
FLOORS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import typer"': [sys.executable, "-c", "import typer"],
}


def _time(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, env=env, cwd=os.getcwd())  # exit 2 is the mistyped case
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--before", help="a folder holding another version's `moecap` package")
    args = ap.parse_args()
    before_env, before_module = None, "entry"
    if args.before:
        before_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([args.before, os.environ.get("PYTHONPATH", "")]),
        }
        probe = "import moecap, sys; print(list(moecap.__path__)[0])"
        where = subprocess.run([sys.executable, "-c", probe], env=before_env, capture_output=True, text=True)
        print(f"before: moecap from {where.stdout.strip()}")
        # An editable install's finder would also serve this version's new modules to the other one.
        before_module = "entry" if (Path(args.before) / "moecap/analyze/entry.py").exists() else "cli"
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for name, cmd in FLOORS.items():
            times.setdefault((name, "floor"), []).append(_time(cmd))
        for name, argv in COMMANDS.items():
            cmd = [sys.executable, "-c", ENTRY.format("entry"), *argv]
            times.setdefault((name, "now"), []).append(_time(cmd))
            if before_env is not None:
                cmd = [sys.executable, "-c", ENTRY.format(before_module), *argv]
                times.setdefault((name, "before"), []).append(_time(cmd, before_env))
    print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"median (best) of {args.repeat} rounds, seconds")
    head = f"{'process':<28} {'now':>15}" + (f" {'before':>15}" if before_env else "")
    print(head)
    for name in [*FLOORS, *COMMANDS]:
        sides = ["floor"] if name in FLOORS else ["now", *(["before"] if before_env else [])]
        cells = [f"{statistics.median(times[name, s]):.3f} ({min(times[name, s]):.3f})" for s in sides]
        print(f"{name:<28} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
