"""Host time the vLLM plugin adds per engine step, measured on the CPU against vLLM's real classes.

    MOECAP_VLLM_VENV_CACHE=... bash .ci/vllm-venv.sh           # prints the venv's python
    VLLM_TARGET_DEVICE=cpu <that python> benchmarks/plugin_host_cost.py [--steps 3000] [--json OUT]

The real `vllm.v1.worker.gpu_worker.Worker`, patched by the plugin exactly as in an engine, runs decode
steps of real `SchedulerOutput`s (batch 1 and 64, one token per request) around a model runner whose
`execute_model` / `sample_tokens` do nothing, so the time per step is the plugin's own host work
(batch snapshot, request tracker, step row, readback bookkeeping, counting launches, row hand-over to
the writer thread) plus the wrappers. Three configurations: unpatched, steps only (`MOECAP_COUNTS=0`),
steps + expert counts. On the CPU the counting kernels run on the CPU and CUDA events are absent, so
the figures bound the Python work, not the GPU launches (a CUDA launch costs ~3-5 µs of host time).
Reported: median µs per step over `--repeats` interleaved blocks of `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engines_vllm"))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def use_cpu_platform() -> None:
    """vLLM 0.26 has no VLLM_TARGET_DEVICE switch: the CPU platform, as the adapter tests pick it."""
    import vllm.platforms as platforms

    current = getattr(platforms, "_current_platform", None)
    if current is None or not getattr(current, "device_type", ""):
        from vllm.platforms.cpu import CpuPlatform

        platforms._current_platform = CpuPlatform()


def decode_steps(batch: int, steps: int) -> list:
    """One prefill step admitting `batch` requests of 256 tokens, then `steps` decode steps."""
    from vllm_objects import cached_requests, new_request, scheduler_output

    ids = [f"r{i}-0123abcd" for i in range(batch)]
    out = [scheduler_output([new_request(r, list(range(256))) for r in ids], cached_requests([], [], []),
                            {r: 256 for r in ids})]  # fmt: skip
    for s in range(steps):
        out.append(
            scheduler_output(
                [], cached_requests(ids, [256 + s] * batch, [s + 1] * batch), {r: 1 for r in ids}
            )
        )
    return out


class NoOpRunner:
    """The model runner with the forward taken out: what remains per step is the worker + plugin."""

    def __init__(self, model) -> None:
        self.model = model

    def load_model(self, *a, **k) -> None:
        pass

    def get_model(self):
        return self.model

    def initialize_kv_cache(self, *a, **k) -> None:
        pass

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        return None

    def sample_tokens(self, grammar_output):
        return None

    def shutdown(self) -> None:
        pass


def measure(mode: str, batch: int, steps: int, repeats: int) -> list[float]:
    from vllm.v1.worker.gpu_worker import Worker
    from vllm_objects import init_vllm, kv_cache_config, make_model, make_worker, write_tiny_config

    from moecap.collect.engines.vllm import adapter

    trace = Path(tempfile.mkdtemp(prefix="moecap-hostcost-"))
    for k in (adapter.ENV_TRACE_DIR, adapter.ENV_COUNTS, adapter.ENV_RUN_ID):
        os.environ.pop(k, None)
    if mode != "off":
        os.environ[adapter.ENV_TRACE_DIR] = str(trace)
        os.environ[adapter.ENV_RUN_ID] = f"hostcost-{mode}-{batch}-{time.monotonic_ns()}"
        if mode == "steps":
            os.environ[adapter.ENV_COUNTS] = "0"
        adapter.patch_worker_class(Worker)
    try:
        env = init_vllm(write_tiny_config(Path(tempfile.mkdtemp())))
        worker = make_worker(env, NoOpRunner(make_model()))
        worker.load_model()
        worker.initialize_from_config(kv_cache_config())
        sos = decode_steps(batch, steps)
        per_step = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for so in sos:
                if worker.execute_model(so) is None:
                    worker.sample_tokens(None)
            per_step.append((time.perf_counter_ns() - t0) / len(sos) / 1e3)
        if mode != "off":
            worker.moecap_control("close")
        return per_step
    finally:
        if mode != "off":
            adapter.unpatch_worker_class(Worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    use_cpu_platform()
    result: dict[str, dict[str, float]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        row = {}
        for mode in ("off", "steps", "experts"):
            row[mode] = round(statistics.median(measure(mode, batch, args.steps, args.repeats)), 2)
        row["steps_added_us"] = round(row["steps"] - row["off"], 2)
        row["experts_added_us"] = round(row["experts"] - row["off"], 2)
        result[f"batch_{batch}"] = row
        print(f"batch {batch}: µs per step {row}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
