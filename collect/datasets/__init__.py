"""Benchmark workloads: named datasets and fixed-length synthetic prompts.

`load_samples(spec, num_prompts, seed=…)` is the one entry point engines and the driver use. `spec` is

- a dataset name (`gsm8k`, `numinamath`, `longbench_v2`, `mmlu_pro`, `arena_hard`; see DATASETS),
- `synthetic:<in>x<out>`: random token ids, exactly <in> prompt tokens, <out> output tokens, or
- `<dataset>:<in>x<out>`: the dataset's prompts repeated/cut to <in> tokens (needs the tokenizer), as
  MoE-CAP's fixed-length runs do.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import CollectError
from .base import Sample
from .registry import (
    DATASETS,
    DEFAULT_SYSTEM_PROMPT,
    SAMPLING_MODES,
    DatasetSpec,
    dataset_names,
    load_named_dataset,
    resolve_dataset,
)
from .synthetic import parse_synthetic, synthetic_samples
from .text import apply_chat_template, chat_messages, ids_as_text, load_tokenizer, pad_samples

_PADDED = re.compile(r"^(?P<name>[A-Za-z0-9_-]+):(?P<n_in>\d+)x(?P<n_out>\d+)$")


def load_samples(
    spec: str,
    num_prompts: int,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    local_path: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    sampling: str = "random",
    tokenizer: Any = None,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> list[Sample]:
    """Samples of workload `spec`, deterministic for a seed.

    `local_path`: a local copy of the dataset in the hub's format (offline hosts). `split` / `revision`:
    which hub split and revision (default: the dataset's usual evaluation split, the hub's main branch).
    `sampling`: `random` (seeded subset) or `first` (first N rows, as MoE-CAP). `tokenizer`: a tokenizer
    or model id/path, needed to pad prompts (`<dataset>:<in>x<out>`) and for `chat_template=True`, which
    replaces each prompt by the chat-templated text (for instruct models served through the completions
    API). `system_prompt`: the system message the template uses for samples without their own (None:
    MoE-CAP's default; "": none). Without a template, samples keep only their own `system`; the driver
    adds its default when it sends them through the chat API.
    """
    default_system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    if spec.startswith("synthetic:"):
        if chat_template:
            raise CollectError(f"dataset {spec}: synthetic prompts are token ids; a chat template needs text")
        return synthetic_samples(spec, num_prompts, seed=seed, vocab_size=vocab_size)
    padded = _PADDED.match(spec)
    name = padded.group("name") if padded else spec
    samples = load_named_dataset(
        name,
        num_prompts,
        seed=seed,
        local_path=local_path,
        split=split,
        revision=revision,
        sampling=sampling,
    )
    if padded:
        n_in, n_out = int(padded.group("n_in")), int(padded.group("n_out"))
        if n_in < 1 or n_out < 1:
            raise CollectError(f"dataset {spec}: lengths must be at least 1")
        samples = pad_samples(samples, n_in, n_out, tokenizer, spec=spec)
    if chat_template:
        samples = apply_chat_template(samples, tokenizer, default_system=default_system)
    return samples


__all__ = [
    "DATASETS",
    "DEFAULT_SYSTEM_PROMPT",
    "SAMPLING_MODES",
    "DatasetSpec",
    "Sample",
    "apply_chat_template",
    "chat_messages",
    "dataset_names",
    "ids_as_text",
    "load_samples",
    "load_tokenizer",
    "pad_samples",
    "parse_synthetic",
    "resolve_dataset",
    "synthetic_samples",
]
