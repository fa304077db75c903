"""On a machine of several GPUs: record one tensor-parallel run with the hf collector, one file set per rank.

    source benchmarks/gpu/env.sh
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    torchrun --nproc-per-node 2 benchmarks/gpu/tp_run.py --out OUT \\
        --config analyze/specs/models/allenai__OLMoE-1B-7B-0924.json --prefix h200x2 \\
        --dataset synthetic:256x64 --num-prompts 32 --batch-size 16

Random weights cannot be sharded by transformers' `from_pretrained(..., tp_plan=...)` straight from a
config, so rank 0 first builds the model from the config (seed 0, bf16) and saves it as safetensors under
--ckpt (skipped when it is already there); then every rank loads its shard (`tp_plan="auto"`), runs one
unrecorded warm-up batch and the recorded workload under static `generate` (NCCL). Each rank writes
`<run>.dp0-pp0-tp<r>.{steps,experts}.arrow`; rank 0 also the requests/outputs. Rank 0 then reads both
ranks' files back and checks: the count invariant per step and MoE layer (Σ counts = tokens × top_k),
the two ranks' counts equal on every step, GPU spans present. Results go to OUT/summary.json, the trace
files into OUT/traces.tar.gz.

NVLink multicast must stay off (shared hosts): the script refuses to start unless NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def read_stream(path: Path) -> Any:
    import pyarrow as pa

    with pa.ipc.open_stream(path) as reader:
        return reader.read_all()


def check_ranks(trace_dir: Path, run_id: str, world: int) -> dict[str, Any]:
    """Per rank: steps, tokens, invariant violations, GPU-span nulls; across ranks: steps whose counts differ."""
    import numpy as np

    from moecap.schemas import read_trace_header

    out: dict[str, Any] = {"ranks": {}}
    counts_by_rank = {}
    for r in range(world):
        tag = f"dp0-pp0-tp{r}"
        steps = read_stream(trace_dir / f"{run_id}.{tag}.steps.arrow")
        experts = read_stream(trace_dir / f"{run_id}.{tag}.experts.arrow")
        md = read_trace_header(trace_dir / f"{run_id}.{tag}.steps.arrow").run
        layers, k = len(md.moe.layer_ids), md.moe.top_k
        step_keys = np.asarray(experts.column("step").to_pylist())
        counts = np.asarray(experts.column("counts").to_pylist(), dtype=np.int64)
        tokens = dict(
            zip(steps.column("step").to_pylist(), steps.column("num_tokens").to_pylist(), strict=True)
        )
        per_layer = counts.reshape(len(step_keys), layers, -1).sum(axis=2)
        expected = np.asarray([tokens[s] * k for s in step_keys])[:, None]
        counts_by_rank[r] = dict(zip(step_keys.tolist(), counts, strict=True))
        g0 = steps.column("gpu_start_ns").to_numpy(zero_copy_only=False)
        g1 = steps.column("gpu_end_ns").to_numpy(zero_copy_only=False)
        out["ranks"][tag] = {
            "steps": steps.num_rows,
            "expert_rows": experts.num_rows,
            "tokens": int(sum(tokens.values())),
            "invariant_violations": int(np.any(per_layer != expected, axis=1).sum()),
            "gpu_span_null": int(steps.column("gpu_start_ns").null_count),
            "median_gpu_step_ms": float(np.median(np.asarray(g1, float) - np.asarray(g0, float)) / 1e6),
            "parallelism_tp": md.parallelism.tp,
            "rank_tp": md.rank.tp,
            "gpu_uuids": md.rank.gpu_uuids,
            "kv_bytes_per_token_per_layer": md.model.kv_bytes_per_token_per_layer[:1],
        }
    ref = counts_by_rank[0]
    for r in range(1, world):
        other = counts_by_rank[r]
        common = sorted(set(ref) & set(other))
        differ = [s for s in common if not np.array_equal(ref[s], other[s])]
        out[f"tp{r}_vs_tp0"] = {
            "steps_compared": len(common),
            "steps_differing": len(differ),
            "first_differing": differ[:5],
            "steps_one_rank_only": len(set(ref) ^ set(other)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", required=True, help="config.json of the model (random weights)")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/moecap-tp-ckpt"))
    p.add_argument(
        "--trace-dir", type=Path, default=None, help="Where the .arrow files go (default OUT/traces)."
    )
    p.add_argument("--prefix", default="gpu")
    p.add_argument("--dataset", default="synthetic:256x64")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bf16")
    a = p.parse_args(argv)

    wrong = {k: os.environ.get(k) for k, v in _MULTICAST_OFF.items() if os.environ.get(k) != v}
    if wrong:
        print(f"refusing to start: NVLink multicast must be off, set {_MULTICAST_OFF} (found {wrong})")
        return 2

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:  # a dry run of this script on CPUs (gloo)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[rank {rank} {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    from moecap.collect.datasets import load_samples
    from moecap.collect.engines.hf.runner import (
        HFRunOptions,
        execute_generate,
        load_model,
        run_workload,
    )
    from moecap.collect.workload import make_prompts

    # The directory's name gives the run's model id (Org__Name -> Org/Name), as for the bundled configs.
    ckpt = a.ckpt / Path(a.config).stem
    if rank == 0 and not (ckpt / "config.json").is_file():
        torch.manual_seed(0)
        device = f"cuda:{local_rank}" if cuda else "cpu"
        built = load_model(a.config, random_weights=True, dtype=a.dtype, device=device)
        built.model.save_pretrained(ckpt)
        del built
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        log(f"built and saved random weights to {ckpt}")
    dist.barrier()

    loaded = load_model(str(ckpt), dtype=a.dtype, tp_plan="auto")
    loaded.random_weights = True  # the checkpoint holds the random weights built above
    gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    log(f"loaded {loaded.model_id} on {loaded.device} with tp_plan=auto: {gib:.1f} GiB on this GPU")
    vocab = int(loaded.model.config.get_text_config().vocab_size)
    warm = make_prompts(
        load_samples("synthetic:128x8", a.batch_size, seed=99, vocab_size=vocab), None, None, vocab
    )
    execute_generate(loaded.model, warm, a.batch_size, ignore_eos=True)
    log("warmed up (unrecorded)")

    data = a.dataset.replace("synthetic:", "syn")
    run_id = f"{a.prefix}-{loaded.model_id.split('/')[-1]}-tp{world}-generate-bs{a.batch_size}-{data}-n{a.num_prompts}"
    trace_dir = a.trace_dir or a.out / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_workload(
        loaded,
        HFRunOptions(
            dataset=a.dataset,
            num_prompts=a.num_prompts,
            batch_size=a.batch_size,
            out=str(trace_dir),
            mode="generate",
            ignore_eos=True,
            run_id=run_id,
        ),
    )
    log(f"{res.run_id}: {res.steps} steps, {res.output_tokens} output tokens, {res.tokens_per_s:.1f} tok/s")
    dist.barrier()
    if rank == 0:
        summary: dict[str, Any] = {
            "run_id": res.run_id,
            "world": world,
            "tokens_per_s": res.tokens_per_s,
            "wall_s": res.wall_s,
            "engine_args": res.metadata.engine.args if res.metadata else None,
            "torch": torch.__version__,
            "env": {k: os.environ.get(k) for k in _MULTICAST_OFF},
        }
        try:
            summary["check"] = check_ranks(trace_dir, res.run_id, world)
        except Exception as exc:  # keep the traces even if the check itself breaks
            summary["check_error"] = f"{type(exc).__name__}: {exc}"
        if cuda:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=index,name,uuid,memory.total,driver_version",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            summary["nvidia_smi"] = smi.stdout.strip()
        with tarfile.open(a.out / "traces.tar.gz", "w:gz") as tar:
            for f in sorted(trace_dir.glob("*.arrow")):
                tar.add(f, arcname=f"traces/{f.name}")
        (a.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log(json.dumps(summary.get("check", summary.get("check_error")), default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
