"""`moecap-collect drive` end to end, as a user runs it: a real process against the loopback server,
real trace files, user errors as one line with exit status 2, Ctrl-C keeping what was done."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from moecap.analyze.accuracy import score_outputs
from moecap.schemas import open_traces, read_trace_file

CLI = [sys.executable, "-c", "from moecap.collect.cli import main; main()"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _gsm8k_file(tmp_path: Path) -> Path:
    # GSM8K's own format; the questions script the loopback server's answers.
    rows = [
        {"question": "stream tokens=4 answer=29", "answer": "36 - 7 = 29\n#### 29"},
        {"question": "stream tokens=4 answer=5", "answer": "2 + 4 = 6\n#### 6"},
        {"question": "stream tokens=5 answer=1,625", "answer": "#### 1,625"},
        {"question": "ctx400", "answer": "#### 1"},
    ]
    path = tmp_path / "gsm8k" / "main" / "test-00000-of-00001.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.parent.parent


def test_drive_writes_requests_and_outputs_then_accuracy(scripted, tmp_path):
    data = _gsm8k_file(tmp_path)
    out = tmp_path / "traces"
    proc = _cli(
        "drive",
        "--api-url",
        scripted.url,
        "--dataset",
        "gsm8k",
        "--dataset-path",
        str(data),
        "--num-prompts",
        "4",
        "--batch-size",
        "2",
        "--max-tokens",
        "8",
        "--out",
        str(out),
        "--run-id",
        "run-e2e",
        "--no-progress",
        "--slo-ttft-ms",
        "500",
    )
    assert proc.returncode == 0, proc.stderr
    assert "requests: 4 (3 ok, 1 failed)" in proc.stderr
    assert "HTTP 400: This model's maximum context length" in proc.stderr  # reported, and the run went on
    traces = open_traces([out], strict=True)
    assert list(traces.runs) == ["run-e2e"] and not traces.errors
    assert {f.table_kind for f in traces.files} == {"requests", "outputs"}
    req = read_trace_file(out / "run-e2e.client.requests.arrow")
    meta = req.run
    assert meta.model.id == "scripted-model"  # from the server's /v1/models
    assert meta.engine.name == "client"
    w = meta.workload
    assert (w["dataset"], w["num_prompts"], w["mode"], w["concurrency"], w["api"]) == (
        "gsm8k",
        4,
        "closed_loop",
        2,
        "completions",
    )
    assert w["slo"] == {"ttft_s": 0.5, "tpot_s": None}
    rows = req.table.to_pylist()
    assert len(rows) == 4
    ok = [r for r in rows if r["error"] is None]
    assert all(r["first_token_ns"] > r["arrival_ns"] and r["chunk_tokens"] for r in ok)
    outputs = pl.from_arrow(read_trace_file(out / "run-e2e.client.outputs.arrow").table)
    summary, per = score_outputs(outputs)
    assert (summary["correct"], summary["total"], summary["failed"]) == (2, 4, 1)
    assert summary["scorer"]["name"] == "gsm8k_numeric"
    assert per.filter(pl.col("correct"))["extracted"].sort().to_list() == ["1,625", "29"]


def test_batch_recording_writes_a_steps_table(tmp_path):
    from loopback import SCRIPTED, start_server

    out = tmp_path / "traces"
    with start_server(SCRIPTED, "--dump-key", "batches") as srv:  # ServerlessLLM's dump key
        proc = _cli(
            "drive",
            "--api-url",
            srv.url,
            "--model",
            "m1",
            "--dataset",
            "synthetic:8x3",
            "--num-prompts",
            "2",
            "--batch-recording",
            "--out",
            str(out),
            "--run-id",
            "rec",
            "--no-progress",
        )
        control = srv.get("/_seen")
    assert proc.returncode == 0, proc.stderr
    steps = read_trace_file(out / "rec.dp0-pp0-tp0.steps.arrow")
    # per request: a prefill pass + 2 decode passes; the warm-up request (default 1) is not recorded
    assert steps.table.num_rows == 2 * 3
    assert steps.run.engine.name == "http"
    ref = steps.run.extra["moecap_reference"]
    assert ref["columns"]["expert_activation"] == [5.5, 3.25, 3.25] * 2
    assert ref["columns"]["latency"] == [0.004, 0.002, 0.002] * 2
    assert ref["gpu_raw_type"] == "NVIDIA-H100-HBM3-80GB" and len(steps.run.gpus) == 2
    records = json.loads((out / "rec.batch_data.json").read_text())
    assert len(records) == 6 and records[0]["forward_mode"] == "prefill"
    assert {s["body"]["model"] for s in control} == {"m1"}


def test_user_errors_are_one_line_with_exit_2(scripted, tmp_path, free_port):
    unknown = _cli("drive", "--api-url", scripted.url, "--dataset", "gsm9k", "--out", str(tmp_path))
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0 and "Traceback" not in unknown.stderr
    assert (
        "unknown dataset 'gsm9k'; choose one of gsm8k, numinamath, longbench_v2, mmlu_pro, arena_hard"
        in unknown.stderr
    )
    t0 = time.monotonic()
    down = _cli(
        "drive",
        "--api-url",
        f"http://127.0.0.1:{free_port}",
        "--dataset",
        "synthetic:4x2",
        "--out",
        str(tmp_path),
        "--connect-timeout-s",
        "2",
    )
    assert down.returncode == 2 and time.monotonic() - t0 < 20
    assert down.stderr.strip().startswith(
        f"moecap-collect: error: cannot reach the server at http://127.0.0.1:{free_port}"
    )
    assert "Traceback" not in down.stderr
    assert not list(tmp_path.glob("*.arrow"))  # nothing written for a run that never started
    norec = None
    from loopback import SCRIPTED, start_server

    with start_server(SCRIPTED, "--no-recording") as srv:
        norec = _cli(
            "drive",
            "--api-url",
            srv.url,
            "--dataset",
            "synthetic:4x2",
            "--batch-recording",
            "--out",
            str(tmp_path),
        )
    assert norec.returncode == 2 and "has no /batch_recording_status endpoint" in norec.stderr


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_stops_cleanly_and_keeps_what_was_done(scripted, tmp_path, sig, status):
    """Ctrl-C and `kill` alike: finished rows kept, in-flight ones recorded as aborted with the signal
    named, both files closed with their end-of-stream marker, exit 128 + signal, no traceback."""
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": "stream ttft_ms=5 itl_ms=50 tokens=30", "answer": "#### 1"}) + "\n"
            for _ in range(12)
        )
    )
    out = tmp_path / "traces"
    proc = subprocess.Popen(
        [
            *CLI,
            "drive",
            "--api-url",
            scripted.url,
            "--dataset",
            "gsm8k",
            "--dataset-path",
            str(data),
            "--num-prompts",
            "12",
            "--batch-size",
            "2",
            "--max-tokens",
            "30",
            "--warmup",
            "0",  # the schedule below counts from the first recorded request
            "--out",
            str(out),
            "--run-id",
            "cc",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # wait until the first requests have finished (1.5 s each)
        while time.monotonic() < deadline and not (out / "cc.client.requests.arrow").exists():
            time.sleep(0.05)
        time.sleep(2.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(sig).name
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert f"interrupted by {name}: kept 4 of 12 requests" in err
    requests = read_trace_file(out / "cc.client.requests.arrow")
    outputs = read_trace_file(out / "cc.client.outputs.arrow")
    assert requests.complete and outputs.complete  # end-of-stream markers written
    rows = requests.table.to_pylist()
    assert len(rows) == 4
    done = [r for r in rows if r["error"] is None]
    aborted = [r for r in rows if r["finish_reason"] == "abort"]
    assert len(done) == 2 and len(aborted) == 2
    assert {r["error"] for r in aborted} == {f"stopped by {name} before the response was complete"}
    assert all(len(r["chunk_times_ns"]) >= 1 for r in aborted)
    assert requests.run.workload["mode"] == "closed_loop"
    assert outputs.table.num_rows == 4


def test_fewer_rows_than_asked_is_said_and_recorded(scripted, tmp_path):
    data = tmp_path / "five.jsonl"
    data.write_text(
        "".join(json.dumps({"question": "stream tokens=2", "answer": "#### 1"}) + "\n" for _ in range(5))
    )
    out = tmp_path / "traces"
    proc = _cli(
        "drive", "--api-url", scripted.url, "--dataset", "gsm8k", "--dataset-path", str(data),
        "--num-prompts", "8", "--out", str(out), "--run-id", "few", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert warnings == ["moecap-collect: warning: --num-prompts 8 but dataset gsm8k has 5 rows; sending 5"]
    req = read_trace_file(out / "few.client.requests.arrow")
    assert req.table.num_rows == 5
    assert (req.run.workload["num_prompts_requested"], req.run.workload["num_prompts"]) == (8, 5)


def test_slo_flags_are_named_as_the_analyzers(scripted, tmp_path):
    common = ["drive", "--api-url", scripted.url, "--dataset", "synthetic:4x2", "--num-prompts", "1",
              "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    new = _cli(*common, "--run-id", "new", "--slo-ttft-ms", "500", "--slo-tpot-ms", "40")
    old = _cli(*common, "--run-id", "old", "--ttft-slo-ms", "500", "--tpot-slo-ms", "40")  # hidden alias
    for proc, run in ((new, "new"), (old, "old")):
        assert proc.returncode == 0, proc.stderr
        slo = read_trace_file(tmp_path / f"{run}.client.requests.arrow").run.workload["slo"]
        assert slo == {"ttft_s": 0.5, "tpot_s": 0.04}
    both = _cli(*common, "--slo-ttft-ms", "500", "--ttft-slo-ms", "400")
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "moecap-collect: error: --slo-ttft-ms 500 and --ttft-slo-ms 400 disagree; give --slo-ttft-ms only"
    )
    shown = _cli("drive", "--help").stdout
    assert "--slo-ttft-ms" in shown and "--ttft-slo-ms" not in shown


def test_sigterm_during_the_warmup_stops_at_once(scripted, tmp_path):
    data = tmp_path / "slow.jsonl"
    data.write_text(
        json.dumps({"question": "stream ttft_ms=5 itl_ms=200 tokens=50", "answer": "#### 1"}) + "\n"
    )
    out = tmp_path / "traces"
    proc = subprocess.Popen(
        [*CLI, "drive", "--api-url", scripted.url, "--dataset", "gsm8k", "--dataset-path", str(data),
         "--num-prompts", "1", "--warmup", "1", "--max-tokens", "50", "--out", str(out), "--run-id", "wu",
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (out / "wu.client.requests.arrow").exists():
            time.sleep(0.05)
        time.sleep(0.5)  # inside the 10 s warm-up request
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert stopped_in < 5  # not after the warm-up request's 10 s
    assert "interrupted by SIGTERM: kept 0 of 1 requests" in err
    requests = read_trace_file(out / "wu.client.requests.arrow")
    assert requests.complete and requests.table.num_rows == 0  # warm-up requests are never recorded
