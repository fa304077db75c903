"""Fleet scale: analyse many runs' traces, local or in object storage, on a Ray cluster.

`run_fleet(inputs, dataset)` runs the local analysis of each run as a Ray task and writes a
hive-partitioned Parquet dataset (docs/fleet-dataset.md); `open_dataset(dataset)` gives a DuckDB
connection with the analyzer's views over it plus `fleet_hourly`. Ray is imported only when a fleet
analysis starts (`pip install 'moecap[fleet]'`).
"""

from __future__ import annotations

from .dataset import open_dataset
from .run import FleetReport, run_fleet

__all__ = ["FleetReport", "open_dataset", "run_fleet"]
