"""Packaging and the dependency rule of DESIGN.md, checked in fresh interpreters."""

from __future__ import annotations

import json
import shutil
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


SOURCE_ROOTS = ("schemas", "collect", "analyze")
CACHES = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The file names inside a wheel built from a clean copy of the sources.

    The copy keeps a stale build/ (or egg-info) of the checkout from filling in a file the build
    itself would miss.
    """
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for root in SOURCE_ROOTS:
        shutil.copytree(ROOT / root, src / root, ignore=shutil.ignore_patterns(*CACHES, "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("moecap-*.whl")
    return zipfile.ZipFile(wheel).namelist()


@pytest.mark.slow
def test_wheel_installs_everything_under_moecap(wheel_names: list[str]):
    code = [n for n in wheel_names if ".dist-info/" not in n]
    assert code and all(n.startswith("moecap/") for n in code), [
        n for n in code if not n.startswith("moecap/")
    ]
    for sub in SOURCE_ROOTS:
        assert f"moecap/{sub}/__init__.py" in wheel_names
    assert "moecap/schemas/tables.py" in wheel_names


def _source_files(suffix_ok) -> list[str]:
    found = []
    for root in SOURCE_ROOTS:
        for path in (ROOT / root).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and not CACHES & set(rel.parts) and suffix_ok(path.suffix):
                found.append(rel.as_posix())
    return sorted(found)


@pytest.mark.slow
def test_wheel_holds_every_data_file_of_the_source_folders(wheel_names: list[str]):
    data = _source_files(lambda suffix: suffix not in (".py", ".pyc"))
    # The files that were missing before (no __init__.py in their folders) are among them.
    assert "analyze/reference/data/moecap_reference_tables.json" in data
    assert "collect/models/tiny-qwen2-moe/config.json" in data
    missing = [f for f in data if f"moecap/{f}" not in wheel_names]
    assert not missing, f"not in the wheel: {missing}"


@pytest.mark.slow
def test_wheel_holds_every_python_file_of_the_source_folders(wheel_names: list[str]):
    missing = [f for f in _source_files(lambda suffix: suffix == ".py") if f"moecap/{f}" not in wheel_names]
    assert not missing, f"not in the wheel: {missing}"
