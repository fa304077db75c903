"""Running one query and writing its result: a text table, CSV, JSON / JSON lines or Parquet.

Results are read in Arrow record batches and written as they come (CSV, JSON) or by DuckDB itself
(Parquet), so an export never holds the whole result; the text table holds at most `max_rows` rows.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

from ..errors import AnalyzeError
from ..terminal import plain

FORMATS = ("table", "csv", "json", "jsonl", "parquet")
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "table",
}
_BATCH_ROWS = 8192
_CELL_WIDTH = 60


class QueryError(AnalyzeError):
    """DuckDB rejected a query (syntax, unknown table or column, type error, …)."""


def one_line(exc: BaseException) -> str:
    """DuckDB's error message on one line (its caret-marker lines dropped)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    return " ".join(ln for ln in lines if ln and set(ln) != {"^"})


def read_query(text: str, stdin: IO[str] | None = None) -> str:
    """The query itself, `@path` for a file holding it, or `-` for standard input."""
    if text == "-":
        return (stdin or sys.stdin).read()
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise QueryError(f"{path}: cannot read the query ({exc.strerror or exc})") from None
    return text


def run(
    con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = False
) -> duckdb.DuckDBPyRelation | None:
    """Run `query` (several `;`-separated statements run in order; the last one's result is returned,
    None where DuckDB gives no relation for it). DuckDB errors become one-line QueryErrors.
    `read_only`: refuse statements that write files or load extensions (see `readonly`), before any runs."""
    if read_only:
        from .readonly import refused_statement

        refused = refused_statement(con, query)
        if refused:
            raise QueryError(refused)
    try:
        return con.sql(query)
    except duckdb.Error as exc:
        message = one_line(exc)
        if read_only and (
            isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in message
        ):
            from .readonly import HINT

            message += f" ({HINT})"
        raise QueryError(message) from None


_RETURNING = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "EXECUTE", "RELATION"}
"""Statement types whose result is rows to show (DESCRIBE and SHOW parse as SELECT)."""


def _parse(con: duckdb.DuckDBPyConnection, query: str) -> list[Any]:
    try:
        return list(con.extract_statements(query))
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None


def run_each(
    con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyRelation]:
    """Run `query`'s statements in order (DuckDB's parser splits them: a ';' inside a string stays
    put), yielding each row-returning statement's result as it runs: a caller prints every result,
    not only the last one's. SET, CREATE and the like yield nothing. `read_only` as `run`: a refused
    statement anywhere stops the query before any statement runs."""
    statements = _parse(con, query)
    if read_only:
        from .readonly import refused_statement

        refused = refused_statement(con, query)
        if refused:
            raise QueryError(refused)
    for st in statements:
        rel = run(con, st.query, read_only=read_only)
        if rel is not None and st.type.name in _RETURNING:
            yield rel


def result_statements(con: duckdb.DuckDBPyConnection, query: str) -> int:
    """How many of `query`'s statements return rows (SELECT, DESCRIBE, SHOW, EXPLAIN, PRAGMA, CALL…)."""
    return sum(1 for st in _parse(con, query) if st.type.name in _RETURNING)


def infer_format(fmt: str | None, out: Path | None) -> str:
    """The output format: `fmt` if given, else from `out`'s suffix, else a text table. An `out`
    suffix that names no format (x.xlsx) is an error: writing a text table into it would hand the
    user a file their program cannot open."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise QueryError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    if out is not None:
        suffix = out.suffix.lower()
        if suffix not in _SUFFIX_FORMATS:
            raise QueryError(
                f"--out {out}: cannot tell the format from {suffix or 'a name without a suffix'!r}; expected "
                f"{', '.join(_SUFFIX_FORMATS)} (.txt: a text table), or give --format"
            )
        return _SUFFIX_FORMATS[suffix]
    return "table"


def _batches(rel: duckdb.DuckDBPyRelation) -> Iterator[pa.RecordBatch]:
    try:
        # to_arrow_reader is DuckDB >= 1.4's name; fetch_arrow_reader the older one (deprecated since).
        to_reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
        reader = to_reader(_BATCH_ROWS)
        while True:
            try:
                yield reader.read_next_batch()
            except StopIteration:
                return
    except duckdb.Error as exc:  # errors found while executing (a bad cast, a division by zero, …)
        raise QueryError(one_line(exc)) from None


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def write_json(rel: duckdb.DuckDBPyRelation, stream: IO[str], *, lines: bool = False) -> int:
    """Rows as a JSON array of objects (or one object per line); NaN/inf become null. Returns rows written."""
    n = 0
    if not lines:
        stream.write("[")
    for batch in _batches(rel):
        for row in batch.to_pylist():
            text = json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False)
            if lines:
                stream.write(text + "\n")
            else:
                stream.write(("\n" if n == 0 else ",\n") + text)
            n += 1
    if not lines:
        stream.write("\n]\n" if n else "]\n")
    return n


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(_json_value(v), ensure_ascii=False)
    if isinstance(v, Decimal):
        return _json_value(v)
    return v


def write_csv(rel: duckdb.DuckDBPyRelation, stream: IO[str]) -> int:
    """Rows as CSV with a header; lists as JSON text, NULL as an empty field. Returns rows written."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(rel.columns)
    n = 0
    for batch in _batches(rel):
        for row in batch.to_pylist():
            writer.writerow([_csv_value(v) for v in row.values()])
            n += 1
    return n


def write_parquet(rel: duckdb.DuckDBPyRelation, path: Path) -> None:
    """The result as a Parquet file (DuckDB streams it)."""
    try:
        rel.write_parquet(str(path), compression="zstd")
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        text = repr(v)
    elif isinstance(v, Decimal):
        text = str(_json_value(v))
    elif isinstance(v, str):
        text = v
    else:
        text = str(v)
    text = plain(text.replace("\n", "\\n").replace("\t", " "))  # no raw escape reaches the terminal
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def format_table(names: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool]) -> str:
    """A plain aligned text table: header, rule, rows (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(names)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


def _is_numeric(t: Any) -> bool:
    name = str(t).upper()
    return (
        any(k in name for k in ("INT", "DOUBLE", "FLOAT", "DECIMAL", "REAL", "NUMERIC")) and "[]" not in name
    )


def write_table(
    rel: duckdb.DuckDBPyRelation, stream: IO[str], *, max_rows: int | None = 100
) -> tuple[int, bool]:
    """The first `max_rows` rows (all when None or 0) as a text table. Returns (rows shown, truncated)."""
    limited = rel.limit(max_rows + 1) if max_rows else rel
    try:
        rows = limited.fetchall()
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    truncated = bool(max_rows) and len(rows) > (max_rows or 0)
    if truncated:
        rows = rows[:max_rows]
    stream.write(format_table(rel.columns, rows, [_is_numeric(t) for t in rel.types]))
    return len(rows), truncated


def write_result(
    rel: duckdb.DuckDBPyRelation,
    fmt: str,
    *,
    out: Path | None = None,
    stdout: IO[str] | None = None,
    max_rows: int | None = 100,
) -> str:
    """Write `rel` in `fmt` to `out` (or stdout) and return a one-line note for stderr."""
    stdout = stdout or sys.stdout
    if fmt == "parquet":
        if out is None:
            raise QueryError("--format parquet needs --out FILE")
        write_parquet(rel, out)
        return f"wrote {out}"
    try:
        handle: IO[str] = out.open("w", encoding="utf-8", newline="") if out is not None else stdout
    except OSError as exc:
        raise QueryError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    try:
        if fmt == "table":
            n, truncated = write_table(rel, handle, max_rows=max_rows)
            note = f"({n} row{'s' if n != 1 else ''}"
            note += "; more not shown: --max-rows 0 shows all, --format csv streams)" if truncated else ")"
        elif fmt == "csv":
            n = write_csv(rel, handle)
            note = f"({n} rows)"
        else:
            n = write_json(rel, handle, lines=fmt == "jsonl")
            note = f"({n} rows)"
    finally:
        if out is not None:
            handle.close()
    return f"wrote {out} {note}" if out is not None else note
