"""Server-side per-pass records from MoE-CAP-style recorders: the HTTP batch-recording source, the
record -> `steps` mapping, and the importer of existing MoE-CAP output folders."""

from __future__ import annotations

from .http_source import BatchRecorder
from .importer import ImportedRun, import_moecap_dir
from .records import gpus_from_records, records_to_steps, step_row, write_reference_steps

__all__ = [
    "BatchRecorder",
    "ImportedRun",
    "gpus_from_records",
    "import_moecap_dir",
    "records_to_steps",
    "step_row",
    "write_reference_steps",
]
