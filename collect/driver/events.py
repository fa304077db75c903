"""What the driver accepts from a server: every field it reads in a streamed event or a whole response,
type-checked before anything is counted.

A server's JSON can be valid and still the wrong shape (`{"choices": "x"}`, `{"choices": [null]}`, a
`completion_tokens` of NaN or 1e14). `parse_event` turns one decoded JSON value into an `Event` or raises
`BadEvent`, whose message names the field, what was expected and what came
(`usage.completion_tokens: expected a non-negative integer < 2^31, got 1e+14`); the client then fails that
request with the message and the run goes on. Token counts are bounded by the `requests` table's int32
columns, so a count that would not fit is refused here, where the request is still known.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_COUNT = 2**31 - 1
"""Largest token count accepted (the int32 count columns of the `requests` table)."""


class BadEvent(ValueError):
    """A field of a server's JSON that is not what the OpenAI API says; the message names it."""


@dataclass(frozen=True)
class Usage:
    """A usage block, in tokens (None: not reported)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True)
class Choice:
    """The first choice of an event: text and reasoning pieces, and what it says about its token count."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    listed_tokens: int | None = None
    """Tokens the choice lists (logprobs entries or token ids); None when it lists none."""
    listed_source: str | None = None
    """logprobs | token_ids: where `listed_tokens` came from."""


@dataclass(frozen=True)
class Event:
    """One streamed event (or a whole response), checked. `error`: the server's own error message."""

    id: str | None = None
    error: str | None = None
    choice: Choice | None = None
    usage: Usage | None = None


def parse_event(obj: Any, *, whole: bool = False) -> Event:
    """Check one decoded JSON value: a streamed chunk (`whole=False`, text under `delta`) or a whole
    response (`whole=True`, text under `message`). Raises BadEvent naming the first bad field."""
    if not isinstance(obj, dict):
        raise BadEvent(f"{'response' if whole else 'event'}: expected a JSON object, got {show(obj)}")
    if obj.get("error") is not None or obj.get("object") == "error":
        err = obj.get("error", obj)
        msg = err.get("message") if isinstance(err, dict) else err
        return Event(error=one_line(str(msg)))
    event_id = _opt_str(obj, "id", "")
    usage = _usage(obj.get("usage"))
    choices = obj.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise BadEvent(f"choices: expected a list, got {show(choices)}")
    checked = [_choice(c, f"choices[{i}]", whole) for i, c in enumerate(choices)]
    return Event(id=event_id, choice=checked[0] if checked else None, usage=usage)


def _choice(c: Any, where: str, whole: bool) -> Choice:
    if not isinstance(c, dict):
        raise BadEvent(f"{where}: expected an object, got {show(c)}")
    finish = _opt_str(c, "finish_reason", where)
    key = "message" if whole else "delta"
    body = c.get(key)
    if body is not None and not isinstance(body, dict):
        raise BadEvent(f"{where}.{key}: expected an object, got {show(body)}")
    text = _opt_str(c, "text", where) or ""
    reasoning = ""
    if body is not None:
        text = _opt_str(body, "content", f"{where}.{key}") or text
        reasoning = (
            _opt_str(body, "reasoning_content", f"{where}.{key}")
            or _opt_str(body, "reasoning", f"{where}.{key}")
            or ""
        )
    listed, source = _listed_tokens(c, where)
    return Choice(text, reasoning, finish, listed, source)


def _listed_tokens(c: dict[str, Any], where: str) -> tuple[int | None, str | None]:
    logprobs = c.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, dict):
            raise BadEvent(f"{where}.logprobs: expected an object, got {show(logprobs)}")
        for key in ("tokens", "content"):  # completions, chat
            items = logprobs.get(key)
            if items is not None:
                if not isinstance(items, list):
                    raise BadEvent(f"{where}.logprobs.{key}: expected a list, got {show(items)}")
                return len(items), "logprobs"
    for key in ("token_ids", "output_ids"):
        items = c.get(key)
        if items is not None:
            if not isinstance(items, list):
                raise BadEvent(f"{where}.{key}: expected a list, got {show(items)}")
            return len(items), "token_ids"
    return None, None


def _usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise BadEvent(f"usage: expected an object, got {show(usage)}")
    details = usage.get("prompt_tokens_details")
    if details is not None and not isinstance(details, dict):
        raise BadEvent(f"usage.prompt_tokens_details: expected an object, got {show(details)}")
    return Usage(
        prompt_tokens=_count(usage, "prompt_tokens", "usage"),
        completion_tokens=_count(usage, "completion_tokens", "usage"),
        cached_tokens=None
        if details is None
        else _count(details, "cached_tokens", "usage.prompt_tokens_details"),
    )


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    name = f"{where}.{key}" if where else key
    raise BadEvent(f"{name}: expected a string, got {show(value)}")


def _count(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_COUNT:
        return int(value)  # 5.0: the same count, spelled as a JSON float
    raise BadEvent(f"{where}.{key}: expected a non-negative integer < 2^31, got {show(value)}")


def show(value: Any) -> str:
    """A JSON value as a short, one-line piece of an error message (floats as JSON spells them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else f"{value:.6g}"
    if isinstance(value, str):
        text = json.dumps(value[:40], ensure_ascii=True)
        return text if len(value) <= 40 else text[:-1] + '…"'
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def one_line(text: str, limit: int = 300) -> str:
    """Server-supplied text made safe for one line of a terminal: whitespace runs become one space,
    other control characters (terminal escapes) are shown escaped, at most `limit` characters."""
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text[:limit] + ("…" if len(text) > limit else "")
