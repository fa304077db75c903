"""Scorers on hand-labelled outputs per dataset: correct answers, wrong ones and tricky formats, each with
the expected verdict written down; then `score_outputs` over the outputs table."""

from __future__ import annotations

import polars as pl
import pytest

from moecap.analyze.accuracy import (
    extract_boxed,
    extract_choice,
    extract_gsm8k,
    math_equal,
    parse_number,
    score_outputs,
)
from moecap.analyze.errors import InputError

# (reference, output, correct?) — labelled by hand.
GSM8K = [
    ("29", "She keeps 36 - 7 = 29 pencils.\n#### 29", True),
    ("1625", "1250 + 375 = 1625\nThe answer is $1,625.", True),
    ("56", "Two weeks are 14 days and 14 * 4 = 56 km. \\boxed{56}", True),
    ("-75", "The level changes by \u221275 litres.\n#### \u221275", True),  # unicode minus
    ("2.4", "Each gets 12/5 = 2.40 pizzas.\n#### 2.40", True),  # trailing zero
    ("29", "<think>36 - 7 = 28? no, 29</think>The answer is **29**.", True),
    ("29", "<think>3*12 = 36, minus 7 gives 29, let me double", False),  # cut off while thinking
    ("106", "#### 106.12", False),  # 106.12 is not 106
    ("18", "She has 18 eggs left. The answer is 18. Note that 3 of them were brown.", True),
    ("42", "I computed 40 and added 2 to get 42", True),  # no marker: last number
    ("42", "I do not know.", False),
    ("7", None, False),  # the request failed
    ("5", "#### 5\nCorrection: #### 6", False),  # the last marker is the answer
    ("1000000", "The total is 1,000,000 dollars.\n#### 1,000,000", True),
    ("26", "Final Answer: $26.00", True),
]

NUMINAMATH = [
    ("\\frac{5}{6}", "so the sum is \\boxed{\\dfrac{5}{6}}", True),
    ("\\frac{5}{6}", "\\boxed{5/6}", True),
    ("30", "The share is \\boxed{30\\%}.", True),
    ("\\{-2, 2\\}", "Hence \\boxed{\\{2,-2\\}}", True),  # sets compare without order
    ("90^\\circ", "\\boxed{90}", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("3", "x = 3, so \\boxed{x=3}", True),
    ("\\sqrt{2}", "\\boxed{\\sqrt2}", True),
    ("4", "The answer is 4.", False),  # not boxed
    ("4", "\\boxed{4}? No: \\boxed{5}", False),  # the last box counts
    ("\\text{(C)}", "\\boxed{\\text{(C)}}", True),
    ("2", "\\boxed{\\frac{4}{2}}", True),
    ("\\left( 1, 2 \\right)", "\\boxed{(1,2)}", True),
    ("(1, 2)", "\\boxed{(2,1)}", False),  # tuples keep their order
    ("\\frac{5}{6}", "\\boxed{0.8333}", False),
]

LONGBENCH_V2 = [
    ("C", "The correct answer is (C)", True),
    ("A", "**The correct answer is (A)**", True),
    ("B", "After reading the report, the correct answer is C", False),
    ("D", "D", True),
    ("A", "A careful reading shows the answer is B.", False),  # the article "A" is not an answer
    ("B", "I cannot determine this from the document.", False),
    ("C", "<think>maybe the answer is A</think>The correct answer is (C).", True),
    ("A", "(A)", True),
]

MMLU_PRO = [
    ("B", "Force is measured in newtons. The answer is (B).", True),
    ("J", "Answer: J", True),
    ("C", "The answer is (E)", False),
    ("H", "so the answer is H, the henry", True),
    ("B", "Answer: (K)", False),  # K is not an option
]


def _frame(dataset, cases):
    return pl.DataFrame(
        {
            "req_id": [f"r{i}" for i in range(len(cases))],
            "sample_id": [f"{dataset}-{i}" for i in range(len(cases))],
            "dataset": [dataset] * len(cases),
            "prompt": ["p"] * len(cases),
            "output": [c[1] for c in cases],
            "reference": [c[0] for c in cases],
        },
        schema={
            "req_id": pl.String,
            "sample_id": pl.String,
            "dataset": pl.String,
            "prompt": pl.String,
            "output": pl.String,
            "reference": pl.String,
        },
    )


@pytest.mark.parametrize(
    ("dataset", "cases", "expected_correct"),
    [
        ("gsm8k", GSM8K, 10),
        ("numinamath", NUMINAMATH, 11),
        ("longbench_v2", LONGBENCH_V2, 5),
        ("mmlu_pro", MMLU_PRO, 3),
    ],
)
def test_hand_labelled_outputs(dataset, cases, expected_correct):
    assert sum(c[2] for c in cases) == expected_correct  # the labels themselves
    summary, per = score_outputs(_frame(dataset, cases))
    assert per["correct"].to_list() == [c[2] for c in cases], per.select(
        "output", "extracted", "reference", "correct"
    )
    assert summary["correct"] == expected_correct
    assert summary["total"] == len(cases)
    assert summary["exact_match"] == pytest.approx(expected_correct / len(cases))
    assert (
        summary["scorer"]["name"]
        == {
            "gsm8k": "gsm8k_numeric",
            "numinamath": "boxed_math",
            "longbench_v2": "choice_A-D",
            "mmlu_pro": "choice_A-J",
        }[dataset]
    )


def test_gsm8k_extraction_details():
    assert extract_gsm8k("#### 1,234") == "1,234"
    assert extract_gsm8k("answer: **$57,500**") == "57,500"
    assert extract_gsm8k("<think>12</think>no number here") is None
    assert extract_gsm8k("cut <think>12 then 13") is None
    assert extract_gsm8k("42 apples", flexible=False) is None
    summary, per = score_outputs(_frame("gsm8k", GSM8K))
    assert summary["failed"] == 1
    assert summary["no_answer"] == 2  # "I do not know." and the cut-off reasoning
    assert per.filter(pl.col("req_id") == "r11")["reason"].item() == "request failed"


def test_number_and_math_normalisation():
    assert parse_number("1,234.50") == parse_number("1234.5")
    assert parse_number("-\\frac{3}{4}") == parse_number("-0.75")
    assert parse_number("1,23") is None  # not a thousands separator
    assert parse_number("1/0") is None
    assert math_equal("\\tfrac12", "\\frac{1}{2}")
    assert not math_equal(None, "1")
    assert extract_boxed("\\fbox{7} then \\boxed {8}") == "8"
    assert extract_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("\\boxed{open") is None
    assert extract_choice("The answer is (c)", "ABCD") is None  # lower-case letters are not options


def test_mixed_frame_failed_unscored_and_override():
    frame = pl.concat([_frame("gsm8k", GSM8K[:2]), _frame("mmlu-pro", MMLU_PRO[:2])])
    extra = pl.DataFrame(
        {
            "req_id": ["x1", "x2"],
            "sample_id": ["a", "b"],
            "dataset": ["arena_hard", "gsm8k:64x16"],
            "prompt": ["p", "p"],
            "output": ["text", "text"],
            "reference": [None, None],
        },
        schema=frame.schema,
    )
    summary, per = score_outputs(pl.concat([frame, extra]))
    assert (summary["correct"], summary["total"], summary["unscored"]) == (4, 4, 2)
    assert set(summary["by_dataset"]) == {"gsm8k", "mmlu_pro"}
    assert summary["by_dataset"]["mmlu_pro"]["scorer"]["name"] == "choice_A-J"
    assert summary["scorer"]["name"] == "mixed"
    reasons = dict(zip(per["req_id"].to_list()[-2:], per["reason"].to_list()[-2:]))
    assert reasons == {"x1": "judge-based dataset", "x2": "no scorer for this dataset"}
    # dataset= forces one scorer; the dataset column may then be absent.
    forced, _ = score_outputs(_frame("whatever", GSM8K[:3]).drop("dataset"), dataset="gsm8k")
    assert (forced["correct"], forced["total"]) == (3, 3)


def test_bad_input():
    with pytest.raises(
        InputError,
        match="no scorer for dataset 'gsm9k'; choose one of gsm8k, numinamath, longbench_v2, mmlu_pro",
    ):
        score_outputs(_frame("gsm8k", GSM8K[:1]), dataset="gsm9k")
    with pytest.raises(InputError, match="lacks column"):
        score_outputs(pl.DataFrame({"output": ["x"]}))
    empty_summary, per = score_outputs(_frame("gsm8k", []))
    assert empty_summary["total"] == 0 and empty_summary["exact_match"] is None and per.height == 0
