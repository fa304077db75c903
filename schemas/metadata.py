"""Run metadata: a typed object serialised as JSON into every trace file's schema metadata.

It carries everything the analyzer needs besides the rows: the model's full config.json, dtypes,
the KV-cache bytes the engine really allocates, GPUs, parallelism and this file's rank identity,
the MoE layer ids and expert id space, the workload and a clock anchor. Unknown keys are kept in
`extra` on read (newer minor versions may add fields).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import TraceError


@dataclass
class EngineInfo:
    """The serving engine that produced the steps."""

    name: str
    """hf | vllm | sglang | http | client (a file written only by the workload driver)."""
    version: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """The model as the engine ran it."""

    id: str
    config: dict[str, Any] = field(default_factory=dict)
    """The model's full config.json."""
    dtypes: dict[str, str] = field(default_factory=dict)
    """dtype per module class as loaded, e.g. {"weights": "bfloat16", "activations": "bfloat16", "kv_cache": "bfloat16"}."""
    quantization: dict[str, Any] | None = None
    kv_bytes_per_token_per_layer: list[int] | None = None
    """KV-cache bytes one token occupies in each decoder layer, as the engine allocates it (HF caches
    decompressed MLA heads, vLLM/SGLang the latent); None if unknown (the analyzer then derives it)."""
    random_weights: bool = False


@dataclass
class MoEInfo:
    """How the expert counts of the `experts` table are laid out."""

    layer_ids: list[int] = field(default_factory=list)
    """Decoder-layer index of each MoE layer, in counts order."""
    num_experts: int = 0
    """Experts per MoE layer in the count id space."""
    top_k: int = 0
    id_space: str = "logical"
    """logical | physical; physical ids map through physical_to_logical."""
    physical_to_logical: list[list[int]] | None = None
    counts_available: bool = True
    counts_unavailable_reason: str | None = None
    shared_expert_fused: bool = False
    """True when the engine routes the shared expert as an extra top-k id (SGLang fusion)."""


@dataclass
class GpuInfo:
    """One GPU of the run."""

    index: int
    name: str
    uuid: str = ""
    memory_bytes: int = 0
    driver: str = ""


@dataclass
class Parallelism:
    """The run's parallel layout."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    attention_dp: bool = False


@dataclass
class RankIdentity:
    """Which process wrote this file and what it stands for."""

    dp: int = 0
    pp: int = 0
    tp: int = 0
    ep: int = 0
    layer_start: int = 0
    layer_end: int | None = None
    """Decoder layers [layer_start, layer_end) whose experts this file counts; None = to the last layer."""
    gpu_uuids: list[str] = field(default_factory=list)
    """The GPUs this file's steps stand for (all TP ranks of its stage), for time x GPU accounting."""

    def tag(self) -> str:
        """File-name tag, e.g. dp0-pp0-tp0."""
        return f"dp{self.dp}-pp{self.pp}-tp{self.tp}"


@dataclass
class ClockAnchor:
    """A simultaneous reading of the host's monotonic and Unix clocks."""

    monotonic_ns: int
    unix_ns: int

    @staticmethod
    def now() -> ClockAnchor:
        return ClockAnchor(monotonic_ns=time.monotonic_ns(), unix_ns=time.time_ns())


@dataclass
class RunMetadata:
    """Everything about a run that is not a row. Serialised as `moecap.run` in each file."""

    run_id: str
    engine: EngineInfo
    model: ModelInfo
    moe: MoEInfo = field(default_factory=MoEInfo)
    gpus: list[GpuInfo] = field(default_factory=list)
    parallelism: Parallelism = field(default_factory=Parallelism)
    rank: RankIdentity = field(default_factory=RankIdentity)
    workload: dict[str, Any] = field(default_factory=dict)
    clock: ClockAnchor = field(default_factory=ClockAnchor.now)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    collector_version: str = ""
    host: str = field(default_factory=socket.gethostname)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<metadata>") -> RunMetadata:
        """Parse and validate; raises TraceError naming `source` and the bad field."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TraceError(f"{source}: moecap.run metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TraceError(f"{source}: moecap.run metadata must be a JSON object")
        return _build(cls, data, source, "run")

    def with_rank(self, **changes: Any) -> RunMetadata:
        """A copy whose rank identity has `changes` applied."""
        return dataclasses.replace(self, rank=dataclasses.replace(self.rank, **changes))


def _build(cls: Any, data: dict[str, Any], source: str, path: str) -> Any:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        f = hints.get(key)
        if f is None:
            extra[key] = value
            continue
        nested = _NESTED.get((cls, key))
        if nested is not None and value is not None:
            if isinstance(nested, list):
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise TraceError(f"{source}: {path}.{key} must be a list of objects")
                value = [_build(nested[0], v, source, f"{path}.{key}[{i}]") for i, v in enumerate(value)]
            else:
                if not isinstance(value, dict):
                    raise TraceError(f"{source}: {path}.{key} must be an object")
                value = _build(nested, value, source, f"{path}.{key}")
        kwargs[key] = value
    missing = [
        name
        for name, f in hints.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TraceError(f"{source}: {path} lacks required field(s) {', '.join(missing)}")
    if extra and "extra" in hints:
        kwargs.setdefault("extra", {}).update(extra)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TraceError(f"{source}: {path} is malformed ({exc})") from None


_NESTED: dict[tuple[Any, str], Any] = {
    (RunMetadata, "engine"): EngineInfo,
    (RunMetadata, "model"): ModelInfo,
    (RunMetadata, "moe"): MoEInfo,
    (RunMetadata, "gpus"): [GpuInfo],
    (RunMetadata, "parallelism"): Parallelism,
    (RunMetadata, "rank"): RankIdentity,
    (RunMetadata, "clock"): ClockAnchor,
}


def new_run_id(engine: str, model_id: str) -> str:
    """A run id that sorts by creation time: 20261124T061500Z-hf-Qwen1.5-MoE-A2.7B-3f9a."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    short = os.path.basename(model_id.rstrip("/")) or "model"
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in short)[:48]
    return f"{stamp}-{engine}-{safe}-{secrets.token_hex(2)}"
