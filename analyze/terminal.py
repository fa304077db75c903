"""Text from traces and users on the terminal: control characters escaped, rich markup inert.

Run ids, model ids, file names and error messages come from files anyone can write. Printed raw, an
escape sequence in one would reach the terminal (retitle it, hide lines, …) and a `[/red]` in one
would be read as rich markup (and crash it). `plain` makes text safe to print; `markup` also makes it
safe inside a rich markup string; `one_line` makes an error message one line.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """`text` with every control character (but tab and newline) written as a visible escape, \\x1b."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def markup(text: object) -> str:
    """`plain(text)` with rich markup escaped, for interpolation into a markup string."""
    return escape(plain(text))


def one_line(text: object) -> str:
    """An error message as one safe line: line breaks become spaces."""
    return " ".join(plain(text).replace("\t", " ").split("\n")).strip()
