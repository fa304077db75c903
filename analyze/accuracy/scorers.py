"""One scorer per dataset: how to read the answer, and when it matches the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .extract import extract_boxed, extract_choice, extract_gsm8k
from .normalize import math_equal, numbers_equal


@dataclass(frozen=True)
class Scorer:
    name: str
    version: int
    description: str
    extract: Callable[[str], str | None]
    equal: Callable[[str | None, str | None], bool]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "description": self.description}


def _letters_equal(pred: str | None, ref: str | None) -> bool:
    return pred is not None and ref is not None and pred.strip().upper() == ref.strip().strip("()").upper()


SCORERS: dict[str, Scorer] = {
    "gsm8k": Scorer(
        "gsm8k_numeric",
        1,
        "last '#### N' / \\boxed{N} / 'answer is N', else the last number (not inside unfinished reasoning); "
        "equal as exact numbers (commas, $ and trailing zeros ignored)",
        extract_gsm8k,
        numbers_equal,
    ),
    "numinamath": Scorer(
        "boxed_math",
        1,
        "last \\boxed{} after the reasoning; equal as exact numbers (fractions, decimals), else as normalised "
        "LaTeX (spacing, \\left/\\right, \\dfrac, \\text{}, degrees, %, 'x =' dropped; sets unordered)",
        extract_boxed,
        math_equal,
    ),
    "longbench_v2": Scorer(
        "choice_A-D",
        1,
        "last '(correct) answer is (X)' / 'answer: X' with X in A-D, else an output that is only the letter",
        lambda text: extract_choice(text, "ABCD"),
        _letters_equal,
    ),
    "mmlu_pro": Scorer(
        "choice_A-J",
        1,
        "last 'answer is (X)' / 'answer: X' with X in A-J, else an output that is only the letter",
        lambda text: extract_choice(text, "ABCDEFGHIJ"),
        _letters_equal,
    ),
}

ALIASES = {
    "gsm8k": "gsm8k",
    "openai/gsm8k": "gsm8k",
    "numinamath": "numinamath",
    "numina": "numinamath",
    "math": "numinamath",
    "longbench_v2": "longbench_v2",
    "longbench-v2": "longbench_v2",
    "mmlu_pro": "mmlu_pro",
    "mmlu-pro": "mmlu_pro",
}
UNSCORED = ("arena_hard", "arena-hard")
"""Datasets that need a judge model; their outputs are counted as unscored."""


def scorer_key(dataset: str | None) -> str | None:
    """The SCORERS key of a dataset name (aliases accepted), or None when it has no scorer."""
    if dataset is None:
        return None
    return ALIASES.get(dataset.strip().lower())
