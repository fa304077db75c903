"""`drive --prompt-format`: token-id prompts (`synthetic:<in>x<out>`) sent as ids (auto, ids) or as text
decoded with the model's tokenizer (text), as `vllm bench serve --dataset-name random` sends them. What the
server received is read back from the loopback server; the recorded prompt count is the server's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tinyhf import build_tokenizer, save_word_level_tokenizer

from moecap.collect.datasets import ids_as_text, synthetic_samples
from moecap.collect.errors import CollectError
from moecap.schemas import read_trace_file

CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]
SPEC = "synthetic:12x3"


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """A one-word-per-id tokenizer covering the synthetic ids (< 32000)."""
    return save_word_level_tokenizer(tmp_path_factory.mktemp("tok"))


def _drive(url: str, out: Path, run_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "drive", "--api-url", url, "--dataset", SPEC, "--num-prompts", "3", "--warmup", "0",
         "--out", str(out), "--run-id", run_id, "--no-progress", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _sent(scripted, out: Path, run_id: str) -> tuple[list, list[dict], list[dict], dict]:
    """(bodies' prompts the server received, requests rows, outputs rows, workload) of one run."""
    req = read_trace_file(out / f"{run_id}.client.requests.arrow")
    rows = req.table.to_pylist()
    ids = {r["req_id"] for r in rows}
    prompts = {s["id"]: s["body"]["prompt"] for s in scripted.get("/_seen") if s["id"] in ids}
    outputs = read_trace_file(out / f"{run_id}.client.outputs.arrow").table.to_pylist()
    return [prompts[r["req_id"]] for r in rows], rows, outputs, req.run.workload


def test_text_sends_the_decoded_ids_and_records_the_servers_count(scripted, words, tmp_path):
    proc = _drive(scripted.url, tmp_path, "as-text", "--prompt-format", "text", "--tokenizer", str(words))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr  # the word tokenizer gives the ids back exactly
    prompts, rows, outputs, workload = _sent(scripted, tmp_path, "as-text")
    expected = {f"synthetic-{i}": s for i, s in enumerate(synthetic_samples(SPEC, 3))}
    for prompt, row, out in zip(prompts, rows, outputs, strict=True):
        ids = expected[row["sample_id"]].prompt_token_ids
        assert prompt == " ".join(f"t{i}" for i in ids), "the body carries the ids decoded to text"
        assert out["prompt"] == prompt, "outputs.prompt is what was sent"
        # The scripted server reports 7 prompt tokens whatever it gets: the server's count is recorded,
        # not the 12 the workload asked for.
        assert row["prompt_tokens"] == 7
    assert workload["prompt_format"] == "text"


@pytest.mark.parametrize("flag", [[], ["--prompt-format", "ids"], ["--prompt-format", "auto"]])
def test_ids_and_auto_send_token_ids(scripted, tmp_path, flag):
    proc = _drive(scripted.url, tmp_path, "as-ids", *flag)
    assert proc.returncode == 0, proc.stderr
    prompts, rows, outputs, workload = _sent(scripted, tmp_path, "as-ids")
    expected = {f"synthetic-{i}": s.prompt_token_ids for i, s in enumerate(synthetic_samples(SPEC, 3))}
    assert [expected[r["sample_id"]] for r in rows] == prompts
    assert {o["prompt"] for o in outputs} == {"<12 token ids>"}
    assert workload["prompt_format"] == "ids"


def test_a_text_dataset_records_text(scripted, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "stream tokens=2", "answer": "#### 1"}\n')
    proc = subprocess.run(
        [*CLI, "drive", "--api-url", scripted.url, "--dataset", "gsm8k", "--dataset-path", str(data),
         "--num-prompts", "1", "--warmup", "0", "--out", str(tmp_path), "--run-id", "gsm", "--no-progress",
         "--prompt-format", "text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    workload = read_trace_file(tmp_path / "gsm.client.requests.arrow").run.workload
    assert workload["prompt_format"] == "text"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--prompt-format", "text"],
            "moecap-collect: error: --prompt-format text needs --tokenizer (the served model's tokenizer "
            "decodes the token ids)",
        ),
        (
            ["--prompt-format", "words"],
            "moecap-collect: error: --prompt-format 'words': expected one of auto, ids, text",
        ),
        (
            ["--prompt-format", "ids", "--dataset", "gsm8k"],
            "moecap-collect: error: --prompt-format ids: dataset gsm8k has text prompts; only "
            "synthetic:<in>x<out> prompts are token ids",
        ),
    ],
)
def test_bad_prompt_format_is_one_line_before_anything_is_sent(args, line, free_port, tmp_path):
    # No server listens on free_port: the check comes before the server is asked (and before the hub).
    proc = _drive(f"http://127.0.0.1:{free_port}", tmp_path / "t", "bad", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == line and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()


def test_an_id_outside_the_tokenizer_is_refused(tmp_path):
    small = save_word_level_tokenizer(tmp_path / "small", vocab_size=500)
    with pytest.raises(
        CollectError, match=r"token id \d+ of sample synthetic-0 is outside the tokenizer's 500 ids"
    ):
        ids_as_text(synthetic_samples(SPEC, 1), str(small), spec=SPEC)


def test_bpe_round_trip_is_fitted_to_the_length_and_its_count_kept():
    """A byte-level BPE does not give random ids back: decoded and re-encoded, 64 random ids become 100+
    tokens (partial UTF-8 bytes turn into U+FFFD, three bytes each). Fitted as vLLM's random dataset does,
    every prompt lands within a few tokens of 64, and `text_tokens` is the tokenizer's count of the text
    actually sent (the server's count is what the driver records)."""
    tok = build_tokenizer()
    samples = synthetic_samples("synthetic:64x4", 30, seed=0, vocab_size=len(tok))
    plain = [len(tok.encode(tok.decode(s.prompt_token_ids), add_special_tokens=False)) for s in samples]
    assert min(plain) > 90
    texts = ids_as_text(samples, tok, spec="synthetic:64x4")
    counts = [len(tok.encode(s.prompt, add_special_tokens=False)) for s in texts]
    assert all(64 <= n <= 68 for n in counts) and counts.count(64) >= 10
    assert [s.extra["text_tokens"] for s in texts] == counts
    assert all(s.prompt_token_ids is None and s.extra["token_ids_decoded"] == 64 for s in texts)


def test_a_bos_the_server_adds_is_left_room_for():
    """A tokenizer that puts a BOS in front of a text prompt: the text is fitted to <in> - 1 tokens, so the
    server counts <in>, as for the ids (vLLM's random dataset subtracts `num_special_tokens_to_add` too)."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    samples = synthetic_samples("synthetic:64x4", 30, seed=1, vocab_size=len(tok))
    texts = ids_as_text(samples, tok, spec="synthetic:64x4")
    with_bos = [tok(s.prompt)["input_ids"] for s in texts]
    assert all(ids[0] == tok.bos_token_id for ids in with_bos)
    assert [len(ids) for ids in with_bos] == [s.extra["text_tokens"] for s in texts]
    assert sum(len(ids) == 64 for ids in with_bos) >= 10


def test_text_samples_pass_through_unchanged(words):
    from moecap.collect.datasets import Sample

    s = Sample("q-1", "gsm8k", prompt="how many?")
    assert ids_as_text([s], str(words), spec="gsm8k") == [s]


def test_prompts_that_miss_their_length_are_one_warning_line(capsys):
    from moecap.collect.driver.command import _warn_lengths

    tok = build_tokenizer()
    texts = ids_as_text(synthetic_samples("synthetic:64x4", 30, vocab_size=len(tok)), tok, spec="x")
    missed = sum(s.extra["text_tokens"] != 64 for s in texts)
    assert missed > 0
    _warn_lengths(texts)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"moecap-collect: warning: --prompt-format text: {missed} of 30 prompts re-encode")
    assert err.rstrip().endswith("requests.prompt_tokens records the server's count")
