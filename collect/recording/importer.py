"""Import MoE-CAP output folders as moecap trace files, so published runs join the leaderboard.

A MoE-CAP run leaves, in one folder (its runner writes `<out>/<org>/<model>/`), some of:

| file | holds | becomes |
|---|---|---|
| `metrics.json`, `metrics_<dataset>_<ts>.json`, `cap_metrics_<…>.json` | the published metrics | `extra["moecap_metrics"]` verbatim; model, engine, dataset, precision, GPU type |
| `metadata_<dataset>_<ts>.json` | hardware, engine version, batch size | engine version, GPUs, workload |
| `batch_data.json` / `*records*.jsonl` / per-pass `detailed_results_<…>.jsonl` | per-pass records | `steps` (records.py) + `<run_id>.batch_data.json` |
| `inference_outputs.json(l)`, `output_data_<…>.jsonl`, per-request `detailed_results_<…>.jsonl` | per-request texts / timings | `requests` + `outputs` |

Files of one run share the folder and the `_<dataset>_<timestamp>` suffix of their names (a folder with one
metrics file takes every other file in it). Per-request files carry durations only (TTFT, latency, ITL), so
each request's arrival is 0 ns on its own clock: TTFT, TPOT, ITL and E2E are right, makespans are not
(`extra["moecap_import"]["request_clock"] = "relative"`). Field names are read through the aliases
below, since the formats changed across MoE-CAP versions.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import EngineInfo, GpuInfo, ModelInfo, MoEInfo, RunMetadata, TraceWriter, trace_file_name

from ..datasets import DATASETS, Sample, resolve_dataset
from ..errors import CollectError
from ..workload import RequestRecord
from .records import gpus_from_records, write_reference_steps

_KINDS = (
    ("metrics", re.compile(r"^(?:cap_)?metrics(?P<key>_.*)?\.json$")),
    ("metadata", re.compile(r"^metadata(?P<key>_.*)?\.json$")),
    ("batch", re.compile(r"^batch_data(?P<key>_.*)?\.jsonl?$")),
    ("batch", re.compile(r"^(?P<key>.*)records\.jsonl$")),
    ("detailed", re.compile(r"^detailed_results(?P<key>_.*)?\.jsonl?$")),
    ("outputs", re.compile(r"^inference_outputs(?P<key>_.*)?\.jsonl?$")),
    ("outputs", re.compile(r"^output_data(?P<key>_.*)?\.jsonl?$")),
)
_TS = re.compile(r"(\d{8})_(\d{6})")

PROMPT_KEYS = ("prompt", "input", "question", "formatted_prompt", "input_text")
OUTPUT_KEYS = (
    "output",
    "generated_text",
    "prediction",
    "response",
    "output_text",
    "completion",
    "output_tokens",
)
REFERENCE_KEYS = ("reference", "target", "answer", "expected", "ground_truth", "gold", "label")
INDEX_KEYS = ("index", "idx", "id", "sample_id")


@dataclass
class ImportedRun:
    run_id: str
    paths: list[str] = field(default_factory=list)
    summary: str = ""


def import_moecap_dir(
    src: str | Path, out: str | Path, *, model_config: dict[str, Any] | None = None
) -> list[ImportedRun]:
    """Convert every MoE-CAP run under `src` into trace files in `out`."""
    root = Path(src)
    if not root.exists():
        raise CollectError(f"{src}: no such file or directory")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups = _group(files)
    if not groups:
        raise CollectError(
            f"{src}: no MoE-CAP results here (expected metrics*.json, batch_data*.json, detailed_results*.jsonl, "
            "inference_outputs*.json or output_data*.jsonl)"
        )
    return [_import_group(g, Path(out), model_config or {}) for g in groups]


def _classify(p: Path) -> tuple[str, str] | None:
    for kind, pattern in _KINDS:
        m = pattern.match(p.name)
        if m:
            return kind, (m.group("key") or "").strip("_")
    return None


def _group(files: list[Path]) -> list[dict[str, list[Path]]]:
    by_dir: dict[Path, list[tuple[str, str, Path]]] = {}
    for f in files:
        c = _classify(f)
        if c:
            by_dir.setdefault(f.parent, []).append((c[0], c[1], f))
    groups = []
    for entries in by_dir.values():
        metrics = [(k, f) for kind, k, f in entries if kind == "metrics"]
        others = [(kind, k, f) for kind, k, f in entries if kind != "metrics"]
        if len(metrics) <= 1:
            g: dict[str, list[Path]] = {"metrics": [f for _, f in metrics]}
            for kind, _, f in others:
                g.setdefault(kind, []).append(f)
            groups.append(g)
            continue
        for key, mf in metrics:
            g = {"metrics": [mf]}
            for kind, k, f in others:
                if k == key or (k and key.startswith(k)):
                    g.setdefault(kind, []).append(f)
            groups.append(g)
    return groups


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CollectError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except ValueError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise CollectError(f"{path}: line {n} is not JSON ({exc})") from None
    return rows


def _as_list(
    doc: Any, path: Path, keys: tuple[str, ...] = ("records", "batches", "results", "outputs", "data")
) -> list[dict[str, Any]]:
    if isinstance(doc, Mapping):
        for k in keys:
            if isinstance(doc.get(k), list):
                doc = doc[k]
                break
        else:
            doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(r, Mapping) for r in doc):
        raise CollectError(f"{path}: expected a list of objects (JSON or JSON Lines)")
    return [dict(r) for r in doc]


def _first(d: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):  # an OpenAI response object
        choices = value.get("choices") or []
        if choices and isinstance(choices[0], Mapping):
            msg = choices[0].get("message")
            if isinstance(msg, Mapping):
                return str(msg.get("content") or "")
            return str(choices[0].get("text") or "")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in s)[:48]


def _import_group(g: dict[str, list[Path]], out: Path, model_config: dict[str, Any]) -> ImportedRun:
    metrics_path = g["metrics"][0] if g.get("metrics") else None
    metrics = _load(metrics_path) if metrics_path else {}
    if not isinstance(metrics, Mapping):
        raise CollectError(f"{metrics_path}: expected a JSON object of metrics")
    metadata: dict[str, Any] = {}
    for p in g.get("metadata", []):
        doc = _load(p)
        if isinstance(doc, Mapping):
            metadata.update(doc)
    hardware = metadata.get("hardware") or {}
    model_cfg = metadata.get("model_config") or {}
    system = metadata.get("system_environment") or {}

    records: list[dict[str, Any]] = []
    per_request: dict[int, dict[str, Any]] = {}
    used = [p for p in (metrics_path,) if p] + list(g.get("metadata", []))
    for p in g.get("batch", []):
        records += _as_list(_load(p), p)
        used.append(p)
    for kind in ("detailed", "outputs"):
        for p in g.get(kind, []):
            rows = _as_list(_load(p), p)
            used.append(p)
            if rows and "forward_mode" in rows[0]:
                records += rows  # per-pass detailed results (current MoE-CAP runner)
                continue
            for pos, row in enumerate(rows):
                idx = _first(row, INDEX_KEYS)
                try:
                    key = int(idx) if idx is not None else pos
                except (TypeError, ValueError):
                    key = pos
                per_request.setdefault(key, {}).update({k: v for k, v in row.items() if v is not None})

    anchor_file = metrics_path or used[0]
    model = str(
        metrics.get("model_name")
        or model_cfg.get("model_name")
        or model_config.get("_name_or_path")
        or "unknown-model"
    )
    dataset = str(metrics.get("dataset") or _dataset_from_name(anchor_file) or "unknown")
    engine = str(metrics.get("method") or system.get("inference_engine") or "moecap")
    precision = metrics.get("precision") or model_cfg.get("precision")
    stamp = _TS.search(anchor_file.name)
    digest = hashlib.sha1(anchor_file.read_bytes()).hexdigest()[:6]
    when = f"{stamp.group(1)}T{stamp.group(2)}" if stamp else "undated"
    run_id = f"{when}-moecap-import-{_safe(Path(model).name)}-{_safe(dataset)}-{digest}"
    gpus = gpus_from_records(records) or _gpus_from_type(metrics.get("gpu_type"), hardware)
    workload = {
        "dataset": dataset,
        "num_prompts": len(per_request) or None,
        "batch_size": metrics.get("batch_size", metrics.get("server_batch_size", system.get("batch_size"))),
        "ignore_eos": metrics.get("ignore_eos"),
        "mode": "closed_loop",
    }
    run = RunMetadata(
        run_id=run_id,
        engine=EngineInfo(
            name=engine,
            version=str(system.get("inference_engine_version") or ""),
            args={"imported_from": str(anchor_file.parent)},
        ),
        model=ModelInfo(
            id=model, config=model_config, dtypes={"weights": str(precision)} if precision else {}
        ),
        moe=MoEInfo(
            counts_available=False,
            counts_unavailable_reason="imported MoE-CAP results carry only expert_activation",
        ),
        gpus=gpus,
        workload={k: v for k, v in workload.items() if v is not None},
        extra={
            "moecap_metrics": dict(metrics),
            "moecap_metadata": metadata,
            "moecap_import": {
                "source_dir": str(anchor_file.parent),
                "files": [p.name for p in used],
                "request_clock": "relative",
            },
        },
    )
    result = ImportedRun(run_id)
    if records:
        result.paths += write_reference_steps(records, run, out, source=f"import of {anchor_file.parent}")
    if per_request:
        result.paths += _write_requests(per_request, run, out, dataset)
    result.summary = (
        f"{len(records)} passes, {len(per_request)} requests, metrics {'yes' if metrics else 'no'}"
    )
    if not records and not per_request:
        # Metrics alone still make a leaderboard row: keep them in an (empty) requests file's metadata.
        result.paths += _write_requests({}, run, out, dataset)
    return result


def _dataset_from_name(p: Path) -> str | None:
    m = re.match(r"^(?:cap_)?metrics_(?:(?:vllm|sglang|sllm)_)?(?P<ds>.+?)(?:_\d{8}_\d{6})?\.json$", p.name)
    return m.group("ds") if m else None


def _gpus_from_type(gpu_type: Any, hardware: Mapping[str, Any]) -> list[GpuInfo]:
    name, n = hardware.get("gpu_type"), hardware.get("num_gpus")
    if isinstance(gpu_type, str) and "x" in gpu_type:
        prefix, _, kind = gpu_type.partition("x")
        if prefix.isdigit():
            n, name = n or int(prefix), name or kind
    try:
        count = int(n) if n is not None else 0
    except (TypeError, ValueError):
        count = 0
    if not name or count < 1:
        return []
    return [GpuInfo(index=i, name=str(name)) for i in range(count)]


def _sample_prefix(dataset: str) -> str:
    try:
        spec = resolve_dataset(dataset)
    except CollectError:
        return _safe(dataset)
    return f"{spec.name}-{spec.split}" if spec.name in DATASETS else _safe(dataset)


def _write_requests(
    per_request: dict[int, dict[str, Any]], run: RunMetadata, out: Path, dataset: str
) -> list[str]:
    prefix = _sample_prefix(dataset)
    req_rows, out_rows = [], []
    for idx in sorted(per_request):
        r = per_request[idx]
        req_id = f"moecap-{idx:06d}"
        success = r.get("success")
        error = r.get("error") or None
        if success is False and error is None:
            error = "failed (MoE-CAP recorded success=false)"
        ttft = _num(_first(r, ("ttft_s", "ttft")))
        latency = _num(_first(r, ("latency_s", "latency", "e2e_s")))
        finish = round(latency * 1e9) if latency and latency > 0 else None
        first = round(ttft * 1e9) if ttft and ttft > 0 else (finish if error is None else None)
        itl = r.get("itl")
        chunks = None
        if isinstance(itl, list) and first is not None and all(_num(x) is not None for x in itl):
            times = [first]
            for gap in itl:
                times.append(times[-1] + round(float(gap) * 1e9))
            chunks = times
        out_text = _text(_first(r, OUTPUT_KEYS))
        out_count = _num(_first(r, ("output_token_count", "output_len", "completion_tokens")))
        in_count = _num(_first(r, ("input_token_count", "prompt_length", "prompt_tokens", "prompt_len")))
        if (
            in_count is None
            and isinstance(r.get("input_tokens"), (int, float))
            and not isinstance(r.get("input_tokens"), bool)
        ):
            in_count = float(r["input_tokens"])
        if (
            out_count is None
            and isinstance(r.get("output_tokens"), (int, float))
            and not isinstance(r.get("output_tokens"), bool)
        ):
            out_count = float(r["output_tokens"])
            out_text = None if out_text == str(r["output_tokens"]) else out_text
        prompt = _first(r, PROMPT_KEYS)
        sample = Sample(
            f"{prefix}-{idx}", dataset, prompt="" if not isinstance(prompt, str) else prompt,
            reference=_text(_first(r, REFERENCE_KEYS)),
        )  # fmt: skip
        rec = RequestRecord(
            req_id, sample, 0, first_token_ns=first, finish_ns=finish,
            prompt_tokens=None if in_count is None else int(in_count),
            output_tokens=None if out_count is None else int(out_count),
            chunk_times_ns=chunks or [], chunk_tokens=[1] * len(chunks or []),
            text=[out_text] if out_text else [], error=None if error is None else str(error)[:500],
        )  # fmt: skip
        req_rows.append(rec.requests_row())
        out_rows.append(rec.outputs_row())
    paths = []
    for table, rows in (("requests", req_rows), ("outputs", out_rows)):
        try:
            w = TraceWriter(out / trace_file_name(run, table), table, run, rows_per_batch=4096, blocking=True)
        except OSError as exc:
            raise CollectError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        w.write_rows(rows)
        stats = w.close()
        if stats.errors:
            raise CollectError(f"{w.path}: writing failed ({stats.last_error})")
        paths.append(str(w.path))
    return paths
