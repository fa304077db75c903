"""`supervise_traced_server`: the engine's server as a child whose stop signals go through us first.

Real processes: the "server" is a Python child that logs what it hears; the supervisor runs in its own
process (and process group, standing in for a terminal's), so the signals are real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_SERVER = """
import os, signal, sys, time
log = open({log!r}, "a", buffering=1)
log.write(f"pgid {{os.getpgid(0)}}\\n")
def on(signum, frame):
    log.write(f"heard {{signum}} marker={{os.path.exists({marker!r})}}\\n")
    sys.exit(3)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
if {exit_by_itself!r}:
    sys.exit(7)
while True:
    time.sleep(0.05)
"""

_SUPERVISOR = """
import os, sys, time
from pathlib import Path
from moecap.collect.engines.offline import supervise_traced_server
def before_stop():
    time.sleep(0.3)  # e.g. waiting for the workers to close their files
    Path({marker!r}).write_text("closed")
    return ["scheduler 123: not closed"]
print("SUPERVISOR", os.getpgid(0), flush=True)
rc = supervise_traced_server([sys.executable, {server!r}], dict(os.environ), engine="X", run_id="r1",
                             out_dir=Path("out"), warnings=["old release"], before_stop=before_stop)
print("RC", rc, flush=True)
"""


def _start(tmp_path: Path, exit_by_itself: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    log, marker = tmp_path / "server.log", tmp_path / "closed.marker"
    server, supervisor = tmp_path / "server.py", tmp_path / "supervisor.py"
    server.write_text(_SERVER.format(log=str(log), marker=str(marker), exit_by_itself=exit_by_itself))
    supervisor.write_text(_SUPERVISOR.format(marker=str(marker), server=str(server)))
    proc = subprocess.Popen(
        [sys.executable, str(supervisor)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    return proc, log, marker


def _wait_for(path: Path, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_runs_before_stop_first_then_reaches_the_server(tmp_path, sig):
    proc, log, marker = _start(tmp_path)
    try:
        supervisor_pgid = int(proc.stdout.readline().split()[1])
        text = _wait_for(log, "pgid")
        server_pgid = int(text.split()[1])
        assert server_pgid != supervisor_pgid  # a terminal's Ctrl-C reaches the supervisor only
        os.killpg(proc.pid, sig)  # the whole (terminal) group: the server is not in it
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    heard = [ln for ln in log.read_text().splitlines() if ln.startswith("heard")]
    assert heard == [f"heard {int(sig)} marker=True"]  # once, and after before_stop had finished
    assert "RC 3" in out  # the server's own exit status
    assert "moecap-collect: warning: old release" in err
    assert "moecap-collect: warning: scheduler 123: not closed" in err  # before_stop's lines, one each
    assert "moecap-collect: run r1: tracing X (server pid " in err and ") into out/" in err
    assert marker.read_text() == "closed"


def test_a_server_that_ends_by_itself_returns_its_status_without_before_stop(tmp_path):
    proc, log, marker = _start(tmp_path, exit_by_itself=True)
    out, err = proc.communicate(timeout=30)
    assert "RC 7" in out, err
    assert not marker.exists()
    assert "heard" not in log.read_text()
