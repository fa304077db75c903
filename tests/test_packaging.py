"""Packaging and the dependency rule of DESIGN.md, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
if sys.argv[2] == "all":
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if any(part in info.name for part in sys.argv[3].split(",") if part):
            continue
        importlib.import_module(info.name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _top_level_modules(package: str, walk: bool = False, skip: str = "") -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, package, "all" if walk else "one", skip],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    return set(json.loads(out.stdout))


def test_schemas_loads_only_pyarrow_and_stdlib():
    loaded = _top_level_modules("moecap.schemas", walk=True)
    # Interpreter/installer plumbing, not dependencies: pip's editable finder, setuptools' .pth hook,
    # and the Cython runtime modules pyarrow's extension loads.
    plumbing = {m for m in loaded if m.startswith(("__editable__", "_cython_"))}
    plumbing |= {"_distutils_hack", "cython_runtime", "__main__"}
    foreign = loaded - set(sys.stdlib_module_names) - plumbing - {"moecap", "pyarrow", "numpy"}
    assert not foreign, f"moecap.schemas pulled in {sorted(foreign)}"


def test_collect_never_loads_analysis_libraries():
    loaded = _top_level_modules("moecap.collect", walk=True)
    assert not loaded & {"polars", "duckdb", "altair", "moecap.analyze"}


def test_analyze_never_loads_torch_or_an_engine():
    loaded = _top_level_modules("moecap.analyze", walk=True)
    assert not loaded & {"torch", "vllm", "sglang", "transformers", "triton"}


def test_nothing_named_collect_analyze_or_schemas_at_top_level():
    code = "import importlib.util as u; print([n for n in ('collect','analyze','schemas') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wheel_installs_everything_under_moecap(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("moecap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("moecap-") or ".dist-info/" not in n]
    assert code and all(n.startswith("moecap/") for n in code), [
        n for n in code if not n.startswith("moecap/")
    ]
    for sub in ("schemas", "collect", "analyze"):
        assert f"moecap/{sub}/__init__.py" in names
    assert "moecap/schemas/tables.py" in names


def test_help_starts_without_data_libraries():
    # `moecap-analyze --help` (and a command's --help) must not pay for the analyzer's data stack:
    # it once imported pandas through the sql command's set-up (2.5 s).
    code = (
        "import sys, json, io, contextlib\n"
        "sys.argv = ['moecap-analyze', '--help']\n"
        "from moecap.analyze.cli import main\n"
        "out = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(out): main()\n"
        "except SystemExit: pass\n"
        "assert 'summary' in out.getvalue()\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    heavy = set(json.loads(out.stdout)) & {"pyarrow", "polars", "duckdb", "pandas", "numpy", "yaml", "altair"}
    assert not heavy, f"--help imported {sorted(heavy)}"
