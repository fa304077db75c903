"""Named datasets from small local copies in their hub formats, the hub path through a real
`datasets.Dataset`, deterministic sampling, padding and chat templates."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moecap.collect.datasets import (
    DEFAULT_SYSTEM_PROMPT,
    Sample,
    apply_chat_template,
    chat_messages,
    dataset_names,
    load_samples,
)
from moecap.collect.datasets.registry import GSM8K_SYSTEM_PROMPT, gsm8k_reference, last_boxed
from moecap.collect.errors import CollectError


def test_gsm8k_from_a_hub_snapshot_directory_picks_the_test_split(datasets_dir):
    samples = load_samples("gsm8k", 10, local_path=str(datasets_dir / "gsm8k"), sampling="first")
    assert [s.reference for s in samples] == ["29", "1625", "56", "-75", "2.4"]
    assert samples[0].prompt.startswith("Mia buys 3 packs")
    assert samples[0].system == GSM8K_SYSTEM_PROMPT
    assert samples[0].sample_id == "gsm8k-test-0"
    assert samples[0].dataset == "gsm8k"
    train = load_samples("gsm8k", 10, local_path=str(datasets_dir / "gsm8k"), split="train")
    assert [s.reference for s in train] == ["2"]


def test_every_named_dataset_builds_prompts_and_references(datasets_dir):
    numina = load_samples(
        "numinamath", 3, local_path=str(datasets_dir / "numinamath_test.jsonl"), sampling="first"
    )
    assert [s.reference for s in numina] == ["\\frac{5}{6}", "\\{-2, 2\\}", "30"]
    assert numina[0].prompt == "Compute $\\frac{1}{2}+\\frac{1}{3}$."

    lb = load_samples(
        "longbench_v2", 2, local_path=str(datasets_dir / "longbench_v2.jsonl"), sampling="first"
    )
    assert [s.reference for s in lb] == ["C", "A"]
    assert "--- Document ---\nRevenue: Q1 10" in lb[0].prompt
    assert "C. Q3\nD. Q4" in lb[0].prompt
    assert lb[0].prompt.endswith('"The correct answer is (insert answer here)".')
    assert lb[0].extra["native_id"] == "66f36490821e116aacb2cc22"

    mmlu = load_samples("mmlu-pro", 3, local_path=str(datasets_dir / "mmlu_pro_test.jsonl"), sampling="first")
    assert [s.reference for s in mmlu] == ["B", "B", "C"]
    assert "J. mole" in mmlu[0].prompt and "Category: physics" in mmlu[0].prompt
    assert "E." not in mmlu[1].prompt  # four options only: A-D

    arena = load_samples("arena_hard", 2, local_path=str(datasets_dir / "arena_hard.jsonl"), sampling="first")
    assert arena[0].reference is None
    assert arena[0].prompt.startswith("Use ABC notation")
    assert arena[1].extra["native_id"] == "b43c07656ead4150b360294ee932b410"


def test_random_sampling_is_deterministic_for_a_seed_and_differs_across_seeds(datasets_dir):
    path = str(datasets_dir / "gsm8k")
    a = [s.sample_id for s in load_samples("gsm8k", 3, local_path=path, seed=1)]
    b = [s.sample_id for s in load_samples("gsm8k", 3, local_path=path, seed=1)]
    assert a == b and len(set(a)) == 3
    seeds = {tuple(s.sample_id for s in load_samples("gsm8k", 3, local_path=path, seed=k)) for k in range(6)}
    assert len(seeds) > 1
    first = [s.sample_id for s in load_samples("gsm8k", 3, local_path=path, sampling="first")]
    assert first == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]


def test_parquet_and_json_list_copies_give_the_same_samples(datasets_dir, tmp_path):
    rows = [json.loads(line) for line in (datasets_dir / "mmlu_pro_test.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    (tmp_path / "list.json").write_text(
        json.dumps({"rows": [{"row_idx": i, "row": r} for i, r in enumerate(rows)]})
    )
    from_jsonl = load_samples("mmlu_pro", 3, local_path=str(datasets_dir / "mmlu_pro_test.jsonl"), seed=4)
    from_parquet = load_samples(
        "mmlu_pro", 3, local_path=str(tmp_path / "test-00000-of-00001.parquet"), seed=4
    )
    from_json = load_samples("mmlu_pro", 3, local_path=str(tmp_path / "list.json"), seed=4)
    assert [s.prompt for s in from_parquet] == [s.prompt for s in from_jsonl] == [s.prompt for s in from_json]


def test_hub_path_uses_load_dataset_with_id_config_split_revision(monkeypatch, datasets_dir):
    import datasets

    rows = [
        json.loads(line)
        for line in (datasets_dir / "gsm8k/main/test-00000-of-00001.jsonl").read_text().splitlines()
    ]
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(rows)  # a real Dataset: .select and row iteration are exercised

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_samples("gsm8k", 4, seed=3, revision="abc123")
    local = load_samples("gsm8k", 4, seed=3, local_path=str(datasets_dir / "gsm8k"))
    assert calls == [("openai/gsm8k", "main", "test", "abc123")]
    assert [(s.sample_id, s.prompt, s.reference) for s in hub] == [
        (s.sample_id, s.prompt, s.reference) for s in local
    ]


def test_hub_errors_are_one_line_collect_errors(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError(
            "Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CollectError, match=r"cannot load openai/gsm8k .*Couldn't reach.*--dataset-path") as e:
        load_samples("gsm8k", 2)
    assert "\n" not in str(e.value)
    with pytest.raises(CollectError, match="no split 'dev'; openai/gsm8k has train, test"):
        load_samples("gsm8k", 2, split="dev")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(CollectError) as e:
        load_samples("gsm9k", 2)
    msg = str(e.value)
    for name in dataset_names():
        assert name in msg
    assert "synthetic:<input tokens>x<output tokens>" in msg


def test_bad_local_inputs(tmp_path, datasets_dir):
    with pytest.raises(CollectError, match="no such file"):
        load_samples("gsm8k", 2, local_path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(CollectError, match="cannot read"):
        load_samples("gsm8k", 2, local_path=str(bad))
    with pytest.raises(CollectError, match=r"row 0 is not in the openai/gsm8k format .*'question'"):
        load_samples("gsm8k", 2, local_path=str(datasets_dir / "arena_hard.jsonl"), sampling="first")
    with pytest.raises(CollectError, match="no file of split 'validation'"):
        load_samples("gsm8k", 2, local_path=str(datasets_dir / "gsm8k"), split="validation")
    with pytest.raises(CollectError, match="sampling 'middle'"):
        load_samples("gsm8k", 2, local_path=str(datasets_dir / "gsm8k"), sampling="middle")


def test_reference_extractors():
    assert gsm8k_reference("x\n#### 1,234") == "1234"
    assert gsm8k_reference("no marker") == ""
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


def test_padding_repeats_prompt_tokens_to_the_target_as_the_guide(datasets_dir, tiny_tokenizer):
    samples = load_samples(
        "gsm8k:64x16", 2, local_path=str(datasets_dir / "gsm8k"), sampling="first", tokenizer=tiny_tokenizer
    )
    for s in samples:
        assert s.prompt.endswith("\n\nPlease continue writing:")
        body = s.prompt[: -len("\n\nPlease continue writing:")]
        # 64 tokens of the repeated question; re-encoding may merge a token at a seam, never more than a few.
        assert abs(len(tiny_tokenizer.encode(body, add_special_tokens=False)) - 64) <= 3
        assert s.max_new_tokens == 16 and s.reference is None and s.dataset == "gsm8k:64x16"
        assert s.extra["base_sample_id"].startswith("gsm8k-test-")
    assert samples[0].prompt.startswith("Mia buys 3 packs of pencils")
    assert samples[0].prompt.count("Mia bu") >= 2  # shorter than 64 tokens: repeated, then cut
    with pytest.raises(CollectError, match="needs the model's tokenizer"):
        load_samples("gsm8k:64x16", 1, local_path=str(datasets_dir / "gsm8k"))


def test_chat_template_for_instruct_models(datasets_dir, tiny_tokenizer):
    samples = load_samples(
        "gsm8k",
        1,
        local_path=str(datasets_dir / "gsm8k"),
        sampling="first",
        tokenizer=tiny_tokenizer,
        chat_template=True,
    )
    s = samples[0]
    assert s.prompt.startswith(f"<|system|>{GSM8K_SYSTEM_PROMPT}</s><|user|>Mia buys")
    assert s.prompt.endswith("</s><|assistant|>")
    assert s.extra["chat_template_applied"] and s.extra["user_prompt"].startswith("Mia buys")
    mmlu = load_samples(
        "mmlu_pro",
        1,
        local_path=str(datasets_dir / "mmlu_pro_test.jsonl"),
        tokenizer=tiny_tokenizer,
        chat_template=True,
    )
    assert mmlu[0].prompt.startswith(f"<|system|>{DEFAULT_SYSTEM_PROMPT}</s>")
    none = load_samples(
        "mmlu_pro",
        1,
        local_path=str(datasets_dir / "mmlu_pro_test.jsonl"),
        tokenizer=tiny_tokenizer,
        chat_template=True,
        system_prompt="",
    )
    assert none[0].prompt.startswith("<|user|>")
    with pytest.raises(CollectError, match="token ids"):
        load_samples("synthetic:8x4", 1, chat_template=True, tokenizer=tiny_tokenizer)


def test_templates_without_a_system_role_get_it_merged_into_the_user_message(tiny_tokenizer):
    class NoSystem:
        def apply_chat_template(self, messages, **kw):
            if any(m["role"] == "system" for m in messages):
                raise ValueError("Conversation roles must alternate user/assistant")
            return tiny_tokenizer.apply_chat_template(messages, **kw)

    (s,) = apply_chat_template(
        [Sample("a", "d", prompt="Q?", system="Be brief.")], NoSystem(), default_system=None
    )
    assert s.prompt == "<|user|>Be brief.\n\nQ?</s><|assistant|>"
    assert s.extra["system_merged"] is True


def test_chat_messages():
    s = Sample("a", "d", prompt="Q?")
    assert chat_messages(s, "SYS") == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q?"},
    ]
    assert chat_messages(s, None) == [{"role": "user", "content": "Q?"}]
    own = Sample("a", "d", prompt="Q?", system="OWN")
    assert chat_messages(own, "SYS")[0]["content"] == "OWN"
    with pytest.raises(CollectError, match="token ids"):
        chat_messages(Sample("a", "d", prompt_token_ids=[1, 2]), "SYS")


def test_synthetic_still_works():
    s = load_samples("synthetic:16x4", 3, seed=2, vocab_size=500)
    assert len(s) == 3 and all(len(x.prompt_token_ids) == 16 and x.max_new_tokens == 4 for x in s)
    assert s == load_samples("synthetic:16x4", 3, seed=2, vocab_size=500)
