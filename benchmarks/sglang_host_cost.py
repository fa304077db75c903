"""Host time the SGLang plugin adds per forward pass, and the ops it puts into every MoE layer, measured
on the CPU against SGLang's real classes (issue #20).

    PY=$(bash .ci/sglang-venv.sh)                       # the SGLang contract venv (prints its python)
    $PY benchmarks/sglang_host_cost.py [--passes 3000] [--json OUT]
    PYTHONPATH=$VENV/sglang-0.5.16 $PY benchmarks/sglang_host_cost.py    # against SGLang 0.5.16

Per pass: the real `ModelRunner.forward` (its own body, SGLang's `HookRegistry` applying the plugin's
AROUND hook) runs decode passes of real `ForwardBatch`es (batch 1 and 64) around a model whose forward
does nothing — as under a CUDA-graph replay, where the per-layer count ops run inside the graph and
cost no host time — so the time per pass is SGLang's runner + the plugin's own host work (snapshot,
live-token mask, readback bookkeeping and launches, row hand-over to the writer). Modes: `off` (no
plugin, SGLang's recorder on as in the control), `steps` (`MOECAP_COUNTS=0`), `experts`. On the CPU the
device ops run on the CPU and there are no CUDA events, so the figures bound the Python and dispatch
work, not the CUDA launch latency (~3-5 µs of host time per launch on an H100 host).

Per layer: the ATen ops the select-experts gatherer runs for one MoE layer (inside every replayed graph
on a GPU), counted with a TorchDispatchMode — SGLang's own method, the plugin's masking wrapper around
it, and the plugin's fused count (one Triton kernel on CUDA: no ATen op; on the CPU here it is the
torch fallback, so its op count is reported too).
Reported: median µs per pass over `--repeats` interleaved blocks of `--passes` passes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engines_sglang"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(mode: str, batch: int, passes: int, repeats: int) -> list[float]:
    import pytest
    import torch
    from sglang_objects import Sgl, make_batch

    from moecap.collect.engines.sglang import compat

    mp = pytest.MonkeyPatch()
    gatherer = getattr(importlib.import_module(compat.GATHERER_CLASS[0]), compat.GATHERER_CLASS[1])
    mp.setattr(gatherer, "on_select_experts", gatherer.on_select_experts)
    mp.setattr(compat, "_LIVE_TOKENS", {})
    mp.setattr(compat, "_LIVE_SET", {}, raising=False)
    tmp = Path(tempfile.mkdtemp(prefix="moecap-sglang-hostcost-"))
    env = Sgl(mp, tmp)
    try:
        if mode == "steps":
            mp.setenv("MOECAP_COUNTS", "0")
        if mode != "off":
            env.install()
        env.set_recorder()
        env.recorder.start_record()  # SGLang's recorder on in every mode (as in the GPU control)
        runner = env.runner([])
        if mode == "experts":
            env.adapter._before_graph_capture(runner)
        rids = [f"r{i}-0123abcd" for i in range(batch)]
        runner.forward(make_batch("EXTEND", rids, seq_lens=[256] * batch, extend_seq_lens_cpu=[256] * batch,
                                  extend_prefix_lens_cpu=[0] * batch, extend_num_tokens=256 * batch))  # fmt: skip
        batches = [make_batch("DECODE", rids, seq_lens=[257 + s] * batch) for s in range(passes)]
        per_pass = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for fb in batches:
                runner.forward(fb)
            per_pass.append((time.perf_counter_ns() - t0) / len(batches) / 1e3)
        tracer = env.adapter.current_tracer()
        if mode == "experts":
            assert tracer is not None and tracer.counting, tracer and tracer.counts_reason
        del torch
        return per_pass
    finally:
        env.close()
        mp.undo()


def layer_ops(num_tokens: int = 64, top_k: int = 4, num_experts: int = 60) -> dict[str, object]:
    """ATen ops per MoE layer and pass: SGLang's gatherer method, + the plugin's masking wrapper, and
    the plugin's fused count (its CPU fallback here; on CUDA it is one Triton kernel)."""
    import torch
    from sglang_objects import location_metadata
    from torch.utils._python_dispatch import TorchDispatchMode

    from moecap.collect.engines.sglang import compat

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = str(func.overloadpacket.__name__)
            if not name.startswith(("view", "_unsafe_view", "alias", "detach", "select", "slice", "unsqueeze",
                                    "reshape", "expand", "as_strided")):  # fmt: skip
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    ed = importlib.import_module(compat.GATHERER_CLASS[0])
    cls = getattr(ed, compat.GATHERER_CLASS[1])
    original = cls.on_select_experts
    original = getattr(original, "__wrapped__", original)
    meta = location_metadata(num_layers=2, num_experts=num_experts)
    ed_get_device = getattr(ed, "get_device", None)
    if ed_get_device is not None:
        ed.get_device = lambda *a, **k: "cpu"
    try:
        g = cls(meta, 0)
    finally:
        if ed_get_device is not None:
            ed.get_device = ed_get_device
    ids = torch.randint(0, num_experts, (num_tokens, top_k), dtype=torch.int32)
    live = torch.full((), num_tokens - 3, dtype=torch.int32)
    out: dict[str, object] = {}
    with Count() as c:
        original(g, 0, ids)
    out["sglang_method"] = c.ops
    with Count() as c:
        compat.legacy_masked_count(g, 0, ids, live, original)
    out["plugin_before_wrapper_plus_sglang"] = c.ops
    with Count() as c:
        compat.fused_count(g, 0, ids, live)
    out["plugin_after_cpu_fallback"] = c.ops
    out["plugin_after_cuda"] = "1 Triton kernel (moecap.collect.engines.sglang.fused_count), no ATen op"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import sglang

    result: dict[str, object] = {"sglang": sglang.__version__}
    for batch in (int(b) for b in args.batches.split(",")):
        samples: dict[str, list[float]] = {m: [] for m in ("off", "steps", "experts")}
        for _ in range(args.repeats):  # interleaved: one block of each mode per round
            for mode in samples:
                samples[mode] += measure(mode, batch, args.passes, 1)
        row = {m: round(statistics.median(v), 2) for m, v in samples.items()}
        row["steps_added_us"] = round(row["steps"] - row["off"], 2)
        row["experts_added_us"] = round(row["experts"] - row["off"], 2)
        row["experts_over_steps_us"] = round(row["experts"] - row["steps"], 2)
        result[f"batch_{batch}"] = row
        print(f"batch {batch}: µs per pass {row}", flush=True)
    with __import__("contextlib").suppress(AttributeError):
        ops = layer_ops()
        result["ops_per_layer"] = {k: (len(v), v) if isinstance(v, list) else v for k, v in ops.items()}
        for k, v in result["ops_per_layer"].items():  # type: ignore[union-attr]
            print(f"per layer, {k}: {v}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
