"""Benchmark workloads: named datasets and fixed-length synthetic prompts.

`load_samples(spec, num_prompts, seed=…)` is the one entry point engines and the driver use.
"""

from __future__ import annotations

from .base import Sample
from .synthetic import parse_synthetic, synthetic_samples


def load_samples(
    spec: str,
    num_prompts: int,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    local_path: str | None = None,
) -> list[Sample]:
    """Samples of workload `spec`: `synthetic:<in>x<out>` or a dataset name (see DATASETS)."""
    if spec.startswith("synthetic:"):
        return synthetic_samples(spec, num_prompts, seed=seed, vocab_size=vocab_size)
    from .registry import load_named_dataset

    return load_named_dataset(spec, num_prompts, seed=seed, local_path=local_path)


__all__ = ["Sample", "load_samples", "parse_synthetic", "synthetic_samples"]
