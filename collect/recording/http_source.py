"""Control a server's batch recorder over HTTP: MoE-CAP's vLLM server (moe_cap/systems/vllm.py) and
ServerlessLLM's `vllm_moecap` backend expose the same five endpoints.

| action | request | answer |
|---|---|---|
| status | GET  /batch_recording_status?model=M | {"is_recording": bool, "total_records": n} |
| start  | POST /start_batch_recording {"model": M} | {"status": "success", ...} (clears earlier records) |
| stop   | POST /stop_batch_recording  {"model": M} | {"status": "success", "total_records": n} |
| dump   | POST /dump_batch_recording  {"model": M} | {"records": [...]} (ServerlessLLM may say "batches") |
| clear  | POST /clear_batch_recording {"model": M} | {"status": "success", "message": ...} |

MoE-CAP's server ignores the body; ServerlessLLM routes by `model`. (SGLang's expert recorder dumps to a
file on the server host instead; import that file with `moecap-collect import-moecap`.)
"""

from __future__ import annotations

from typing import Any

import httpx

from ..errors import CollectError


class BatchRecorder:
    """start -> (the workload) -> stop -> dump, against `base_url`."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        *,
        headers: dict[str, str] | None = None,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = headers or {}
        self.timeout = httpx.Timeout(max(timeout_s, 5.0), read=max(timeout_s, 300.0))
        self.transport = transport

    async def _call(self, method: str, path: str) -> Any:
        payload = {"model": self.model} if self.model else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as http:
                if method == "GET":
                    resp = await http.get(self.base_url + path, params=payload, headers=self.headers)
                else:
                    resp = await http.post(self.base_url + path, json=payload, headers=self.headers)
        except httpx.HTTPError as exc:
            raise CollectError(
                f"batch recording: {method} {self.base_url}{path} failed ({type(exc).__name__}: {exc})"
            ) from None
        if resp.status_code == 404:
            raise CollectError(
                f"batch recording: the server at {self.base_url} has no {path} endpoint; serve the model with "
                "MoE-CAP's `python -m moe_cap.systems.vllm` or a ServerlessLLM `vllm_moecap` backend"
            )
        if resp.status_code != 200:
            raise CollectError(
                f"batch recording: {method} {path} answered HTTP {resp.status_code}: {resp.text[:200]}"
            )
        try:
            return resp.json()
        except ValueError:
            raise CollectError(
                f"batch recording: {method} {path} did not answer JSON: {resp.text[:120]!r}"
            ) from None

    async def status(self) -> dict[str, Any]:
        doc = await self._call("GET", "/batch_recording_status")
        return doc if isinstance(doc, dict) else {}

    async def start(self) -> None:
        await self._call("POST", "/start_batch_recording")

    async def stop(self) -> None:
        await self._call("POST", "/stop_batch_recording")

    async def clear(self) -> None:
        await self._call("POST", "/clear_batch_recording")

    async def dump(self) -> list[dict[str, Any]]:
        doc = await self._call("POST", "/dump_batch_recording")
        if isinstance(doc, dict):
            if doc.get("status") == "error":
                raise CollectError(f"batch recording: dump failed: {doc.get('message', doc)}")
            records = doc.get("records", doc.get("batches", []))
        else:
            records = doc
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise CollectError("batch recording: the dump is not a list of record objects")
        return records

    async def begin(self) -> None:
        """Check the endpoints exist, drop old records, start recording."""
        await self.status()
        await self.clear()
        await self.start()

    async def finish(self) -> list[dict[str, Any]]:
        """Stop recording and return the records (CollectError if there are none)."""
        await self.stop()
        records = await self.dump()
        if not records:
            raise CollectError(
                "batch recording: the server recorded no passes (was recording started on the serving process?)"
            )
        return records
