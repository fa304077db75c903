"""Throughput cost of the hf collector: tokens/s with it off, recording steps only, and steps + expert counts.

One model is loaded once; the same workload runs through transformers' continuous batching in the three
modes, interleaved (the order rotates every repeat, so drift and warm-up do not favour one mode), each run
on a fresh continuous-batching manager. "steps" and "experts" write real trace files (to a temporary
directory), so the writer thread's cost is included. Prints one line per run and a JSON summary with the
median tokens/s per mode and the ratios to "off" (targets: >= 0.99 steps only, >= 0.97 with counts).

    python benchmarks/collector_overhead.py --model analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json \\
        --random-weights --dataset synthetic:256x64 --num-prompts 64 --batch-size 64 --repeats 3

On a CPU use a tiny config (the numbers then mostly measure Python overhead).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("off", "steps", "experts")


def run_once(loaded: Any, prompts: list, mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One workload run in `mode`; returns tokens/s, steps recorded and wall seconds."""
    from moecap.collect.engines.hf.adapter import HFCollector
    from moecap.collect.engines.hf.runner import execute_cb
    from moecap.collect.writers import RunWriters
    from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata, new_run_id

    model = loaded.model
    collector = writers = None
    if mode != "off":
        holder: dict[str, Any] = {}
        collector = HFCollector(
            model, lambda row, counts: holder["w"].step(row, counts), counts=mode == "experts"
        )
        meta = RunMetadata(
            run_id=new_run_id("hf", loaded.model_id),
            engine=EngineInfo(name="hf"),
            model=ModelInfo(id=loaded.model_id),
            moe=MoEInfo(
                layer_ids=collector.layout.layer_ids,
                num_experts=collector.layout.num_experts,
                top_k=collector.layout.top_k,
                counts_available=collector.counts_enabled,
            ),
        )
        writers = holder["w"] = RunWriters(tmp, meta, experts=collector.counts_enabled, client_tables=False)
        collector.attach()
    try:
        records, wall_s = execute_cb(
            model,
            prompts,
            args.batch_size,
            ignore_eos=True,
            cuda_graphs=args.cuda_graphs,
            warmup=not args.no_warmup,
        )
    finally:
        if collector is not None:
            collector.close()
        stats = writers.close() if writers is not None else {}
    tokens = sum(len(r.output_ids) for r in records)
    gc.collect()
    return {
        "mode": mode,
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "steps": collector.steps_written if collector is not None else None,
        "readback_waits": collector.readback.waits if collector is not None else None,
        "rows_dropped": sum(s.rows_dropped for s in stats.values()),
    }


def benchmark(loaded: Any, args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Warm-up run, then `args.repeats` rounds of the three modes in rotating order."""
    from moecap.collect.datasets import load_samples
    from moecap.collect.workload import make_prompts

    vocab = int(loaded.model.config.get_text_config().vocab_size)
    samples = load_samples(args.dataset, args.num_prompts, seed=args.seed, vocab_size=vocab)
    prompts = make_prompts(samples, None, args.max_new_tokens, vocab)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moecap-overhead-") as tmp:
        first = run_once(loaded, prompts, "off", args, Path(tmp))
        log(f"warm-up off: {first['tokens_per_s']:.1f} tok/s")
        for r in range(args.repeats):
            order = MODES[r % 3 :] + MODES[: r % 3]
            for mode in order:
                res = run_once(loaded, prompts, mode, args, Path(tmp))
                res["repeat"] = r
                runs.append(res)
                log(
                    f"repeat {r} {mode:7s}: {res['tokens_per_s']:8.1f} tok/s  ({res['tokens']} tokens in "
                    f"{res['wall_s']:.2f} s, steps={res['steps']}, waits={res['readback_waits']})"
                )
    median = {m: statistics.median(x["tokens_per_s"] for x in runs if x["mode"] == m) for m in MODES}
    # Ratios per repeat (each against the same round's "off"), then their median: robust to drift.
    per_round = {
        m: [
            next(x for x in runs if x["mode"] == m and x["repeat"] == r)["tokens_per_s"]
            / next(x for x in runs if x["mode"] == "off" and x["repeat"] == r)["tokens_per_s"]
            for r in range(args.repeats)
        ]
        for m in ("steps", "experts")
    }
    summary = {
        "workload": {
            "model": loaded.model_id,
            "dataset": args.dataset,
            "num_prompts": args.num_prompts,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "cuda_graphs": args.cuda_graphs,
            "repeats": args.repeats,
        },
        "median_tokens_per_s": median,
        "ratio_steps_to_off": median["steps"] / median["off"],
        "ratio_experts_to_off": median["experts"] / median["off"],
        "per_round_ratios": per_round,
        "runs": runs,
    }
    log(
        f"median tok/s: off {median['off']:.1f}, steps {median['steps']:.1f}, experts {median['experts']:.1f}; "
        f"ratios steps/off {summary['ratio_steps_to_off']:.4f}, experts/off {summary['ratio_experts_to_off']:.4f}"
    )
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", default="synthetic:256x64")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="Write the summary here too.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from moecap.collect.engines.hf.runner import load_model

    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    loaded = load_model(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device)
    print(f"loaded {loaded.model_id} on {loaded.device} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    summary = benchmark(loaded, args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
