"""How the cross-run charts tell dozens of runs apart: each run's execution mode (CUDA graphs or
eager), its group (model · engine · GPU · mode), and a palette that never repeats a colour.

Colour encodes the group, not the run: 27 runs make 27 near-identical hues, while their groups
are few and mean something (the same model on the same engine and GPU, graphs on or off). Lines of
one group stay separate lines (Vega-Lite `detail`), and the tooltip names the run.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from typing import Any

TABLEAU10 = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
TABLEAU20 = (
    "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63",
    "#499894", "#86bcb6", "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295", "#fabfd2",
    "#b07aa1", "#d4a6c8", "#9d7660", "#d7b5a6",
)  # fmt: skip


def palette(n: int) -> list[str]:
    """`n` distinct colours: Tableau 10 up to 10, Tableau 20 up to 20, else evenly spaced hues at
    two lightnesses (never a repeat, however many)."""
    if n <= len(TABLEAU10):
        return list(TABLEAU10[:n])
    if n <= len(TABLEAU20):
        return list(TABLEAU20[:n])
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0  # golden-ratio hue steps: neighbours differ most
        light = 0.42 if i % 2 == 0 else 0.62
        r, g, b = colorsys.hls_to_rgb(h, light, 0.65)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return _unique(out)


def _unique(colours: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for c in colours:
        while c in seen:  # nudge a (vanishingly rare) rounding collision by one unit of blue
            c = f"{c[:5]}{(int(c[5:], 16) + 1) % 256:02x}"
        seen.add(c)
        out.append(c)
    return out


def execution_mode(engine: str | None, args: dict[str, Any] | None) -> str:
    """Execution mode, "CUDA graphs" or "eager", from the engine arguments a trace records; "?" when they do not say.

    vLLM: `enforce_eager`; SGLang: `disable_cuda_graph`; HF transformers: `use_cuda_graph` (a
    per-phase list; graphs when any is on, eager when absent: transformers' default)."""
    args = args or {}
    name = (engine or "").lower()
    if name == "vllm" and "enforce_eager" in args:
        return "eager" if args["enforce_eager"] else "CUDA graphs"
    if name == "sglang" and "disable_cuda_graph" in args:
        return "eager" if args["disable_cuda_graph"] else "CUDA graphs"
    if name in ("hf", "transformers"):
        flag = args.get("use_cuda_graph")
        on = any(bool(v) for v in flag) if isinstance(flag, (list, tuple)) else bool(flag)
        return "CUDA graphs" if on else "eager"
    return "?"


def run_modes(analysis: Any) -> dict[str, str]:
    """run_id -> execution mode, from each run's recorded engine arguments."""
    modes = {}
    for ctx in getattr(analysis, "contexts", []) or []:
        md = ctx.run.metadata
        modes[ctx.run.run_id] = execution_mode(md.engine.name, md.engine.args)
    return modes


def info_rows(analysis: Any) -> list[dict[str, Any]]:
    """The rows of `Analysis.run_info()` in the analysis' run order: what every run label is built
    from (model, engine, gpu, num_gpus, batch_size, dataset)."""
    info = {r["run_id"]: r for r in analysis.run_info().iter_rows(named=True)}
    return [info.get(rid, {"run_id": rid}) for rid in analysis.run_ids]


def group_label(row: dict[str, Any], mode: str = "?", *, short_gpu: bool = True) -> str:
    """ "model · engine · GPU×n · mode" of one `run_info` row (mode left out when unknown;
    `short_gpu`: a leading "NVIDIA " dropped from the GPU's name)."""
    model = str(row.get("model") or "?").rstrip("/").split("/")[-1]
    gpu = _short_gpu(row.get("gpu")) if short_gpu else str(row.get("gpu") or "?")
    label = f"{model} · {row.get('engine') or '?'} · {gpu}×{row.get('num_gpus') or 1}"
    return label + (f" · {mode}" if mode != "?" else "")


def run_groups(rows: list[dict[str, Any]], modes: dict[str, str] | None = None) -> dict[str, str]:
    """run_id -> "model · engine · GPU×n · mode": the colour key of the cross-run charts
    (`rows`: `info_rows(analysis)`)."""
    modes = modes or {}
    return {row["run_id"]: group_label(row, modes.get(row["run_id"], "?")) for row in rows}


def _short_gpu(name: Any) -> str:
    """Drops a leading "NVIDIA " ("NVIDIA H100 80GB HBM3" -> "H100 80GB HBM3"); the table's short names stay as they are."""
    text = str(name or "?")
    return text[len("NVIDIA ") :] if text.startswith("NVIDIA ") else text


def run_labels(rows: list[dict[str, Any]], modes: dict[str, str] | None = None) -> dict[str, str]:
    """run_id -> a legend label that tells runs apart by what differs: "model · engine · GPU×n ·
    mode · bs N" (mode = CUDA graphs or eager, when known), then the dataset where that alone
    repeats, then the run id where even that does: never a bare "#18" that names nothing.
    `rows`: `info_rows(analysis)` (the façade's `run_info`)."""
    modes = modes or {}
    base: dict[str, str] = {}
    datasets: dict[str, str] = {}
    for row in rows:
        rid = row["run_id"]
        bs = row.get("batch_size")
        base[rid] = group_label(row, modes.get(rid, "?")) + (f" · bs {bs}" if bs else "")
        datasets[rid] = str(row.get("dataset") or "")
    return disambiguate(base, datasets, lambda i, rid: rid)


def disambiguate(
    base: dict[str, str], datasets: dict[str, str], last_resort: Callable[[int, str], str]
) -> dict[str, str]:
    """run_id -> label: `base`, plus the dataset where the label alone repeats, plus
    `last_resort(position from 1, run_id)` where even that does."""

    def repeated(labels: dict[str, str]) -> set[str]:
        seen: dict[str, int] = {}
        for label in labels.values():
            seen[label] = seen.get(label, 0) + 1
        return {label for label, n in seen.items() if n > 1}

    dup = repeated(base)
    labels = {
        rid: (f"{label} · {datasets[rid]}" if label in dup and datasets[rid] else label)
        for rid, label in base.items()
    }
    dup = repeated(labels)
    return {
        rid: (f"{label} · {last_resort(i, rid)}" if label in dup else label)
        for i, (rid, label) in enumerate(labels.items(), 1)
    }
