"""Tokenizer-dependent prompt shaping: padding a dataset's prompts to a fixed length, and chat templates.

Both need the served model's tokenizer: pass a loaded tokenizer (anything with `encode`, `decode` and
`apply_chat_template`, e.g. a transformers `PreTrainedTokenizerFast`) or a model id / path, which is
loaded with transformers lazily.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ..errors import CollectError
from .base import Sample

PAD_SUFFIX = "\n\nPlease continue writing:"
"""Appended after a padded prompt, as MoE-CAP's fixed-length loader does."""


def load_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` itself, or the transformers tokenizer of a model id / local path."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CollectError(
            "a tokenizer is needed (padding to a fixed length or a chat template) and transformers is not "
            "installed; pip install transformers"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CollectError(f"tokenizer {tokenizer!r}: cannot load it ({first})") from None


def pad_samples(samples: list[Sample], n_in: int, n_out: int, tokenizer: Any, *, spec: str) -> list[Sample]:
    """Each sample's prompt repeated (or cut) to exactly `n_in` tokens of text, then the guide's suffix.

    As MoE-CAP's fixed-length loader: tokenize without special tokens, repeat the prompt's tokens until
    there are at least `n_in`, keep the first `n_in`, decode, append PAD_SUFFIX. The suffix adds a few
    tokens, and decoding then re-encoding can merge tokens at the joins, so the server's prompt length
    (recorded from usage) can differ from `n_in` by a few tokens. References are dropped: a padded prompt
    is no longer the question.
    """
    if tokenizer is None:
        raise CollectError(
            f"dataset {spec}: padding prompts to {n_in} tokens needs the model's tokenizer (--tokenizer)"
        )
    tok = load_tokenizer(tokenizer)
    out = []
    for s in samples:
        ids = list(tok.encode(s.prompt or "", add_special_tokens=False))
        if not ids:
            raise CollectError(f"dataset {spec}: sample {s.sample_id} has an empty prompt; cannot pad it")
        reps = -(-n_in // len(ids))
        text = tok.decode((ids * reps)[:n_in], skip_special_tokens=True)
        out.append(
            dataclasses.replace(
                s,
                sample_id=f"{s.sample_id}-pad{n_in}",
                dataset=spec,
                prompt=text + PAD_SUFFIX,
                reference=None,
                system=None,
                max_new_tokens=n_out,
                extra={**s.extra, "base_sample_id": s.sample_id, "padded_to_tokens": n_in},
            )
        )
    return out


def chat_messages(sample: Sample, default_system: str | None) -> list[dict[str, str]]:
    """The messages of a sample: its system message (or `default_system`; none if both are empty), then the
    user prompt."""
    if sample.prompt is None:
        raise CollectError(
            f"sample {sample.sample_id} is given as token ids; the chat API and chat templates need text "
            "(use the completions API for synthetic prompts)"
        )
    system = sample.system if sample.system is not None else default_system
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": sample.prompt})
    return messages


def apply_chat_template(samples: list[Sample], tokenizer: Any, *, default_system: str | None) -> list[Sample]:
    """Samples whose prompt is the chat-templated text (generation prompt added), for the completions API.

    Templates that refuse a system role (some Mistral/Gemma ones) get the system text prepended to the user
    message instead; `extra["system_merged"]` says so.
    """
    tok = load_tokenizer(tokenizer)
    if tok is None:
        raise CollectError("a chat template needs the model's tokenizer (--tokenizer)")
    out = []
    for s in samples:
        messages = chat_messages(s, default_system)
        merged = False
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:
            if messages[0]["role"] != "system":
                raise
            merged = True
            user = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            text = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        extra = {**s.extra, "chat_template_applied": True, "user_prompt": s.prompt}
        if merged:
            extra["system_merged"] = True
        out.append(dataclasses.replace(s, prompt=text, extra=extra))
    return out


RETOKENIZE_ROUNDS = 10
"""Decode / re-encode rounds `ids_as_text` spends fitting a prompt's length (`vllm bench serve`'s
`gen_prompt_decode_to_target_len` allows as many)."""


def ids_as_text(samples: list[Sample], tokenizer: Any, *, spec: str) -> list[Sample]:
    """Token-id samples as text prompts, built as `vllm bench serve --dataset-name random` builds its
    own: the ids decoded with the served model's tokenizer.

    Decoding then re-encoding need not give the ids back (a BPE tokenizer merges tokens across the
    joins: GPT-2 reads `[' calls', 'here']` back as `[' call', 'sh', 'ere']`), so, as vLLM's random
    dataset does, the text is re-encoded without special tokens and cut (or extended with the sample's
    own ids, cycled) to the target, then decoded again, for at most RETOKENIZE_ROUNDS rounds. The target
    is the sample's length less the special tokens the server adds to a text prompt (a BOS), so the
    server counts as many prompt tokens as it would for the ids. A prompt that still misses it is sent as
    it is; the driver records the server's count. `extra["text_tokens"]` holds this tokenizer's count of
    the text with special tokens (what the server should report); text samples pass through.
    """
    if tokenizer is None:
        raise CollectError(
            f"dataset {spec}: sending token ids as text needs the model's tokenizer (--tokenizer)"
        )
    tok = load_tokenizer(tokenizer)
    vocab = len(tok)
    special = int(tok.num_special_tokens_to_add()) if hasattr(tok, "num_special_tokens_to_add") else 0
    out = []
    for s in samples:
        if s.prompt_token_ids is None:
            out.append(s)
            continue
        ids = list(s.prompt_token_ids)
        too_big = next((i for i in ids if not 0 <= i < vocab), None)
        if too_big is not None:
            raise CollectError(
                f"dataset {spec}: token id {too_big} of sample {s.sample_id} is outside the tokenizer's "
                f"{vocab} ids; cannot send it as text"
            )
        text, n_text = _decode_to_length(tok, ids, max(len(ids) - special, 1))
        out.append(
            dataclasses.replace(
                s,
                prompt=text,
                prompt_token_ids=None,
                extra={**s.extra, "token_ids_decoded": len(ids), "text_tokens": n_text + special},
            )
        )
    return out


def _decode_to_length(tok: Any, ids: list[int], target: int) -> tuple[str, int]:
    """(text, its length encoded without special tokens): `ids` decoded, then fitted to `target` tokens."""
    seq = list(ids)
    for round_ in range(RETOKENIZE_ROUNDS + 1):
        text = tok.decode(seq)
        seq = list(tok.encode(text, add_special_tokens=False))
        if len(seq) == target or round_ == RETOKENIZE_ROUNDS:
            break
        if len(seq) > target:
            seq = seq[:target]
        else:
            seq += list(itertools.islice(itertools.cycle(ids), target - len(seq)))
    return text, len(seq)
