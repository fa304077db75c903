"""A tiny byte-level BPE tokenizer (and chat template) built in-process for tests: exact round trips of
any text, no files, no network. Also used by the real-model loopback server script."""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "how many pencils does she keep? she keeps 29 pencils. #### 29",
    "solve the math problem and answer with a number",
    "the answer is (B). the correct answer is (C).",
] * 20


def build_tokenizer():
    """A `PreTrainedTokenizerFast` with a ~300-token byte-level BPE vocabulary and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def save_word_level_tokenizer(folder, vocab_size: int = 32000):
    """A tokenizer directory (for `--tokenizer`) with one word per id: id i is `t<i>`, 0 is `<unk>`, 1 `</s>`.
    Ids decode to `t<i> t<j> …` and that text encodes back to the same ids (what a random-weight model's
    fidelity run uses, benchmarks/gpu/sglang_validate.py)."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(2, vocab_size)}
    vocab.update({"<unk>": 0, "</s>": 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "</s>"})
    )
    return folder
