"""`moecap-collect sweep`: a benchmark matrix (models × tasks × batch sizes × repeats) recorded as one
run per point, with one engine start per engine configuration, resumable after a kill.

Rooms: `matrix` (what to run: command line / YAML → points and their identity), `state` (what became of
each point: `<out>/sweep.json`), `session` (the narrow engine interface: start, run a point, stop; HF here,
vLLM in `vllm_session`, SGLang — one engine per point — in `sglang_session`), `execute` (the loop, stop
signals, the table at the end), `command` (the CLI).
"""

from .execute import SweepOutcome, run_sweep, show_table, table_command
from .matrix import EngineConfig, Point, SweepSpec, build_spec, expand, group_by_config, load_spec
from .session import EngineSession, HFSession, PointInterrupted, PointResult, open_session
from .state import SweepState, file_closed

__all__ = [
    "EngineConfig",
    "EngineSession",
    "HFSession",
    "Point",
    "PointInterrupted",
    "PointResult",
    "SweepOutcome",
    "SweepSpec",
    "SweepState",
    "build_spec",
    "expand",
    "file_closed",
    "group_by_config",
    "load_spec",
    "open_session",
    "run_sweep",
    "show_table",
    "table_command",
]
