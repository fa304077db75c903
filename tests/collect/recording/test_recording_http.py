"""The batch-recording endpoints over HTTP, against the scripted loopback server."""

from __future__ import annotations

import asyncio

import pytest

from moecap.collect.datasets import Sample
from moecap.collect.driver import ClientConfig, LoadConfig, drive
from moecap.collect.errors import CollectError
from moecap.collect.recording import BatchRecorder


def test_start_workload_stop_dump(scripted):
    rec = BatchRecorder(scripted.url, "the-model")

    async def main():
        await rec.begin()
        status = await rec.status()
        samples = [Sample(f"s{i}", "d", prompt="stream tokens=3") for i in range(2)]
        res = await drive(
            samples, ClientConfig(api_url=scripted.url, max_tokens=3), LoadConfig(concurrency=2)
        )
        records = await rec.finish()
        after = await rec.status()
        return status, res, records, after

    status, res, records, after = asyncio.run(main())
    assert status == {"is_recording": True, "total_records": 0}
    assert after == {"is_recording": False, "total_records": 6}
    assert len(records) == 6
    prefill = [r for r in records if r["forward_mode"] == "prefill"]
    assert sorted(p["per_req_info"][0]["req_id"] for p in prefill) == sorted(r.req_id for r in res.records)
    assert [v for v, _ in scripted.get("/_control")][-7:] == [
        "status",
        "clear",
        "start",
        "status",
        "stop",
        "dump",
        "status",
    ]


def test_model_is_sent_in_every_control_call(scripted):
    async def main():
        r = BatchRecorder(scripted.url, "routing-name")
        await r.status()
        await r.clear()
        await r.start()
        await r.stop()
        return await r.dump()

    assert asyncio.run(main()) == []
    # ServerlessLLM routes by model: POST bodies and the status query carry it
    assert scripted.get("/_control")[-5:] == [
        [v, "routing-name"] for v in ("status", "clear", "start", "stop", "dump")
    ]
    with pytest.raises(CollectError, match="recorded no passes"):
        asyncio.run(BatchRecorder(scripted.url, "x").finish())


def test_missing_endpoints_and_unreachable(free_port):
    from loopback import SCRIPTED, start_server

    with (
        start_server(SCRIPTED, "--no-recording") as srv,
        pytest.raises(
            CollectError, match="has no /batch_recording_status endpoint; serve the model with MoE-CAP"
        ),
    ):
        asyncio.run(BatchRecorder(srv.url, "m").begin())
    with pytest.raises(
        CollectError,
        match=r"batch recording: GET http://127.0.0.1:\d+/batch_recording_status failed \(cannot connect: ",
    ):
        asyncio.run(BatchRecorder(f"http://127.0.0.1:{free_port}", "m", timeout_s=2).status())
