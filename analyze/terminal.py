"""Text from traces and users on the terminal: control characters escaped, rich markup inert.

Run ids, model ids, file names and error messages come from files anyone can write. Printed raw, an
escape sequence in one would reach the terminal (retitle it, hide lines, …) and a `[/red]` in one
would be read as rich markup (and crash it). `plain` makes text safe to print; `markup` also makes it
safe inside a rich markup string; `one_line` makes an error message one line.
"""

from __future__ import annotations

import re
from typing import IO

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """`text` with every control character (but tab and newline) written as a visible escape, \\x1b."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def markup(text: object) -> str:
    """`plain(text)` with rich markup escaped, for interpolation into a markup string."""
    from rich.markup import escape  # not at module level: error lines are printed before rich loads

    return escape(plain(text))


def one_line(text: object) -> str:
    """An error message as one safe line: line breaks become spaces."""
    return " ".join(plain(text).replace("\t", " ").split("\n")).strip()


class EscapingWriter:
    """A text stream that writes through `plain` (for data printed to a terminal, e.g. CSV rows)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(plain(text))

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def for_terminal(stream: IO[str]) -> IO[str]:
    """`stream` itself when it is a pipe or a file (data stays exact), else an `EscapingWriter`."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return EscapingWriter(stream) if tty else stream  # type: ignore[return-value]
