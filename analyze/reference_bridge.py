"""Reference mode over inputs: MoE-CAP record files, or moecap traces reduced to MoE-CAP records.

A trace step becomes one reference record: forward_mode (prefill for any pure-prefill step, decode for
decode, mixed for mixed), batch_size = requests, seq_lens_sum = Σ (prefix + new) tokens (SGLang's
running context sum), latency = the step's GPU span (s), expert_activation = activated experts
averaged over MoE layers, gpu_num / gpu_raw_type from the run; prefill steps carry per_req_info
(req_id, extend_len, total_len, is_last_chunk = the step sampled a logit for the request).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, SpecError
from .reference.metrics import Records, reference_metrics
from .reference.tables import reference_gpu_raw_type
from .specs import load_model_config

if TYPE_CHECKING:
    import polars as pl

    from .load import TraceDB
    from .settings import Settings as Options


def records_from_trace(
    db: TraceDB, run_id: str, gpu_raw_type: str, num_gpus: int, *, max_records: int | None = None
) -> pl.DataFrame:
    """The run's steps as a MoE-CAP record frame (see module docstring), built with column
    expressions, no loop over steps. `max_records`: only the first that many (in step order)."""
    import polars as pl

    rid = run_id.replace("'", "''")
    n_moe = db.con.execute(f"SELECT num_moe_layers FROM runs WHERE run_id = '{rid}'").fetchall()[0][0] or 1
    frame = (
        db.con.sql(
            f"""
        SELECT s.phase, s.num_reqs,
               -- per-request lists are only needed for prefill passes (per_req_info)
               CASE WHEN s.phase = 'prefill' THEN s.req_ids END AS req_ids,
               CASE WHEN s.phase = 'prefill' THEN s.req_prefix_lens END AS req_prefix_lens,
               CASE WHEN s.phase = 'prefill' THEN s.req_new_tokens END AS req_new_tokens,
               CASE WHEN s.phase = 'prefill'
                    THEN coalesce(s.req_num_logits, list_transform(s.req_new_tokens, lambda x: 1::SMALLINT)) END AS logits,
               coalesce((s.gpu_end_ns - s.gpu_start_ns), (s.t_end_ns - s.t_start_ns)) / 1e9 AS latency,
               coalesce(e.active_experts / {n_moe}::DOUBLE, -1) AS expert_activation,
               list_sum(s.req_new_tokens) AS scheduled_tokens,
               list_sum(s.req_prefix_lens) + list_sum(s.req_new_tokens) AS seq_lens_sum
        FROM steps s LEFT JOIN expert_step_stats e USING (run_id, dp, pp, tp, ep, step)
        WHERE s.run_id = '{rid}' AND NOT s.is_draft ORDER BY s.dp, s.pp, s.step
        {"" if max_records is None else f"LIMIT {int(max_records)}"}
        """
        )
        .pl()
        .with_row_index("_row")
    )
    info = (
        frame.filter(pl.col("phase") == "prefill")
        .select("_row", "req_ids", "req_prefix_lens", "req_new_tokens", "logits")
        .explode("req_ids", "req_prefix_lens", "req_new_tokens", "logits")
        .group_by("_row", maintain_order=True)
        .agg(
            pl.struct(
                pl.col("req_ids").alias("req_id"),
                pl.lit(True).alias("req_id_present"),
                pl.lit(None, pl.Int64).alias("req_pool_idx"),
                pl.col("req_new_tokens").cast(pl.Int64).alias("extend_len"),
                (pl.col("req_prefix_lens") + pl.col("req_new_tokens")).cast(pl.Int64).alias("total_len"),
                (pl.col("logits") > 0).alias("is_last_chunk"),
            ).alias("per_req_info")
        )
    )
    return frame.join(info, on="_row", how="left", maintain_order="left").select(
        pl.col("phase").alias("forward_mode"),
        pl.col("num_reqs").cast(pl.Float64).alias("batch_size"),
        pl.col("seq_lens_sum").cast(pl.Float64),
        "latency",
        pl.col("expert_activation").cast(pl.Float64),
        pl.lit(num_gpus, pl.Int64).alias("gpu_num"),
        pl.lit(gpu_raw_type).alias("gpu_raw_type"),
        "per_req_info",
        pl.col("scheduled_tokens").cast(pl.Float64),
    )


def reference_document_for_records(
    path: Path,
    *,
    model_config: str | None,
    model_name: str | None,
    gpu: str | None,
    num_gpus: int | None,
    precision: str | None,
    num_requests: int | None = None,
    total_time_s: float | None = None,
    read: Callable[[Path], Records] | None = None,
) -> dict[str, Any]:
    """One metrics.json run object from a MoE-CAP record file. `read`: how the records are read
    (default `read_records`; `moecap.analyze.lean` passes a reader without a frame library)."""
    if not model_config:
        raise InputError(
            f"{path}: MoE-CAP records carry no model config; pass --model-config (a config.json or a registry name)"
        )
    config = load_model_config(model_config)
    name = model_name or config.get("_name_or_path") or model_config
    records = (read or read_records)(path)
    try:
        result = reference_metrics(
            records,
            model_config=config,
            model_name=name,
            gpu=gpu,
            num_gpus=num_gpus,
            precision=precision,
            num_requests=num_requests,
            total_time_s=total_time_s,
        )
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from None  # a record's problem, named with its file
    return _document(str(path), name, result)


def read_records(path: Path) -> Records:
    """A record file decoded straight into the record frame where that gives the same frame, else
    through Python's json (which also gives the one-line errors)."""
    from .reference.record_file import load_reference_records
    from .reference.records import load_reference_frame

    frame = load_reference_frame(path)
    return load_reference_records(path) if frame is None else frame


def reference_document_for_run(
    db: TraceDB, run_id: str, options: Options, precision: str | None
) -> dict[str, Any]:
    run = db.runs[run_id]
    md = run.metadata
    if options.gpu:
        gpu_name = options.gpu
    elif md.gpus:
        # What the reference's recorder would have written for this GPU (its get_gpu_details()).
        gpu_name = reference_gpu_raw_type(md.gpus[0].name, md.gpus[0].memory_bytes / 2**20 or None)
    else:
        raise SpecError(f"run {run_id}: the trace names no GPU; pass --gpu")
    num_gpus = options.num_gpus or max(1, len(md.gpus))
    records = records_from_trace(db, run_id, gpu_name, num_gpus)
    requests = db.con.execute(
        f"SELECT count(*), (max(finish_ns) - min(arrival_ns)) / 1e9 FROM requests WHERE run_id = '{run_id}'"
    ).fetchall()[0]
    config = options.model_config or md.model.config
    result = reference_metrics(
        records,
        model_config=config,
        model_name=md.model.id,
        gpu=gpu_name,
        num_gpus=num_gpus,
        precision=precision,
        num_requests=requests[0] or None,
        total_time_s=requests[1],
    )
    return _document(run_id, md.model.id, result)


def _document(source: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    from .reference import CONTINUOUS_KEYS, RUN_LEVEL_KEYS

    batch_metrics = {k: result.get(k) for k in CONTINUOUS_KEYS}
    run_level = {k: result.get(k) for k in RUN_LEVEL_KEYS}
    context = {k: v for k, v in result.items() if k not in batch_metrics and k not in run_level}
    warnings = []
    if result.get("reason"):
        warnings.append(str(result["reason"]))
    return {
        "run_id": source,
        "model": model,
        "formula": "reference",
        "batch_metrics": batch_metrics,
        "run_level": run_level,
        "constants": json.loads(json.dumps(context, default=str)),
        "warnings": warnings,
    }
