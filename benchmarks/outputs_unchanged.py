"""Do two versions of the analyzer give the same results? For speed work that must not move a number.

`python benchmarks/outputs_unchanged.py --baseline DIR [PATH ...]` runs this checkout's and another
version's `moecap-analyze PATHS --out OUT` (the other from `DIR/moecap`, e.g. `git worktree add
DIR/moecap REV`, as `cli_scale.py --baseline` does), cold and then again on the warm cache with
`--window all`, and compares, per run:

* stdout, byte for byte;
* metrics.json, value for value (key order and `generated_at` aside: the key order of a few maps is
  not fixed from run to run);
* every Parquet file under --out and in the cache (same names): schema and values;
* the cache's per-file JSON entries (rows, warnings, left-out rows, ...).

Parquet row-group layout is not compared (a cache may be written in fewer, larger row groups).
PATHS default to the shipped traces (traces/). Exit status 1 and one line per difference if any.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("cold", []), ("warm-window-all", ["--window", "all"]))


def _run(args: list[str], pythonpath: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = "import sys; from moecap.analyze.entry import main; sys.argv[0] = 'moecap-analyze'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def _same_column(x: pa.ChunkedArray, y: pa.ChunkedArray) -> bool:
    """Same type, nulls and values; floats bit for bit (NaN equals NaN, -0.0 does not equal 0.0)."""
    if not x.type.equals(y.type) or len(x) != len(y) or x.null_count != y.null_count:
        return False
    if pa.types.is_floating(x.type):
        xv, yv = x.combine_chunks(), y.combine_chunks()
        if not xv.is_null().equals(yv.is_null()):
            return False
        xn, yn = xv.fill_null(0).to_numpy(), yv.fill_null(0).to_numpy()
        return bool(np.array_equal(xn.view(f"u{xn.itemsize}"), yn.view(f"u{yn.itemsize}")))
    return x.equals(y)


def _metrics(path: Path) -> str:
    doc = json.loads(path.read_text())
    doc.pop("generated_at", None)
    return json.dumps(doc, sort_keys=True)


def _compare_dirs(a: Path, b: Path, label: str) -> list[str]:
    problems = []
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    if names_a != names_b:
        problems.append(f"{label}: files differ: {sorted(map(str, names_a ^ names_b))}")
    for name in sorted(names_a & names_b):
        pa_, pb = a / name, b / name
        if name.suffix == ".parquet":
            ta, tb = pq.read_table(pa_), pq.read_table(pb)
            same = ta.schema.equals(tb.schema) and all(
                _same_column(ta.column(i), tb.column(i)) for i in range(ta.num_columns)
            )
        elif name.name == "metrics.json":
            same = _metrics(pa_) == _metrics(pb)
        elif name.suffix == ".json":
            same = json.loads(pa_.read_text()) == json.loads(pb.read_text())
        else:
            same = pa_.read_bytes() == pb.read_bytes()
        if not same:
            problems.append(f"{label}: {name} differs")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=[str(ROOT / "traces")])
    ap.add_argument("--baseline", required=True, help="folder holding the other version as <DIR>/moecap")
    ap.add_argument("--workdir", help="keep the outputs here (default: a temporary folder)")
    args = ap.parse_args()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for side, pythonpath in (("new", None), ("base", args.baseline)):
            for run, extra in RUNS:
                out = root / side / run
                res = _run(
                    [*args.paths, "--out", str(out), "--cache-dir", str(root / side / "cache"), *extra],
                    pythonpath,
                )
                (root / side / f"{run}.stdout").write_text(res.stdout.replace(str(root / side), "<side>"))
                stderr = res.stderr.replace(str(root / side), "<side>")
                (root / side / f"{run}.rc").write_text(f"{res.returncode}\n{stderr}")
        for run, _ in RUNS:
            for suffix in ("stdout", "rc"):
                if (root / "new" / f"{run}.{suffix}").read_text() != (
                    root / "base" / f"{run}.{suffix}"
                ).read_text():
                    problems.append(f"{run}: {suffix} differs")
            problems += _compare_dirs(root / "new" / run, root / "base" / run, f"{run} --out")
        problems += _compare_dirs(root / "new" / "cache", root / "base" / "cache", "cache")
        n_files = sum(1 for _ in (root / "new").rglob("*") if _.is_file())
    for p in problems:
        print(p)
    print(json.dumps({"paths": args.paths, "files_compared": n_files, "differences": len(problems)}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
