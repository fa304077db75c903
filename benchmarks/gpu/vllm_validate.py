"""On a GPU machine with vLLM: validate the vLLM plugin's traces and measure its overhead.

    python benchmarks/gpu/vllm_validate.py --out OUT --model analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json \\
        --budget-s 540

Stages, each in its own process (a failure or a hang costs that stage only), most important first;
a stage that would start after `--budget-s` is skipped and listed as such:

1. `graphs`  — vLLM defaults (torch.compile + CUDA graphs), random weights, a fixed workload, with vLLM's
   own per-request routing capture on (`enable_return_routed_experts`) as an independent oracle:
   every step's counts must sum to num_tokens x top_k per MoE layer, and equal the oracle's routing of
   the step's (request, token range) rows exactly. Engine core in-process, so scheduling is deterministic.
2. `eager`   — the same with `enforce_eager=True`; then eager vs graphs: same steps, and counts compared
   step by step (identical unless the two kernel paths round a router near-tie differently: reported).
3. `sweep`   — one engine (vLLM defaults, in-process engine core), one trace holding closed-loop segments at
   several concurrencies (`--sweep-batches`, `--sweep-waves` waves of that many prompts each), GPU telemetry
   on: the same-workload twin for what-if validation across GPUs, calibrated on some batch sizes and
   tested on the others (`moecap-analyze whatif … --calibrate-batches …`).
4. `off`, `steps`, `experts` — throughput of a second workload (vLLM's default multiprocess engine, so
   the plugin also travels through the entry point into a spawned engine process) without the plugin,
   with steps only, with steps + expert counts; medians of interleaved repetitions in one engine each.

Results: OUT/summary.json, OUT/log.txt, OUT/trace_graphs.tar.gz and OUT/trace_sweep.tar.gz (trace files).
`--prefix h200-` names the runs `h200-vllm-…` so twins from two GPUs can sit side by side in traces/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("graphs", "eager", "sweep", "off", "experts", "steps")
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 48, 64]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Checks over a trace
# ---------------------------------------------------------------------------------------------------
def read_run(folder: Path) -> dict[str, Any]:
    from moecap.schemas import read_trace_file

    steps = sorted(folder.glob("*.steps.arrow"))
    experts = sorted(folder.glob("*.experts.arrow"))
    assert len(steps) == 1, f"expected one steps file in {folder}: {[p.name for p in folder.iterdir()]}"
    s = read_trace_file(steps[0])
    e = read_trace_file(experts[0]) if experts else None
    return {"steps": s, "experts": e}


def check_invariant(run: dict[str, Any]) -> dict[str, Any]:
    s, e = run["steps"], run["experts"]
    meta = s.run
    rows = s.table.to_pylist()
    counts = {r["step"]: r["counts"] for r in e.table.to_pylist()} if e is not None else {}
    num_layers, num_experts, top_k = len(meta.moe.layer_ids), meta.moe.num_experts, meta.moe.top_k
    bad = []
    for r in rows:
        c = counts.get(r["step"])
        if c is None:
            bad.append((r["step"], "no counts"))
            continue
        for layer in range(num_layers):
            total = sum(c[layer * num_experts : (layer + 1) * num_experts])
            if total != r["num_tokens"] * top_k:
                bad.append((r["step"], layer, total, r["num_tokens"] * top_k))
                break
    phases: dict[str, int] = {}
    for r in rows:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    gpu = [r for r in rows if r["gpu_start_ns"] is not None]
    return {
        "steps": len(rows),
        "experts_rows": len(counts),
        "phases": phases,
        "tokens": sum(r["num_tokens"] for r in rows),
        "invariant_violations": len(bad),
        "first_violations": bad[:5],
        "gpu_spans": len(gpu),
        "gpu_span_ms_median": statistics.median([(r["gpu_end_ns"] - r["gpu_start_ns"]) / 1e6 for r in gpu])
        if gpu
        else None,
        "host_ms_median": statistics.median([(r["t_end_ns"] - r["t_start_ns"]) / 1e6 for r in rows])
        if rows
        else None,
        "steps_complete": s.complete,
        "experts_complete": e.complete if e is not None else None,
        "layers": num_layers,
        "experts": num_experts,
        "top_k": top_k,
        "counts_available": meta.moe.counts_available,
        "counts_unavailable_reason": meta.moe.counts_unavailable_reason,
        "engine_args": {
            k: meta.engine.args.get(k)
            for k in (
                "enforce_eager",
                "compilation_mode",
                "cudagraph_mode",
                "use_v2_model_runner",
                "async_scheduling",
            )
        },
        "kv_bytes_per_token_per_layer": (meta.model.kv_bytes_per_token_per_layer or [None])[0],
    }


def check_oracle(run: dict[str, Any], routed: dict[str, Any]) -> dict[str, Any]:
    """Our per-step counts vs vLLM's own per-request routing (`routed[req engine id]`: [tokens, layers, k])."""
    import numpy as np

    s, e = run["steps"], run["experts"]
    meta = s.run
    layer_ids = meta.moe.layer_ids
    num_experts = meta.moe.num_experts
    counts = {
        r["step"]: np.asarray(r["counts"]).reshape(len(layer_ids), num_experts) for r in e.table.to_pylist()
    }
    checked = mismatched = skipped = 0
    first = []
    for r in s.table.to_pylist():
        if r["num_tokens"] == 0:
            continue
        want = np.zeros((len(layer_ids), num_experts), dtype=np.int64)
        ok = True
        for rid, start, n in zip(r["req_ids"], r["req_prefix_lens"], r["req_new_tokens"]):
            arr = routed.get(rid)
            if arr is None or start + n > arr.shape[0]:
                ok = False
                break
            part = arr[start : start + n][:, layer_ids, :].reshape(n, len(layer_ids), -1)
            for li in range(len(layer_ids)):
                want[li] += np.bincount(part[:, li, :].reshape(-1).astype(np.int64), minlength=num_experts)[
                    :num_experts
                ]
        if not ok:
            skipped += 1
            continue
        checked += 1
        if not np.array_equal(want, counts[r["step"]]):
            mismatched += 1
            if len(first) < 3:
                first.append({"step": r["step"], "diff": int(np.abs(want - counts[r["step"]]).sum())})
    return {
        "oracle_steps_checked": checked,
        "oracle_mismatches": mismatched,
        "oracle_skipped": skipped,
        "first": first,
    }


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import re

    import numpy as np

    ra, rb = a["steps"].table.to_pylist(), b["steps"].table.to_pylist()

    def ids(row: dict[str, Any]) -> list[str]:  # vLLM appends 8 random characters to our request ids
        return [re.sub(r"-[0-9a-f]{8}$", "", x) for x in row["req_ids"]]

    ca = {r["step"]: r["counts"] for r in a["experts"].table.to_pylist()}
    cb = {r["step"]: r["counts"] for r in b["experts"].table.to_pylist()}
    same_steps = len(ra) == len(rb) and all(
        (ids(x), x["req_new_tokens"], x["req_prefix_lens"])
        == (ids(y), y["req_new_tokens"], y["req_prefix_lens"])
        for x, y in zip(ra, rb)
    )
    identical = sum(1 for x, y in zip(ra, rb) if ca.get(x["step"]) == cb.get(y["step"]))
    tot_a = np.sum([ca[k] for k in ca], axis=0)
    tot_b = np.sum([cb[k] for k in cb], axis=0)
    return {
        "same_step_composition": same_steps,
        "steps": [len(ra), len(rb)],
        "steps_with_identical_counts": identical,
        "total_counts_identical": bool(np.array_equal(tot_a, tot_b)),
        "total_counts_l1_diff": int(np.abs(tot_a - tot_b).sum()),
        "total_routed": int(tot_a.sum()),
    }


# ---------------------------------------------------------------------------------------------------
# Stages (run in a child process)
# ---------------------------------------------------------------------------------------------------
def stage_trace(args: argparse.Namespace, eager: bool) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # deterministic scheduling, direct RPC
    from moecap.collect.engines.vllm.runner import VllmRunOptions, run

    out = Path(args.out) / ("trace_eager" if eager else "trace_graphs")
    engine_args: dict[str, Any] = {
        "enable_return_routed_experts": True,
        "max_num_seqs": 64,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 1024,
    }
    if not eager:
        engine_args["compilation_config"] = {"cudagraph_capture_sizes": CAPTURE_SIZES}
    opts = VllmRunOptions(
        model=args.model,
        random_weights=True,
        dataset=args.trace_dataset,
        num_prompts=args.trace_prompts,
        batch_size=args.trace_batch,
        out=str(out),
        ignore_eos=True,
        dtype="bfloat16",
        cuda_graphs="off" if eager else "on",
        run_id=f"{args.prefix}vllm-0.26.0-qwen15moe-{'eager' if eager else 'graphs'}",
        engine_args=engine_args,
    )
    t0 = time.time()
    try:
        result = run(opts)
    except Exception as exc:
        # vLLM's own routing capture may not combine with every runner: record without the oracle.
        log(f"with enable_return_routed_experts: {type(exc).__name__}: {exc}; retrying without the oracle")
        for p in out.glob("*.arrow"):
            p.unlink()
        opts.engine_args.pop("enable_return_routed_experts")
        result = run(opts)
    wall = time.time() - t0
    summary: dict[str, Any] = {
        "wall_s_including_start": round(wall, 1),
        "workload_s": round(result.wall_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "worker_stats": result.worker_stats,
        "files": [p.name for p in result.files],
    }
    rr = read_run(out)
    summary["check"] = check_invariant(rr)
    routed = {r.engine_req_id: r.routed_experts for r in result.records if r.routed_experts is not None}
    summary["oracle_requests"] = len(routed)
    if routed:
        shape = next(iter(routed.values())).shape
        summary["oracle_shape_example"] = list(shape)
        summary["oracle"] = check_oracle(rr, routed)
    return summary


def stage_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, one trace: segments at each of `--sweep-batches` concurrencies (`VllmSession.run_point`)."""
    import dataclasses

    from moecap.collect.engines.vllm.runner import VllmRunOptions, VllmSession

    batches = [int(b) for b in args.sweep_batches.split(",")]
    out = Path(args.out) / "trace_sweep"
    opts = VllmRunOptions(
        model=args.model,
        random_weights=True,
        dataset=args.sweep_dataset,
        num_prompts=sum(batches) * args.sweep_waves,
        batch_size=max(batches),
        out=str(out),
        ignore_eos=True,
        dtype="bfloat16",
        run_id=f"{args.prefix}vllm-0.26.0-qwen15moe-sweep",
        gpu_sample_interval_s=0.1,
        engine_args={
            "compilation_config": {"cudagraph_capture_sizes": CAPTURE_SIZES},
            "gpu_memory_utilization": 0.85,
            "max_model_len": 2048,
        },
    )
    session = VllmSession(opts)
    prompts = session.prompts(opts.dataset, opts.num_prompts)
    session.workload.update(
        batch_sizes=batches, waves_per_batch_size=args.sweep_waves, driver="vllm-offline-closed-loop-sweep"
    )
    session.start()
    session.warmup(prompts, max(batches))
    records: list[Any] = []
    segments = []
    offset = 0
    for bs in batches:
        part = prompts[offset : offset + bs * args.sweep_waves]
        offset += len(part)
        got, wall, _ = session.run_point(part, concurrency=bs)
        records += got
        tokens = sum(len(r.output_ids) for r in got)
        segments.append(
            {
                "batch_size": bs,
                "requests": len(got),
                "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
            }
        )
        log(f"sweep bs {bs}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s")
    sampler = session._sampler
    stats = session.stop(records=records)
    result: dict[str, Any] = {
        "engine_start_s": session.timing.get("engine_start_s"),
        "segments": segments,
        "worker_stats": stats,
        "sampler": dataclasses.asdict(sampler.stats) if sampler is not None else None,
        "files": sorted(p.name for p in out.glob("*.arrow")),
    }
    result["check"] = check_invariant(read_run(out))
    return result


def stage_throughput(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One engine (vLLM defaults: multiprocess, compile + graphs), `reps` timed runs of the workload.
    (benchmarks/gpu/engine_fidelity.py measures the same against vLLM's own `LLM.generate`.)"""
    from moecap.collect.engines.vllm.runner import VllmRunOptions, VllmSession

    out = Path(args.out) / f"tp_{mode}"
    opts = VllmRunOptions(
        model=args.model,
        random_weights=True,
        dataset=args.tp_dataset,
        num_prompts=args.tp_prompts,
        batch_size=args.tp_batch,
        out=str(out),
        ignore_eos=True,
        dtype="bfloat16",
        counts=mode == "experts",
        trace=mode != "off",
        run_id=f"tp-{mode}",
        gpu_sample_interval_s=None,
        engine_args={
            "compilation_config": {"cudagraph_capture_sizes": CAPTURE_SIZES},
            "gpu_memory_utilization": 0.85,
            "max_model_len": 1024,
        },
    )
    session = VllmSession(opts)
    session.start()
    samples_s = []
    session.warmup(session.prompts(opts.dataset, opts.num_prompts), opts.batch_size)
    for rep in range(args.reps):
        session.engine.reset_prefix_cache()
        records, wall, _ = session.run_point(session.prompts(opts.dataset, opts.num_prompts))
        tokens = sum(len(r.output_ids) for r in records)
        samples_s.append(tokens / wall)
        log(f"{mode} rep {rep}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s")
    stats = session.stop(write=False)
    result: dict[str, Any] = {
        "engine_start_s": session.timing.get("engine_start_s"),
        "tokens_per_s": [round(x, 1) for x in samples_s],
        "median_tokens_per_s": round(statistics.median(samples_s), 1),
        "worker_stats": stats,
    }
    if mode != "off":
        with_files = list(out.glob("*.steps.arrow"))
        if with_files:
            result["check"] = (
                check_invariant(read_run(out)) if mode == "experts" else {"steps_file": with_files[0].name}
            )
    return result


def child(args: argparse.Namespace) -> None:
    try:
        if args.stage in ("graphs", "eager"):
            result = stage_trace(args, eager=args.stage == "eager")
        elif args.stage == "sweep":
            result = stage_sweep(args)
        else:
            result = stage_throughput(args, args.stage)
        result["ok"] = True
    except Exception as exc:
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
    Path(args.out, f"stage_{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------
def _without_stages(argv: list[str]) -> list[str]:
    """The orchestrator's arguments for a child, less --stages (either form)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stages":
            skip = True
        elif not a.startswith("--stages="):
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(ROOT / "analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json"))
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--trace-dataset", default="synthetic:200x24")
    ap.add_argument("--trace-prompts", type=int, default=24)
    ap.add_argument("--trace-batch", type=int, default=16)
    ap.add_argument("--tp-dataset", default="synthetic:256x64")
    ap.add_argument("--tp-prompts", type=int, default=64)
    ap.add_argument("--tp-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefix", default="", help="run id prefix, e.g. h200- (the GPU of the twin)")
    ap.add_argument("--sweep-dataset", default="synthetic:512x64")
    ap.add_argument("--sweep-batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-waves", type=int, default=2)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage:
        child(args)
        return
    t_start = time.time()
    estimates = {"graphs": 150, "eager": 90, "sweep": 120, "off": 90, "steps": 80, "experts": 80}
    summary: dict[str, Any] = {"stages": {}, "skipped": []}
    for stage in args.stages.split(","):
        left = args.budget_s - (time.time() - t_start)
        if left < estimates.get(stage, 90) * 0.6:
            summary["skipped"].append(stage)
            log(f"skip {stage}: {left:.0f} s left")
            continue
        log(f"stage {stage} ({left:.0f} s left)")
        cmd = [
            sys.executable,
            __file__,
            "--stage",
            stage,
            *_without_stages(sys.argv[1:]),
        ]
        t0 = time.time()
        try:
            subprocess.run(cmd, timeout=max(30, left - 10), check=False)
        except subprocess.TimeoutExpired:
            log(f"{stage} timed out")
        path = Path(args.out, f"stage_{stage}.json")
        result = (
            json.loads(path.read_text())
            if path.exists()
            else {"ok": False, "error": "no result (timeout or crash)"}
        )
        result["stage_s"] = round(time.time() - t0, 1)
        summary["stages"][stage] = result
        log(
            f"{stage}: {json.dumps({k: v for k, v in result.items() if k not in ('traceback', 'worker_stats')}, default=str)[:1500]}"
        )
        if path.exists():
            path.unlink()
    try:
        if "graphs" in summary["stages"] and "eager" in summary["stages"]:
            summary["eager_vs_graphs"] = compare_runs(
                read_run(Path(args.out, "trace_eager")), read_run(Path(args.out, "trace_graphs"))
            )
    except Exception as exc:
        summary["eager_vs_graphs"] = {"error": f"{type(exc).__name__}: {exc}"}
    tp = {m: summary["stages"].get(m, {}).get("median_tokens_per_s") for m in ("off", "steps", "experts")}
    if tp.get("off"):
        summary["overhead_pct"] = {
            m: round(100 * (1 - tp[m] / tp["off"]), 2) for m in ("steps", "experts") if tp.get(m)
        }
    summary["total_s"] = round(time.time() - t_start, 1)
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name in ("trace_graphs", "trace_sweep"):
        folder = Path(args.out, name)
        if folder.exists():
            with tarfile.open(Path(args.out, f"{name}.tar.gz"), "w:gz") as tar:
                for p in sorted(folder.glob("*.arrow")):
                    tar.add(p, arcname=p.name)
    log(
        "done: "
        + json.dumps(
            {k: summary.get(k) for k in ("skipped", "eager_vs_graphs", "overhead_pct", "total_s")},
            default=str,
        )
    )


if __name__ == "__main__":
    main()
