"""One rank of a two-process CPU run (gloo): loads a tiny OLMoE checkpoint (sharded with `tp_plan` when
accelerate is installed, else replicated: routing is the same), runs a static-`generate` workload with the
hf collector on and writes this rank's files. Launched by test_multi_rank_tp.py with torchrun's variables.

    python tp_worker.py CHECKPOINT OUT_DIR {tp_plan|replicated}

CPUs have no GPU UUIDs: each rank stands for one made-up H200 (`GPU-cpu-test-rank<r>`), so that the
analyzer's GPU accounting by UUID can be checked on these files.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from moecap.collect import runtime
from moecap.schemas import GpuInfo


def main() -> int:
    ckpt, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    runtime.local_gpu = lambda device: GpuInfo(
        index=rank, name="NVIDIA H200", uuid=f"GPU-cpu-test-rank{rank}", memory_bytes=150_118_924_288
    )
    from moecap.collect.engines.hf.runner import HFRunOptions, load_model, run_workload

    loaded = load_model(ckpt, dtype="fp32", device="cpu", tp_plan="auto" if how == "tp_plan" else None)
    result = run_workload(
        loaded,
        HFRunOptions(
            dataset="synthetic:24x6",
            num_prompts=6,
            batch_size=3,
            out=out,
            mode="generate",
            ignore_eos=True,
        ),
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": rank,
                "run_id": result.run_id,
                "steps": result.steps,
                "paths": sorted(p.name for p in result.paths.values()),
                "sharded": any(hasattr(p, "to_local") for p in loaded.model.parameters()),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
