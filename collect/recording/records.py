"""MoE-CAP per-pass records -> our `steps` table, keeping the reference's own values beside it.

A MoE-CAP record (the ServerlessLLM / MoE-CAP vLLM batch recorder, the SGLang expert recorder, a
`batch_data.json`) describes one forward pass by `forward_mode`, `batch_size`, `latency` (seconds, a
CUDA-synchronised span around the forward), `seq_lens_sum`, `expert_activation` (distinct experts hit,
averaged over layers), `gpu_num`, `gpu_raw_type`, and sometimes `forward_pass_id`, `scheduled_tokens`,
`per_req_info` (prefill: req_id, extend_len, total_len, prompt_len, is_last_chunk, [req_pool_idx, orig_len])
and `req_ids` (decode). The mapping (docs/driver.md has the table):

- step = the record's position in the dump (vLLM writes two records, prefill and decode, for one mixed
  pass; `forward_pass_id` is kept in the reference columns);
- the records carry durations, not start times: steps are laid end to end from the recording's start
  (t_start of step i = anchor + sum of earlier latencies; gpu_* = the same span), so step durations are
  facts and gaps between steps are unknown (zero);
- per-request lists come from `per_req_info` / `req_ids` where present, else they are empty; a prefix
  length that the record does not determine is null;
- the reference values themselves go, column-wise and under their own names, into the run metadata
  (`extra["moecap_reference"]`), and the records verbatim into `<run_id>.batch_data.json`, which
  `moecap-analyze --formula reference` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moecap.schemas import GpuInfo, RunMetadata, TraceWriter, trace_file_name

from ..errors import CollectError

_PHASES = {
    "prefill": "prefill",
    "extend": "prefill",
    "decode": "decode",
    "decoding": "decode",
    "mixed": "mixed",
}

REFERENCE_FIELDS = (
    "forward_pass_id",
    "forward_mode",
    "batch_size",
    "latency",
    "seq_lens_sum",
    "expert_activation",
    "scheduled_tokens",
)
"""Reference record fields copied column-wise into `extra["moecap_reference"]["columns"]`."""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    f = _num(value)
    return None if f is None else int(f)


def record_latency_s(rec: Mapping[str, Any]) -> float:
    """The pass duration: `latency`, else `ttft` (prefill) / `tpot` (decode) of the detailed-results form."""
    for key in ("latency", "ttft", "tpot"):
        f = _num(rec.get(key))
        if f is not None and f >= 0:
            return f
    return 0.0


def step_row(i: int, rec: Mapping[str, Any], t_start_ns: int, dur_ns: int) -> dict[str, Any]:
    """One `steps` row for record `rec` (index `i`) spanning [t_start_ns, t_start_ns + dur_ns]."""
    mode = str(rec.get("forward_mode") or "")
    batch = _int(rec.get("batch_size")) or 0
    phase = _PHASES.get(mode, "idle" if batch == 0 else "mixed")
    infos = rec.get("per_req_info") if phase == "prefill" else None
    ids: list[str] = []
    prefix: list[int | None] = []
    new: list[int] = []
    logits: list[int] | None = None
    if isinstance(infos, list) and infos and all(isinstance(x, Mapping) for x in infos):
        logits = []
        for info in infos:
            extend = _int(info.get("extend_len")) or 0
            total = _int(info.get("total_len"))
            last = bool(info.get("is_last_chunk"))
            # SGLang (req_pool_idx present): total_len = tokens computed so far including this chunk.
            # vLLM: total_len = prompt length, so it fixes the prefix only for the prompt's last chunk.
            known = total is not None and ("req_pool_idx" in info or last)
            ids.append(str(info.get("req_id", info.get("req_pool_idx", ""))))
            prefix.append(total - extend if known and total is not None else None)
            new.append(extend)
            logits.append(1 if last else 0)
    elif phase == "decode" and isinstance(rec.get("req_ids"), list):
        ids = [str(r) for r in rec["req_ids"]]
        prefix = [None] * len(ids)
        new = [1] * len(ids)
        logits = [1] * len(ids)
    scheduled = _int(rec.get("scheduled_tokens"))
    if scheduled is not None:
        tokens = scheduled
    elif new:
        tokens = sum(new)
    elif phase == "decode":
        tokens = batch
    else:
        tokens = _int(rec.get("seq_lens_sum")) or 0
    return {
        "step": i,
        "t_start_ns": t_start_ns,
        "t_end_ns": t_start_ns + dur_ns,
        "gpu_start_ns": t_start_ns,
        "gpu_end_ns": t_start_ns + dur_ns,
        "phase": phase,
        "is_draft": False,
        "num_reqs": batch or len(ids),
        "num_tokens": tokens,
        "req_ids": ids,
        "req_prefix_lens": prefix,
        "req_new_tokens": new,
        "req_num_logits": logits,
        "req_spec_tokens": None,
    }


def records_to_steps(
    records: Sequence[Mapping[str, Any]], anchor_ns: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(steps rows, reference block for `RunMetadata.extra["moecap_reference"]`)."""
    bad = next((i for i, r in enumerate(records) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise CollectError(f"MoE-CAP record {bad} is a {type(records[bad]).__name__}, not an object")
    rows = []
    t = anchor_ns
    for i, rec in enumerate(records):
        dur = round(record_latency_s(rec) * 1e9)
        rows.append(step_row(i, rec, t, dur))
        t += dur
    columns: dict[str, list[Any]] = {"step": list(range(len(records)))}
    for key in REFERENCE_FIELDS:
        vals = [r.get(key) if key == "forward_mode" else _num(r.get(key)) for r in records]
        if key == "latency":
            vals = [_num(r.get("latency", r.get("ttft", r.get("tpot")))) for r in records]
        if any(v is not None for v in vals):
            columns[key] = vals
    first = records[0] if records else {}
    block = {
        "format": "MoE-CAP per-pass records",
        "timing": "packed: records carry durations only; steps are laid end to end from the anchor",
        "gpu_num": first.get("gpu_num"),
        "gpu_raw_type": first.get("gpu_raw_type"),
        "columns": columns,
    }
    return rows, block


def gpus_from_records(records: Sequence[Mapping[str, Any]]) -> list[GpuInfo]:
    """One GpuInfo per GPU the first record names (`gpu_num` × `gpu_raw_type`); [] if it does not say."""
    if not records:
        return []
    n = _int(records[0].get("gpu_num"))
    name = records[0].get("gpu_raw_type")
    if not n or n < 1 or not name:
        return []
    return [GpuInfo(index=i, name=str(name)) for i in range(n)]


def write_reference_steps(
    records: Sequence[Mapping[str, Any]], run: RunMetadata, out_dir: str | Path, *, source: str
) -> list[str]:
    """Write `records` as `<run>.dp0-pp0-tp0.steps.arrow` (+ the records verbatim as
    `<run_id>.batch_data.json`); return the paths. `run.extra` gets the reference block."""
    out = Path(out_dir)
    rows, block = records_to_steps(records, run.clock.monotonic_ns)
    records_name = f"{run.run_id}.batch_data.json"
    block.update(source=source, records_file=records_name, records=len(records))
    run.extra = {**run.extra, "moecap_reference": block}
    if not run.gpus:
        run.gpus = gpus_from_records(records)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / records_name).write_text(json.dumps(list(records), separators=(",", ":")), encoding="utf-8")
        writer = TraceWriter(
            out / trace_file_name(run, "steps"), "steps", run, rows_per_batch=4096, blocking=True
        )
    except OSError as exc:
        raise CollectError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    writer.write_rows(rows)
    stats = writer.close()
    if stats.errors:
        raise CollectError(f"{writer.path}: writing the steps table failed ({stats.last_error})")
    return [str(writer.path), str(out / records_name)]
