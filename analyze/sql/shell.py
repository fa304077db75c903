"""Interactive use: a SQL prompt over the views, a Python REPL, or a DuckDB database file for other clients.

The SQL prompt reads statements ending in `;` (from a terminal with line editing and history, or
piped from stdin), prints each result as a table and each DuckDB error as one line. Dot commands:
`.tables`, `.schema VIEW`, `.mode table|csv|json|jsonl`, `.maxrows N`, `.examples`, `.example NAME`,
`.help`, `.quit`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import duckdb

from .catalog import VIEWS
from .examples import EXAMPLES_BY_NAME
from .query import FORMATS, QueryError, run_each, write_result
from .tables import Tables, needs_run_metrics

_HELP = """\
End each SQL statement with ';'. Views: .tables; their columns: .schema VIEW (docs/sql.md has units).
  .tables               views and what one row is
  .schema VIEW          columns and types of a view
  .mode FORMAT          table (default), csv, json or jsonl
  .maxrows N            rows shown in table mode (0 = all; default 100)
  .examples             the documented example queries; .example NAME runs one
  .help                 this text
  .quit                 leave (or Ctrl-D)"""


class SqlShell:
    """A line-oriented SQL prompt over a `Tables`."""

    def __init__(
        self,
        t: Tables,
        *,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        read_only: bool = False,
    ) -> None:
        self.t = t
        self.read_only = read_only
        """Refuse statements that write files or load extensions (`readonly`)."""
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.mode = "table"
        self.max_rows = 100
        self.errors = 0

    # -- one unit of input ------------------------------------------------------------------------
    def execute(self, statement: str) -> None:
        """Run one statement (or several separated by ';') and print its result."""
        try:
            if needs_run_metrics(statement) and not self.t.has_run_metrics:
                # The first use computes every run's metrics: say so rather than sit silent.
                self.stderr.write(
                    f"computing the run-level metrics of {len(self.t.runs)} run(s) (once per session)…\n"
                )
                self.stderr.flush()
                t0 = time.monotonic()
                self.t.ensure_run_metrics()
                self.stderr.write(f"run-level metrics ready ({time.monotonic() - t0:.1f} s)\n")
            for rel in run_each(self.t.con, statement, read_only=self.read_only):
                note = write_result(rel, self.mode, stdout=self.stdout, max_rows=self.max_rows)
                if self.mode == "table":
                    self.stderr.write(note + "\n")
        except QueryError as exc:
            self.error(str(exc))

    def error(self, message: str) -> None:
        self.errors += 1
        self.stderr.write(f"error: {message}\n")

    def dot(self, line: str) -> bool:
        """Handle a dot command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in (".quit", ".exit", ".q"):
            return False
        if cmd == ".help":
            self.stdout.write(_HELP + "\n")
        elif cmd in (".tables", ".views"):
            for name in self.t.views:
                doc = VIEWS.get(name)
                self.stdout.write(f"{name:<18} {doc.grain if doc else ''}\n")
        elif cmd == ".schema":
            if not arg:
                self.error(".schema needs a view name (see .tables)")
            else:
                self.execute(f'DESCRIBE "{arg}"')
        elif cmd == ".mode":
            if arg not in FORMATS or arg == "parquet":
                self.error(f".mode {arg!r}: expected table, csv, json or jsonl")
            else:
                self.mode = arg
        elif cmd == ".maxrows":
            try:
                self.max_rows = max(0, int(arg))
            except ValueError:
                self.error(f".maxrows {arg!r}: expected a number")
        elif cmd == ".examples":
            for name, e in EXAMPLES_BY_NAME.items():
                self.stdout.write(f"{name:<32} {e.title}\n")
        elif cmd == ".example":
            example = EXAMPLES_BY_NAME.get(arg)
            if example is None:
                self.error(f".example {arg!r}: unknown; see .examples")
            else:
                self.stdout.write(example.sql.strip() + "\n")
                self.execute(example.sql)
        else:
            self.error(f"unknown command {cmd}; .help lists them")
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def loop(self, stdin: IO[str] | None = None, *, interactive: bool | None = None) -> int:
        """Read and run statements until EOF or .quit. Returns 0, or 2 when a piped statement failed."""
        stdin = stdin or sys.stdin
        if interactive is None:
            interactive = stdin is sys.stdin and stdin.isatty()
        read = _terminal_reader() if interactive else _stream_reader(stdin)
        if interactive:
            runs = len(self.t.runs)
            self.stdout.write(
                f"moecap SQL shell: {runs} run{'s' if runs != 1 else ''}, views "
                f"{', '.join(self.t.views)}.\nEnd statements with ';'. .help for commands, .quit to leave.\n"
            )
        buffer: list[str] = []
        while True:
            line = read("moecap> " if not buffer else "   ...> ")
            if line is None:
                break
            if not buffer and line.strip().startswith("."):
                if not self.dot(line):
                    break
                continue
            buffer.append(line)
            text = "\n".join(buffer).strip()
            if not text:
                buffer = []
                continue
            if text.endswith(";"):
                buffer = []
                self.execute(text)
        rest = "\n".join(buffer).strip()
        if rest:
            self.execute(rest)
        return 2 if self.errors and not interactive else 0


def _stream_reader(stream: IO[str]) -> Callable[[str], str | None]:
    def read(prompt: str) -> str | None:
        line = stream.readline()
        return None if line == "" else line.rstrip("\n")

    return read


def _terminal_reader() -> Callable[[str], str | None]:
    with contextlib.suppress(ImportError):  # line editing and history for input(), where available
        import readline  # noqa: F401

    def read(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            sys.stdout.write("\n")
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return ""

    return read


def python_repl(t: Tables) -> None:
    """A Python REPL (IPython when installed) with `t` (Tables), `con`, `sql`, `lazy`, `pl`, `duckdb` bound."""
    import polars as pl

    namespace = {"t": t, "con": t.con, "sql": t.sql, "lazy": t.lazy, "pl": pl, "duckdb": duckdb}
    banner = (
        f"moecap: {len(t.runs)} run(s). t.sql('SELECT …').pl(), t.lazy('steps'), con (DuckDB), t.document.\n"
        f"Views: {', '.join(t.views)}"
    )
    try:
        from IPython import start_ipython
    except ImportError:
        import code

        code.interact(banner=banner, local=namespace)
        return
    print(banner)
    start_ipython(argv=[], user_ns=namespace)


def save_database(t: Tables, path: Path) -> tuple[list[str], list[str]]:
    """Write a DuckDB database file holding the views (over the same cached files) and the small
    tables, for the `duckdb` CLI or any DuckDB client. Returns (names saved, names left out): views
    that read data registered from Python (the loader's Arrow datasets) cannot live in a file."""
    t.ensure_run_metrics()
    con = t.con
    if path.exists():
        path.unlink()
    target = str(path).replace("'", "''")
    home = con.sql("SELECT current_database()").fetchall()[0][0]
    con.execute(f"ATTACH '{target}' AS moecap_saved")
    saved: list[str] = []
    try:
        kinds = con.sql(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = 'main'"
        ).fetchall()
        for name, kind in kinds:
            if kind == "BASE TABLE":
                con.execute(f'CREATE TABLE moecap_saved.main."{name}" AS SELECT * FROM "{name}"')
                saved.append(name)
        pending = dict(
            con.sql(
                "SELECT view_name, sql FROM duckdb_views() "
                "WHERE NOT internal AND NOT temporary AND database_name = current_database()"
            ).fetchall()
        )
        con.execute("USE moecap_saved")
        try:
            # A view binds what it reads when created: create in rounds until no more can be.
            progressed = True
            while pending and progressed:
                progressed = False
                for name, sql in list(pending.items()):
                    try:
                        con.execute(sql)
                    except duckdb.CatalogException:
                        continue
                    saved.append(name)
                    del pending[name]
                    progressed = True
        finally:
            con.execute(f'USE "{home}"')
    finally:
        con.execute("DETACH moecap_saved")
    return saved, sorted(pending)
