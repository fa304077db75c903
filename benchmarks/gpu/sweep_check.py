"""Check a sweep folder (`moecap-collect sweep --out DIR`) on a machine with the analyzer: its matrix
table (`moecap-analyze leaderboard DIR --layout moecap`) must equal, cell for cell, each point analysed
alone, and every point of sweep.json must be recorded with closed files.

    python benchmarks/gpu/sweep_check.py DIR [--gpu H100]      # prints the table, then OK or the mismatches

Exit status 0 when everything matches exactly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gpu", default=None, help="analyse as this GPU (default: the trace's)")
    args = ap.parse_args()

    from moecap.analyze.analysis import Options
    from moecap.analyze.pipeline import analyze_paths
    from moecap.analyze.report.matrix import matrix_frame, to_markdown
    from moecap.collect.sweep.state import SweepState

    cache = Path(tempfile.mkdtemp(prefix="moecap-sweep-check-"))
    options = Options(gpu=args.gpu)
    problems: list[str] = []
    state = SweepState.load(args.folder)
    for entry in state.points.values():
        files = entry.attempts[-1].files if entry.attempts else []
        if entry.status != "done":
            problems.append(f"{entry.slug}: {entry.status} ({entry.reason})")
        elif not all((args.folder / f).exists() for f in files):
            problems.append(f"{entry.slug}: files missing")
    frame = matrix_frame(analyze_paths([args.folder], options, cache_dir=cache))
    print(to_markdown(frame))
    checks = {
        "ttft_ms": lambda m: m["requests"]["ttft_s"]["mean"] * 1e3,
        "tpot_ms": lambda m: m["requests"]["tpot_s"]["mean"] * 1e3,
        "window_output_throughput": lambda m: m["steps"]["all"]["window_output_throughput"],
        "prefill_smbu": lambda m: m["steps"]["prefill"]["s_mbu"],
        "prefill_smfu": lambda m: m["steps"]["prefill"]["s_mfu"],
        "decode_smbu": lambda m: m["steps"]["decode"]["s_mbu"],
        "decode_smfu": lambda m: m["steps"]["decode"]["s_mfu"],
        "cost_usd_per_m_output_tokens": lambda m: m["cost"]["usd_per_1m_output_tokens"],
    }
    for row in frame.iter_rows(named=True):
        files = sorted(args.folder.glob(f"{row['run_id']}.*.arrow"))
        (run,) = analyze_paths(files, options, cache_dir=cache).document["runs"]
        for column, read in checks.items():
            try:
                alone = read(run["metrics"])
            except (KeyError, TypeError):
                alone = None
            if row[column] != alone:
                problems.append(f"{row['run_id']}: {column} table {row[column]!r} != alone {alone!r}")
    print(json.dumps({"rows": frame.height, "points": len(state.points), "problems": problems}, indent=1))
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
