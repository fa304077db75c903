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
it (the old path, still used where the fused kernel is not), and the plugin's fused count (one Triton
kernel, no ATen op).
Reported: median CPU µs of the calling (scheduler) thread per pass over `--repeats` interleaved blocks of
`--passes` passes (thread CPU time, so other processes on a shared host do not inflate it; the writer
thread's work is not in it).
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


VIEWS = {"view", "_unsafe_view", "alias", "detach", "select", "slice", "unsqueeze", "squeeze", "reshape",
         "expand", "as_strided", "t", "transpose", "lift_fresh"}  # fmt: skip
"""ATen ops that make views or wrap host data (no device kernel)."""


def _op_counter():  # type: ignore[no-untyped-def]
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = str(func.overloadpacket.__name__)
            if name not in VIEWS:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    return Count()


def measure(mode: str, batch: int, passes: int, repeats: int, ops: list | None = None) -> list[float]:
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
            t0 = time.thread_time_ns()  # this thread's CPU time: robust to other processes on the host
            for fb in batches:
                runner.forward(fb)
            per_pass.append((time.thread_time_ns() - t0) / len(batches) / 1e3)
        if ops is not None:  # the device ops of one more steady decode pass (SGLang's own included)
            fb = make_batch("DECODE", rids, seq_lens=[257 + passes] * batch)
            with _op_counter() as c:
                runner.forward(fb)
            ops.extend(c.ops)
        tracer = env.adapter.current_tracer()
        if mode == "experts":
            assert tracer is not None and tracer.counting, tracer and tracer.counts_reason
        del torch
        return per_pass
    finally:
        env.close()
        mp.undo()


def layer_ops(num_tokens: int = 64, top_k: int = 4, num_experts: int = 60) -> dict[str, object]:
    """ATen ops per MoE layer and pass: SGLang's gatherer method, and the plugin's old path (its masking
    wrapper + SGLang's method); the fused path is one Triton kernel."""
    import torch
    from sglang_objects import location_metadata

    from moecap.collect.engines.sglang import compat

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
    with _op_counter() as c:
        original(g, 0, ids)
    out["sglang_method"] = c.ops
    with _op_counter() as c:
        compat.legacy_masked_count(g, 0, ids, live, original)
    out["plugin_before_wrapper_plus_sglang"] = c.ops
    out["plugin_after"] = (
        "1 Triton kernel (fused_count.launch; its CPU check: tests/engines_sglang/test_fused_count.py)"
    )
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
        row: dict[str, object] = {m: round(statistics.median(v), 2) for m, v in samples.items()}
        row.update({f"{m}_min": round(min(v), 2) for m, v in samples.items()})
        for m in ("", "_min"):
            row[f"steps_added_us{m}"] = round(row[f"steps{m}"] - row[f"off{m}"], 2)  # type: ignore[operator]
            row[f"experts_added_us{m}"] = round(row[f"experts{m}"] - row[f"off{m}"], 2)  # type: ignore[operator]
            row[f"experts_over_steps_us{m}"] = round(row[f"experts{m}"] - row[f"steps{m}"], 2)  # type: ignore[operator]
        pass_ops = {}
        for mode in samples:
            names: list[str] = []
            measure(mode, batch, 20, 1, ops=names)
            pass_ops[mode] = names
        row["device_ops_per_pass"] = {m: (len(v), v) for m, v in pass_ops.items()}
        result[f"batch_{batch}"] = row
        brief = {k: v for k, v in row.items() if k != "device_ops_per_pass"}
        print(f"batch {batch}: µs per pass {brief}", flush=True)
        for m, (n, names) in row["device_ops_per_pass"].items():  # type: ignore[union-attr]
            print(f"batch {batch}: {m}: {n} device ops per pass {names}", flush=True)
    with __import__("contextlib").suppress(AttributeError):
        ops = layer_ops()
        result["ops_per_layer"] = {k: (len(v), v) if isinstance(v, list) else v for k, v in ops.items()}
        for k, v in result["ops_per_layer"].items():  # type: ignore[union-attr]
            print(f"per layer, {k}: {v}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
