"""Maps the top-level source folders onto the `moecap` namespace.

schemas/ -> moecap.schemas, collect/ -> moecap.collect, analyze/ -> moecap.analyze (and their
subpackages). Nothing named `schemas`, `collect` or `analyze` is installed at top level; all other
metadata lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = ("schemas", "collect", "analyze")

packages = [
    f"moecap.{name}"
    for name in find_packages(include=[f"{root}{suffix}" for root in ROOTS for suffix in ("", ".*")])
]

setup(packages=packages, package_dir={f"moecap.{root}": root for root in ROOTS})
