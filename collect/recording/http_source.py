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

import json
from typing import Any

import aiohttp

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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = headers or {}
        # a dump of a long run's records can take minutes to build on the server
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=max(timeout_s, 5.0), sock_read=max(timeout_s, 300.0)
        )

    async def _call(self, method: str, path: str) -> Any:
        payload = {"model": self.model} if self.model else {}
        try:
            async with aiohttp.ClientSession(timeout=self.timeout, trust_env=True) as http:
                if method == "GET":
                    request = http.get(self.base_url + path, params=payload, headers=self.headers)
                else:
                    request = http.post(self.base_url + path, json=payload, headers=self.headers)
                async with request as resp:
                    status, body = resp.status, await resp.read()
        except aiohttp.ClientConnectorError as exc:
            raise CollectError(
                f"batch recording: {method} {self.base_url}{path} failed (cannot connect: {exc.os_error})"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CollectError(
                f"batch recording: {method} {self.base_url}{path} failed ({type(exc).__name__}: {exc})"
            ) from None
        text = body.decode("utf-8", "replace")
        if status == 404:
            raise CollectError(
                f"batch recording: the server at {self.base_url} has no {path} endpoint; serve the model with "
                "MoE-CAP's `python -m moe_cap.systems.vllm` or a ServerlessLLM `vllm_moecap` backend"
            )
        if status != 200:
            raise CollectError(f"batch recording: {method} {path} answered HTTP {status}: {text[:200]}")
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise CollectError(
                f"batch recording: {method} {path} did not answer JSON: {text[:120]!r}"
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
