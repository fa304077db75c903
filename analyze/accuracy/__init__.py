"""Accuracy: score generated outputs against reference answers, per dataset.

    summary, per_sample = score_outputs(outputs)      # outputs: the `outputs` table as a polars frame

`summary` is the run's `accuracy_metrics`: {exact_match, correct, total, no_answer, failed, unscored,
scorer, …} (+ `by_dataset` when the frame mixes datasets); `per_sample` has one row per output with the
extracted answer and whether it matched. Failed requests (null output) count as wrong, as MoE-CAP
counts them; rows without a reference (arena_hard, padded fixed-length prompts) are not scored.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from ..errors import InputError
from .extract import extract_boxed, extract_choice, extract_gsm8k, strip_reasoning
from .normalize import math_equal, normalize_math, numbers_equal, parse_number
from .scorers import SCORERS, UNSCORED, Scorer, scorer_key

PER_SAMPLE_SCHEMA = {
    "req_id": pl.String,
    "sample_id": pl.String,
    "dataset": pl.String,
    "scorer": pl.String,
    "extracted": pl.String,
    "reference": pl.String,
    "correct": pl.Boolean,
    "reason": pl.String,
}


def score_outputs(outputs: pl.DataFrame, dataset: str | None = None) -> tuple[dict[str, Any], pl.DataFrame]:
    """Score every row of `outputs` (columns of the `outputs` table: output, reference, dataset, and
    req_id / sample_id where present). `dataset` forces one dataset's scorer for all rows; by default
    each row uses the scorer of its own `dataset` value.

    Raises InputError for a missing column or an unknown `dataset`.
    """
    needed = ["output", "reference"] + ([] if dataset is not None else ["dataset"])
    missing = [c for c in needed if c not in outputs.columns]
    if missing:
        raise InputError(
            f"outputs frame lacks column(s) {', '.join(missing)} (needs the outputs table's columns)"
        )
    if dataset is not None and scorer_key(dataset) is None:
        raise InputError(f"no scorer for dataset {dataset!r}; choose one of {', '.join(SCORERS)}")
    n = outputs.height
    datasets = [dataset] * n if dataset is not None else outputs["dataset"].to_list()
    texts = outputs["output"].to_list()
    refs = outputs["reference"].to_list()
    req_ids = outputs["req_id"].to_list() if "req_id" in outputs.columns else [None] * n
    sample_ids = outputs["sample_id"].to_list() if "sample_id" in outputs.columns else [None] * n
    rows = []
    # Answer extraction is regular-expression work on free text: a Python pass per row (thousands of
    # rows take milliseconds), the aggregation below is columnar.
    for req_id, sample_id, ds, text, ref in zip(req_ids, sample_ids, datasets, texts, refs):
        key = scorer_key(ds)
        scorer = SCORERS.get(key) if key else None
        row = {
            "req_id": req_id,
            "sample_id": sample_id,
            "dataset": key or ds,
            "scorer": scorer.name if scorer else None,
            "extracted": None,
            "reference": ref,
            "correct": None,
            "reason": None,
        }
        if scorer is None:
            row["reason"] = (
                "judge-based dataset" if (ds or "").lower() in UNSCORED else "no scorer for this dataset"
            )
        elif ref is None or str(ref).strip() == "":
            row["reason"] = "no reference"
        elif text is None:
            row.update(correct=False, reason="request failed")
        else:
            pred = scorer.extract(text)
            row["extracted"] = pred
            row["correct"] = bool(scorer.equal(pred, str(ref)))
            if pred is None:
                row["reason"] = "no answer"
        rows.append(row)
    per_sample = pl.DataFrame(rows, schema=PER_SAMPLE_SCHEMA)
    summary = _summarize(per_sample)
    groups = (
        per_sample.filter(pl.col("scorer").is_not_null())["dataset"].unique(maintain_order=True).to_list()
    )
    if len(groups) > 1:
        summary["by_dataset"] = {g: _summarize(per_sample.filter(pl.col("dataset") == g)) for g in groups}
    return summary, per_sample


def _summarize(frame: pl.DataFrame) -> dict[str, Any]:
    scored = frame.filter(pl.col("correct").is_not_null())
    total = scored.height
    correct = int(scored["correct"].sum() or 0) if total else 0
    scorers = [s for s in scored["scorer"].unique(maintain_order=True).to_list() if s]
    out: dict[str, Any] = {
        "exact_match": correct / total if total else None,
        "correct": correct,
        "total": total,
        "no_answer": scored.filter(pl.col("reason") == "no answer").height,
        "failed": scored.filter(pl.col("reason") == "request failed").height,
        "unscored": frame.height - total,
    }
    if len(scorers) == 1:
        key = scorer_key(scored["dataset"][0])
        out["scorer"] = SCORERS[key].describe() if key else {"name": scorers[0]}
    elif scorers:
        out["scorer"] = {"name": "mixed", "scorers": scorers}
    else:
        out["scorer"] = None
    return out


__all__ = [
    "SCORERS",
    "Scorer",
    "extract_boxed",
    "extract_choice",
    "extract_gsm8k",
    "math_equal",
    "normalize_math",
    "numbers_equal",
    "parse_number",
    "score_outputs",
    "scorer_key",
    "strip_reasoning",
]
