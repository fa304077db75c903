"""How b1_requests.csv was made from the lease's traces (not shipped: 2.4 MB of server steps; kept on the
lead's machine). One row per measured b1 request: client TTFT (drive: its requests trace; `vllm bench serve`:
`--save-detailed`, run 2 only; SGLang's bench saved none) and the server's own first step for that request
(duration, prompt tokens it found cached, new tokens). `engine_fidelity.ttft_outside_step` computes the same
pairing in later leases; this lease's code did not yet keep the round windows.

    python extract_b1_requests.py LEASE_DIR b1_requests.csv   # LEASE_DIR holds fidv/ fidv1/ fids/
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pyarrow as pa

RUNS = (
    ("1", "vllm", "fidv/serve-vllm"),
    ("2", "vllm", "fidv1/serve-vllm"),
    ("3", "sglang", "fids/serve-sglang"),
)
ROUND_GAP_NS = 2_500_000_000  # bench rounds are told apart by the idle time between them


def read_stream(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all()


def first_steps(folder: Path) -> dict[str, tuple[float, int, int, int]]:
    """Per server request id: (its first step's duration ms, cached prompt tokens, new tokens, start ns)."""
    (path,) = folder.glob("*.steps.arrow")
    cols = ["t_start_ns", "t_end_ns", "req_ids", "req_prefix_lens", "req_new_tokens"]
    rows = sorted(read_stream(path).select(cols).to_pylist(), key=lambda r: r["t_start_ns"])
    first: dict[str, tuple[float, int, int, int]] = {}
    for r in rows:
        for rid, cached, new in zip(
            r["req_ids"] or [], r["req_prefix_lens"] or [], r["req_new_tokens"] or []
        ):
            first.setdefault(
                rid, (round((r["t_end_ns"] - r["t_start_ns"]) / 1e6, 3), cached, new, r["t_start_ns"])
            )
    return first


def main(lease: Path, out_csv: Path) -> None:
    with open(out_csv, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["run", "engine", "tool", "round", "request", "client_ttft_ms", "server_step_ms",
                      "server_cached_tokens", "server_new_tokens"])  # fmt: skip
        for run, engine, sub in RUNS:
            folder = lease / sub
            first = first_steps(folder)
            drive_prefixes: set[str] = set()
            for path in sorted(folder.glob("*.client.requests.arrow")):
                d = read_stream(path).to_pydict()
                drive_prefixes.update(rid.split("-")[0] for rid in d["req_id"])
                if "-b1-r" not in path.name:
                    continue
                tool = path.name.split("-b1-r")[0].rsplit("-", 1)[1]
                rnd = int(path.name.split("-b1-r")[1][0])
                rows = sorted(zip(d["req_id"], d["arrival_ns"], d["first_token_ns"], strict=True))
                for i, (rid, sent, first_token) in enumerate(rows):
                    match = next((v for k, v in first.items() if rid in k), None)
                    out.writerow([run, engine, tool, rnd, i, round((first_token - sent) / 1e6, 3),
                                  *(match[:3] if match else ("", "", ""))])  # fmt: skip
            # bench's requests: the server ids no drive run sent, grouped into rounds by idle gaps
            others = sorted(
                (v[3], v)
                for k, v in first.items()
                if "warmup" not in k and not any(p in k for p in drive_prefixes)
            )
            groups: list[list[tuple[float, int, int, int]]] = [[]]
            for start, v in others:
                if groups[-1] and start - groups[-1][-1][3] > ROUND_GAP_NS:
                    groups.append([])
                groups[-1].append(v)
            b1_rounds = [g for g in groups if len(g) in (4, 5)]  # 4 requests, after SGLang's bench's warm-up
            for rnd, (path, g) in enumerate(
                zip(sorted(folder.glob("bench-*-b1-*.json")), b1_rounds, strict=True)
            ):
                ttfts = json.loads(path.read_text().strip().splitlines()[-1]).get("ttfts") or []
                for i, v in enumerate(g[-4:]):
                    out.writerow(
                        [run, engine, "bench", rnd, i, round(ttfts[i] * 1000, 3) if ttfts else "", *v[:3]]
                    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
