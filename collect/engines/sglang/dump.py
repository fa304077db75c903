"""Import SGLang's own expert-distribution dumps (`.pt` files) as moecap `steps` + `experts` trace files,
so runs recorded with SGLang's recorder get moecap's expert heatmaps.

    runs = import_sglang_dumps(["expert_distribution_recorder_1733.pt"], "traces/",
                               model_config=load_model_config("Qwen/Qwen1.5-MoE-A2.7B"), tp_size=2)

What SGLang writes (`ExpertDistributionRecorder.dump_record()`, `sglang/srt/eplb/expert_distribution.py`,
the same in 0.5.16 and 0.5.23), by `--expert-distribution-recorder-mode`:

| mode | file | content |
|---|---|---|
| `stat`, `stat_approx` | `expert_distribution_recorder_{time}.pt`, rank 0 only | `{rank, logical_count: int32 [buffer_size, num_layers, num_logical_experts], average_utilization_rate_over_window}` |
| `per_pass` | `expert_distribution_recorder_{time}_{rank}.pt`, every rank | `{records: [{forward_pass_id, rank, gatherer_key, global_physical_count: int32 [num_layers, num_physical_experts]}, …], last_physical_to_logical_map: [num_layers, num_physical_experts]}` |
| `per_token` | as `per_pass` | records also hold `input_ids`, `positions`, `extend_seq_lens`, `forward_mode` (int), `topk_ids_of_layer [num_layers, tokens, 8]`, `misc_objects` |

How each becomes rows (one `steps` row and one `experts` row per pass or buffer slot):

- `stat`: `logical_count` is all-reduced (SUM) over every rank before the dump, so under plain TP (every
  rank routes the same tokens) the counts are x tp_size. They are divided only when told (`tp_size`),
  and the metadata says which (`extra.sglang_dump.counts_scale`). A row is a slot of SGLang's buffer:
  the step key is the slot index; a circular buffer (`--expert-distribution-recorder-buffer-size` >= 0,
  default 1000) overwrites its oldest slots, so slot order is pass order only until it wraps, and unused
  slots are all zero — all-zero slots are dropped (an idle pass is all zero too).
- `per_pass` / `per_token`: each record is one forward pass of one rank, step key = `forward_pass_id`
  (the record index where ids repeat, e.g. a draft model's passes); physical counts go through
  `last_physical_to_logical_map` (the map at dump time: exact unless EPLB rebalanced while recording).
  Under plain TP every rank's file holds the same tokens: the lowest rank is imported; with
  `sum_ranks=True` (DP attention, DeepEP: each rank routed its own tokens) every rank becomes a file of
  its own and `extra.sglang.counts_scope = "sum_over_ranks"`, as the live adapter writes it.
- `num_tokens` is `len(input_ids)` (per_token) or, with a known top-k, the first MoE layer's count sum /
  top_k (under `sum_ranks`, a `per_pass` row's is summed over the ranks' shares of that pass, so the one
  rank's steps the analyzer reads match the summed counts); the batch composition (requests, prefix lengths) comes from `extend_seq_lens` / `positions`
  (per_token, extend and decode passes), else the per-request lists are empty.
- `phase`: from `forward_mode` (per_token); the other modes do not record it: `mixed` (the schema's
  least specific value), `idle` for a pass without a routed token.
- Times: the dumps have none. Every step is a zero-length span at the import's clock anchor (the
  MoE-CAP importer does the same for records without a latency): counts and tokens are facts, step
  times and throughput are not (`extra.sglang_dump.timing = "none"`).
- Layers: the dump has one row per decoder layer (dense layers' rows stay zero); with a model config the
  MoE layers are its MoE layers (`moe.layer_ids`), without one every row is kept.

torch reads the files (`pip install 'moecap[hf]'`); it is imported only here, when an import runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecap.schemas import (
    EngineInfo,
    ModelInfo,
    MoEInfo,
    Parallelism,
    RankIdentity,
    RunMetadata,
    TraceWriter,
    trace_file_name,
)

from ...errors import CollectError
from ...recording.importer import ImportedRun
from . import compat
from .adapter import snapshot_batch

MODES = ("stat", "per_pass", "per_token")
_TIME = re.compile(r"expert_distribution_recorder_(?P<t>\d+(?:\.\d+)?)(?:_(?P<rank>\d+))?\.pt$")


@dataclass
class SglangDump:
    """One dump file, read and checked."""

    path: Path
    mode: str
    """stat | per_pass | per_token"""
    rank: int
    time: float | None
    counts: Any = None
    """stat: int64 [slots, layers, logical experts]."""
    records: list[dict[str, Any]] = field(default_factory=list)
    p2l: Any = None
    """per_pass / per_token: [layers, physical experts]."""
    utilization: Any = None


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise CollectError(
            "reading SGLang's .pt dumps needs torch (pip install 'moecap[hf]' or torch)"
        ) from None
    return torch


def load_model_config(ref: str | Path | None) -> dict[str, Any]:
    """A model's config.json from a path (a file or a folder holding config.json) or a name bundled with
    moecap's specs (`Qwen/Qwen1.5-MoE-A2.7B` -> analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json, read as a
    file: the collector never imports the analyzer)."""
    if ref is None:
        return {}
    path = Path(ref)
    if not path.exists():
        spec = importlib.util.find_spec("moecap.analyze")
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        bundled = [Path(r) / "specs" / "models" / f"{str(ref).replace('/', '__')}.json" for r in roots]
        found = [p for p in bundled if p.is_file()]
        if not found:
            raise CollectError(
                f"--model-config {ref}: neither a config.json path nor a bundled model (analyze/specs/models)"
            )
        path = found[0]
    p = path / "config.json" if path.is_dir() else path
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CollectError(f"--model-config {ref}: cannot read a config.json ({exc})") from None
    if not isinstance(doc, dict):
        raise CollectError(f"--model-config {ref}: not a JSON object")
    return doc


# ---------------------------------------------------------------------------------------------------
# Reading and checking one file
# ---------------------------------------------------------------------------------------------------
def read_dump(path: str | Path) -> SglangDump:
    """Load one SGLang dump and check its structure; `CollectError` naming the file and field if not."""
    torch = _torch()
    p = Path(path)
    if not p.is_file():
        raise CollectError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive (SGLang's dumps always are)
        raise CollectError(f"{p}: not a torch.save file (SGLang's expert-distribution dumps are)")
    try:
        doc = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectError(
            f"{p}: not a torch.save file of SGLang's expert recorder ({first[:200]})"
        ) from None
    if not isinstance(doc, Mapping):
        raise CollectError(f"{p}: expected a dict (SGLang's dump), got {type(doc).__name__}")
    m = _TIME.search(p.name)
    when = float(m.group("t")) if m else None

    def tensor(value: Any, name: str, ndim: int) -> Any:
        if not isinstance(value, torch.Tensor):
            raise CollectError(f"{p}: {name} is a {type(value).__name__}, expected a tensor")
        if value.dim() != ndim or value.is_floating_point():
            raise CollectError(
                f"{p}: {name} has shape {list(value.shape)} ({value.dtype}), expected {ndim} integer dimensions"
            )
        return value.to(torch.int64)

    if "logical_count" in doc:
        counts = tensor(doc["logical_count"], "logical_count", 3)
        rank = doc.get("rank", 0)
        return SglangDump(
            p,
            "stat",
            int(rank) if isinstance(rank, int) else 0,
            when,
            counts=counts,
            utilization=doc.get("average_utilization_rate_over_window"),
        )
    if "records" in doc:
        if "last_physical_to_logical_map" not in doc:
            raise CollectError(f"{p}: a per_pass / per_token dump without last_physical_to_logical_map")
        p2l = tensor(doc["last_physical_to_logical_map"], "last_physical_to_logical_map", 2)
        records = doc["records"]
        if not isinstance(records, list):
            raise CollectError(f"{p}: records is a {type(records).__name__}, expected a list")
        per_token = bool(records) and isinstance(records[0], Mapping) and "topk_ids_of_layer" in records[0]
        out: list[dict[str, Any]] = []
        for i, rec in enumerate(records):
            where = f"records[{i}]"
            if not isinstance(rec, Mapping):
                raise CollectError(f"{p}: {where} is a {type(rec).__name__}, expected a dict")
            for key in ("forward_pass_id", "global_physical_count"):
                if key not in rec:
                    raise CollectError(f"{p}: {where} has no {key}")
            count = tensor(rec["global_physical_count"], f"{where}.global_physical_count", 2)
            if tuple(count.shape) != tuple(p2l.shape):
                raise CollectError(
                    f"{p}: {where}.global_physical_count has shape {list(count.shape)}, "
                    f"last_physical_to_logical_map {list(p2l.shape)}"
                )
            row = dict(rec)
            row["global_physical_count"] = count
            if per_token:
                for key in ("input_ids", "forward_mode"):
                    if key not in rec:
                        raise CollectError(f"{p}: {where} has no {key} (a per_token record)")
                if not isinstance(rec["input_ids"], list):
                    raise CollectError(f"{p}: {where}.input_ids is not a list")
            out.append(row)
        ranks = {int(r["rank"]) for r in out if isinstance(r.get("rank"), int)}
        if len(ranks) > 1:
            raise CollectError(f"{p}: records of several ranks {sorted(ranks)} in one file")
        rank = ranks.pop() if ranks else int(m.group("rank")) if m and m.group("rank") else 0
        return SglangDump(p, "per_token" if per_token else "per_pass", rank, when, records=out, p2l=p2l)
    missing = "logical_count (stat) or records + last_physical_to_logical_map (per_pass / per_token)"
    raise CollectError(f"{p}: not an SGLang expert-distribution dump: no {missing} (keys: {sorted(doc)[:8]})")


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
def physical_to_logical(count: Any, p2l: Any, num_logical: int) -> Any:
    """[layers, physical] counts -> [layers, logical] through `p2l` (SGLang's own conversion)."""
    torch = _torch()
    out = torch.zeros((count.shape[0], num_logical), dtype=torch.int64)
    out.scatter_add_(1, p2l.to(torch.int64), count.to(torch.int64))
    return out


def _composition(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A partial `steps` row from a per_token record's batch facts (None when it has none)."""
    if "forward_mode" not in rec:
        return None
    value = rec["forward_mode"]
    try:
        mode = compat.FORWARD_MODES[int(value) - 1] if int(value) >= 1 else str(value)
    except (TypeError, ValueError, IndexError):
        mode = str(value)
    ids = rec.get("input_ids") or []
    positions = [int(x) for x in rec.get("positions") or []]
    ext = [int(x) for x in rec.get("extend_seq_lens") or []]
    fields: dict[str, Any] = {"mode": mode, "rids": [], "extend_num_tokens": len(ids)}
    if mode == "DECODE":  # one token per request, at position = tokens already cached
        fields.update(
            batch_size=len(ids), seq_lens=[x + 1 for x in positions] if len(positions) == len(ids) else None
        )
    elif ext and sum(ext) == len(ids):
        starts = [sum(ext[:i]) for i in range(len(ext))]
        prefix = [positions[s] for s in starts] if len(positions) == len(ids) else None
        fields.update(batch_size=len(ext), extend_seq_lens=ext, extend_prefix_lens=prefix)
    else:  # verify / other passes: the tokens are known, not how they split into requests
        row = snapshot_batch({"mode": mode, "batch_size": 0})
        row.update(num_tokens=len(ids) if row["phase"] != "idle" else 0)
        return row
    return snapshot_batch(fields)


def _unknown_composition(tokens: int) -> dict[str, Any]:
    return {
        "phase": "mixed" if tokens > 0 else "idle",
        "is_draft": False,
        "num_reqs": 0,
        "num_tokens": tokens,
        "req_ids": [],
        "req_prefix_lens": [],
        "req_new_tokens": [],
        "req_num_logits": None,
        "req_spec_tokens": None,
    }


@dataclass
class _Layout:
    layer_ids: list[int]
    num_experts: int
    top_k: int


def _layout(config: Mapping[str, Any], num_layers: int, num_logical: int, where: Path) -> _Layout:
    cfg = dict(config.get("text_config") or {}, **config) if config else {}
    top_k = int(cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or cfg.get("top_k") or 0)
    if not cfg:
        return _Layout(list(range(num_layers)), num_logical, 0)
    layers = cfg.get("num_hidden_layers")
    if layers is not None and int(layers) != num_layers:
        raise CollectError(
            f"{where}: the dump has {num_layers} layers, the model config's num_hidden_layers is {layers}"
        )
    experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    if experts is not None and int(experts) != num_logical:
        raise CollectError(f"{where}: the dump has {num_logical} logical experts, the model config {experts}")
    ids = compat.moe_layer_ids_of_config(cfg.get, num_layers)
    return _Layout(ids or list(range(num_layers)), num_logical, top_k)


def _tokens_of(counts: Any, top_k: int) -> int:
    if top_k <= 0 or counts.shape[0] == 0:
        return 0
    return int(counts[0].sum()) // top_k


# ---------------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------------
def import_sglang_dumps(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    model_config: Mapping[str, Any] | None = None,
    model_id: str | None = None,
    tp_size: int | None = None,
    sum_ranks: bool = False,
    run_id: str | None = None,
) -> ImportedRun:
    """Convert SGLang dumps (all of one mode: several `stat` dumps of one run in time order, or the
    per-rank files of `per_pass` / `per_token`) into one run's trace files in `out`. See the module
    docstring for what each field becomes. `tp_size` divides `stat` counts (all-reduced over ranks)."""
    if not paths:
        raise CollectError("no dump files given")
    dumps = [read_dump(p) for p in paths]
    modes = {d.mode for d in dumps}
    if len(modes) > 1:
        raise CollectError(
            f"dumps of different recorder modes ({', '.join(sorted(modes))}): import them apart"
        )
    mode = modes.pop()
    if tp_size is not None and tp_size < 1:
        raise CollectError("--tp-size must be at least 1")
    if tp_size is not None and mode != "stat":
        raise CollectError(
            f"--tp-size divides stat dumps only; {mode} counts are one rank's own (never x tp)"
        )
    dumps.sort(key=lambda d: (d.rank, d.time if d.time is not None else 0.0))
    config = dict(model_config or {})
    shapes = {tuple(d.counts.shape[1:] if d.mode == "stat" else d.p2l.shape) for d in dumps}
    if len(shapes) > 1:
        raise CollectError(f"dumps of different shapes {sorted(shapes)}: not one run")
    num_layers = next(iter(shapes))[0]
    if mode == "stat":
        num_logical = int(dumps[0].counts.shape[2])
    else:
        num_logical = int(max(int(d.p2l.max()) for d in dumps)) + 1
        exp = config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts")
        num_logical = max(num_logical, int(exp or 0))
    layout = _layout(config, num_layers, num_logical, dumps[0].path)
    name = str(model_id or config.get("_name_or_path") or "unknown-model")
    digest = hashlib.sha1(b"".join(hashlib.sha1(d.path.read_bytes()).digest() for d in dumps)).hexdigest()[:6]
    stamp = min((d.time for d in dumps if d.time is not None), default=None)
    when = _utc(stamp) if stamp is not None else "undated"
    run_id = run_id or f"{when}-sglang-dump-{_safe(Path(name).name)}-{mode}-{digest}"

    by_rank: dict[int, list[SglangDump]] = {}
    for d in dumps:
        by_rank.setdefault(d.rank, []).append(d)
    ranks = sorted(by_rank)
    if mode != "stat" and not sum_ranks:
        skipped = ranks[1:]
        ranks = ranks[:1]
    else:
        skipped = []
    notes: list[str] = []
    if skipped:
        notes.append(
            f"ranks {skipped} not imported: under plain TP every rank routes the same tokens "
            "(pass --sum-ranks for DP attention / DeepEP dumps)"
        )
    scale = "as dumped"
    if mode == "stat":
        scale = (
            f"divided by tp_size {tp_size} (SGLang all-reduces stat counts over ranks)"
            if tp_size
            else "as dumped: SGLang's all-reduced SUM over ranks, x tp_size under plain TP (pass --tp-size)"
        )
    result = ImportedRun(run_id)
    steps_total = 0
    anchor: Any = None
    per_rank = {rank: _rows(by_rank[rank], mode, layout, tp_size) for rank in ranks}
    if sum_ranks and len(ranks) > 1:
        _pass_totals(per_rank, notes)
    for rank in ranks:
        rows, counts, step_key = per_rank[rank]
        steps_total += len(rows)
        meta = RunMetadata(
            run_id=run_id,
            engine=EngineInfo(name="sglang", version="", args={"expert_distribution_recorder_mode": mode}),
            model=ModelInfo(id=name, config=config),
            moe=MoEInfo(
                layer_ids=list(layout.layer_ids),
                num_experts=layout.num_experts,
                top_k=layout.top_k,
                id_space="logical",
                counts_available=True,
            ),
            parallelism=Parallelism(tp=tp_size or max(1, len(by_rank))),
            rank=RankIdentity(tp=rank),
            workload={"source": "sglang expert-distribution dump"},
            extra={
                "sglang": {
                    "counts_scope": "sum_over_ranks" if sum_ranks and mode != "stat" else "replicated"
                },
                "sglang_dump": {
                    "mode": mode,
                    "files": [d.path.name for d in by_rank[rank]],
                    "rank": rank,
                    "counts_scale": scale,
                    "tp_divided": bool(tp_size),
                    "step_key": step_key,
                    "timing": "none: the dump has no times; every step is a zero-length span at the clock anchor",
                    "phase_source": "forward_mode"
                    if mode == "per_token"
                    else "none (mixed, idle when no token)",
                    "physical_to_logical": None if mode == "stat" else "last_physical_to_logical_map",
                    "layers": "model config MoE layers" if config else "every dump row (no model config)",
                    "average_utilization_rate_over_window": [
                        d.utilization for d in by_rank[rank] if isinstance(d.utilization, (int, float))
                    ],
                    "notes": notes,
                },
            },
        )
        if anchor is None:
            anchor = meta.clock
        meta.clock = anchor
        t = meta.clock.monotonic_ns
        for row in rows:
            row.update(t_start_ns=t, t_end_ns=t, gpu_start_ns=None, gpu_end_ns=None)
        result.paths += _write(Path(out), meta, rows, counts)
    result.summary = (
        f"{mode}: {steps_total} passes over {len(ranks)} rank(s), {len(layout.layer_ids)} MoE layers"
    )
    if skipped:
        result.summary += f"; {notes[0]}"
    return result


def _pass_totals(per_rank: dict[int, tuple[list[dict[str, Any]], list[Any], str]], notes: list[str]) -> None:
    """Ranks whose counts are shares of one pass (`--sum-ranks`): a row whose batch composition the
    dump does not record (`per_pass`) takes the pass's tokens summed over the ranks' shares, so that the
    steps the analyzer reads (one rank's) match the summed counts. `per_token` rows keep their own
    tokens: they list that rank's requests."""
    totals: dict[int, int] = {}
    for rows, _, _ in per_rank.values():
        for row in rows:
            if not row["req_ids"]:
                totals[row["step"]] = totals.get(row["step"], 0) + int(row["num_tokens"])
    changed = 0
    for rows, _, _ in per_rank.values():
        for row in rows:
            if not row["req_ids"] and row["step"] in totals and row["num_tokens"] != totals[row["step"]]:
                row["num_tokens"] = totals[row["step"]]
                row["phase"] = "mixed" if row["num_tokens"] > 0 else "idle"
                changed += 1
    if changed:
        notes.append(
            f"{changed} row(s) without a batch composition carry their pass's tokens summed over the ranks' shares"
        )


def _rows(
    dumps: list[SglangDump], mode: str, layout: _Layout, tp_size: int | None
) -> tuple[list[dict[str, Any]], list[Any], str]:
    torch = _torch()
    index = torch.tensor(layout.layer_ids, dtype=torch.long)
    rows: list[dict[str, Any]] = []
    counts: list[Any] = []
    if mode == "stat":
        slot = 0
        for d in dumps:
            for i in range(d.counts.shape[0]):
                c = d.counts[i]
                if tp_size:
                    if bool((c % tp_size != 0).any()):
                        raise CollectError(
                            f"{d.path}: logical_count[{i}] is not divisible by --tp-size {tp_size} "
                            "(not a plain-TP dump, or a different TP size)"
                        )
                    c = c // tp_size
                if not bool(c.any()):
                    slot += 1
                    continue  # an unused slot of SGLang's buffer (or an idle pass)
                sel = c.index_select(0, index)
                row = _unknown_composition(_tokens_of(sel, layout.top_k))
                row["step"] = slot
                rows.append(row)
                counts.append(sel.flatten().to(torch.int32).numpy())
                slot += 1
        return rows, counts, "buffer slot (file order, then slot)"
    records = [(d, r) for d in dumps for r in d.records]
    ids = [r.get("forward_pass_id") for _, r in records]
    unique = all(isinstance(x, int) for x in ids) and len(set(ids)) == len(ids)
    for n, (d, rec) in enumerate(records):
        logical = physical_to_logical(rec["global_physical_count"], d.p2l, layout.num_experts)
        sel = logical.index_select(0, index)
        row = _composition(rec) if mode == "per_token" else None
        if row is None:
            row = _unknown_composition(_tokens_of(sel, layout.top_k))
        row["step"] = int(rec["forward_pass_id"]) if unique else n
        rows.append(row)
        counts.append(sel.flatten().to(torch.int32).numpy())
    return rows, counts, "forward_pass_id" if unique else "record index (forward_pass_id repeats)"


def _write(out: Path, meta: RunMetadata, rows: list[dict[str, Any]], counts: list[Any]) -> list[str]:
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        steps = TraceWriter(
            out / trace_file_name(meta, "steps"), "steps", meta, rows_per_batch=4096, blocking=True
        )
        experts = TraceWriter(
            out / trace_file_name(meta, "experts"), "experts", meta, rows_per_batch=4096, blocking=True
        )
    except OSError as exc:
        raise CollectError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    steps.write_rows(rows)
    experts.write_rows([{"step": r["step"], "counts": c} for r, c in zip(rows, counts, strict=True)])
    for w in (steps, experts):
        stats = w.close()
        if stats.errors:
            raise CollectError(f"{w.path}: writing failed ({stats.last_error})")
        paths.append(str(w.path))
    return paths


def _utc(unix_s: float) -> str:
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(unix_s))


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in s)[:48]
