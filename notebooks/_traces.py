"""Where the notebooks find their traces: the repository's `traces/*.arrow`, or synthetic runs.

The real H100 sample traces live in `traces/`. Until they are there (or when a checkout lacks them),
the notebooks run on synthetic traces written by `benchmarks/synthetic_traces.py` (a toy
continuous-batching scheduler whose step times follow a known roofline: shapes are right, numbers
are not measurements), and say so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

SYNTHETIC_BATCH_SIZES = (2, 4, 8, 16)


def repo_root() -> Path:
    """The checkout holding these notebooks (the first parent with pyproject.toml)."""
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() and (d / "notebooks").is_dir():
            return d
    raise RuntimeError(f"run the notebooks from inside the moecap checkout (cwd {here})")


def trace_paths() -> list[str]:
    """`traces/*.arrow`, or (with a printed note) synthetic runs at batch sizes 2, 4, 8 and 16."""
    root = repo_root()
    files = sorted((root / "traces").glob("*.arrow"))
    if files:
        return [str(p) for p in files]
    out = _synthetic_traces(root)
    print(
        f"note: {root / 'traces'} holds no *.arrow files yet, so this notebook runs on synthetic traces "
        f"({out}); their numbers come from a toy scheduler, not from a GPU."
    )
    return [str(p) for p in sorted(out.glob("*.arrow"))]


def _synthetic_traces(root: Path) -> Path:
    out = (
        Path(tempfile.gettempdir())
        / f"moecap-notebook-traces-{os.getuid() if hasattr(os, 'getuid') else 0}-v1"
    )
    if out.is_dir() and len(list(out.glob("*.arrow"))) == 4 * len(SYNTHETIC_BATCH_SIZES):
        return out
    sys.path.insert(0, str(root / "benchmarks"))
    import synthetic_traces

    tmp = Path(tempfile.mkdtemp(prefix="moecap-notebook-traces-"))
    for i, bs in enumerate(SYNTHETIC_BATCH_SIZES):
        synthetic_traces.simulate_run(
            tmp,
            synthetic_traces.SimConfig(
                num_requests=48,
                concurrency=bs,
                output_len=24,
                seed=i,
                run_id=f"20260101T000000Z-synthetic-qwen15moe-bs{bs:02d}",
            ),
        )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
