"""Reading a model's final answer out of its output text.

Every extractor first drops reasoning (`<think>…</think>`, `<reasoning>…</reasoning>`, gpt-oss'
`…assistantfinal`), then looks for explicit answer markers and takes the *last* one (models restate
and correct themselves; the last statement is the answer). Fallbacks are per dataset and documented
on each function. None means "no answer found".
"""

from __future__ import annotations

import re

NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\uff0d": "-"})


def strip_reasoning(text: str) -> tuple[str, bool]:
    """(answer part, complete): the text after the last reasoning block. `complete` is False when a
    reasoning block was opened and never closed (the output was cut off while thinking)."""
    for close in ("</think>", "</reasoning>"):
        if close in text:
            return text.rsplit(close, 1)[1], True
    if "assistantfinal" in text:
        return text.rsplit("assistantfinal", 1)[1], True
    if "<think>" in text or "<reasoning>" in text:
        return text, False
    return text, True


_GSM8K_MARKERS = [
    re.compile(rf"####\s*\**\s*\\?\$?\s*({NUMBER})"),
    re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\s*\\?\$?\s*({NUMBER})\s*(?:\\?%)?\s*\}}?\s*\}}"),
    re.compile(rf"(?i:answer)\s*(?:(?i:is)|:|=)\s*[:\s]*\**\s*\\?\$?\s*({NUMBER})"),
]
_LAST_NUMBER = re.compile(rf"({NUMBER})")


def extract_gsm8k(text: str, *, flexible: bool = True) -> str | None:
    """The final number of a GSM8K answer, as written (commas kept), or None.

    Explicit markers, last one wins: `#### N`, `\\boxed{N}`, `answer is N` / `answer: N` (markdown bold
    and a `$` allowed). `flexible` (default) falls back to the last number in the text, as lm-eval's
    flexible-extract does; not when the output stopped inside its reasoning (the last number there is
    an intermediate step).
    """
    body, complete = strip_reasoning(text.translate(_MINUS))
    best: tuple[int, str] | None = None
    for pattern in _GSM8K_MARKERS:
        for m in pattern.finditer(body):
            if best is None or m.end(1) > best[0]:
                best = (m.end(1), m.group(1))
    if best is not None:
        return best[1]
    if not flexible or not complete:
        return None
    numbers = _LAST_NUMBER.findall(body)
    return numbers[-1] if numbers else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` (braces balanced), or None."""
    best = None
    for marker in ("\\boxed", "\\fbox"):
        i = text.rfind(marker)
        while i >= 0:
            j = i + len(marker)
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                if best is None or i > best:
                    best = i
                break
            i = text.rfind(marker, 0, i)
    if best is None:
        return None
    start = text.index("{", best)
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : k].strip()
    return None


def extract_boxed(text: str) -> str | None:
    """The last boxed expression after the reasoning, or None (NuminaMath / MATH answers are boxed)."""
    body, _ = strip_reasoning(text)
    return last_boxed(body)


def extract_choice(text: str, letters: str) -> str | None:
    """The option letter (one of `letters`, upper case) a multiple-choice answer picks, or None.

    Markers, last one wins: `(The correct) answer is (X)` / `answer is X` / `answer: X` (markdown
    stripped). Fallback: an output that is just the letter (`B`, `(B)`, `B.`). No bare-letter search
    elsewhere: "A" is also an English word.
    """
    body, _ = strip_reasoning(text)
    body = body.replace("*", "").replace("_", " ")
    cls = f"[{letters}]"
    patterns = [
        re.compile(rf"(?i:answer\s+is)\s*:?\s*(?:(?i:option|choice)\s*)?\(?({cls})\)?(?![A-Za-z0-9])"),
        re.compile(rf"(?i:answer)\s*:\s*(?:(?i:option|choice)\s*)?\(?({cls})\)?(?![A-Za-z0-9])"),
    ]
    best: tuple[int, str] | None = None
    for p in patterns:
        for m in p.finditer(body):
            if best is None or m.end(1) > best[0]:
                best = (m.end(1), m.group(1))
    if best is not None:
        return best[1]
    alone = re.fullmatch(rf"\s*\(?({cls})\)?[.:)]?\s*", body)
    return alone.group(1) if alone else None
