"""The narrow engine interface a sweep needs: start an engine once, record many points, stop.

    session = open_session("hf")
    session.start(config)                           # load the model / start the engine (once)
    result = session.run_point(point, run_id, out, {"sweep": {...}})   # one recorded run
    session.stop()

Implemented here over the existing runners (`engines/hf/runner.py` in process, `engines/vllm/runner.py`'s
offline engine in `vllm_session.py`, `engines/sglang/runner.py`'s session in `sglang_session.py`: one
engine per point there, as `run` starts it); when the engines' own session API lands this module is where
the sweep is re-pointed at it. A session raises `PointInterrupted` after closing the point's files
on Ctrl-C / SIGTERM, and any other `CollectError` for a point that failed (the sweep goes on).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CollectError
from .matrix import EngineConfig, Point


class PointInterrupted(CollectError):
    """Ctrl-C / SIGTERM during a point; its files are closed (the point is not recorded)."""


@dataclass
class PointResult:
    """What one recorded point produced (for the sweep's state file and its log line)."""

    run_id: str
    requests: int
    output_tokens: int
    steps: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "steps": self.steps,
            "wall_s": round(self.wall_s, 3),
            **self.extra,
        }


class EngineSession(Protocol):
    """One engine configuration, started once and reused for every point that shares it."""

    def start(self, config: EngineConfig, out: Path) -> None:
        """Load the model / start the engine; trace files will go to `out`."""

    def run_point(self, point: Point, run_id: str, workload_extra: dict[str, Any]) -> PointResult:
        """Warm up, then record `point` as run `run_id` (its files closed on return or on error)."""

    def stop(self) -> None:
        """Release the engine (idempotent)."""


def open_session(engine: str) -> EngineSession:
    """A session for `engine` (hf | vllm | sglang)."""
    if engine == "hf":
        return HFSession()
    if engine == "vllm":
        from .vllm_session import VllmSession

        return VllmSession()
    if engine == "sglang":
        from .sglang_session import SglangSweepSession

        return SglangSweepSession()
    raise CollectError(f"sweep: engine {engine!r} has no session (hf, vllm, sglang)")


class HFSession:
    """transformers in this process: the model is loaded once per config and every point runs on it
    (continuous batching, a fresh paged cache and transformers' own warm-up per point)."""

    def __init__(self) -> None:
        self.loaded: Any = None
        self.config: EngineConfig | None = None
        self.out: Path | None = None

    def start(self, config: EngineConfig, out: Path) -> None:
        if config.engine_args:
            raise CollectError(
                f"engine_args {config.engine_args!r} apply to vllm; the hf engine takes dtype/device settings"
            )
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            raise CollectError(
                f"engine hf needs torch and transformers (pip install 'moecap[hf]'): {exc}"
            ) from None
        from ..engines.hf.runner import load_model

        if config.random_weights:
            torch.manual_seed(config.seed)
        self.loaded = load_model(
            config.model,
            random_weights=config.random_weights,
            dtype=config.dtype,
            device=config.device,
            tokenizer=config.tokenizer,
            attn_implementation=config.attn_implementation,
        )
        self.config = config
        self.out = out

    def run_point(self, point: Point, run_id: str, workload_extra: dict[str, Any]) -> PointResult:
        from ..engines.hf.runner import HFRunOptions, Interrupted, run_workload

        assert self.loaded is not None and self.config is not None and self.out is not None
        options = HFRunOptions(
            dataset=point.task,
            num_prompts=point.num_prompts,
            batch_size=point.batch_size,
            out=str(self.out),
            max_new_tokens=point.max_new_tokens,
            ignore_eos=point.ignore_eos,
            seed=self.config.seed,
            counts=self.config.counts,
            cuda_graphs=self.config.cuda_graphs,
            warmup=True,
            max_batch_tokens=point.max_batch_tokens,
            run_id=run_id,
            dataset_path=point.dataset_path,
            workload_extra=workload_extra,
        )
        try:
            result = run_workload(self.loaded, options)
        except Interrupted as exc:
            raise PointInterrupted(str(exc)) from None
        return PointResult(
            run_id=result.run_id,
            requests=result.requests,
            output_tokens=result.output_tokens,
            steps=result.steps,
            wall_s=result.wall_s,
        )

    def stop(self) -> None:
        if self.loaded is None:
            return
        device = getattr(self.loaded, "device", None)
        self.loaded = None
        gc.collect()
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()
