"""Maps the top-level source folders onto the `moecap` namespace and ships every data file in them.

schemas/ -> moecap.schemas, collect/ -> moecap.collect, analyze/ -> moecap.analyze (and their
subpackages). Nothing named `schemas`, `collect` or `analyze` is installed at top level; all other
metadata lives in pyproject.toml.

Data files (every non-Python file under those folders, caches excluded) are assigned to the nearest
enclosing package, so a data folder needs no `__init__.py` (analyze/reference/data/, collect/models/
had none and were missing from the wheel). tests/test_packaging.py builds the wheel and checks it.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOTS = ("schemas", "collect", "analyze")
CACHE_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"}
CODE_SUFFIXES = (".py", ".pyc", ".pyo")

packages = [
    f"moecap.{name}"
    for name in find_packages(include=[f"{root}{suffix}" for root in ROOTS for suffix in ("", ".*")])
]


def _package_data() -> dict[str, list[str]]:
    """{package: [paths relative to its folder]} for every non-Python file under ROOTS."""
    here = Path(__file__).resolve().parent
    data: dict[str, list[str]] = {}
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(here / root):
            dirnames[:] = sorted(d for d in dirnames if d not in CACHE_DIRS and not d.endswith(".egg-info"))
            for name in sorted(filenames):
                if name.endswith(CODE_SUFFIXES):
                    continue
                path = Path(dirpath, name).relative_to(here)
                owner = path.parent
                while not (here / owner / "__init__.py").exists():
                    owner = owner.parent
                package = "moecap." + ".".join(owner.parts)
                data.setdefault(package, []).append(path.relative_to(owner).as_posix())
    return data


setup(
    packages=packages,
    package_dir={f"moecap.{root}": root for root in ROOTS},
    package_data=_package_data(),
    include_package_data=False,
)
