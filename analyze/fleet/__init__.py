"""Fleet scale: analyse many runs' traces, local or in object storage, on a Ray cluster.

`run_fleet(inputs, dataset)` runs the local analysis of each run as a Ray task and writes a
hive-partitioned Parquet dataset (docs/fleet-dataset.md); `open_dataset(dataset)` gives a DuckDB
connection with the analyzer's views over it plus `fleet_hourly`. Ray is imported only when a fleet
analysis starts (`pip install 'moecap[fleet]'`). The names load on first use, so that registering
the `fleet` command (`moecap-analyze --help`) imports no data library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dataset import open_dataset
    from .run import FleetReport, run_fleet

_LAZY = {"FleetReport": ".run", "open_dataset": ".dataset", "run_fleet": ".run"}

__all__ = ["FleetReport", "open_dataset", "run_fleet"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
