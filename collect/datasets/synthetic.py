"""Fixed-length synthetic workloads, `synthetic:<in>x<out>` (e.g. synthetic:4096x1024), as MoE-CAP's guide runs them."""

from __future__ import annotations

import random
import re

from ..errors import CollectError
from .base import Sample

_SPEC = re.compile(r"^synthetic:(\d+)x(\d+)$")


def parse_synthetic(spec: str) -> tuple[int, int]:
    """(input tokens, output tokens) of a `synthetic:<in>x<out>` spec."""
    m = _SPEC.match(spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise CollectError(
            f"dataset {spec!r}: expected synthetic:<input tokens>x<output tokens>, e.g. synthetic:4096x1024"
        )
    return int(m.group(1)), int(m.group(2))


def synthetic_samples(spec: str, num_prompts: int, *, seed: int = 0, vocab_size: int = 32000) -> list[Sample]:
    """`num_prompts` prompts of random token ids in [100, vocab_size), deterministic for a seed.

    Ids start at 100 to stay clear of the special tokens most vocabularies put first.
    """
    n_in, n_out = parse_synthetic(spec)
    rng = random.Random(seed)
    hi = max(101, vocab_size)
    return [
        Sample(
            sample_id=f"synthetic-{i}",
            dataset=spec,
            prompt_token_ids=[rng.randrange(100, hi) for _ in range(n_in)],
            max_new_tokens=n_out,
        )
        for i in range(num_prompts)
    ]
