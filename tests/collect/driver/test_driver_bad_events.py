"""Valid JSON of the wrong shape from a server: the request it belongs to fails with a reason naming the
field, the other requests and the rest of the run go on, and every row lands in the trace files.

Each case is a real event sent by the scripted loopback server in the middle of an otherwise good stream
(or as a whole non-streamed response)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive, open_client_writers
from moecap.collect.driver.events import MAX_COUNT, BadEvent, parse_event
from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, read_trace_file

COUNT = "expected a non-negative integer < 2^31"

# (event data as sent, the reason the request's error names)
BAD_STREAM_EVENTS = [
    ('{"choices":"x"}', 'choices: expected a list, got "x"'),
    ('{"choices":[null]}', "choices[0]: expected an object, got null"),
    ('{"choices":[{"text":5}]}', "choices[0].text: expected a string, got 5"),
    ('{"choices":[],"usage":{"completion_tokens":NaN}}', f"usage.completion_tokens: {COUNT}, got NaN"),
    ('{"choices":[],"usage":{"completion_tokens":1e14}}', f"usage.completion_tokens: {COUNT}, got 1e+14"),
    (
        '{"choices":[],"usage":{"completion_tokens":3000000000}}',
        f"usage.completion_tokens: {COUNT}, got 3000000000",
    ),
    ('{"choices":[],"usage":{"prompt_tokens":-1}}', f"usage.prompt_tokens: {COUNT}, got -1"),
    ('{"choices":[],"usage":{"completion_tokens":true}}', f"usage.completion_tokens: {COUNT}, got true"),
    ('{"choices":[],"usage":{"completion_tokens":"7"}}', f'usage.completion_tokens: {COUNT}, got "7"'),
    (
        '{"choices":[],"usage":{"completion_tokens":Infinity}}',
        f"usage.completion_tokens: {COUNT}, got Infinity",
    ),
    ('{"usage":[1,2]}', "usage: expected an object, got a list of 2"),
    (
        '{"usage":{"prompt_tokens_details":{"cached_tokens":2.5}}}',
        f"usage.prompt_tokens_details.cached_tokens: {COUNT}, got 2.5",
    ),
    ('{"choices":[{"text":"a","finish_reason":7}]}', "choices[0].finish_reason: expected a string, got 7"),
    ('{"choices":[{"delta":"hi"}]}', 'choices[0].delta: expected an object, got "hi"'),
    (
        '{"choices":[{"text":"a","logprobs":{"tokens":"abc"}}]}',
        'choices[0].logprobs.tokens: expected a list, got "abc"',
    ),
    ('{"choices":[{"text":"a","token_ids":{}}]}', "choices[0].token_ids: expected a list, got an object"),
    ('{"id":5,"choices":[]}', "id: expected a string, got 5"),
    ("[1,2]", "event: expected a JSON object, got a list of 2"),
    ('"\\u001b[31mred"', 'event: expected a JSON object, got "\\u001b[31mred"'),  # no raw escape
    ("[" * 100_000, repr("[" * 80)),  # nesting deeper than the JSON parser's recursion limit
]


def _run(url: str, prompts: list[str], tmp_path, **client) -> tuple[list, list[dict]]:
    samples = [Sample(f"s{i}", "scripted", prompt=p) for i, p in enumerate(prompts)]
    run = RunMetadata(run_id="bad", engine=EngineInfo(name="client"), model=ModelInfo(id="scripted-model"))
    req_w, out_w = open_client_writers(tmp_path, run)
    try:
        res = asyncio.run(
            drive(
                samples,
                ClientConfig(api_url=url, max_tokens=4, **client),
                LoadConfig(concurrency=4),
                requests_writer=req_w,
                outputs_writer=out_w,
            )
        )
    finally:
        req_w.close()
        out_w.close()
    requests = read_trace_file(req_w.path)
    assert requests.complete and read_trace_file(out_w.path).complete
    assert requests.table.num_rows == read_trace_file(out_w.path).table.num_rows == len(prompts)
    return res.records, requests.table.to_pylist()


def test_a_bad_stream_event_fails_its_request_and_the_run_goes_on(scripted, tmp_path):
    prompts = [f"stream tokens=4 at=2 inject={quote(data, safe='')}" for data, _ in BAD_STREAM_EVENTS]
    prompts.append("stream tokens=4")
    records, rows = _run(scripted.url, prompts, tmp_path)
    *bad, good = records
    assert good.ok and good.chunk_tokens == [1, 1, 1, 1] and good.output_tokens == 4
    for rec, (_, reason) in zip(bad, BAD_STREAM_EVENTS):
        assert rec.error == f"1 malformed stream event(s); first: {reason}"
        # the good events around the bad one still count, and the row keeps them
        assert rec.chunk_tokens == [1, 1, 1, 1] and rec.output_tokens == 4
        assert rec.output_text() == " alpha beta gamma delta"
    by_id = {r["req_id"]: r for r in rows}
    for rec in records:
        assert by_id[rec.req_id]["error"] == rec.error
        assert by_id[rec.req_id]["output_tokens"] == 4


def test_counts_up_to_int32_are_accepted():
    ev = parse_event({"usage": {"prompt_tokens": 2**31 - 1, "completion_tokens": 5.0}})
    assert ev.usage.prompt_tokens == MAX_COUNT == 2147483647
    assert ev.usage.completion_tokens == 5 and type(ev.usage.completion_tokens) is int


def test_a_bad_chat_delta_fails_its_request(scripted, tmp_path):
    data = '{"choices":[{"delta":{"content":["a"]}}]}'
    records, _ = _run(
        scripted.url,
        [f"stream tokens=3 inject={quote(data, safe='')}", "stream tokens=2"],
        tmp_path,
        api="chat",
    )
    bad, good = records
    assert (
        bad.error
        == "1 malformed stream event(s); first: choices[0].delta.content: expected a string, got a list of 1"
    )
    assert good.ok and good.output_text() == " alpha beta"


BAD_RESPONSES = [
    ('{"choices":[null]}', "choices[0]: expected an object, got null"),
    (
        '{"choices":[{"text":"a"}],"usage":{"completion_tokens":1e14}}',
        f"usage.completion_tokens: {COUNT}, got 1e+14",
    ),
    ('{"choices":[{"message":{"content":5}}]}', "choices[0].message.content: expected a string, got 5"),
    ('"just text"', 'response: expected a JSON object, got "just text"'),
]


def test_a_bad_whole_response_fails_its_request(scripted, tmp_path):
    prompts = [f"nonstream tokens=3 body={quote(body, safe='')}" for body, _ in BAD_RESPONSES]
    prompts.append("nonstream tokens=3")
    records, rows = _run(scripted.url, prompts, tmp_path, stream=False)
    *bad, good = records
    assert good.ok and good.output_tokens == 3
    for rec, (_, reason) in zip(bad, BAD_RESPONSES):
        assert rec.error == f"malformed response: {reason}"
        assert rec.first_token_ns is None and rec.finish_reason == "error"
    errors = {r["req_id"]: r["error"] for r in rows}  # rows are in finish order
    assert [errors[r.req_id] for r in records] == [r.error for r in bad] + [None]


def test_cli_keeps_the_row_of_a_count_that_does_not_fit(scripted, tmp_path):
    """The issue's case: a server reporting completion_tokens 3e9. The row is kept with the reason; the
    file is complete; the other request is unharmed; no traceback."""
    event = '{"choices":[],"usage":{"completion_tokens":3000000000}}'
    rows = [
        {"question": f"stream tokens=3 inject={quote(event, safe='')}", "answer": "#### 1"},
        {"question": "stream tokens=3", "answer": "#### 2"},
    ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "traces"
    proc = subprocess.run(
        [sys.executable, "-c", "from moecap.collect.cli import main; main()", "drive", "--api-url", scripted.url,
         "--dataset", "gsm8k", "--dataset-path", str(data), "--num-prompts", "2", "--sampling", "first",
         "--out", str(out), "--run-id", "big", "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "requests: 2 (1 ok, 1 failed)" in proc.stderr
    reason = f"usage.completion_tokens: {COUNT}, got 3000000000"
    assert f"error ×1: 1 malformed stream event(s); first: {reason}" in proc.stderr
    req = read_trace_file(out / "big.client.requests.arrow")
    assert req.complete and req.table.num_rows == 2
    errors = sorted(r["error"] or "" for r in req.table.to_pylist())
    assert errors == ["", f"1 malformed stream event(s); first: {reason}"]


# -- the checker itself, over any JSON value ----------------------------------------------------------

KEYS = ["choices", "usage", "id", "error", "object", "text", "delta", "message", "content", "reasoning",
        "reasoning_content", "finish_reason", "logprobs", "tokens", "token_ids", "output_ids",
        "prompt_tokens", "completion_tokens", "prompt_tokens_details", "cached_tokens"]  # fmt: skip
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_any_json_value_is_accepted_with_sound_fields_or_refused_with_a_reason(value, whole):
    try:
        ev = parse_event(value, whole=whole)
    except BadEvent as exc:
        text = str(exc)
        assert ": expected " in text and "\n" not in text and "\x1b" not in text
        return
    if ev.error is not None:
        assert isinstance(ev.error, str) and ev.error.isprintable()
        return
    assert ev.id is None or isinstance(ev.id, str)
    if ev.usage is not None:
        for n in (ev.usage.prompt_tokens, ev.usage.completion_tokens, ev.usage.cached_tokens):
            assert n is None or (type(n) is int and 0 <= n <= MAX_COUNT)
    if ev.choice is not None:
        c = ev.choice
        assert isinstance(c.text, str) and isinstance(c.reasoning, str)
        assert c.finish_reason is None or isinstance(c.finish_reason, str)
        assert c.listed_tokens is None or (type(c.listed_tokens) is int and c.listed_tokens >= 0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [(float("nan"), "NaN"), (1e14, "1e+14"), (2**31, "2147483648"), (-(2**80), "-1.20893e+24"), (0.5, "0.5")],
)
def test_counts_out_of_range_name_the_value(value, reason):
    with pytest.raises(BadEvent) as info:
        parse_event({"usage": {"completion_tokens": value}})
    assert str(info.value) == f"usage.completion_tokens: {COUNT}, got {reason}"


def test_an_event_without_end_is_refused_at_16_mib(scripted, tmp_path):
    records, _ = _run(scripted.url, ["stream tokens=4 bloat_mib=40", "stream tokens=2"], tmp_path)
    bloated, good = records
    assert bloated.error == "stream event larger than 16 MiB after 1 chunks"
    assert bloated.chunk_tokens == [1] and bloated.finish_reason == "error"  # what arrived first is kept
    assert good.ok


@pytest.mark.parametrize("models_body", ['{"data": 5}', '{"data": [{"id": 5}, null]}', "[" * 100_000])
def test_a_model_list_of_the_wrong_shape_lists_no_model(models_body, tmp_path):
    """GET /v1/models answering valid JSON of another shape: no crash; without --model the one-line
    error says the server lists no model, with --model the run goes ahead."""
    from loopback import SCRIPTED, start_server

    cli = [sys.executable, "-c", "from moecap.collect.cli import main; main()", "drive", "--dataset", "synthetic:4x2",
           "--num-prompts", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    with start_server(SCRIPTED, "--models-body", models_body) as srv:
        without = subprocess.run([*cli, "--api-url", srv.url], capture_output=True, text=True, timeout=60)
        named = subprocess.run(
            [*cli, "--api-url", srv.url, "--model", "m"], capture_output=True, text=True, timeout=60
        )
    assert without.returncode == 2 and without.stderr.strip() == (
        f"moecap-collect: error: --model not given and {srv.url}/v1/models lists no model"
    )
    assert named.returncode == 0, named.stderr
    assert "requests: 1 (1 ok, 0 failed)" in named.stderr
