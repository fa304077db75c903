"""Normalising answers before comparison: numbers, and the LaTeX of boxed maths answers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_PLAIN = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)$")


def parse_number(text: str | None) -> Fraction | None:
    """An exact number from `1,234`, `-2.50`, `$26.00`, `30%`, `1/2`, `\\frac{1}{2}`, `-\\frac12`; else None."""
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-").replace("$", "").replace("\\%", "").rstrip("%").strip()
    s = s.rstrip(".") if not s.endswith("..") else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _PLAIN.match(s):
        try:
            return Fraction(Decimal(s))
        except (InvalidOperation, ValueError):
            return None
    m = re.fullmatch(r"(-?)\\[dt]?frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s.replace(" ", ""))
    if m is None:
        m = re.fullmatch(r"(-?)(\d+)/(\d+)", s.replace(" ", ""))
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) else value
    return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Both parse as numbers and are equal exactly (`72.00` == `72`, `1,625` == `1625`)."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "\\$")


def normalize_math(text: str) -> str:
    """A canonical form of a LaTeX answer for string comparison.

    Drops sizing and spacing commands, `$`, degree and percent signs, `\\text{}`-style wrappers, a
    leading `x =`, a trailing period and all whitespace; `\\dfrac`/`\\tfrac` -> `\\frac`; shorthand
    `\\frac12` -> `\\frac{1}{2}` and `\\sqrt2` -> `\\sqrt{2}`.
    """
    s = text.strip()
    for _ in range(3):
        s = _UNWRAP.sub(r"\1", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\{?\\circ\}?", "", s).replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"[a-zA-Z]=(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    return s.rstrip(".")


def _set_items(s: str) -> list[str] | None:
    m = re.fullmatch(r"\\\{(.*)\\\}", s)
    return sorted(m.group(1).split(",")) if m else None


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Boxed-answer equality: equal numbers (exact, fractions and decimals alike), else equal normalised
    LaTeX, with `\\{a,b\\}` sets compared without order."""
    if pred is None or ref is None:
        return False
    a, b = normalize_math(pred), normalize_math(ref)
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y
    if a == b:
        return True
    sa, sb = _set_items(a), _set_items(b)
    return sa is not None and sa == sb
