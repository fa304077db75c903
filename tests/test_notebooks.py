"""The notebooks run the way notebooks/README.md says, as written, without error, each in a time budget.

The documented command (`jupytext --to ipynb --execute notebooks/<name>.py`, from the repository root)
runs in a scratch folder laid out like the checkout (links to pyproject.toml, traces/ and benchmarks/,
a copy of notebooks/), so the .ipynb it writes stays out of the checkout. The Parquet cache goes to a
temporary directory shared by the notebooks, so the run does not depend on (or fill) the user's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import readme_commands
import tomllib

pytest.importorskip("jupytext")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
BUDGET_S = 20.0
"""Target wall time per notebook, kernel start included (the test allows a slow CI machine 3x)."""


def _documented() -> list[str]:
    (block,) = readme_commands.bash_blocks((NOTEBOOKS_DIR / "README.md").read_text())
    return readme_commands.commands(block)


def test_there_are_at_least_three_notebooks() -> None:
    assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]


def test_the_documented_install_gives_what_the_command_needs() -> None:
    install, run = _documented()
    assert "'.[analyze,notebooks]'" in install
    assert run.startswith(".venv/bin/jupytext --to ipynb --execute notebooks/")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0] for req in extras["notebooks"]}
    # jupytext reads the .py, nbconvert executes it (jupytext --execute imports it), ipykernel runs it.
    assert {"jupytext", "nbconvert", "ipykernel"} <= names
    assert {"jupytext", "nbconvert", "ipykernel"} <= {r.split(">")[0] for r in extras["dev"]}


def _jupytext() -> list[str]:
    """This interpreter's jupytext: its console script when it belongs here, else `python -m jupytext`."""
    script = Path(sys.executable).parent / "jupytext"
    if script.is_file() and script.read_text(errors="replace").startswith(f"#!{sys.executable}"):
        return [str(script)]
    return [sys.executable, "-m", "jupytext"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "traces", "benchmarks"):
        (work / name).symlink_to(ROOT / name)
    shutil.copytree(
        NOTEBOOKS_DIR, work / "notebooks", ignore=shutil.ignore_patterns("*.ipynb", "__pycache__")
    )
    return work


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_as_documented(path: Path, checkout: Path, tmp_path_factory) -> None:
    command = _documented()[1].split("#")[0].split()
    documented = "notebooks/01_tour_of_a_run.py"
    assert command[-1] == documented
    args = [*_jupytext(), *command[1:-1], f"notebooks/{path.name}"]
    cache = tmp_path_factory.getbasetemp() / "notebook-cache"
    cache.mkdir(exist_ok=True)
    start = time.monotonic()
    r = subprocess.run(
        args,
        cwd=checkout,
        env={**os.environ, "MOECAP_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=int(6 * BUDGET_S),
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-4000:]
    written = checkout / "notebooks" / path.with_suffix(".ipynb").name
    notebook = json.loads(written.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every code cell ran"
    errors = [out for c in code for out in c.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    assert elapsed < 3 * BUDGET_S, f"{path.name} took {elapsed:.1f} s"
