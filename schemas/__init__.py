"""moecap.schemas — the trace format: table schemas, run metadata, writer and reader.

Imports only pyarrow (and numpy, which pyarrow requires), xxhash where installed, and the standard library.
"""

from .errors import TraceError
from .metadata import (
    ClockAnchor,
    EngineInfo,
    GpuInfo,
    ModelInfo,
    MoEInfo,
    Parallelism,
    RankIdentity,
    RunMetadata,
    new_run_id,
)
from .reader import (
    DRIVER_ENGINE,
    TraceFile,
    TraceRun,
    TraceScan,
    TraceSet,
    expand_paths,
    file_name_error,
    is_driver_side,
    mixed_run_error,
    mixed_run_error_among,
    open_traces,
    read_trace_file,
    read_trace_header,
    scan_trace_file,
)
from .tables import PHASES, SCHEMA_VERSION, TABLE_KINDS, TABLES, Column, arrow_schema, required_columns
from .writer import TraceWriter, WriterStats, rows_to_batch, trace_file_name

__all__ = [
    "DRIVER_ENGINE",
    "PHASES",
    "SCHEMA_VERSION",
    "TABLES",
    "TABLE_KINDS",
    "ClockAnchor",
    "Column",
    "EngineInfo",
    "GpuInfo",
    "MoEInfo",
    "ModelInfo",
    "Parallelism",
    "RankIdentity",
    "RunMetadata",
    "TraceError",
    "TraceFile",
    "TraceRun",
    "TraceScan",
    "TraceSet",
    "TraceWriter",
    "WriterStats",
    "arrow_schema",
    "expand_paths",
    "file_name_error",
    "is_driver_side",
    "mixed_run_error",
    "mixed_run_error_among",
    "new_run_id",
    "open_traces",
    "read_trace_file",
    "read_trace_header",
    "required_columns",
    "rows_to_batch",
    "scan_trace_file",
    "trace_file_name",
]
