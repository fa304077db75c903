"""On one GPU: does `moecap-collect` measure the engine, not itself? The engine's own offline throughput vs
`moecap-collect run` (tracing off, steps, steps + experts), and the engine's own serving benchmark vs
`moecap-collect drive` on the same `moecap-collect serve` server, at batch 1 and 64 (issue #20).

Model: random-weight Qwen1.5-MoE-A2.7B from analyze/specs/models (`load_format="dummy"`, prompts as token ids,
no tokenizer; the serve stage writes a word-level tokenizer, one word per id, with the machine's
`tokenizers`), bf16, torch.compile + CUDA graphs (the engines' defaults), gpu memory 0.85 (vLLM) / 0.8
(SGLang), context 4096, fixed lengths, ignore_eos. Workloads:
  b64: 64 prompts x 256 in / 128 out, 64 in flight;   b1: 4 prompts x 256 in / 256 out, 1 in flight.
Concurrency is the engine's own limit (vLLM `max_num_seqs`, SGLang `max_running_requests`), as `run` sets
it; so each batch size is its own engine.

Offline stages (`<mode>-<batch>`, mode off | steps | experts): ONE engine built by `run`'s own session code
(`VllmSession` / `SglangSession`, which `moecap-collect run` uses), warmed up once (`run`'s warm-up), then
`--reps` (default 7) INTERLEAVED repeats of (a) the engine's own offline call on that engine — vLLM `LLM.generate`
(the `LLM` object builds the engine from `run`'s engine kwargs), SGLang `Engine.generate` over every prompt
(what `bench_offline_throughput` times) — and (b) `run`'s submission (`session.run_point`), prefix cache
reset before each. Mode off: no plugin (so (a) is the engine's own baseline and (b) is `run --no-trace`);
steps / experts: the plugin on (`--no-counts` / default), so (a) is the engine with our plugin and (b) is
`run`. Medians, ratios and start-up delays go to OUT/fidelity-<engine>-<stage>.json.
Stage `serve`: `moecap-collect serve` (steps + experts on) once; then `--serve-reps` (default 5) interleaved
repeats at b64 and b1 of `moecap-collect drive` and the engine's serving benchmark (`vllm bench serve
--dataset-name random`; SGLang `python -m sglang.benchmark.serving`, OpenAI completions backend,
`random-ids`) against it, both sending the same kind of request: text for vLLM (drive `--prompt-format
text`: the random ids decoded with the tokenizer, as bench's random dataset), token ids for SGLang, greedy
both (drive's default temperature 0; `vllm bench serve` 0.26 sends none unless `--temperature 0`, leaving
the server's default — 1.0 here, random sampling — which the runs up to 2026-12-07 did); mean
TTFT, mean TPOT and output throughput computed by the same definitions for both; then Ctrl-C (SIGINT) the
server, and read from its own steps file how the engine prefilled each round (`schedule`: a burst that
arrives at once fills the first steps to the token budget; one that trickles in needs more steps). The
untimed first drive round climbs drive's residue ladder (vLLM with `--max-num-batched-tokens 8192` passed,
SGLang from its /server_info); the server runs with MOECAP_RECORD_WARMUP=1 (the tracers record warm-up
steps too), and `ladder_steps` says how many ladder groups the engine prefilled in one step of exactly
their count (the rest were split: the measure of whether the ladder reaches its classes through a server).

ON THE H100 (vLLM 0.26.0 installed from wheels per ../shared/gpu/README.md; each line one device call of at
most 10 minutes, back to back; `source benchmarks/gpu/env.sh` makes this checkout `moecap` without pip):

  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages off-64,off-1 --out $OUT
      # ~300 s cold (first engine start ~175 s incl. compile), ~150 s warm
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages steps-64,experts-64 --out $OUT
      # ~170 s (engine start ~50 s each with the compile cache warm, ~20 s of repeats each)
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages steps-1,experts-1 --out $OUT
      # ~200 s (b1 repeats: ~3 s each)
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages serve --out $OUT
      # ~400 s (server start ~60-100 s; ~55 s per repeat, each `vllm bench serve` paying ~15 s of imports:
      # 273-329 s with 3 repeats, estimated for the default 5), inside the 570 s --budget-s
  # optional, ~90 s: the real CLI end to end once (engine start + warm-up + run), its own printed figures
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages cli-64 --out $OUT

SGLang (a second lease: SGLang 0.5.16 wheels, see gpu/README.md; `export PYTHONPATH=/root/sgl` if installed
with --target): the same commands with `--engine sglang` (engine start ~120 s; `--stages off-64,off-1` then
`steps-64,experts-64`, `steps-1,experts-1`, `serve`).
Control for the experts cost (SGLang's own select-experts recorder on, no moecap plugin), same lease:
  source benchmarks/gpu/env.sh && cd benchmarks/gpu && python sglang_recorder_cost.py $OUT 1,64

SGLang experts cost A/B (issue #20: one fused Triton count per MoE layer instead of the padding mask +
SGLang's 6-8 ops; no per-pass zero / index_select / copy; the live-token fill only on change). Stage
`experts-N` runs the plugin as shipped (the trace metadata's `count_path` says `fused`), stage
`expertsunfused-N` the same plugin with `MOECAP_SGLANG_FUSED_COUNTS=0` (`count_path` `masked`: the old
in-graph ops; the host-side savings stay). Both record per decode pass the GPU span, GPU start-to-start
interval and host time (`spans`: interval ≈ span = GPU-bound; interval > span = the GPU waits for the
host). Same lease, one device call per line, engines one after another (off twice: engine-to-engine noise):
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine sglang --reps 5 --stages off-1,experts-1 --out $OUT
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine sglang --reps 5 --stages expertsunfused-1,off-1 --out $OUT/again
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine sglang --reps 5 --stages off-64,experts-64 --out $OUT
  source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine sglang --reps 5 --stages expertsunfused-64,steps-1 --out $OUT
Done when `experts-1` and `experts-64` are within 3 % of the `off-` medians (`--summarize $OUT $OUT/again`).

BOTH ENGINES IN ONE LEASE (as run 2026-12-07 on an H100, 23 min of device time): a wheel-part call takes ~4 s,
so bring vLLM's 8 parts (`wheel_parts.sh`), install (~40 s), start a long vLLM stage DETACHED so it runs
while SGLang's 11 parts travel, and queue the SGLang stages behind it in a second detached job (its
`--target` install first; it waits for the first job's rc file, then `pip uninstall -y vllm`):
  bash benchmarks/gpu/detach.sh vserve 'source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages serve --budget-s 900 --out /root/fidv'
  bash benchmarks/gpu/detach.sh sgl '<pip install --target /root/sx …>; while [ ! -f /root/jobs/vserve.rc ]; do sleep 2; done; python3 -m pip uninstall -y -q vllm; export PYTHONPATH=/root/sx; source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine sglang --reps 5 --stages off-1,experts-1,off-64,experts-64 --budget-s 960 --out /root/fids'
then poll (`sleep 150; tail /root/jobs/*.log`: every call keeps the machine) and tar the JSON into $OUT.
Seen: vLLM serve stage 528 s (server up in 158 s); SGLang stages 133 s cold, 68-82 s warm each.

Run 2026-12-07 (fourth H100 lease, benchmarks/README.md): `--drive-variant=--no-continuous-usage` moved
drive's b1 TTFT outside the engine's step by ~0.6 ms (to bench's); b64 TTFT was not settled. NEXT serve
stages (both engines): `--drive-variant="--warmup 0"` (drive's burst follows its warm-up at once, and on
SGLang it reached the scheduler over three steps where bench's arrived in one; bench_serving sleeps 1 s after
its warm-up, vllm bench serve sends none), `--serve-reps 5`; `--serve-batches 64` when time is short.

Here, afterwards: `python benchmarks/gpu/engine_fidelity.py --summarize DIR [DIR…]` prints the table
(Markdown) from the fetched JSON files.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
MODEL = ROOT / "analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json"
WORKLOADS = {64: (64, 256, 128), 1: (4, 256, 256)}
"""batch -> (prompts, input tokens, output tokens)."""
CLI = "import sys; sys.argv = ['moecap-collect', *sys.argv[1:]]; from moecap.collect.cli import main; main()"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


# ---------------------------------------------------------------------------------------------------
# Plugin discovery without pip: entry points written next to this checkout
# ---------------------------------------------------------------------------------------------------
def plugin_path(out: Path) -> Path:
    """A folder with `.dist-info`s declaring moecap's vLLM and SGLang entry points, put on PYTHONPATH (of
    this process and every child) so the engines' plugin loaders find moecap as if it were installed."""
    folder = out / "_plugin"
    for group, value, name in (
        ("vllm.general_plugins", "moecap.collect.engines.vllm:register", "vllm"),
        ("sglang.srt.plugins", "moecap.collect.engines.sglang:register", "sglang"),
    ):
        dist = folder / f"moecap_{name}_plugin-0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: moecap-{name}-plugin\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[{group}]\nmoecap = {value}\n")
    os.environ["PYTHONPATH"] = f"{folder}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")
    sys.path.insert(0, str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------
# Offline stages
# ---------------------------------------------------------------------------------------------------
EXPERT_MODES = ("experts", "expertsunfused")
"""Offline modes with expert counts. `expertsunfused` (SGLang): the same plugin with the fused per-layer
count switched off (`MOECAP_SGLANG_FUSED_COUNTS=0`: the padding mask + SGLang's own gatherer method in
every MoE layer, as before issue #20's fix) — the A/B of the in-graph count kernels."""


def offline_options(engine: str, mode: str, batch: int, out: Path) -> Any:
    n, n_in, n_out = WORKLOADS[batch]
    common = dict(
        model=str(MODEL), dataset=f"synthetic:{n_in}x{n_out}", num_prompts=n, batch_size=batch,
        out=str(out / f"trace-{engine}-{mode}-{batch}"), random_weights=True, dtype="bfloat16", ignore_eos=True,
        counts=mode in EXPERT_MODES, trace=mode != "off", run_id=f"fidelity-{engine}-{mode}-b{batch}-{int(time.time())}",
        gpu_sample_interval_s=None,
    )  # fmt: skip
    if engine == "vllm":
        from moecap.collect.engines.vllm.runner import VllmRunOptions

        return VllmRunOptions(**common, engine_args={"gpu_memory_utilization": 0.85, "max_model_len": 4096})
    from moecap.collect.engines.sglang.runner import SglangRunOptions

    return SglangRunOptions(**common, engine_args={"mem_fraction_static": 0.8, "context_length": 4096})


def _steps_recorded(llm: Any) -> int | None:
    with contextlib.suppress(Exception):
        stats = [x for x in llm.collective_rpc("moecap_control", args=("stats",)) if x]
        return int(stats[0]["steps_recorded"]) if stats else None
    return None


def span_stats(folder: Path, ranges: dict[str, list[tuple[int, int]]] | None) -> dict[str, Any]:
    """Per label, medians over the decode steps whose keys fall in the label's [first, last) ranges
    (None: one label `all`, every step of the file): GPU span (start event to end event, µs), GPU
    start-to-start interval of consecutive steps (µs), and host time inside the step (`t_start`..`t_end`,
    µs). Tells GPU time added per step from host time: interval ≈ span means the GPU runs back to back
    (GPU-bound); interval > span means it waits for the host."""
    from moecap.schemas.reader import read_trace_file

    files = sorted(folder.glob("*.steps.arrow"))
    if not files:
        return {"error": f"no steps file in {folder}"}
    rows = read_trace_file(files[0]).table.select(
        ["step", "phase", "t_start_ns", "t_end_ns", "gpu_start_ns", "gpu_end_ns"]).to_pylist()  # fmt: skip
    by_key = {r["step"]: r for r in rows}
    if ranges is None:
        ranges = {"all": [(min(by_key), max(by_key) + 1)]} if by_key else {}
    out: dict[str, Any] = {}
    for label, spans in ranges.items():
        gpu, interval, host = [], [], []
        for first, last in spans:
            for k in range(first, last):
                r, nxt = by_key.get(k), by_key.get(k + 1)
                if r is None or r["phase"] != "decode" or r["gpu_start_ns"] is None:
                    continue
                gpu.append((r["gpu_end_ns"] - r["gpu_start_ns"]) / 1e3)
                host.append((r["t_end_ns"] - r["t_start_ns"]) / 1e3)
                if nxt is not None and k + 1 < last and nxt["phase"] == "decode" and nxt["gpu_start_ns"]:
                    interval.append((nxt["gpu_start_ns"] - r["gpu_start_ns"]) / 1e3)
        out[label] = {"decode_steps": len(gpu), "gpu_span_us": median(gpu),
                      "gpu_interval_us": median(interval), "host_in_step_us": median(host)}  # fmt: skip
    return out


def steps_by_window(
    folder: Path, windows: list[dict[str, Any]], *columns: str
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each window with the server's steps (t_start_ns, t_end_ns and `columns`) that started inside it, in
    time order; nothing when `folder` has no steps file."""
    from moecap.schemas.reader import read_trace_file

    files = sorted(folder.glob("*.steps.arrow"))
    if not files:
        return
    rows = read_trace_file(files[0]).table.select(["t_start_ns", "t_end_ns", *columns]).to_pylist()
    rows.sort(key=lambda r: r["t_start_ns"])
    starts = [r["t_start_ns"] for r in rows]
    for w in windows:
        yield w, rows[bisect.bisect_left(starts, w["t0_ns"]) : bisect.bisect_left(starts, w["t1_ns"])]


LADDER_ID = re.compile(r"-ladder-(\d+)")


def ladder_formation(folder: Path, window: dict[str, Any]) -> dict[str, Any] | None:
    """How drive's residue ladder reached the engine, from the server's own steps in `window` (the warm
    round): per ladder group (its requests' ids carry its token count, `…-ladder-<count>[-<i>]`), whether
    all its requests were prefilled in one step whose token count (every request's new tokens) is the
    group's count. None where the steps name no ladder request (the tracers leave warm-up steps out unless
    MOECAP_RECORD_WARMUP=1, which the serve stage sets)."""
    for _, steps in steps_by_window(folder, [window], "req_ids", "req_new_tokens"):
        totals = [sum(r["req_new_tokens"] or []) for r in steps]
        where: dict[int, set[int]] = {}
        for i, r in enumerate(steps):
            for rid in r["req_ids"] or []:
                if m := LADDER_ID.search(str(rid)):
                    where.setdefault(int(m.group(1)), set()).add(i)
        if not where:
            return None
        whole = {c for c, at in where.items() if len(at) == 1 and totals[min(at)] == c}
        missed = sorted(set(where) - whole)
        return {"groups": len(where), "one_step_of_its_count": len(whole), "missed": len(missed),
                "missed_counts": missed[:64]}  # fmt: skip
    return None


def round_schedules(
    folder: Path, windows: list[dict[str, Any]], first: int = 8
) -> dict[str, list[dict[str, Any]]]:
    """How the engine scheduled each serve round's prompts, read from the server's own steps file: per
    round (a [t0_ns, t1_ns) window of the host's monotonic clock, which the plugin stamps steps with), the
    steps that prefilled prompt tokens (a request's chunk of more than one new token), the new prompt
    tokens of the first `first` of them, the span from the first such step's start to the last one's end
    (ms), and the longest of them (its prompt tokens and host span, ms: an engine-side stall, e.g. a kernel
    compiled for a chunk size met for the first time, shows there; the sixth H100 lease saw two rounds with
    spans of 622 and 810 ms and could not tell which step held them). A burst that reaches the server at once
    fills the first steps to the token budget; one that arrives spread out starts with a few prompts and
    needs more steps (issue #20: drive vs bench TTFT)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for w, in_window in steps_by_window(folder, windows, "req_new_tokens"):
        steps = [
            (r["t_start_ns"], r["t_end_ns"], sum(n for n in (r["req_new_tokens"] or []) if n > 1))
            for r in in_window
        ]
        prefill = [s for s in steps if s[2] > 0]
        longest = max(prefill, key=lambda s: s[1] - s[0], default=None)
        out.setdefault(w["key"], []).append({
            "prefill_steps": len(prefill),
            "prefill_tokens": sum(s[2] for s in prefill),
            "first_prefill_tokens": [s[2] for s in prefill[:first]],
            "prefill_span_ms": round((prefill[-1][1] - prefill[0][0]) / 1e6, 2) if prefill else None,
            "longest_prefill": {"tokens": longest[2], "ms": round((longest[1] - longest[0]) / 1e6, 2)}
            if longest else None,
        })  # fmt: skip
    return out


def ttft_outside_step(folder: Path, windows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per b1 round (one request in flight): the mean over its requests of the client's TTFT minus the
    duration of the engine step that prefilled the request (its first step in the server's own steps file),
    ms: the part of TTFT the engine's step does not explain — HTTP, tokenisation, scheduling, the client.
    At b1 the step itself varies from request to request (H100, vLLM 0.26: 37–81 ms for the same
    256 tokens), which swamps a few-ms difference between two clients' means; this removes it. The i-th
    request the server saw in the window is the client's i-th (one at a time); warm-ups come first, so the
    last `len(ttfts)` requests are the measured ones (drive's warm-up ids are also marked `warmup`)."""
    out: dict[str, list[float]] = {}
    for w, in_window in steps_by_window(folder, windows, "req_ids"):
        ttfts = w.get("ttfts_ms") or []
        if w.get("batch") != 1 or not ttfts:
            continue
        first_step: dict[str, float] = {}
        for r in in_window:
            for rid in r["req_ids"] or []:
                if "warmup" not in rid and rid not in first_step:
                    first_step[rid] = (r["t_end_ns"] - r["t_start_ns"]) / 1e6
        steps = list(first_step.values())[-len(ttfts) :]
        if len(steps) == len(ttfts):
            out.setdefault(w["key"], []).append(
                round(statistics.mean(t - d for t, d in zip(ttfts, steps)), 3)
            )
    return out


def b64_ttft_split(folder: Path, windows: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per b64 round, its mean TTFT (ms) split in two with the server's own steps file:
    `engine` — the mean over the round's requests of (the end of the step that finished the request's
    prompt − the start of the step that first held the round's first request): how much later than the
    first the others reached the scheduler, plus the engine's batching of them; `rest` — mean TTFT −
    `engine`: the first request's way from the client's send to the engine's first step, plus the way back
    (HTTP, tokenisation, hand-over, the client). Two clients whose `rest` agree but whose `engine` differ
    delivered their bursts to the scheduler differently spread (issue #20, H100 SGLang: drive's `rest`
    within 5 ms of bench_serving's, its `engine` 8-11 % longer: its other requests reached the scheduler
    17-43 ms after its first, bench's from 7 ms on). A request's prompt is finished by its last step with
    more than one new token (a prefill chunk); the step's end is its GPU end where recorded. Warm-ups (ids
    marked `warmup`, or a lone first request over 0.5 s before the next: SGLang's bench warms up with an
    unmarked one) are left out, and only the last `len(ttfts)` requests in order of first step count."""
    out: dict[str, list[dict[str, float]]] = {}
    cols = ("gpu_end_ns", "req_ids", "req_new_tokens")
    for w, in_window in steps_by_window(folder, windows, *cols):
        ttfts = w.get("ttfts_ms") or []
        if w.get("batch") != 64 or not ttfts:
            continue
        first: dict[str, int] = {}
        done: dict[str, int] = {}
        for r in in_window:
            end = r["gpu_end_ns"] or r["t_end_ns"]
            for rid, new in zip(r["req_ids"] or [], r["req_new_tokens"] or []):
                if "warmup" in rid:
                    continue
                first.setdefault(rid, r["t_start_ns"])
                if new > 1:
                    done[rid] = end
        order = sorted(first, key=first.__getitem__)
        if len(order) > 1 and first[order[1]] - first[order[0]] > 500_000_000:
            order = order[1:]
        order = [rid for rid in order if rid in done][-len(ttfts) :]
        if len(order) != len(ttfts):
            continue
        t0 = first[order[0]]
        engine = statistics.mean((done[rid] - t0) / 1e6 for rid in order)
        ttft = statistics.mean(ttfts)
        out.setdefault(w["key"], []).append(
            {
                "mean_ttft_ms": round(ttft, 2),
                "engine_ms": round(engine, 2),
                "rest_ms": round(ttft - engine, 2),
            }
        )
    return out


def vllm_count_modes(batch: int, reps: int, out: Path) -> dict[str, Any]:
    """Stage `modes-<batch>`: ONE engine with expert counts on; interleaved repeats of `LLM.generate` with
    the routing rows counted on the device (index_add kernels on the engine's stream) and on the host
    (one copy per step), switched between repeats by `moecap_control("count-on", …)`; the same counts
    either way. Per mode: tok/s and per-step GPU span / interval / host time from the trace."""
    from vllm import LLM, SamplingParams

    from moecap.collect.engines.vllm.runner import VllmSession

    opts = offline_options("vllm", "experts", batch, out)
    opts.out = str(out / f"trace-vllm-modes-{batch}")
    session = VllmSession(opts)
    holder: dict[str, Any] = {}

    def factory(kwargs: dict[str, Any]) -> Any:
        holder["llm"] = LLM(**kwargs)
        return holder["llm"].llm_engine

    prompts = session.prompts(opts.dataset, opts.num_prompts)
    session.start(engine_factory=factory)
    llm = holder["llm"]
    modes = ("device", "host")
    tps: dict[str, list[float]] = {m: [] for m in modes}
    ranges: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}
    result: dict[str, Any] = {"scheduler": _vllm_scheduler(llm)}
    try:
        session.warmup(prompts, batch)
        _, _, n_out = WORKLOADS[batch]
        params = SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=0.0, detokenize=False)
        for rep in range(reps):
            for m in modes if rep % 2 == 0 else modes[::-1]:
                llm.collective_rpc("moecap_control", args=("count-on", m))
                llm.reset_prefix_cache()
                first = _steps_recorded(llm)
                t0 = time.perf_counter()
                outs = llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts], params,
                                    use_tqdm=False)  # fmt: skip
                wall = time.perf_counter() - t0
                last = _steps_recorded(llm)
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                tps[m].append(tokens / wall)
                if first is not None and last is not None:
                    ranges[m].append((first, last))
                log(f"vllm modes-{batch} rep {rep} count-on {m}: {tokens / wall:.1f} tok/s")
    finally:
        result["worker_stats"] = session.stop(write=False)
    result.update({f"tok_s_{m}": [round(x, 1) for x in tps[m]] for m in modes})
    result.update({f"median_{m}": median(tps[m]) for m in modes})
    if tps["device"] and tps["host"]:
        result["host_over_device"] = round(
            statistics.median(tps["host"]) / statistics.median(tps["device"]), 4
        )
    result["spans"] = span_stats(Path(opts.out), ranges)
    return result


def vllm_offline(mode: str, batch: int, reps: int, out: Path) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from moecap.collect.engines.vllm.runner import VllmSession

    opts = offline_options("vllm", mode, batch, out)
    session = VllmSession(opts)
    holder: dict[str, Any] = {}

    def factory(kwargs: dict[str, Any]) -> Any:
        holder["kwargs"] = {k: v for k, v in kwargs.items() if k != "model"}
        holder["llm"] = LLM(**kwargs)  # vLLM's own offline entry point, from `run`'s engine kwargs
        return holder["llm"].llm_engine

    prompts = session.prompts(opts.dataset, opts.num_prompts)
    session.start(engine_factory=factory)
    llm = holder["llm"]
    result: dict[str, Any] = {"engine_kwargs": holder["kwargs"], "scheduler": _vllm_scheduler(llm)}
    gen_tps: list[float] = []
    run_tps: list[float] = []
    firsts: list[float] = []
    gen_ranges: list[tuple[int, int]] = []
    try:
        session.warmup(prompts, batch)
        result["timing"] = dict(session.timing)
        _, _, n_out = WORKLOADS[batch]
        params = SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=0.0, detokenize=False)
        for rep in range(reps):
            order = ("generate", "run") if rep % 2 == 0 else ("run", "generate")
            for what in order:
                llm.reset_prefix_cache()
                if what == "generate":
                    first = _steps_recorded(llm) if mode != "off" else None
                    t0 = time.perf_counter()
                    outs = llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts], params,
                                        use_tqdm=False)  # fmt: skip
                    wall = time.perf_counter() - t0
                    last = _steps_recorded(llm) if mode != "off" else None
                    if first is not None and last is not None:
                        gen_ranges.append((first, last))
                    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                    gen_tps.append(tokens / wall)
                else:
                    records, wall, delays = session.run_point(session.prompts(opts.dataset, opts.num_prompts))
                    tokens = sum(len(r.output_ids) for r in records)
                    run_tps.append(tokens / wall)
                    firsts.append(delays["first_token_s"])
                log(
                    f"vllm {mode}-{batch} rep {rep} {what}: {tokens} tokens in {wall:.3f} s = {tokens / wall:.1f} tok/s"
                )
    finally:
        result["worker_stats"] = session.stop(write=False)
    if gen_ranges:
        with contextlib.suppress(Exception):
            result["spans"] = span_stats(Path(opts.out), {"generate": gen_ranges})
    return _offline_result(result, gen_tps, run_tps, firsts)


def _vllm_scheduler(llm: Any) -> dict[str, Any]:
    vc = llm.llm_engine.vllm_config
    sc = vc.scheduler_config
    cc = vc.compilation_config
    return {
        "max_num_seqs": sc.max_num_seqs,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "async_scheduling": getattr(sc, "async_scheduling", None),
        "cudagraph_mode": str(getattr(cc, "cudagraph_mode", None)),
        "enforce_eager": vc.model_config.enforce_eager,
    }


def sglang_offline(mode: str, batch: int, reps: int, out: Path) -> dict[str, Any]:
    from moecap.collect.engines.sglang import fused_count
    from moecap.collect.engines.sglang.runner import SglangSession

    opts = offline_options("sglang", mode, batch, out)
    if mode == "expertsunfused":  # this stage's process only; SGLang's scheduler inherits it
        os.environ[fused_count.ENV_FUSED] = "0"
    session = SglangSession(opts)
    prompts = session.prompts(opts.dataset, opts.num_prompts)
    session.start()
    engine = session.engine
    result: dict[str, Any] = {"engine_kwargs": {k: v for k, v in session.kwargs.items() if k != "model_path"}}
    gen_tps: list[float] = []
    run_tps: list[float] = []
    firsts: list[float] = []
    try:
        session.warmup(prompts, batch)
        result["timing"] = dict(session.timing)
        _, _, n_out = WORKLOADS[batch]
        params = {"max_new_tokens": n_out, "ignore_eos": True, "temperature": 0.0}
        for rep in range(reps):
            order = ("generate", "run") if rep % 2 == 0 else ("run", "generate")
            for what in order:
                engine.flush_cache()
                if what == "generate":  # bench_offline_throughput's call: one generate over every prompt
                    t0 = time.perf_counter()
                    res = engine.generate(input_ids=[list(p.token_ids) for p in prompts],
                                          sampling_params=[dict(params) for _ in prompts])  # fmt: skip
                    wall = time.perf_counter() - t0
                    res = res if isinstance(res, list) else [res]
                    tokens = sum(int(r["meta_info"]["completion_tokens"]) for r in res)
                    gen_tps.append(tokens / wall)
                else:
                    records, wall, delays = session.run_point(session.prompts(opts.dataset, opts.num_prompts))
                    tokens = sum(len(r.output_ids) for r in records)
                    run_tps.append(tokens / wall)
                    firsts.append(delays["first_token_s"])
                log(
                    f"sglang {mode}-{batch} rep {rep} {what}: {tokens} tokens in {wall:.3f} s = {tokens / wall:.1f} tok/s"
                )
    finally:
        result["tracer_stats"] = session.stop(write=False)
    if mode != "off":
        with contextlib.suppress(Exception):
            result["spans"] = span_stats(Path(opts.out), None)  # every decode pass, generate and run
        with contextlib.suppress(Exception):
            from moecap.schemas.reader import read_trace_file

            (steps,) = sorted(Path(opts.out).glob("*.steps.arrow"))[:1]
            result["count_path"] = read_trace_file(steps).run.extra["sglang"].get("count_path")
    return _offline_result(result, gen_tps, run_tps, firsts)


def _offline_result(
    result: dict[str, Any], gen: list[float], run: list[float], firsts: list[float]
) -> dict[str, Any]:
    result.update(
        engine_own_tok_s=[round(x, 1) for x in gen],
        run_tok_s=[round(x, 1) for x in run],
        engine_own_median=median(gen),
        run_median=median(run),
        run_first_token_s=[round(x, 4) for x in firsts],
    )
    if gen and run:
        result["run_over_engine_own"] = round(statistics.median(run) / statistics.median(gen), 4)
    return result


def cli_stage(engine: str, batch: int, out: Path) -> dict[str, Any]:
    """`moecap-collect run` as users run it, once (engine start, warm-up, the workload)."""
    n, n_in, n_out = WORKLOADS[batch]
    engine_args = (
        "--gpu-memory-utilization 0.85 --max-model-len 4096"
        if engine == "vllm"
        else "--mem-fraction-static 0.8 --context-length 4096"
    )
    cmd = [sys.executable, "-c", CLI, "run", "--engine", engine, "--model", str(MODEL), "--random-weights",
           "--dataset", f"synthetic:{n_in}x{n_out}", "--num-prompts", str(n), "--batch-size", str(batch),
           "--ignore-eos", "--dtype", "bfloat16", "--out", str(out / f"cli-{engine}-{batch}"), "--no-progress",
           "--engine-args", engine_args]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    text = p.stdout + p.stderr
    lines = [ln for ln in text.splitlines() if "tok/s" in ln or ln.startswith("moecap-collect:")]
    return {
        "rc": p.returncode,
        "wall_s": round(time.time() - t0, 1),
        "lines": lines[-6:],
        "tail": text[-2000:],
    }


# ---------------------------------------------------------------------------------------------------
# Serve stage
# ---------------------------------------------------------------------------------------------------
def _get(url: str, timeout_s: float = 5.0) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status)
    except Exception:
        return 0


def drive_metrics(folder: Path, run_id: str) -> dict[str, Any]:
    """Mean TTFT (ms), mean TPOT (ms: (finish - first token) / (output tokens - 1), requests with more
    than one token) and output throughput (tokens / (last finish - first arrival)) of one `drive` run:
    the definitions `vllm bench serve` and SGLang's bench_serving use."""
    from moecap.schemas import read_trace_file

    (path,) = sorted(folder.glob(f"{run_id}*.requests.arrow"))
    rows = read_trace_file(path).table.to_pylist()
    ok = sorted(
        (r for r in rows if r["first_token_ns"] is not None and r["finish_ns"] is not None),
        key=lambda r: r["req_id"],
    )
    ttft = [(r["first_token_ns"] - r["arrival_ns"]) / 1e6 for r in ok]
    tpot = [
        (r["finish_ns"] - r["first_token_ns"]) / 1e6 / (r["output_tokens"] - 1)
        for r in ok
        if r["output_tokens"] > 1
    ]
    dur = (max(r["finish_ns"] for r in ok) - min(r["arrival_ns"] for r in ok)) / 1e9 if ok else float("nan")
    return {
        "completed": len(ok),
        "mean_ttft_ms": round(statistics.mean(ttft), 3) if ttft else None,
        "mean_tpot_ms": round(statistics.mean(tpot), 4) if tpot else None,
        "output_throughput": round(sum(r["output_tokens"] for r in ok) / dur, 2) if ok else None,
        "duration_s": round(dur, 3),
        "ttfts_ms": [round(t, 3) for t in ttft],
    }


def serve_seed(batch: int, rep: int, tool: str = "drive") -> int:
    """The seed a tool gets for one serve round. One per (batch, rep): drive's synthetic prompts of a seed
    are one sequence, so with the rep alone as seed its b1 prompts were the first four of its b64 prompts —
    prefix-cache hits on an engine that caches prefixes — where vLLM's random dataset draws anew per size.
    The drive variant gets its own (+`VARIANT_SEED_OFFSET`): with drive's seed, whichever of the two ran
    second found its prompts cached (H100 2026-12-07: 17 ms TTFT instead of 45 ms at b1)."""
    return 100 * batch + rep + (VARIANT_SEED_OFFSET if tool == "drivevar" else 0)


VARIANT_SEED_OFFSET = 50
"""Below the 100 between batch sizes' seeds, above any repeat count used (5)."""


BENCH_PROMPT_FORMAT = {"vllm": "text", "sglang": "ids"}
"""`drive --prompt-format` per engine: the request its own serving benchmark sends. `vllm bench serve
--dataset-name random` sends text (random ids decoded with the tokenizer, which the server tokenizes
again); SGLang's `--dataset-name random-ids` sends token ids."""


VLLM_SERVE_STEP_BUDGET = 8192
"""`--max-num-batched-tokens` of the vLLM serve stage: vLLM 0.26's own default for its API server on a GPU
of 70 GiB or more other than an A100 (`EngineArgs` defaults; the H100's prefill steps reached 7,936
tokens, 2026-12-07), passed so that drive's ladder knows it."""


def drive_argv(
    engine: str,
    url: str,
    tok: Path,
    batch: int,
    seed: int,
    folder: Path,
    run_id: str,
    extra: Sequence[str] = (),
    ladder: str = "off",
) -> list[str]:
    """`moecap-collect drive`'s arguments for one serve-stage round at `batch` (plus `extra` flags). The
    measured rounds climb no residue ladder (`ladder` off: the untimed first round climbed it)."""
    n, n_in, n_out = WORKLOADS[batch]
    return ["drive", "--api-url", url, "--dataset", f"synthetic:{n_in}x{n_out}", "--num-prompts", str(n),
            "--batch-size", str(batch), "--ignore-eos", "--tokenizer", str(tok),
            "--prompt-format", BENCH_PROMPT_FORMAT[engine], "--seed", str(seed), "--out", str(folder),
            "--run-id", run_id, "--no-progress", "--warmup-ladder", ladder, *extra]  # fmt: skip


def run_drive(argv: list[str]) -> dict[str, Any]:
    """Run `moecap-collect drive` with `argv` (from `drive_argv`); its metrics from the trace it wrote."""
    cmd = [sys.executable, "-c", CLI, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return {"error": f"drive exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}"}
    metrics = drive_metrics(Path(argv[argv.index("--out") + 1]), argv[argv.index("--run-id") + 1])
    metrics["ladder"] = next((line for line in p.stderr.splitlines() if "residue ladder" in line), None)
    return metrics


def run_bench(
    engine: str, url: str, served: str, tok: Path, batch: int, seed: int, folder: Path
) -> dict[str, Any]:
    n, n_in, n_out = WORKLOADS[batch]
    result_file = folder / f"bench-{engine}-b{batch}-s{seed}.json"
    if engine == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
               "--base-url", url, "--model", served, "--tokenizer", str(tok), "--dataset-name", "random",
               "--random-input-len", str(n_in), "--random-output-len", str(n_out), "--random-range-ratio", "0",
               "--num-prompts", str(n), "--max-concurrency", str(batch), "--ignore-eos", "--seed", str(seed),
               "--save-result", "--result-dir", str(folder), "--result-filename", result_file.name,
               "--disable-tqdm", "--num-warmups", "0", "--save-detailed", "--temperature", "0"]  # fmt: skip
    else:
        backend = "sglang-oai"
        with contextlib.suppress(Exception):
            from sglang.benchmark.serving import ASYNC_REQUEST_FUNCS

            backend = "sglang-oai" if "sglang-oai" in ASYNC_REQUEST_FUNCS else "sglang"
        cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", backend, "--base-url", url,
               "--model", served, "--tokenizer", str(tok), "--dataset-name", "random-ids",
               "--random-input-len", str(n_in), "--random-output-len", str(n_out), "--random-range-ratio", "1",
               "--num-prompts", str(n), "--max-concurrency", str(batch), "--seed", str(seed),
               "--output-file", str(result_file), "--disable-tqdm", "--output-details",
               "--flush-cache"]  # fmt: skip
        # its warm-up is request 0 itself; without the flush request 0 is a prefix-cache hit, and drive's
        # warm-ups (reordered prompts) leave no such hit: the two would not measure the same workload
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or not result_file.exists():
        return {"error": f"bench exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}"}
    text = result_file.read_text().strip().splitlines()[-1]  # SGLang appends JSON lines
    data = json.loads(text)
    return {
        "completed": data.get("completed"),
        "mean_ttft_ms": data.get("mean_ttft_ms"),
        "mean_tpot_ms": data.get("mean_tpot_ms"),
        "output_throughput": data.get("output_throughput"),
        "duration_s": data.get("duration"),
        "ttfts_ms": [round(1000 * t, 3) for t in data.get("ttfts") or []],  # per request, in request order
    }


def serve_stage(
    engine: str,
    reps: int,
    out: Path,
    port: int,
    batches: tuple[int, ...] = (64, 1),
    drive_variant: Sequence[str] = (),
) -> dict[str, Any]:
    """The serve stage (module docstring). With `drive_variant` (drive flags, e.g. `--no-continuous-usage`)
    a third tool, `drivevar`, runs drive with them in every round, so one server answers whether a drive
    setting moves its figures (`drivevar_over_bench_b<N>`)."""
    from sglang_validate import word_level_tokenizer

    config = json.loads(MODEL.read_text())
    tok = word_level_tokenizer(out / "tokenizer", int(config["vocab_size"]), int(config["eos_token_id"]))
    served = "Qwen/Qwen1.5-MoE-A2.7B"
    folder = out / f"serve-{engine}"
    folder.mkdir(parents=True, exist_ok=True)
    run_id = f"fidelity-{engine}-serve-{int(time.time())}"
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", CLI, "serve", "--engine", engine, "--out", str(folder), "--run-id", run_id,
           "--random-weights", str(MODEL), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if engine == "vllm":
        cmd += ["--tokenizer", str(tok), "--dtype", "bfloat16", "--gpu-memory-utilization", "0.85",
                "--max-model-len", "4096", "--max-num-seqs", "64",
                "--max-num-batched-tokens", str(VLLM_SERVE_STEP_BUDGET)]  # fmt: skip
    else:
        cmd += ["--tokenizer-path", str(tok), "--dtype", "bfloat16", "--mem-fraction-static", "0.8",
                "--context-length", "4096", "--max-running-requests", "64", "--log-level", "warning"]  # fmt: skip
    server_log = out / f"serve-{engine}.log"
    result: dict[str, Any] = {"argv": cmd[3:], "run_id": run_id}
    windows: list[dict[str, Any]] = []  # each measured round's [t0_ns, t1_ns): round_schedules
    t0 = time.time()
    with open(server_log, "w") as logf:
        # MOECAP_RECORD_WARMUP: the tracers record drive's warm-ups too (left out by default), so
        # `ladder_steps` can see how the engine formed the warm round's ladder groups.
        env = {**os.environ, "MOECAP_RECORD_WARMUP": "1"}
        srv = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        while time.time() - t0 < 400:
            if srv.poll() is not None:
                raise RuntimeError(f"serve exited {srv.returncode}: {server_log.read_text()[-2000:]}")
            if _get(f"{url}/v1/models") == 200:
                break
            time.sleep(2)
        else:
            raise RuntimeError(f"server not up in 400 s: {server_log.read_text()[-2000:]}")
        result["server_start_s"] = round(time.time() - t0, 1)
        log(f"serve {engine}: up in {result['server_start_s']} s")
        # One untimed round of each tool (first shapes, connection pools; drive's climbs the residue
        # ladder: SGLang tells its step budget, vLLM's is the one passed above), then interleaved repeats.
        ladder = str(VLLM_SERVE_STEP_BUDGET) if engine == "vllm" else "auto"
        warm_window = {"key": "warm", "t0_ns": time.monotonic_ns()}
        warm = run_drive(drive_argv(engine, url, tok, 64, 999, folder, f"{run_id}-warm", ladder=ladder))
        warm_window["t1_ns"] = time.monotonic_ns()
        result["warm_round"] = {k: warm.get(k) for k in ("ladder", "error")}
        run_bench(engine, url, served, tok, 64, 999, folder)
        rows: dict[str, list[dict[str, Any]]] = {}
        tools = ("drive", "bench", "drivevar") if drive_variant else ("drive", "bench")
        result["drive_variant"] = list(drive_variant)
        for rep in range(reps):
            for batch in batches:
                order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
                for what in order:
                    seed = serve_seed(batch, rep, what)
                    t0_ns = time.monotonic_ns()
                    if what != "bench":
                        extra = drive_variant if what == "drivevar" else ()
                        rid = f"{run_id}-{what}-b{batch}-r{rep}"
                        m = run_drive(drive_argv(engine, url, tok, batch, seed, folder, rid, extra))
                    else:
                        m = run_bench(engine, url, served, tok, batch, seed, folder)
                    # per-request TTFTs go with the round's window (ttft_outside_step), the rest to `raw`
                    windows.append({"key": f"{what}-b{batch}", "t0_ns": t0_ns, "t1_ns": time.monotonic_ns(),
                                    "batch": batch, "ttfts_ms": m.pop("ttfts_ms", None)})  # fmt: skip
                    rows.setdefault(f"{what}-b{batch}", []).append(m)
                    log(f"serve {engine} rep {rep} {what} b{batch}: {m}")
        result["raw"] = rows
        result["medians"] = {
            key: {
                k: median([m[k] for m in ms if m.get(k) is not None])
                for k in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")
            }
            for key, ms in rows.items()
        }
        for batch in batches:
            b = result["medians"].get(f"bench-b{batch}")
            for tool in (t for t in tools if t != "bench"):
                d = result["medians"].get(f"{tool}-b{batch}")
                if d and b:
                    result[f"{tool}_over_bench_b{batch}"] = {
                        k: round(d[k] / b[k], 4) for k in d if d[k] is not None and b[k]
                    }
        time.sleep(2.0)
        srv.send_signal(signal.SIGINT)  # a user's Ctrl-C
        try:
            result["serve_rc"] = srv.wait(timeout=120)
        except subprocess.TimeoutExpired:
            result["serve_rc"] = "timeout"
    finally:
        if srv.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(srv.pid, signal.SIGKILL)
    result["trace_files"] = sorted(p.name for p in folder.glob(f"{run_id}.dp*.arrow"))
    result["windows"] = windows
    try:  # diagnostics: never lose the stage's figures over them
        result["schedule"] = round_schedules(folder, windows)
        result["ladder_steps"] = ladder_formation(folder, warm_window)
        result["ttft_outside_step"] = ttft_outside_step(folder, windows)
        result["b64_ttft_split"] = b64_ttft_split(folder, windows)
    except Exception as exc:
        result["schedule_error"] = f"{type(exc).__name__}: {exc}"
    result["server_log_tail"] = server_log.read_text()[-2000:]
    return result


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    stage = args.stage
    t0 = time.time()
    try:
        if stage == "serve":
            batches = tuple(int(b) for b in args.serve_batches.split(","))
            variant = args.drive_variant.split()
            result = serve_stage(args.engine, args.serve_reps, out, args.port, batches, variant)
        elif stage.startswith("cli-"):
            result = cli_stage(args.engine, int(stage.split("-")[1]), out)
        elif stage.startswith("modes-"):
            result = vllm_count_modes(int(stage.split("-")[1]), args.reps, out)
        else:
            mode, batch = stage.split("-")
            fn = vllm_offline if args.engine == "vllm" else sglang_offline
            result = fn(mode, int(batch), args.reps, out)
        result["ok"] = True
    except Exception as exc:
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
    result.update(engine=args.engine, stage=stage, stage_s=round(time.time() - t0, 1), gpu=_gpu_name())
    path = out / f"fidelity-{args.engine}-{stage}.json"
    path.write_text(json.dumps(result, indent=1, default=str))


def keep_earlier(path: Path) -> None:
    """A stage listed twice (`off-1,experts-1,off-1`: engine-to-engine noise) writes the same file name:
    the earlier result moves to `<name>-<n>.json` (first free n) so that `--summarize` sees both."""
    if not path.exists():
        return
    n = 2
    while path.with_name(f"{path.stem}-{n}.json").exists():
        n += 1
    path.rename(path.with_name(f"{path.stem}-{n}.json"))


def _gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        import torch

        return str(torch.cuda.get_device_name(0))
    return None


def summarize(folders: list[str]) -> str:
    """A Markdown table of every fidelity JSON under `folders` (a stage run twice is two rows; the
    overhead table compares each plugin stage with the median of its batch size's `off-` runs)."""
    found: list[tuple[str, str, str, dict[str, Any]]] = []
    for f in folders:
        for p in sorted(Path(f).rglob("fidelity-*.json")):
            data = json.loads(p.read_text())
            found.append((data.get("engine", "?"), data.get("stage", "?"), p.stem, data))
    found.sort(key=lambda x: (x[0], x[1], x[2]))
    offline = ("off-", "steps-", "experts-", "expertsunfused-", "recorder-")
    lines = ["| engine | stage | GPU | engine's own tok/s (median) | `run` tok/s (median) | run / own | first token s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    offs: dict[tuple[str, str], list[float]] = {}
    span_lines = ["", "| engine | stage | count path | decode steps | GPU span µs | GPU start-to-start µs | host in step µs |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
    for engine, stage, _, d in found:
        if stage.startswith(offline) and d.get("ok"):
            lines.append(f"| {engine} | {stage} | {d.get('gpu')} | {d.get('engine_own_median')} | "
                         f"{d.get('run_median')} | {d.get('run_over_engine_own')} | "
                         f"{median(d.get('run_first_token_s') or [])} |")  # fmt: skip
            spans = (d.get("spans") or {}).get("all") or (d.get("spans") or {}).get("generate")
            if spans and spans.get("decode_steps"):
                span_lines.append(f"| {engine} | {stage} | {d.get('count_path', '')} | {spans['decode_steps']} | "
                                  f"{spans['gpu_span_us']} | {spans['gpu_interval_us']} | {spans['host_in_step_us']} |")  # fmt: skip
            if stage.startswith("off-"):
                offs.setdefault((engine, stage[4:]), []).append(d.get("engine_own_median") or 0)
        elif not d.get("ok"):
            lines.append(
                f"| {engine} | {stage} | {d.get('gpu')} | failed: {str(d.get('error'))[:80]} | | | |"
            )
    off = {k: statistics.median(v) for k, v in offs.items()}
    lines += ["", "| engine | stage | `run` overhead vs engine's own without plugin | engine's own with plugin vs without |",
              "|---|---|---|---|"]  # fmt: skip
    for engine, stage, _, d in found:
        if stage.startswith(offline[1:]) and d.get("ok"):
            base = off.get((engine, stage.split("-")[1]))
            if base:
                run_loss = 100 * (1 - (d.get("run_median") or 0) / base)
                own_loss = 100 * (1 - (d.get("engine_own_median") or 0) / base)
                lines.append(f"| {engine} | {stage} | {run_loss:.2f} % | {own_loss:.2f} % |")
    if len(span_lines) > 3:
        lines += span_lines
    for engine, stage, _, d in found:
        if stage == "serve" and d.get("ok"):
            lines += ["", f"{engine} serve ({d.get('gpu')}): medians {json.dumps(d.get('medians'))}",
                      f"drive / bench: b64 {d.get('drive_over_bench_b64')}, b1 {d.get('drive_over_bench_b1')}"]  # fmt: skip
            if d.get("drive_variant"):
                lines.append(f"drive {' '.join(d['drive_variant'])} / bench: b64 {d.get('drivevar_over_bench_b64')}, "
                             f"b1 {d.get('drivevar_over_bench_b1')}")  # fmt: skip
            outside = {
                k: statistics.median(v) for k, v in sorted((d.get("ttft_outside_step") or {}).items()) if v
            }
            if outside:
                bench = outside.get("bench-b1")
                ratio = {k: round(v / bench, 4) for k, v in outside.items()} if bench else {}
                lines.append(f"b1 TTFT outside the engine's prefill step, ms (median of rounds): "
                             f"{json.dumps({k: round(v, 2) for k, v in sorted(outside.items())})}; / bench {ratio}")  # fmt: skip
            split = {
                k: {
                    part: round(statistics.median(r[part] for r in v), 1) for part in ("engine_ms", "rest_ms")
                }
                for k, v in sorted((d.get("b64_ttft_split") or {}).items())
                if v
            }
            if split:
                lines.append(f"b64 TTFT split, ms (median of rounds; engine: first step to prompt done, rest: the "
                             f"client's send to the first step and the way back): {json.dumps(split)}")  # fmt: skip
            for key, rounds in sorted((d.get("schedule") or {}).items()):
                line = (f"{key}: prefill steps per round {[r['prefill_steps'] for r in rounds]}, first steps' "
                        f"prompt tokens {rounds[0]['first_prefill_tokens'] if rounds else []}, prefill span ms "
                        f"{[r['prefill_span_ms'] for r in rounds]}")  # fmt: skip
                # results before 2026-12-07 have no longest prefill step
                longest = [(s["tokens"], s["ms"]) for r in rounds if (s := r.get("longest_prefill"))]
                lines.append(f"{line}, longest prefill step (tokens, ms) {longest}" if longest else line)
            warm = d.get("warm_round") or {}
            if warm.get("ladder"):
                lines.append(f"warm round: {warm['ladder']}")
            if lad := d.get("ladder_steps"):
                lines.append(f"ladder groups prefilled in one step of their count: {lad['one_step_of_its_count']} "
                             f"of {lad['groups']}; not: {lad['missed_counts']}")  # fmt: skip
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    ap.add_argument("--stages", default="off-64,off-1")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "fidelity-out"))
    ap.add_argument("--reps", type=int, default=7)  # H100 run 1: 2 of 5 b64 repeats were transients
    # 3 were too few: one of three b64 drive repeats on the H100 had a 1 s TTFT outlier
    ap.add_argument("--serve-reps", type=int, default=5)
    ap.add_argument("--serve-batches", default="64,1", help="the serve stage's batch sizes (of 64, 1)")
    ap.add_argument(
        "--drive-variant",
        default="",
        help="drive flags for a third serve-stage tool, given with '=': --drive-variant=--no-continuous-usage",
    )
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--budget-s", type=float, default=570, help="skip stages that would start after this")
    ap.add_argument("--summarize", nargs="+", metavar="DIR")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plugin_path(out)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage:
        child(args)
        return
    t_start = time.time()
    for stage in args.stages.split(","):
        left = args.budget_s - (time.time() - t_start)
        if left < 60:
            log(f"skip {stage}: {left:.0f} s left")
            continue
        log(f"{args.engine} stage {stage} ({left:.0f} s left)")
        keep_earlier(out / f"fidelity-{args.engine}-{stage}.json")
        cmd = [sys.executable, __file__, "--stage", stage, "--engine", args.engine, "--out", str(out),
               "--reps", str(args.reps), "--serve-reps", str(args.serve_reps), "--serve-batches", args.serve_batches,
               f"--drive-variant={args.drive_variant}",
               "--port", str(args.port)]  # fmt: skip
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            proc.wait(timeout=max(30, left - 5))
        except subprocess.TimeoutExpired:
            log(f"{stage} timed out")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        path = out / f"fidelity-{args.engine}-{stage}.json"
        if not path.exists():
            path.write_text(json.dumps({"ok": False, "engine": args.engine, "stage": stage,
                                        "error": "no result (timeout or crash)"}))  # fmt: skip
        data = json.loads(path.read_text())
        brief = {k: v for k, v in data.items() if k not in ("traceback", "worker_stats", "tracer_stats", "raw",
                                                             "server_log_tail", "engine_kwargs")}  # fmt: skip
        log(f"{stage}: {json.dumps(brief, default=str)[:1500]}")
    print(summarize([str(out)]))


if __name__ == "__main__":
    main()
