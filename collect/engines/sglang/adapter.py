"""SGLang engine adapter: a `sglang.srt.plugins` plugin recording one `steps` row (and one `experts` row)
per forward pass in every scheduler process.

    MOECAP_TRACE_DIR=traces/ python -m sglang.launch_server --model-path Qwen/Qwen1.5-MoE-A2.7B \\
        --expert-distribution-recorder-mode stat          # or: moecap-collect serve --engine sglang …

`register()` (entry point `moecap = "moecap.collect.engines.sglang:register"`) runs in every SGLang
process that calls `load_plugins()` (the top of `run_scheduler_process`, the DP controller, the Engine); it
does nothing unless `MOECAP_TRACE_DIR` is set, and registers one AROUND hook on
`ModelRunner.forward` with SGLang's `HookRegistry` (applied by `load_plugins()` right after). Per pass:

- before the original forward, a pure function (`snapshot_batch`) reads the real `ForwardBatch` (rids,
  new tokens, prefix lengths, `ForwardMode` incl. IDLE / MIXED / TARGET_VERIFY; draft-worker passes
  are tagged `is_draft`) — before SGLang pads it for DP attention or a CUDA graph; a CUDA event marks
  the start on the current (forward) stream;
- after it, the pass's expert counts are copied on the same stream from SGLang's own select-experts
  gatherer (recorder mode `stat`): its int32 `[num_layers, num_physical_experts]` buffer is zeroed at
  pass start and filled by a `scatter_add_` inside every MoE layer's `select_experts`, which SGLang
  also runs while a CUDA graph is captured, so graph replays count too; padded rows arrive as id −1
  and are masked. The copy is a device-to-device `index_select` (or, under EPLB, a `scatter_add_`
  through `physical_to_logical_map`) into our buffer, then `non_blocking` into pinned memory
  (`counting.StepReadback`); a CUDA event marks the end. No all-reduce, no host sync: rows are emitted
  once their event has completed (checked at the next pass, and by an idle flusher thread).

Why SGLang's gatherer and not a recorder of our own: it is the code path SGLang maintains in every
MoE implementation it has (standard top-k, hash top-k, fused shared experts, DeepEP dispatch), already
baked into its graphs, and it sees the EPLB-remapped physical ids with padding masked; ours would have
to replace `ExpertDistributionRecorder` before capture and track those paths. It costs one
`--expert-distribution-recorder-mode stat` argument (added by `moecap-collect serve|run`) and reads one
private attribute (`_single_pass_gatherers["primary"]._data`, pinned by the contract tests). Without that
mode, steps are recorded and the metadata says why counts are missing. Counts are this rank's own
tokens (never SGLang's dump, which all-reduces them, ×TP under plain TP).

Shared experts: the gatherer's buffer has `num_physical_experts` (routed) columns and masks ids outside
it, and SGLang hands it the routed columns only when it fuses shared experts into top-k
(`recorder_topk_ids`), so counts cover routed experts: per layer, sum = tokens × top_k.

Ranks: attention-TP rank 0 of every attention-DP rank and PP stage writes
(`<run_id>.dp{d}-pp{p}-tp{t}.steps.arrow`, …); under an all-to-all MoE backend (DeepEP, …) every rank
writes, counts are that rank's contribution, and `run.extra.sglang.counts_scope = "sum_over_ranks"`
tells the analyzer to sum them.

Closing: SGLang's shutdown SIGKILLs its schedulers, so a file would end without Arrow's end-of-stream
marker (nothing finished is lost: the idle flusher has written it, and readers recover it as truncated).
`moecap-collect run` therefore sends `CLOSE_SIGNAL` (SIGUSR2) to every recording scheduler first
(`request_close`); the handler closes the tracer's files on a thread, and the stats file says `closed`.

Environment: `MOECAP_TRACE_DIR`, `MOECAP_RUN_ID`, `MOECAP_COUNTS=0` (steps only), `MOECAP_STRICT_ENGINE=1`,
`MOECAP_MODEL_ID`, `MOECAP_WORKLOAD` (JSON), `MOECAP_STATS_DIR` (per-process JSON stats, for validation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecap.schemas import (
    EngineInfo,
    ModelInfo,
    MoEInfo,
    Parallelism,
    RankIdentity,
    RunMetadata,
    new_run_id,
)

from ... import runtime
from ...counting import ReadyStep, StepReadback
from ...errors import CollectError
from ...workload import WARMUP_PREFIX
from ...writers import EngineTraceFiles

# The environment contract shared by the engine adapters (re-exported: `adapter.ENV_*`).
from ..tracing_env import (
    ENV_COUNTS,
    ENV_MODEL_ID,
    ENV_RUN_ID,
    ENV_STATS_DIR,  # noqa: F401
    ENV_STRICT,
    ENV_TRACE_DIR,
    ENV_WORKLOAD,  # noqa: F401
    TracerSettings,
)
from ..tracing_env import env_flag as _flag
from . import compat

log = logging.getLogger("moecap.collect.engines.sglang")


DRAFT_STEP_BASE = 1 << 40
"""Draft-worker passes are keyed `DRAFT_STEP_BASE + draft forward_pass_id` (the draft runner counts its
own passes), so they never collide with the target's `forward_pass_id` in `steps.step`."""
_WRAPPED_MARK = "__moecap_wrapped__"


# ---------------------------------------------------------------------------------------------------
# Batch composition: a pure function of the ForwardBatch's host fields
# ---------------------------------------------------------------------------------------------------
def snapshot_batch(fields: dict[str, Any], *, is_draft: bool = False) -> dict[str, Any]:
    """One pass's batch composition as a partial `steps` row (no step key, no times).

    `fields` = `sglang_compat.batch_fields(forward_batch)`, read before the forward. Per request, in
    batch order: tokens computed this pass (`extend_seq_lens_cpu` for EXTEND / MIXED — a MIXED pass's
    decode rows have 1 —, 1 for DECODE, the draft-token count for TARGET_VERIFY, 0 for IDLE) and tokens
    already cached (`extend_prefix_lens_cpu`; for DECODE `seq_lens_cpu − 1`, the length before this
    token; for TARGET_VERIFY `seq_lens_cpu`). SGLang does not say which extend rows are a request's
    last chunk, so `req_num_logits` is null except for DECODE (1 each) and TARGET_VERIFY (drafts).
    """
    mode = fields["mode"]
    phase = compat._PHASE_OF_MODE.get(mode, "mixed")
    rids = [str(r) for r in fields.get("rids") or []]
    n = len(rids) if rids else int(fields.get("batch_size") or 0)
    if phase == "idle":
        n = 0
    rids = rids[:n] if rids else [f"#{i}" for i in range(n)]
    seq = (fields.get("seq_lens") or [])[:n]
    ext = (fields.get("extend_seq_lens") or [])[:n]
    pre = (fields.get("extend_prefix_lens") or [])[:n]
    logits: list[int] | None = None
    spec: list[int] | None = None
    if phase == "idle":
        new, prefix, logits = [], [], []
    elif mode == "DECODE":
        new = [1] * n
        prefix = [max(0, s - 1) for s in seq] if len(seq) == n else [0] * n
        logits = [1] * n
    elif mode == "TARGET_VERIFY":
        d = int(fields.get("draft_tokens") or 1)
        new = [d] * n
        prefix = list(seq) if len(seq) == n else [0] * n
        logits = [d] * n
        spec = [max(0, d - 1)] * n
    else:
        new = list(ext) if len(ext) == n else [0] * n
        if len(ext) != n and fields.get("extend_num_tokens") and n:
            # Without per-request lengths, all tokens on the first request: totals stay right.
            new = [int(fields["extend_num_tokens"])] + [0] * (n - 1)
        prefix = list(pre) if len(pre) == n else [0] * n
    return {
        "phase": phase,
        "is_draft": bool(is_draft),
        "num_reqs": n,
        "num_tokens": int(sum(new)),
        "req_ids": rids,
        "req_prefix_lens": [int(x) for x in prefix],
        "req_new_tokens": [int(x) for x in new],
        "req_num_logits": logits,
        "req_spec_tokens": spec,
    }


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# The per-process tracer
# ---------------------------------------------------------------------------------------------------
class SglangTracer(EngineTraceFiles):
    """Records the passes of one scheduler process (its target runner and, under spec decoding, its
    draft runner). Created at the first pass, after SGLang built its recorder and captured its graphs."""

    def __init__(self, runner: Any, settings: TracerSettings) -> None:
        import torch

        self._torch = torch
        self.settings = settings
        self.runner_ref = weakref.ref(runner)
        self.ranks = compat.rank_info(runner)
        self.sum_over_ranks = self.ranks.a2a_backend not in ("none", "")
        self.is_recorder = self.sum_over_ranks or self.ranks.attn_tp_rank == 0
        self.device = self._device(runner, torch)
        self.version = compat.installed_version() or ""
        self.lock = threading.RLock()
        self.steps_recorded = 0
        self.steps_written = 0
        self.graph_passes = 0
        self.eager_passes = 0
        self.modes: dict[str, int] = {}
        self.errors: list[str] = []
        self.writers: Any = None
        self.metadata: RunMetadata | None = None
        self._closed = False
        self.stopped = False
        self._last_pass = time.monotonic()
        self.counts_reason: str | None = None
        self._setup_moe(runner, torch)
        self.readback = StepReadback(
            self.device,
            len(self.layer_ids) if self.counting else 0,
            self.num_experts if self.counting else 0,
            max_tokens=1,
            ring=settings.ring,
            with_counts=self.counting and self.is_recorder,
            counts_capacity=int(self._source.numel()) if self._source is not None else 0,
        )
        self._host = (runtime.gpu_infos() if self.device.type == "cuda" else [], runtime.host_facts())
        self._flusher: threading.Thread | None = None
        if self.is_recorder:
            self._flusher = threading.Thread(target=self._idle_flush, name="moecap-sglang-flush", daemon=True)
            self._flusher.start()
        _LIVE.add(self)

    @staticmethod
    def _device(runner: Any, torch: Any) -> Any:
        if str(getattr(runner, "device", "cpu")).startswith("cuda") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- MoE layout ---------------------------------------------------------------------------------
    def _setup_moe(self, runner: Any, torch: Any) -> None:
        self.counting = False
        self.num_layers = compat.num_hidden_layers(runner) or 0
        model = getattr(runner, "model", None)
        self.layer_start = int(getattr(model, "start_layer", 0) or 0)
        end = getattr(model, "end_layer", None)
        self.layer_end = int(end) if end is not None else None
        all_moe = compat.moe_layer_ids(runner, self.num_layers)
        hi = self.layer_end if self.layer_end is not None else self.num_layers
        self.all_layer_ids = all_moe
        self.layer_ids = [i for i in all_moe if self.layer_start <= i < hi]
        self.top_k = int(compat.config_value(runner, "num_experts_per_tok", "moe_topk", "top_k") or 0)
        self.fused_shared = compat.fused_shared_experts(runner)
        meta = compat.location_metadata()
        logical = getattr(meta, "num_logical_experts", None) if meta is not None else None
        self.num_experts = int(
            logical
            or compat.config_value(runner, "num_experts", "n_routed_experts", "num_local_experts")
            or 0
        )
        self._source: Any = None
        self._index: Any = None
        self._host_rows: Any = None
        self.count_path: str | None = None
        """'fused' | 'masked' | 'sglang' once counting is set up (compat.count_path)."""
        self._map: Any = None
        self._map_cols: slice | None = None
        self.scope = ""
        if not self.settings.counts:
            self.counts_reason = "expert counting disabled (MOECAP_COUNTS=0)"
            return
        if not self.layer_ids or self.num_experts <= 0 or self.top_k <= 0:
            self.counts_reason = f"no MoE layers found (layers {self.layer_ids[:3]}…, experts {self.num_experts}, top-k {self.top_k})"
            return
        mode = compat.recorder_mode(runner)
        if mode != compat.RECORDER_MODE:
            self.counts_reason = (
                f"SGLang's expert recorder is in mode {mode!r}; start SGLang with "
                "--expert-distribution-recorder-mode stat (moecap-collect serve|run add it)"
            )
            return
        rec = compat.recorder()
        found = compat.gatherer_buffer(rec)
        if found is None:
            self.counts_reason = f"SGLang's recorder ({type(rec).__name__}) has no device count buffer"
            return
        data, scope = found
        self.scope = scope
        rows = int(data.shape[0])
        if max(self.layer_ids) >= rows:
            self.counts_reason = (
                f"recorder buffer has {rows} layers, the model's MoE layers go to {max(self.layer_ids)}"
            )
            return
        self._source = data
        self._index = torch.tensor(self.layer_ids, dtype=torch.long, device=data.device)
        cols = int(data.shape[1])
        p2l = getattr(meta, "physical_to_logical_map", None) if meta is not None else None
        if scope == "local":
            start = self.ranks.ep_rank * cols
            self._map_cols = slice(start, start + cols)
        if p2l is not None:
            sub = p2l[:, self._map_cols] if self._map_cols is not None else p2l
            ident = torch.arange(cols, device=sub.device) + (self._map_cols.start if self._map_cols else 0)
            if tuple(sub.shape) != (rows, cols) or cols != self.num_experts or not bool((sub == ident).all()):
                # EPLB (redundant / moved experts) or local experts: convert per pass on the device,
                # reading the live map (a rebalance rewrites it in place).
                self._map = p2l
        elif cols != self.num_experts:
            self.counts_reason = (
                f"recorder has {cols} physical experts, config {self.num_experts}, and no EPLB map"
            )
            self._source = None
            return
        if self._map is None and self.layer_ids != list(range(rows)):
            # Dense or other-stage layers among the buffer's rows: the whole buffer is read back and
            # the MoE rows picked on the host (no device op per pass).
            import numpy as np

            self._host_rows = np.asarray(self.layer_ids, dtype=np.intp)
        self.count_path = compat.count_path(self.device)
        if not rec.recording:
            rec.start_record()
        self.counting = True

    def _copy_counts(self) -> Any:
        """What `readback.end` copies to the host for this pass: without EPLB, SGLang's gatherer buffer
        itself (the copy is queued on the forward stream, before the next pass's reset: no device op
        of ours); under EPLB, `readback.counts` after converting physical to logical ids on the device
        (shapes fixed, no host sync)."""
        if self._map is None:
            return self._source
        torch = self._torch
        dst = self.readback.counts
        phys = self._source.index_select(0, self._index)
        m = self._map.index_select(0, self._index.to(self._map.device))
        if self._map_cols is not None:
            m = m[:, self._map_cols]
        dst.zero_()
        dst.scatter_add_(1, m.to(device=dst.device, dtype=torch.long), phys.to(dst.dtype))
        return True

    # -- passes ---------------------------------------------------------------------------------------
    def _stream(self) -> Any:
        if self.device.type != "cuda":
            return None
        return self._torch.cuda.current_stream(self.device)

    def around_forward(
        self, original: Callable[..., Any], runner: Any, forward_batch: Any, *a: Any, **k: Any
    ) -> Any:
        """Run one pass with its row recorded; any failure of ours turns tracing off, never the engine."""
        try:
            is_draft = bool(getattr(runner, "is_draft_worker", False))
            fields = compat.batch_fields(forward_batch)
            rids = fields.get("rids")
            if rids and str(rids[0]).startswith(WARMUP_PREFIX) and not self.settings.record_warmup:
                # A client's warm-up (`run --warmup`): it finishes before the workload starts, so the
                # first request says it all. Not recorded.
                return original(runner, forward_batch, *a, **k)
            row = snapshot_batch(fields, is_draft=is_draft)
            with self.lock:
                self._last_pass = time.monotonic()
                self._drain()
                stream = self._stream()
                # Before the pass's kernels (same stream): how many leading rows are real tokens.
                compat.set_live_tokens(self.device, row["num_tokens"])
                # Counts are overwritten (`_copy_counts`), never accumulated: no zeroing launch.
                slot = self.readback.begin(stream, zero_counts=False)
            row["t_start_ns"] = time.monotonic_ns()
        except Exception as exc:
            self._fail(exc)
            return original(runner, forward_batch, *a, **k)
        try:
            result = original(runner, forward_batch, *a, **k)
        except BaseException:
            with contextlib.suppress(Exception), self.lock:
                self.readback.discard(slot)
            raise
        try:
            pass_id = int(getattr(runner, "forward_pass_id", 0))
            row["step"] = DRAFT_STEP_BASE + pass_id if is_draft else pass_id
            row["t_end_ns"] = time.monotonic_ns()
            graph = getattr(result, "can_run_graph", None)
            with self.lock:
                if graph is True:
                    self.graph_passes += 1
                elif graph is False:
                    self.eager_passes += 1
                self.modes[fields["mode"]] = self.modes.get(fields["mode"], 0) + 1
                counts = self.readback.with_counts and not is_draft
                self.readback.end(
                    slot, (row, counts), stream, counts=self._copy_counts() if counts else False
                )
                self.steps_recorded += 1
        except Exception as exc:
            self._fail(exc)
        return result

    def _fail(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            compat.reset_live_tokens()  # passes no longer set it: mask nothing
        msg = f"{type(exc).__name__}: {exc}"
        if len(self.errors) < 8:
            self.errors.append(msg)
        log.error("moecap: tracing stopped in this scheduler (%s)", msg)
        self.stopped = True  # no new passes; what was recorded is still written at close

    def _drain(self, *, wait: bool = False) -> None:
        for item in self.readback.poll(wait=wait):
            self._emit(item)

    def _emit(self, item: ReadyStep) -> None:
        row, with_counts = item.payload
        row["gpu_start_ns"] = item.gpu_start_ns
        row["gpu_end_ns"] = item.gpu_end_ns
        if not self.is_recorder:
            return
        writers = self.open_writers()
        if writers is None:
            return
        counts = item.counts if with_counts and item.counts is not None else None
        if counts is not None and self._host_rows is not None:
            counts = counts.reshape(-1, self.num_experts)[self._host_rows].reshape(-1)
        writers.step(row, counts)
        self.steps_written += 1

    def _idle_flush(self) -> None:
        # SGLang's shutdown kills scheduler processes without running their exit handlers: while the
        # engine is idle, emit the steps whose GPU work is done and flush the files, so a killed
        # scheduler loses nothing that had finished.
        period = self.settings.idle_flush_s
        while not self._closed:
            time.sleep(period)
            if time.monotonic() - self._last_pass < period:
                continue
            try:
                with self.lock:
                    if self._closed:
                        return
                    self._drain()
                    if self.writers is not None:
                        for w in self.writers.writers.values():
                            w.flush()
                self.write_stats()
            except Exception as exc:  # pragma: no cover - defensive
                log.warning("moecap: idle flush failed (%s)", exc)

    def build_metadata(self) -> RunMetadata:
        runner = self.runner_ref()
        r = self.ranks
        gpus, facts = self._host
        used = [g for g in gpus if self.device.type == "cuda" and g.index == self.device.index] or gpus[:1]
        extra: dict[str, Any] = dict(facts)
        extra["sglang"] = {
            "counts_source": "ExpertDistributionRecorder(mode=stat) select-experts gatherer, read per pass",
            "counts_scope": "sum_over_ranks" if self.sum_over_ranks else "replicated",
            "gatherer_scope": self.scope,
            "eplb_conversion": self._map is not None,
            "count_path": self.count_path,
            "moe_a2a_backend": r.a2a_backend,
            "ranks": {"tp": r.tp_rank, "attn_tp": r.attn_tp_rank, "attn_dp": r.attn_dp_rank, "ep": r.ep_rank},
            "draft_step_base": DRAFT_STEP_BASE,
            "fused_shared_experts": self.fused_shared,
        }
        problem = compat.version_problem(self.version) if self.version else None
        if problem:
            extra["warnings"] = [problem]
        model_id = self.settings.model_id or (compat.model_path(runner) if runner is not None else "model")
        return RunMetadata(
            run_id=self.settings.run_id,
            engine=EngineInfo(name="sglang", version=self.version, args=compat.engine_args(runner)),
            model=ModelInfo(
                id=model_id,
                config=compat.model_config_dict(runner),
                dtypes=compat.dtypes(runner),
                quantization=compat.quantization(runner),
                kv_bytes_per_token_per_layer=None,
                random_weights=compat.load_format(runner) == "dummy",
            ),
            moe=MoEInfo(
                layer_ids=list(self.all_layer_ids),
                num_experts=self.num_experts,
                top_k=self.top_k,
                id_space="logical",
                counts_available=self.counting,
                counts_unavailable_reason=self.counts_reason,
                shared_expert_fused=self.fused_shared > 0,
            ),
            gpus=used,
            parallelism=Parallelism(
                tp=r.tp_size, pp=r.pp_size, dp=r.attn_dp_size, ep=r.ep_size, attention_dp=r.attn_dp_size > 1
            ),
            rank=RankIdentity(
                dp=r.attn_dp_rank,
                pp=r.pp_rank,
                tp=r.tp_rank if self.sum_over_ranks else r.attn_tp_rank,
                ep=r.ep_rank,
                layer_start=self.layer_start,
                layer_end=self.layer_end,
                gpu_uuids=[g.uuid for g in used if g.uuid],
            ),
            workload=dict(self.settings.workload),
            collector_version=runtime.collector_version(),
            extra=extra,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "rank": {"tp": self.ranks.tp_rank, "attn_dp": self.ranks.attn_dp_rank, "pp": self.ranks.pp_rank},
            "recorder": self.is_recorder,
            "counting": self.counting,
            "counts_reason": self.counts_reason,
            "steps_recorded": self.steps_recorded,
            "steps_written": self.steps_written,
            "graph_passes": self.graph_passes,
            "eager_passes": self.eager_passes,
            "modes": dict(self.modes),
            "in_flight": self.readback.in_flight,
            "readback_waits": self.readback.waits,
            "errors": list(self.errors),
            "files": {k: str(v) for k, v in (self.writers.paths.items() if self.writers is not None else [])},
            "closed": self._closed,
        }

    def write_stats(self) -> None:
        if not self.settings.stats_dir:
            return
        path = Path(self.settings.stats_dir) / f"sglang-tracer-{os.getpid()}.json"
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.stats()))
            os.replace(tmp, path)  # readers never see half a file

    def close(self) -> None:
        """Wait for the GPU (shutdown only), write the last rows and close the files. Idempotent."""
        with self.lock:
            if self._closed and self.writers is None:
                return
            with contextlib.suppress(Exception):
                self._drain(wait=True)
            self._closed = True
            writers, self.writers = self.writers, None
        if writers is not None:
            writers.close()
        self.write_stats()


_LIVE: weakref.WeakSet[SglangTracer] = weakref.WeakSet()
_TRACER: SglangTracer | None = None
_TRACER_LOCK = threading.Lock()


def _close_all() -> None:
    for tracer in list(_LIVE):
        with contextlib.suppress(Exception):
            tracer.close()


def _tracer_for(runner: Any) -> SglangTracer | None:
    """The process's tracer, created at the first target-model pass (None when tracing is off)."""
    global _TRACER
    if _TRACER is not None:
        return None if _TRACER._closed or _TRACER.stopped else _TRACER
    if getattr(runner, "is_draft_worker", False):
        return None  # the target runner's first pass creates it (its recorder, its config)
    with _TRACER_LOCK:
        if _TRACER is None:
            settings = TracerSettings.from_env("sglang")
            if settings is None:
                return None
            try:
                _TRACER = SglangTracer(runner, settings)
            except Exception as exc:
                log.error("moecap: tracing disabled in this scheduler (%s: %s)", type(exc).__name__, exc)
                return None
    return _TRACER


def around_forward(
    original: Callable[..., Any], runner: Any, forward_batch: Any, *args: Any, **kwargs: Any
) -> Any:
    """The AROUND hook on `ModelRunner.forward` (signature `HookRegistry` gives AROUND hooks)."""
    tracer = _tracer_for(runner)
    if tracer is None or not tracer.is_recorder:
        # Other attention-TP ranks see the same batch and routing: nothing of theirs is written.
        return original(runner, forward_batch, *args, **kwargs)
    return tracer.around_forward(original, runner, forward_batch, *args, **kwargs)


setattr(around_forward, _WRAPPED_MARK, True)


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------
_REGISTER_LOCK = threading.Lock()
_REGISTERED = False


def check_version(strict: bool | None = None) -> str | None:
    """A warning line when the installed SGLang is outside the supported range; `CollectError` instead
    when `strict` (default: `MOECAP_STRICT_ENGINE`)."""
    version = compat.installed_version()
    if version is None:
        raise CollectError("SGLang is not installed (pip install 'moecap[sglang]')")
    problem = compat.version_problem(version)
    if strict is None:
        strict = _flag(ENV_STRICT, "0")
    if problem and strict:
        raise CollectError(problem + " (--strict-engine)")
    return problem


def register() -> None:
    """The `sglang.srt.plugins` entry point: inert unless `MOECAP_TRACE_DIR` is set; idempotent.

    Registers the AROUND hook with `HookRegistry`; `load_plugins()` applies it right after the plugins
    ran. Called outside `load_plugins()` (a wrapper launcher), call `HookRegistry.apply_hooks()` next."""
    global _REGISTERED
    if not os.environ.get(ENV_TRACE_DIR):
        return
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        problem = check_version()
        if problem:
            log.warning("moecap: %s", problem)
        if not os.environ.get(ENV_RUN_ID):  # children inherit it: one run id for every process
            os.environ[ENV_RUN_ID] = new_run_id("sglang", os.environ.get(ENV_MODEL_ID) or "model")
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(compat.FORWARD_TARGET, around_forward, HookType.AROUND)
        if _flag(ENV_COUNTS, "1") and compat.mask_padded_rows_in_gatherer():
            # Counts cover real tokens only: graph-padded rows are masked by a live-token scalar,
            # allocated before the graphs are captured.
            HookRegistry.register(compat.CAPTURE_TARGET, _before_graph_capture, HookType.BEFORE)
        import atexit

        atexit.register(_close_all)
        try:  # spawned processes leave through multiprocessing, which skips atexit
            from multiprocessing import util

            util.Finalize(None, _close_all, exitpriority=100)
        except Exception:  # pragma: no cover
            pass
        _install_close_signal()
        _REGISTERED = True


CLOSE_SIGNAL = signal.SIGUSR2
"""Asks a scheduler's tracer to close its files (SGLang uses neither SIGUSR; a handler already there is
still called after ours)."""


def _install_close_signal() -> bool:
    """Handle `CLOSE_SIGNAL` in this process (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(CLOSE_SIGNAL)

    def on_close_signal(signum: int, frame: Any) -> None:
        # The main thread may be inside a traced pass holding the tracer's lock: close on a thread.
        threading.Thread(target=_close_all, name="moecap-close", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(CLOSE_SIGNAL, on_close_signal)
    return True


def request_close(
    stats_dir: str | os.PathLike[str], timeout_s: float = 10.0
) -> tuple[list[dict[str, Any]], list[str]]:
    """Send `CLOSE_SIGNAL` to every recording tracer that wrote stats under `stats_dir` and wait until
    each says `closed` (at most `timeout_s`). Returns the last stats and one warning line per tracer that
    did not close (its files then lack the end-of-stream marker; readers recover them)."""

    def read() -> list[dict[str, Any]]:
        out = []
        for p in sorted(Path(stats_dir).glob("sglang-tracer-*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(p.read_text()))
        return out

    open_pids = {int(s["pid"]) for s in read() if s.get("recorder") and not s.get("closed") and s.get("pid")}
    for pid in sorted(open_pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, CLOSE_SIGNAL)
    deadline = time.monotonic() + timeout_s
    while True:
        stats = read()
        waiting = {int(s["pid"]) for s in stats if s.get("pid") in open_pids and not s.get("closed")}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    problems = [
        f"SGLang scheduler pid {pid}: trace files not closed within {timeout_s:g} s "
        "(they end without the end-of-stream marker; moecap-analyze recovers every finished row)"
        for pid in sorted(waiting)
    ]
    return stats, problems


def _before_graph_capture(*args: Any, **kwargs: Any) -> None:
    """BEFORE `ModelRunner.init_cuda_graphs`: the live-token scalar on the runner's device."""
    try:
        runner = args[0] if args else kwargs.get("self")
        if runner is not None and compat.masks_by_live_tokens(runner):
            import torch

            device = SglangTracer._device(runner, torch)
            compat.allocate_live_tokens(device)
            compat.prepare_fused(device)  # compiles the fused count before the graphs capture it
    except Exception as exc:  # never stop the engine; counts then include graph padding
        log.warning("moecap: no padding mask for expert counts (%s: %s)", type(exc).__name__, exc)
    return None


def is_installed(cls: Any) -> bool:
    """Whether `cls.forward` (a `ModelRunner`) runs through our AROUND hook."""
    fn = getattr(cls, "forward", None)
    while fn is not None:
        closure = getattr(fn, "__closure__", None) or ()
        if any(getattr(c, "cell_contents", None) is around_forward for c in closure):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def write_plugin_dist_info(directory: str | os.PathLike[str], name: str = compat.PLUGIN_NAME) -> Path:
    """Make the entry point findable without installing moecap: write a minimal
    `moecap_sglang_plugin-0.dist-info` (METADATA + entry_points.txt) into `directory`, which must then be
    on the PYTHONPATH of SGLang's processes (spawned schedulers inherit the environment). Returns it."""
    dist = Path(directory) / f"moecap_sglang_plugin_{name}-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: moecap-sglang-plugin-{name}\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        f"[{compat.PLUGIN_GROUP}]\n{name} = moecap.collect.engines.sglang:register\n"
    )
    return dist


def _reset_for_tests() -> None:
    """Forget the tracer and the registration (tests)."""
    global _REGISTERED, _TRACER
    _REGISTERED = False
    if _TRACER is not None:
        with contextlib.suppress(Exception):
            _TRACER.close()
    _TRACER = None


def current_tracer() -> SglangTracer | None:
    return _TRACER
