"""Fixtures of the fault-injection suite: one small trace file per table kind whose rows (and their
split into record batches) are known without reading the file, a map of the file's messages made with
pyarrow's own message reader, and the classification of what the reader returned for a damaged copy.

Expected values are the rows the test wrote, never what the reader returned for the intact file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from moecap.schemas import TABLES, RunMetadata, TraceWriter

ROWS = 10
ROWS_PER_BATCH = 3
"""10 rows in batches of 3: the writer's empty opening batch, then 3 + 3 + 3 + 1 rows."""


def _steps(i: int) -> dict[str, Any]:
    n = 1 + i % 3
    return {
        "step": 100 + i,
        "t_start_ns": 1_000_000 * i,
        "t_end_ns": 1_000_000 * i + 250_000,
        "gpu_start_ns": None if i % 4 == 0 else 1_000_000 * i + 10,
        "gpu_end_ns": None if i % 4 == 0 else 1_000_000 * i + 200_000,
        # the dictionary changes between batches (prefill only at first): dictionary messages in the file
        "phase": ("prefill", "decode", "mixed", "idle", "verify")[(i // 3 + i) % 5] if i >= 3 else "prefill",
        "is_draft": i % 5 == 4,
        "num_reqs": n,
        "num_tokens": 7 * n,
        "req_ids": [f"req-{i}-{j}" for j in range(n)],
        "req_prefix_lens": [i * 10 + j for j in range(n)],
        "req_new_tokens": [7] * n,
        "req_num_logits": None if i % 2 else [1] * n,
        "req_spec_tokens": None,
    }


def _experts(i: int) -> dict[str, Any]:
    return {"step": 100 + i, "counts": (np.arange(48, dtype=np.int32) * (i + 1)) % 97}


def _requests(i: int) -> dict[str, Any]:
    failed = i == 4
    return {
        "req_id": f"req-{i:04d}",
        "engine_req_id": None if i % 3 else f"eng-{i}",
        "sample_id": f"gsm8k-{i}",
        "arrival_ns": 10_000 * i,
        "first_token_ns": None if failed else 10_000 * i + 2_000,
        "finish_ns": 10_000 * i + 9_000,
        "prompt_tokens": 100 + i,
        "output_tokens": None if failed else 20 + i,
        "cached_prompt_tokens": 0 if i % 2 else 16,
        "chunk_times_ns": None if failed else [10_000 * i + 2_000, 10_000 * i + 5_000],
        "chunk_tokens": None if failed else [1, 19 + i],
        "queue_ns": None,
        "preemptions": i % 2,
        "finish_reason": "error" if failed else "length",
        "error": "HTTP 500: überlastet" if failed else None,
        "retries": i % 3,
    }


def _outputs(i: int) -> dict[str, Any]:
    return {
        "req_id": f"req-{i:04d}",
        "sample_id": f"gsm8k-{i}",
        "dataset": "gsm8k",
        "prompt": f"Question {i}: what is {i} + {i}? Ünïcode ✓",
        "output": None if i == 4 else f"The answer is {2 * i}.",
        "reference": str(2 * i),
    }


def _gpu_samples(i: int) -> dict[str, Any]:
    return {
        "t_ns": 200_000_000 * i,
        "gpu_index": i % 2,
        "gpu_uuid": f"GPU-{i % 2:08d}-aaaa",
        "power_w": 250.5 + i,  # exact in float32
        "energy_mj": 1_000_000 + 50_000 * i,
        "sm_clock_mhz": 1980,
        "mem_clock_mhz": None if i == 3 else 2619,
        "memory_used_bytes": 40 * 2**30 + i,
        "gpu_util_pct": 87.5,
        "mem_util_pct": None,
    }


ROW_MAKERS = {
    "steps": _steps,
    "experts": _experts,
    "requests": _requests,
    "outputs": _outputs,
    "gpu_samples": _gpu_samples,
}
assert set(ROW_MAKERS) == set(TABLES), "a table kind without fault-injection rows"


def rows(table: str) -> list[dict[str, Any]]:
    return [ROW_MAKERS[table](i) for i in range(ROWS)]


def expected_row(row: dict[str, Any], table: str) -> dict[str, Any]:
    """The row as the reader must return it: every column, numpy lists as lists."""
    out = {}
    for c in TABLES[table]:
        v = row.get(c.name)
        out[c.name] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def expected_batches(table: str) -> list[list[dict[str, Any]]]:
    """The non-empty record batches the writer makes of `rows(table)` (rows_per_batch rows each)."""
    want = [expected_row(r, table) for r in rows(table)]
    return [want[i : i + ROWS_PER_BATCH] for i in range(0, len(want), ROWS_PER_BATCH)]


def write_sample(path: Path, table: str, run: RunMetadata) -> None:
    with TraceWriter(path, table, run, rows_per_batch=ROWS_PER_BATCH, flush_interval_s=600) as w:
        w.write_rows(rows(table))


@dataclass
class Message:
    kind: str  # "schema" | "dictionary" | "record batch" | "eos"
    start: int
    meta_end: int  # end of the 8-byte prefix + flatbuffer metadata; the body follows
    end: int
    rows: int = 0
    uses_dictionary: int | None = None
    """Index (in the message list) of the dictionary message a record batch is decoded with."""


def message_map(data: bytes) -> list[Message]:
    """The file's messages, walked with pyarrow's MessageReader (independent of moecap's reader)."""
    src = pa.BufferReader(data)
    reader = ipc.MessageReader.open_stream(src)
    out: list[Message] = []
    dictionary = None
    start = 0
    while True:
        try:
            msg = reader.read_next_message()
        except StopIteration:
            break
        end = src.tell()
        meta_end = end - msg.body.size if msg.body is not None else end
        m = Message(msg.type, start, meta_end, end)
        if msg.type == "dictionary":
            dictionary = len(out)
        elif msg.type == "record batch":
            m.uses_dictionary = dictionary
        out.append(m)
        start = end
    if start < len(data):
        out.append(Message("eos", start, len(data), len(data)))
    return out


@dataclass
class Outcome:
    """What the reader did with one damaged file."""

    kind: str
    """error-line | exact | exact-warned | recovered | FAIL-..."""
    lost_batches: list[int] = field(default_factory=list)
    detail: str = ""


def classify(
    result: dict[str, Any], table: str, run: RunMetadata, region: Message, messages: list[Message]
) -> Outcome:
    """Judge the reader's result for a file damaged inside `region` (one of `messages`).

    Allowed: a one-line TraceError (only for damage in the schema message); exactly the written rows
    (with or without a warning); or the written batches less some, with a corrupt-batch warning, where
    every lost batch is the damaged one or one decoded with a damaged dictionary message.
    """
    if "crash" in result:
        return Outcome("FAIL-crash", detail=result["crash"])
    if "traceback" in result:
        return Outcome("FAIL-traceback", detail=result["traceback"])
    if "error" in result:
        msg = result["error"]
        if "\n" in msg or not msg.startswith(result["path"]):
            return Outcome("FAIL-error-not-one-line", detail=msg)
        if region.kind != "schema":
            return Outcome("FAIL-file-refused-for-batch-damage", detail=msg)
        return Outcome("error-line", detail=msg)
    for w in result["warnings"]:
        if "\n" in w or not w.startswith(result["path"]):
            return Outcome("FAIL-warning-not-one-line", detail=w)
    if RunMetadata.from_json(result["run"]) != run:
        return Outcome("FAIL-silent-metadata-change")
    batches = expected_batches(table)
    got = result["rows"]
    kept, lost, i = [], [], 0
    for b, want in enumerate(batches):
        if got[i : i + len(want)] == want:
            kept.append(b)
            i += len(want)
        else:
            lost.append(b)
    if i != len(got):
        return Outcome("FAIL-silent-value-change", lost, detail=f"{len(got) - i} unexplained row(s)")
    corrupt_warned = result["corrupt_batches"] > 0 and any("corrupt" in w for w in result["warnings"])
    if not lost:
        return Outcome("exact-warned" if result["warnings"] else "exact")
    if not corrupt_warned:
        return Outcome("FAIL-silent-loss", lost)
    batch_messages = [m for m in messages if m.kind == "record batch" and m.rows]
    damaged = {b for b, m in enumerate(batch_messages) if m is region}
    if region.kind == "dictionary":
        index = messages.index(region)
        damaged |= {b for b, m in enumerate(batch_messages) if m.uses_dictionary == index}
    if not set(lost) <= damaged:
        return Outcome("FAIL-good-batch-lost", lost, detail=f"damaged {sorted(damaged)}")
    return Outcome("recovered", lost)


def annotate_rows(messages: list[Message], table: str) -> None:
    """Give each non-empty record batch message its row count (from the written rows, in order)."""
    sizes = [len(b) for b in expected_batches(table)]
    batch_messages = [m for m in messages if m.kind == "record batch"]
    # the writer's opening batch is empty; the others hold the written rows in order
    assert len(batch_messages) == len(sizes) + 1, (len(batch_messages), sizes)
    for m, n in zip(batch_messages[1:], sizes):
        m.rows = n


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


WORKER = Path(__file__).with_name("fault_worker.py")


def run_cases(cases: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Run the cases through fault_worker.py in a subprocess; a case that kills the worker (a native
    crash) is recorded as {"crash": ...} and the worker is restarted after it."""
    import subprocess
    import sys

    spec = workdir / "cases.json"
    spec.write_text(dumps(cases))
    results: list[dict[str, Any]] = []
    while len(results) < len(cases):
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(spec), str(len(results))],
            capture_output=True,
            text=True,
            timeout=600,
        )
        for line in proc.stdout.splitlines():
            results.append(json.loads(line))
        if len(results) < len(cases) and proc.returncode != 0:
            results.append(
                {"case": len(results), "crash": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            )
        elif len(results) < len(cases):
            raise AssertionError(f"worker stopped early without an error: {proc.stderr[-500:]}")
    return results
