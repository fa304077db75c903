"""moecap.analyze — derive CAP metrics from moecap traces (and MoE-CAP record files) on any machine.

Never imports torch or a serving engine.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moecap")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"


def connect(paths, **kwargs):  # type: ignore[no-untyped-def]
    """A DuckDB connection over the traces at `paths`, with every documented view defined."""
    from .pipeline import analyze_paths

    return analyze_paths(paths, **kwargs).db.con
