"""Loopback test servers, each in its own process bound to 127.0.0.1 (helpers for the collector tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTED = HERE / "driver" / "scripted_server.py"


class LoopbackServer:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return json.loads(resp.read())

    def timings(self, req_id: str) -> dict:
        return self.get(f"/_timings?id={req_id}")


@contextmanager
def start_server(script: Path, *args: str, ready_timeout_s: float = 60.0) -> Iterator[LoopbackServer]:
    """Run `script` (which prints "PORT <n>" and serves until its stdin closes) and yield its address."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(ready_timeout_s)
    try:
        if not line or not line[0].startswith("PORT "):
            proc.kill()
            raise RuntimeError(f"{script.name} did not start: {proc.stderr.read()[-2000:]}")
        yield LoopbackServer(proc, int(line[0].split()[1]))
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
