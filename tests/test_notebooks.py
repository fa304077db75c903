"""The notebooks in notebooks/ run headless (jupytext -> nbclient) without error, each in a time budget.

They read traces/*.arrow, or synthetic traces when traces/ has none. The Parquet cache goes to a
temporary directory shared by the notebooks, so the run does not depend on (or fill) the user's.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
BUDGET_S = 20.0
"""Target wall time per notebook, kernel start included (the test allows a slow CI machine 3x)."""


def test_there_are_at_least_three_notebooks() -> None:
    assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def notebook_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Parquet cache for all notebooks, as a user's would be (the first converts the traces)."""
    return tmp_path_factory.mktemp("notebook-cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, notebook_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(notebook_cache))
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=int(3 * BUDGET_S),
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on the first failure
    elapsed = time.monotonic() - start
    assert elapsed < 3 * BUDGET_S, f"{path.name} took {elapsed:.1f} s"
    errors = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
