"""The unit of a workload: one prompt with its reference answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One benchmark prompt.

    Either `prompt` (text) or `prompt_token_ids` is set; synthetic fixed-length workloads use token
    ids so they need no tokenizer. `max_new_tokens` is the workload's output length for this sample
    (None = the run's default). `system` is the dataset's own system message (None = the run's
    default); it is used when the prompt is sent through the chat API or a chat template.
    """

    sample_id: str
    dataset: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    reference: str | None = None
    max_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    system: str | None = None

    @property
    def prompt_text(self) -> str:
        """The prompt as text for the outputs table (token ids are shown as such)."""
        if self.prompt is not None:
            return self.prompt
        return f"<{len(self.prompt_token_ids or [])} token ids>"
