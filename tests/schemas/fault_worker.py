"""Reads damaged copies of trace files in a separate process (so a native crash is a counted outcome,
not a dead test run). Input: a JSON file of cases {src, dst, flip: [byte, bit] | cut: n | data: hex};
output: one JSON line per case with the reader's error line, or its rows, warnings and counts.

    python tests/schemas/fault_worker.py CASES.json [FIRST_CASE]
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from moecap.schemas import TraceError, read_trace_file


def damaged(data: bytes, case: dict) -> bytes:
    if "flip" in case:
        byte, bit = case["flip"]
        out = bytearray(data)
        out[byte] ^= 1 << bit
        return bytes(out)
    if "cut" in case:
        return data[: case["cut"]]
    return data


def read(path: Path) -> dict:
    try:
        tf = read_trace_file(path)
    except TraceError as exc:
        return {"path": str(path), "error": str(exc)}
    except Exception:
        return {"path": str(path), "traceback": traceback.format_exc()}
    return {
        "path": str(path),
        "rows": tf.table.to_pylist(),
        "run": tf.run.to_json(),
        "warnings": tf.warnings,
        "corrupt_batches": tf.corrupt_batches,
        "complete": tf.complete,
        "lost_bytes": tf.lost_bytes,
        "rows_dropped": tf.rows_dropped,
        "drops": tf.drops,
        "integrity": tf.integrity,
    }


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    sources: dict[str, bytes] = {}
    for i in range(first, len(cases)):
        case = cases[i]
        data = sources.setdefault(case["src"], Path(case["src"]).read_bytes())
        dst = Path(case["dst"])
        dst.write_bytes(damaged(data, case))
        result = read(dst)
        result["case"] = i
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
