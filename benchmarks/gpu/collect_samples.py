"""On a GPU machine: record sample traces with the hf collector, check them, and measure its overhead.

    python benchmarks/gpu/collect_samples.py --out OUT \\
        --model qwen=analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json \\
        --run qwen:synthetic:160x128:16:16 --run qwen:synthetic:1024x128:64:64:cb:on \\
        --overhead qwen:synthetic:256x64:64:64:3 --budget-s 480

`--run KEY:DATASET:NUM_PROMPTS:BATCH_SIZE[:MODE[:CUDA_GRAPHS[:MAX_NEW_TOKENS]]]` (DATASET may contain ':'; it is
everything between the key and the last numeric fields, e.g. synthetic:160x128). Runs of one model share
one load (random weights, bf16, seed 0). Every run's trace is read back and its count invariant checked
(per step and MoE layer: Σ counts = num_tokens × top_k). Traces go to OUT/traces/ and into
OUT/traces.tar.gz; a JSON summary (throughput, steps, invariant, file sizes, GPU, overhead) into
OUT/summary.json. Runs that would start after `--budget-s` seconds are skipped (and listed as skipped).
The same command re-runs the same workloads on another GPU (e.g. an H200) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass
class RunSpec:
    key: str
    dataset: str
    num_prompts: int
    batch_size: int
    mode: str = "cb"
    cuda_graphs: str = "auto"
    max_new_tokens: int | None = None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        key, rest = text.split(":", 1)
        parts = rest.split(":")
        # The dataset is the leading parts up to the first purely numeric field.
        i = next(i for i, p in enumerate(parts) if p.isdigit())
        dataset = ":".join(parts[:i])
        tail = parts[i:]
        spec = cls(key, dataset, int(tail[0]), int(tail[1]))
        if len(tail) > 2:
            spec.mode = tail[2]
        if len(tail) > 3:
            spec.cuda_graphs = tail[3]
        if len(tail) > 4:
            spec.max_new_tokens = int(tail[4])
        return spec

    def run_id(self, prefix: str, model_id: str) -> str:
        short = model_id.split("/")[-1]
        data = self.dataset.replace("synthetic:", "syn")
        graphs = "" if self.cuda_graphs == "auto" else f"-graphs{self.cuda_graphs}"
        return f"{prefix}-{short}-{self.mode}{graphs}-bs{self.batch_size}-{data}-n{self.num_prompts}"


def check_invariant(out_dir: Path, run_id: str) -> dict[str, Any]:
    """Read the run back and check the count invariant on every step."""
    import numpy as np

    from moecap.schemas import open_traces

    traces = open_traces(sorted(out_dir.glob(f"{run_id}.*.arrow")))
    run = traces.runs[run_id]
    meta = run.metadata
    steps = run.tables("steps")[0].table
    result: dict[str, Any] = {
        "errors": traces.errors,
        "steps": steps.num_rows,
        "tokens": int(sum(steps.column("num_tokens").to_pylist())),
        "phases": {p: steps.column("phase").to_pylist().count(p) for p in ("prefill", "decode", "mixed")},
        "gpu_span_null": int(steps.column("gpu_start_ns").null_count),
        "files": {f.path.name: f.path.stat().st_size for f in run.files},
    }
    if meta.moe.counts_available:
        experts = run.tables("experts")[0].table
        tokens = dict(zip(steps.column("step").to_pylist(), steps.column("num_tokens").to_pylist()))
        layers = len(meta.moe.layer_ids)
        bad = 0
        for step, counts in zip(experts.column("step").to_pylist(), experts.column("counts").to_pylist()):
            per_layer = np.asarray(counts, dtype=np.int64).reshape(layers, -1).sum(axis=1)
            bad += int(not np.all(per_layer == tokens[step] * meta.moe.top_k))
        result["invariant_steps_checked"] = experts.num_rows
        result["invariant_violations"] = bad
        result["steps_without_counts"] = steps.num_rows - experts.num_rows
    g = steps.column("gpu_end_ns").to_numpy(zero_copy_only=False) - steps.column("gpu_start_ns").to_numpy(
        zero_copy_only=False
    )
    h = steps.column("t_end_ns").to_numpy() - steps.column("t_start_ns").to_numpy()
    result["median_gpu_step_ms"] = float(np.median(g) / 1e6) if len(g) else None
    if len(g):
        # Clock check: a step's start event is enqueued after its host start, so GPU start >= host start.
        lead = (
            steps.column("gpu_start_ns").to_numpy(zero_copy_only=False)
            - steps.column("t_start_ns").to_numpy()
        )
        result["gpu_start_minus_host_start_us"] = {
            "min": float(lead.min() / 1e3),
            "median": float(np.median(lead) / 1e3),
            "negative_steps": int((lead < 0).sum()),
        }
    result["median_host_step_ms"] = float(np.median(h) / 1e6) if len(h) else None
    result["gpus"] = [f"{x.name} {x.uuid} {x.memory_bytes} driver {x.driver}" for x in meta.gpus]
    return result


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--trace-dir", type=Path, default=None, help="Where the .arrow files go (default OUT/traces)."
    )
    p.add_argument(
        "--warmup-runs", type=int, default=1, help="Unrecorded CB runs per model before recording."
    )
    p.add_argument("--model", action="append", default=[], help="KEY=CONFIG_PATH (random weights)")
    p.add_argument("--run", action="append", default=[], help="KEY:DATASET:N:BS[:MODE[:GRAPHS[:MAX_NEW]]]")
    p.add_argument("--overhead", action="append", default=[], help="KEY:DATASET:N:BS:REPEATS")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--prefix", default="gpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)

    import torch

    from moecap.collect.datasets import load_samples
    from moecap.collect.engines.hf.adapter import MLA_MODEL_TYPES
    from moecap.collect.engines.hf.runner import (
        HFRunOptions,
        execute_cb,
        load_model,
        run_workload,
    )
    from moecap.collect.workload import make_prompts

    t_start = time.monotonic()
    models = dict(m.split("=", 1) for m in a.model)
    runs = [RunSpec.parse(r) for r in a.run]
    trace_dir = a.trace_dir or a.out / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"environment": environment(), "runs": [], "skipped": [], "overhead": []}
    print(json.dumps(summary["environment"]), flush=True)

    def elapsed() -> float:
        return time.monotonic() - t_start

    keys = list(dict.fromkeys([r.key for r in runs] + [o.split(":", 1)[0] for o in a.overhead]))
    for key in keys:
        if elapsed() > a.budget_s:
            summary["skipped"].append(f"model {key}: budget")
            continue
        torch.manual_seed(0)
        t0 = time.monotonic()
        loaded = load_model(models[key], random_weights=True, dtype=a.dtype, device=a.device)
        load_s = time.monotonic() - t0
        mem = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(
            f"[{elapsed():6.1f}s] loaded {key} ({loaded.model_id}) in {load_s:.1f} s, {mem:.1f} GiB",
            flush=True,
        )
        if loaded.config.get("model_type") not in MLA_MODEL_TYPES:
            # Process-wide first-use costs (cuBLAS handles, kernel selection) land in an unrecorded run,
            # so recorded traces start warm.
            vocab = int(loaded.model.config.get_text_config().vocab_size)
            warm = make_prompts(
                load_samples("synthetic:512x8", 4, seed=99, vocab_size=vocab), None, None, vocab
            )
            for _ in range(a.warmup_runs):
                execute_cb(loaded.model, warm, 4, ignore_eos=True)
            print(f"[{elapsed():6.1f}s] warmed up {key}", flush=True)
        for spec in [r for r in runs if r.key == key]:
            if elapsed() > a.budget_s:
                summary["skipped"].append(spec.__dict__)
                print(f"[{elapsed():6.1f}s] skip {spec} (budget)", flush=True)
                continue
            run_id = spec.run_id(a.prefix, loaded.model_id)
            options = HFRunOptions(
                dataset=spec.dataset,
                num_prompts=spec.num_prompts,
                batch_size=spec.batch_size,
                out=str(trace_dir),
                max_new_tokens=spec.max_new_tokens,
                ignore_eos=True,
                mode=spec.mode,
                cuda_graphs=spec.cuda_graphs,
                run_id=run_id,
            )
            t0 = time.monotonic()
            try:
                res = run_workload(loaded, options)
            except Exception as exc:  # keep going: one failed run must not cost the others
                print(f"[{elapsed():6.1f}s] FAILED {run_id}: {type(exc).__name__}: {exc}", flush=True)
                summary["runs"].append({"run_id": run_id, "error": f"{type(exc).__name__}: {exc}"})
                continue
            check = check_invariant(trace_dir, run_id)
            entry = {
                "run_id": run_id,
                "spec": spec.__dict__,
                "tokens_per_s": res.tokens_per_s,
                "wall_s": res.wall_s,
                "run_s": time.monotonic() - t0,
                "output_tokens": res.output_tokens,
                "engine_args": res.metadata.engine.args if res.metadata else None,
                **check,
            }
            summary["runs"].append(entry)
            print(
                f"[{elapsed():6.1f}s] {run_id}: {res.tokens_per_s:.1f} tok/s, {check['steps']} steps, "
                f"invariant violations {check.get('invariant_violations')}, gpu step {check['median_gpu_step_ms']} ms, "
                f"files {sum(check['files'].values()) / 1e3:.0f} kB",
                flush=True,
            )
        for text in [o for o in a.overhead if o.split(":", 1)[0] == key]:
            if elapsed() > a.budget_s:
                summary["skipped"].append(f"overhead {text}: budget")
                continue
            import collector_overhead

            spec = RunSpec.parse(text.rsplit(":", 1)[0])
            repeats = int(text.rsplit(":", 1)[1])
            args = collector_overhead.parser().parse_args(
                [
                    "--model", models[key], "--dataset", spec.dataset, "--num-prompts", str(spec.num_prompts),
                    "--batch-size", str(spec.batch_size), "--repeats", str(repeats), "--device", a.device,
                ]
            )  # fmt: skip
            res = collector_overhead.benchmark(
                loaded, args, log=lambda s: print(f"[{elapsed():6.1f}s] {s}", flush=True)
            )
            summary["overhead"].append(res)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    with tarfile.open(a.out / "traces.tar.gz", "w:gz") as tar:
        for f in sorted(trace_dir.glob("*.arrow")):
            tar.add(f, arcname=f"traces/{f.name}")
    summary["elapsed_s"] = elapsed()
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[{elapsed():6.1f}s] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
