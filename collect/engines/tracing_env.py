"""The environment contract every in-engine tracer reads (vLLM workers, SGLang schedulers): one
definition, so `moecap-collect serve|run` sets the same variables whatever the engine.

`MOECAP_TRACE_DIR` (on/off and where), `MOECAP_RUN_ID` (shared by every process of a run),
`MOECAP_COUNTS=0` (steps only), `MOECAP_STRICT_ENGINE=1` (refuse an untested engine release),
`MOECAP_MODEL_ID`, `MOECAP_WORKLOAD` (JSON for the run metadata), `MOECAP_STATS_DIR` (per-process
tracer stats as JSON, for scripts), `MOECAP_COUNT_ON=auto|device|host` (where vLLM's routing rows are
counted; the counts are the same either way), `MOECAP_RECORD_WARMUP=1` (record the steps of a client's
warm-up too, which the tracers leave out: a diagnostic, e.g. to see how an engine formed drive's residue
ladder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import new_run_id

ENV_TRACE_DIR = "MOECAP_TRACE_DIR"
ENV_RUN_ID = "MOECAP_RUN_ID"
ENV_COUNTS = "MOECAP_COUNTS"
ENV_STRICT = "MOECAP_STRICT_ENGINE"
ENV_MODEL_ID = "MOECAP_MODEL_ID"
ENV_WORKLOAD = "MOECAP_WORKLOAD"
ENV_STATS_DIR = "MOECAP_STATS_DIR"
ENV_COUNT_ON = "MOECAP_COUNT_ON"
ENV_RECORD_WARMUP = "MOECAP_RECORD_WARMUP"


def tracer_environment(
    out: Path,
    run_id: str,
    *,
    counts: bool,
    model_id: str,
    workload: dict[str, Any],
    strict: bool,
    stats_dir: str | None = None,
    plugin_allow_list: tuple[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables that turn an engine's moecap plugin on in every engine process (they inherit the
    environment). `plugin_allow_list`: (the engine's allow-list variable, our plugin's name); where the
    user set that list, the plugin is appended to it, else the variable is left unset (all plugins load)."""
    env = {
        ENV_TRACE_DIR: str(out.resolve()),
        ENV_RUN_ID: run_id,
        ENV_COUNTS: "1" if counts else "0",
        ENV_MODEL_ID: model_id,
        ENV_WORKLOAD: json.dumps(workload, separators=(",", ":"), default=str),
    }
    if strict:
        env[ENV_STRICT] = "1"
    if stats_dir:
        env[ENV_STATS_DIR] = stats_dir
    if plugin_allow_list is not None:
        variable, name = plugin_allow_list
        allow = (os.environ if environ is None else environ).get(variable)
        if allow is not None and name not in [p.strip() for p in allow.split(",")]:
            env[variable] = ",".join([p for p in allow.split(",") if p.strip()] + [name])
    return env


def env_flag(name: str, default: str) -> bool:
    """A boolean variable: anything but 0 / false / no / off / empty is on."""
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def workload_from_env() -> dict[str, Any]:
    """`MOECAP_WORKLOAD` as a dict (a non-dict JSON value under "value", bad JSON kept as text)."""
    raw = os.environ.get(ENV_WORKLOAD)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"unparsed": raw}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


@dataclass
class TracerSettings:
    """What a tracer process records and where; `from_env` is None when tracing is off."""

    trace_dir: str
    run_id: str
    counts: bool = True
    model_id: str | None = None
    workload: dict[str, Any] = field(default_factory=dict)
    stats_dir: str | None = None
    rows_per_batch: int = 256
    flush_interval_s: float = 1.0
    idle_flush_s: float = 0.5
    """Seconds without a pass after which an idle flusher (where the engine has one) writes rows."""
    ring: int = 32
    """Steps whose device readback may be in flight at once."""
    count_on: str = "auto"
    """Where expert counts are made from the routing rows: auto | device | host (engines that support it)."""
    record_warmup: bool = False
    """Record the steps of a client's warm-up (request ids with `workload.WARMUP_PREFIX`) too."""

    @classmethod
    def from_env(cls, engine: str) -> TracerSettings | None:
        trace_dir = os.environ.get(ENV_TRACE_DIR)
        if not trace_dir:
            return None
        return cls(
            trace_dir=trace_dir,
            run_id=os.environ.get(ENV_RUN_ID) or new_run_id(engine, os.environ.get(ENV_MODEL_ID) or "model"),
            counts=env_flag(ENV_COUNTS, "1"),
            model_id=os.environ.get(ENV_MODEL_ID) or None,
            workload=workload_from_env(),
            stats_dir=os.environ.get(ENV_STATS_DIR) or None,
            count_on=os.environ.get(ENV_COUNT_ON, "auto").strip().lower() or "auto",
            record_warmup=env_flag(ENV_RECORD_WARMUP, "0"),
        )
