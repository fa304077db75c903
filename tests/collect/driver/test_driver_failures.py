"""Failure paths against the scripted loopback server: each failure is recorded on its own request and the
run goes on; the rows land in real trace files."""

from __future__ import annotations

import asyncio
import time

import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive, open_client_writers
from moecap.collect.errors import CollectError
from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, read_trace_file


def _samples(*scenarios: str) -> list[Sample]:
    return [Sample(f"s{i}", "scripted", prompt=sc, reference=str(i)) for i, sc in enumerate(scenarios)]


def _drive(url: str, samples, load=None, **kw):
    return asyncio.run(
        drive(samples, ClientConfig(api_url=url, max_tokens=4, **kw), load or LoadConfig(concurrency=4))
    )


def test_each_failure_is_recorded_and_the_run_continues(scripted, tmp_path):
    samples = _samples(
        "stream tokens=4",
        "http500",
        "ctx400",
        "drop tokens=8 itl_ms=5",
        "badjson tokens=4",
        "nonstream tokens=5 ttft_ms=30",
        "stream tokens=3",
    )
    run = RunMetadata(
        run_id="t-failures", engine=EngineInfo(name="client"), model=ModelInfo(id="scripted-model")
    )
    req_w, out_w = open_client_writers(tmp_path, run)
    res = asyncio.run(
        drive(
            samples,
            ClientConfig(api_url=scripted.url, max_tokens=4),
            LoadConfig(concurrency=3),
            requests_writer=req_w,
            outputs_writer=out_w,
        )
    )
    req_w.close()
    out_w.close()
    by = {r.sample.prompt.split()[0]: r for r in res.records}
    assert by["stream"].ok and by["stream"].error is None
    assert by["http500"].error == "HTTP 500: internal failure in the scripted engine"
    assert by["http500"].first_token_ns is None and by["http500"].retries == 0
    # the prompt-too-long case: the server's 400 message, per request
    assert by["ctx400"].error.startswith("HTTP 400: This model's maximum context length is 64 tokens.")
    drop = by["drop"]
    assert drop.error.startswith("stream dropped after 3 chunks")
    assert (
        drop.chunk_tokens == [1, 1, 1] and drop.output_text() == " alpha beta gamma"
    )  # what arrived is kept
    assert by["badjson"].error == "1 malformed stream event(s); first: '{this is not json'"
    assert by["badjson"].chunk_tokens == [1, 1, 1, 1]  # the good events still count
    ns = by["nonstream"]
    assert ns.ok and not ns.streamed and ns.token_source == "response"
    assert ns.first_token_ns == ns.finish_ns and ns.chunk_tokens == [5] and ns.output_tokens == 5
    assert (ns.first_token_ns - ns.arrival_ns) / 1e6 >= 30 + 4 * 2 - 1  # the whole body after ttft + 4 ITLs
    # rows in the files, one per request, failures included
    reqs = read_trace_file(req_w.path).table.to_pylist()
    outs = read_trace_file(out_w.path).table.to_pylist()
    assert len(reqs) == len(outs) == len(samples)
    errors = {r["req_id"]: r["error"] for r in reqs}
    assert errors[by["http500"].req_id].startswith("HTTP 500")
    assert errors[by["stream"].req_id] is None
    out_by = {o["req_id"]: o for o in outs}
    assert out_by[by["http500"].req_id]["output"] is None  # nothing generated
    assert out_by[by["drop"].req_id]["output"] == " alpha beta gamma"
    assert [out_by[r.req_id]["reference"] for r in res.records] == [str(i) for i in range(len(samples))]
    row = next(r for r in reqs if r["req_id"] == by["http500"].req_id)
    assert row["chunk_times_ns"] is None and row["finish_reason"] == "error"


def test_unreachable_server_is_a_clear_error_without_a_hang(free_port):
    t0 = time.monotonic()
    with pytest.raises(
        CollectError, match=rf"cannot reach the server at http://127.0.0.1:{free_port} .*is it running"
    ):
        _drive(f"http://127.0.0.1:{free_port}", _samples("stream"), connect_timeout_s=2.0)
    assert time.monotonic() - t0 < 5


def test_no_first_token_hits_the_read_timeout(scripted):
    t0 = time.monotonic()
    res = _drive(scripted.url, _samples("hang s=20", "stream tokens=2"), read_timeout_s=0.5)
    hang, ok = res.records
    assert hang.error == "no first token within --timeout-s 0.5 s"
    assert ok.ok
    assert time.monotonic() - t0 < 5


def test_slow_first_token_within_the_timeout_is_fine(scripted):
    res = _drive(scripted.url, _samples("stream ttft_ms=700 tokens=2"), read_timeout_s=3.0)
    (r,) = res.records
    assert r.ok and 690 <= (r.first_token_ns - r.arrival_ns) / 1e6 < 1500


def test_whole_request_timeout(scripted):
    res = _drive(scripted.url, _samples("stream ttft_ms=5 itl_ms=300 tokens=8"), request_timeout_s=0.5)
    (r,) = res.records
    assert r.error == "request exceeded --request-timeout-s 0.5 s"
    assert len(r.chunk_times_ns) >= 1  # the tokens that did arrive are kept


def test_retries_on_503_then_success_or_give_up(scripted):
    ok = _drive(
        scripted.url, [Sample("a", "d", prompt="flaky fail=2 tokens=2")], max_retries=2, retry_backoff_s=0.01
    )
    (r,) = ok.records
    assert r.ok and r.retries == 2
    assert r.requests_row()["retries"] == 2
    bad = _drive(
        scripted.url, [Sample("b", "d", prompt="flaky fail=3 tokens=2")], max_retries=1, retry_backoff_s=0.01
    )
    (r,) = bad.records
    assert r.error == "HTTP 503: overloaded, retry later" and r.retries == 1


def test_request_ids_reach_the_server(scripted):
    res = _drive(scripted.url, _samples("stream tokens=2"), request_id_prefix="abc")
    _drive(scripted.url, _samples("stream tokens=2"), request_id_prefix="sgl", engine="sglang")
    seen = {s["id"]: s for s in scripted.get("/_seen")}
    assert res.records[0].req_id == "abc-000000"
    assert seen["abc-000000"]["rid"] is None  # vLLM and others: the X-Request-Id header only
    assert seen["sgl-000000"]["rid"] == "sgl-000000"  # SGLang: also `rid` in the body
    body = seen["abc-000000"]["body"]
    assert body["max_tokens"] == 4 and body["temperature"] == 0.0 and "ignore_eos" not in body
    ie = _drive(
        scripted.url,
        _samples("stream tokens=2"),
        request_id_prefix="ie",
        ignore_eos=True,
        extra_body={"top_p": 0.5},
    )
    body = {s["id"]: s for s in scripted.get("/_seen")}[ie.records[0].req_id]["body"]
    assert body["ignore_eos"] is True and body["top_p"] == 0.5


def test_token_id_prompts_and_bad_configs(scripted):
    res = _drive(
        scripted.url, [Sample("t", "synthetic:4x2", prompt_token_ids=[5, 6, 7, 8], max_new_tokens=2)]
    )
    (r,) = res.records
    assert r.ok and r.prompt_sent == "<4 token ids>"
    seen = {s["id"]: s for s in scripted.get("/_seen")}
    assert seen[r.req_id]["body"]["prompt"] == [5, 6, 7, 8] and seen[r.req_id]["body"]["max_tokens"] == 2
    with pytest.raises(CollectError, match="chat API needs text prompts"):
        _drive(scripted.url, [Sample("t", "x", prompt_token_ids=[1])], api="chat")
    with pytest.raises(CollectError, match="expected http://"):
        ClientConfig(api_url="127.0.0.1:8000")
    with pytest.raises(CollectError, match="contradicts"):
        ClientConfig(api_url="http://127.0.0.1:1/v1/completions", api="chat")
    cfg = ClientConfig(api_url="http://127.0.0.1:1/v1/chat/completions")
    assert (cfg.api, cfg.base_url, cfg.endpoint) == (
        "chat",
        "http://127.0.0.1:1",
        "http://127.0.0.1:1/v1/chat/completions",
    )
