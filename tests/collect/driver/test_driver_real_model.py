"""The streaming path against a real model: a tiny random-weight Qwen2-MoE generating on CPU behind an
OpenAI-compatible loopback server (hf_server.py), which stamps every token it generates and sends.

The driver's timestamps must agree with the server's own within the loopback overhead: same host, same
monotonic clock, so the comparison is direct.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moecap.collect.datasets import load_samples
from moecap.collect.driver import ClientConfig, LoadConfig, drive, open_client_writers
from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, read_trace_file

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hf_server():
    from loopback import HERE, start_server

    with start_server(HERE / "driver" / "hf_server.py", ready_timeout_s=120) as server:
        yield server


@pytest.fixture(scope="module")
def run(hf_server, tmp_path_factory, datasets_dir_module):
    out = tmp_path_factory.mktemp("real")
    samples = load_samples("gsm8k", 4, local_path=str(datasets_dir_module / "gsm8k"), sampling="first")
    meta = RunMetadata(
        run_id="real-model", engine=EngineInfo(name="client"), model=ModelInfo(id="tiny-qwen2-moe-random")
    )
    req_w, out_w = open_client_writers(out, meta)
    # arrival at the first byte on the socket: compared with the server's kernel receive time below
    cfg = ClientConfig(api_url=hf_server.url, max_tokens=MAX_TOKENS, ignore_eos=True, arrival="first-byte")
    res = asyncio.run(
        drive(samples, cfg, LoadConfig(concurrency=2, warmup=1), requests_writer=req_w, outputs_writer=out_w)
    )
    req_w.close()
    out_w.close()
    return res, out, {r.req_id: hf_server.timings(r.req_id) for r in res.records}


@pytest.fixture(scope="module")
def datasets_dir_module():
    from conftest import DATA

    return DATA


def test_every_token_is_recorded_with_usage(run):
    res, _, server = run
    assert res.model == "tiny-qwen2-moe-random"  # from /v1/models
    for r in res.records:
        assert r.error is None and r.finish_reason == "length"
        assert (
            r.output_tokens == MAX_TOKENS and sum(r.chunk_tokens) == MAX_TOKENS and r.token_source == "usage"
        )
        assert r.prompt_tokens == server[r.req_id]["prompt_tokens"]
        assert len(r.chunk_times_ns) == len(server[r.req_id]["chunks"])


def test_ttft_and_itl_agree_with_the_server_side_timings(run):
    res, _, server = run
    ttft_diff, lags, itl_diff = [], [], []
    for r in res.records:
        s = server[r.req_id]
        start = np.array([c["send_start_ns"] for c in s["chunks"]], dtype=np.int64)
        got = np.array(r.chunk_times_ns, dtype=np.int64)
        # causality on one clock: nothing arrives before the server began to send it
        assert np.all(got >= start - 100_000), (got - start) / 1e6
        lags.append((got - start) / 1e6)
        client_ttft = (r.first_token_ns - r.arrival_ns) / 1e6
        server_ttft = (start[0] - s["arrived_ns"]) / 1e6
        ttft_diff.append(client_ttft - server_ttft)
        itl_diff.append(np.diff(got) / 1e6 - np.diff(start) / 1e6)
    lags = np.concatenate(lags)
    itl_diff = np.abs(np.concatenate(itl_diff))
    ttft_diff = np.array(ttft_diff)
    # The client's TTFT = the server's (kernel receive -> first send) + the loopback overhead.
    assert np.all(ttft_diff > -0.1) and np.median(ttft_diff) <= 2.0, ttft_diff
    assert np.median(lags) <= 1.0 and np.quantile(lags, 0.75) <= 2.0, lags
    assert np.median(itl_diff) <= 0.5 and np.quantile(itl_diff, 0.75) <= 1.0, itl_diff


def test_rows_in_the_trace_files(run):
    res, out, _ = run
    reqs = read_trace_file(out / "real-model.client.requests.arrow").table.to_pylist()
    outs = read_trace_file(out / "real-model.client.outputs.arrow").table.to_pylist()
    # Rows are written as requests finish, which under load need not be submission order.
    assert sorted(r["req_id"] for r in reqs) == sorted(r.req_id for r in res.records)
    assert all(
        len(r["chunk_times_ns"]) == len(r["chunk_tokens"]) and r["output_tokens"] == MAX_TOKENS for r in reqs
    )
    by_sample = {o["sample_id"]: o["reference"] for o in outs}
    assert [by_sample[r.sample.sample_id] for r in res.records] == ["29", "1625", "56", "-75"]
    assert all(o["output"] for o in outs)


def test_prompt_longer_than_the_context_is_reported_per_request(hf_server):
    from moecap.collect.datasets import Sample

    samples = [
        Sample("short", "synthetic:8x4", prompt_token_ids=list(range(10, 18)), max_new_tokens=4),
        Sample("too-long", "synthetic:600x4", prompt_token_ids=[11] * 600, max_new_tokens=4),
        Sample("short2", "synthetic:8x4", prompt_token_ids=list(range(20, 28)), max_new_tokens=4),
    ]
    res = asyncio.run(
        drive(samples, ClientConfig(api_url=hf_server.url, ignore_eos=True), LoadConfig(concurrency=1))
    )
    short, long_, short2 = res.records
    assert long_.error == "HTTP 400: prompt of 600 tokens + 4 exceeds the context of 512"
    assert long_.prompt_tokens == 600 and long_.first_token_ns is None
    assert short.ok and short2.ok and short2.output_tokens == 4  # the run went on
