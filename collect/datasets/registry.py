"""Named benchmark datasets: where each lives on the Hugging Face hub, how one of its rows becomes a
prompt and a reference answer, and which scorer of `moecap.analyze.accuracy` reads the answers.

Rows come from the hub through the `datasets` library (hub id, config, split, revision) or, on an
offline host, from a local copy in the hub's own format (`local_path`: a .jsonl / .json / .parquet /
.csv file or a snapshot directory). Either way the same row formatter builds the prompt, so a local
copy gives exactly the prompts the hub would.

The prompt wording follows MoE-CAP's loaders (github Auto-CAP/MoE-CAP, moe_cap/data_loader/, commit
e9e0d88) so accuracy numbers stay comparable with published MoE-CAP results.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CollectError
from .base import Sample
from .local import read_local_rows

DEFAULT_SYSTEM_PROMPT = "Output the answer directly without description."
"""The system message MoE-CAP sends with datasets that have none of their own."""

GSM8K_SYSTEM_PROMPT = (
    "Solve the math problem. End your response with a line of the form "
    "'#### <number>' containing only the final numeric answer (no units, "
    "no commas, no currency symbols)."
)

SAMPLING_MODES = ("random", "first")
"""random: a seeded random subset (default); first: the first N rows, as MoE-CAP takes them."""


@dataclass(frozen=True)
class FormattedRow:
    prompt: str
    reference: str | None
    system: str | None = None
    native_id: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset."""

    name: str
    hub_id: str
    config: str | None
    split: str
    scorer: str | None
    """Scorer name in moecap.analyze.accuracy (None: no automatic scorer, e.g. judge-based)."""
    description: str
    format_row: Callable[[Mapping[str, Any]], FormattedRow]
    aliases: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    """Splits the hub dataset has (for the error message on a wrong --split)."""


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K solution (after '####'), commas removed: '... #### 1,234' -> '1234'."""
    _, sep, tail = str(answer).rpartition("####")
    if not sep:
        return ""
    return tail.strip().replace(",", "").rstrip(".")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    text = str(text)
    starts = [i for marker in ("\\boxed", "\\fbox") for i in _find_all(text, marker)]
    for start in sorted(starts, reverse=True):
        j = text.find("{", start)
        if j < 0 or text[start:j].strip() not in ("\\boxed", "\\fbox"):
            continue
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip()
        return None
    return None


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def _gsm8k(row: Mapping[str, Any]) -> FormattedRow:
    return FormattedRow(
        prompt=str(row["question"]), reference=gsm8k_reference(row["answer"]), system=GSM8K_SYSTEM_PROMPT
    )


def _numinamath(row: Mapping[str, Any]) -> FormattedRow:
    messages = row.get("messages") or []
    user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    assistant = next((m.get("content") for m in messages if m.get("role") == "assistant"), None)
    question = user if user is not None else row.get("problem", "")
    solution = assistant if assistant is not None else row.get("solution", "")
    return FormattedRow(prompt=str(question), reference=last_boxed(solution or "") or "")


def _longbench_v2(row: Mapping[str, Any]) -> FormattedRow:
    options = "\n".join(f"{letter}. {row[f'choice_{letter}']}" for letter in "ABCD")
    prompt = (
        "Please read the following document and answer the multiple-choice question.\n\n"
        f"--- Document ---\n{row['context']}\n\n"
        f"--- Question ---\n{row['question']}\n\n"
        f"--- Options ---\n{options}\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )
    return FormattedRow(prompt=prompt, reference=str(row["answer"]).strip(), native_id=row.get("_id"))


def _mmlu_pro(row: Mapping[str, Any]) -> FormattedRow:
    options = list(row.get("options") or [])
    lettered = "\n".join(f"{chr(65 + i)}. {opt}" for i, opt in enumerate(options))
    prompt = (
        f"Question (Category: {row.get('category', '')}):\n{row['question']}\n\n"
        f"Options:\n{lettered}\n\n"
        'Format your response as follows: "The answer is (insert answer here)".'
    )
    native = row.get("question_id")
    return FormattedRow(
        prompt=prompt,
        reference=str(row.get("answer", "")).strip(),
        native_id=None if native is None else str(native),
    )


def _arena_hard(row: Mapping[str, Any]) -> FormattedRow:
    turns = row.get("turns") or []
    content = turns[0].get("content", "") if turns else ""
    native = row.get("uid", row.get("question_id"))
    return FormattedRow(
        prompt=str(content), reference=None, native_id=None if native is None else str(native)
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "gsm8k",
            "openai/gsm8k",
            "main",
            "test",
            "gsm8k",
            "grade-school maths word problems; numeric exact match",
            _gsm8k,
            splits=("train", "test"),
        ),
        DatasetSpec(
            "numinamath",
            "AI-MO/NuminaMath-CoT",
            None,
            "test",
            "numinamath",
            "competition maths; last \\boxed{} answer, normalised",
            _numinamath,
            aliases=("numina",),
            splits=("train", "test"),
        ),
        DatasetSpec(
            "longbench_v2",
            "THUDM/LongBench-v2",
            None,
            "train",
            "longbench_v2",
            "long-context multiple choice (A-D)",
            _longbench_v2,
            aliases=("longbench-v2",),
            splits=("train",),
        ),
        DatasetSpec(
            "mmlu_pro",
            "TIGER-Lab/MMLU-Pro",
            None,
            "test",
            "mmlu_pro",
            "multiple choice (A-J)",
            _mmlu_pro,
            aliases=("mmlu-pro",),
            splits=("validation", "test"),
        ),
        DatasetSpec(
            "arena_hard",
            "lmarena-ai/arena-hard-auto-v0.1",
            None,
            "train",
            None,
            "open-ended prompts; judged by an LLM, not scored here",
            _arena_hard,
            aliases=("arena-hard",),
            splits=("train",),
        ),
    )
}


def dataset_names() -> list[str]:
    """The dataset names `load_samples` accepts (besides `synthetic:<in>x<out>`)."""
    return list(DATASETS)


def resolve_dataset(name: str) -> DatasetSpec:
    """The spec of dataset `name` (aliases accepted); CollectError listing the choices otherwise."""
    key = name.strip().lower()
    for spec in DATASETS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise CollectError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
        "synthetic:<input tokens>x<output tokens>, or <dataset>:<input tokens>x<output tokens> "
        "(a dataset's prompts padded to a fixed length)"
    )


def select_indices(n_rows: int, num_prompts: int, *, seed: int, sampling: str) -> list[int]:
    """Row indices of the sample, deterministic for (n_rows, num_prompts, seed, sampling).

    `random` draws without replacement in a seeded random order; `first` takes rows 0..N-1 as MoE-CAP
    does. Asking for more prompts than rows gives every row once.
    """
    if sampling not in SAMPLING_MODES:
        raise CollectError(f"sampling {sampling!r}: expected one of {', '.join(SAMPLING_MODES)}")
    if num_prompts < 1:
        raise CollectError(f"num_prompts must be at least 1 (got {num_prompts})")
    k = min(num_prompts, n_rows)
    if sampling == "first":
        return list(range(k))
    return random.Random(seed).sample(range(n_rows), k)


def load_named_dataset(
    name: str,
    num_prompts: int,
    *,
    seed: int = 0,
    local_path: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    sampling: str = "random",
) -> list[Sample]:
    """`num_prompts` samples of dataset `name`, from the hub or from `local_path`."""
    spec = resolve_dataset(name)
    split = split or spec.split
    if local_path is not None:
        rows: Sequence[Mapping[str, Any]] = read_local_rows(local_path, split=split, config=spec.config)
        indices = select_indices(len(rows), num_prompts, seed=seed, sampling=sampling)
        picked = [rows[i] for i in indices]
    else:
        table = _load_from_hub(spec, split, revision)
        indices = select_indices(len(table), num_prompts, seed=seed, sampling=sampling)
        picked = list(table.select(indices))
    if not picked:
        raise CollectError(f"dataset {spec.name}: split {split!r} has no rows")
    samples = []
    for idx, row in zip(indices, picked):
        try:
            fmt = spec.format_row(row)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CollectError(
                f"dataset {spec.name}: row {idx} is not in the {spec.hub_id} format "
                f"(missing or malformed {exc}); columns: {', '.join(map(str, row))}"
            ) from None
        extra: dict[str, Any] = {"row": idx, "split": split}
        if fmt.native_id is not None:
            extra["native_id"] = fmt.native_id
        samples.append(
            Sample(
                sample_id=f"{spec.name}-{split}-{idx}",
                dataset=spec.name,
                prompt=fmt.prompt,
                reference=fmt.reference,
                system=fmt.system,
                extra=extra,
            )
        )
    return samples


def _load_from_hub(spec: DatasetSpec, split: str, revision: str | None) -> Any:
    try:
        import datasets  # lazy: the GPU hosts may not have it, and local files do not need it
    except ImportError:
        raise CollectError(
            f"dataset {spec.name}: loading {spec.hub_id} from the hub needs the `datasets` package "
            "(pip install datasets), or pass a local copy with --dataset-path"
        ) from None
    if spec.splits and split not in spec.splits:
        raise CollectError(
            f"dataset {spec.name}: no split {split!r}; {spec.hub_id} has {', '.join(spec.splits)}"
        )
    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=split, revision=revision)
    except Exception as exc:  # network, auth, missing revision: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectError(
            f"dataset {spec.name}: cannot load {spec.hub_id} (split {split}"
            f"{', revision ' + revision if revision else ''}) from the hub: {first}; "
            "on an offline host pass a local copy with --dataset-path"
        ) from None
