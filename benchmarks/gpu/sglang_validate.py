"""On a GPU machine with SGLang: validate the SGLang plugin's traces and measure its overhead.

    export PYTHONPATH=/root/sgl            # SGLang 0.5.16 installed with pip --target
    source benchmarks/gpu/env.sh           # this checkout as `moecap` (no pip install), offline
    python benchmarks/gpu/sglang_validate.py --out OUT --trace-dir OUT/trace --budget-s 470

The model is random-weight Qwen1.5-MoE-A2.7B built from a folder holding only its config.json
(`load_format="dummy"`, `skip_tokenizer_init=True`, prompts as token ids), CUDA graphs on (SGLang's default).
moecap is not pip-installed there, so the script writes a `.dist-info` with the `sglang.srt.plugins`
entry point into OUT/_plugin and puts it on PYTHONPATH (with `SGLANG_PLUGINS=moecap`): SGLang's spawned
scheduler processes find the plugin as if it were installed.

Stages, each in its own process group (a crash or hang costs that stage only), most important first;
a stage that would start too late for `--budget-s` is skipped and listed:

1. `experts` — tracing on (steps + expert counts, recorder mode `stat`), trace under --trace-dir: a counts
   workload (several batch sizes, so CUDA-graph decode replays and eager extend passes both occur, and
   prompts longer than --chunked-prefill-size so prefills are chunked), then the throughput repeats.
   Checks every pass: per MoE layer, sum of counts = the ForwardBatch's real tokens x top_k. Reads the
   trace back through `moecap.schemas` (and `moecap-analyze check` where the analyzer imports).
2. `off`     — the same engine without tracing: throughput repeats.
3. `run`     — `moecap-collect run --engine sglang` as users run it (the CLI in a subprocess): the same
   checks on its trace, plus its client tables (every request of `steps` in `requests`), and whether
   the files were closed (end-of-stream marker) before SGLang's shutdown killed the schedulers.
4. `steps`   — tracing with `MOECAP_COUNTS=0` (steps only): throughput repeats.
5. `serve`   — `moecap-collect serve --engine sglang` (SGLang's OpenAI server under moecap's supervisor)
   driven by `moecap-collect drive` over HTTP, then stopped with SIGINT as a user's Ctrl-C: the same
   checks, the client tables joined, and whether the supervisor got the files closed before SGLang's
   shutdown killed the scheduler. The server needs a tokenizer to stream text (SGLang 0.5.16's completions
   stream fails under `--skip-tokenizer-init`); the machine has none, so the stage writes a word-level one
   with one word per id of the model's vocabulary (`word_level_tokenizer`).

Engine start is ~2 min, so each mode runs all its repeats inside one engine; modes are sequential
(three engines at 0.8 of the GPU's memory do not fit together), so the overhead figures compare medians
of separate engines. Results: OUT/summary.json (also printed compactly at the end), OUT/stage_*.json
kept inside summary.json, OUT/stats_<stage>/ (per-scheduler tracer stats), the trace in --trace-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("experts", "run", "off", "steps", "serve")
ESTIMATES_S = {"experts": 200, "run": 150, "off": 150, "steps": 150, "serve": 300}
"""Rough stage times on an H200 (engine start ~120 s + workloads), for the budget."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Workloads (token ids; no tokenizer)
# ---------------------------------------------------------------------------------------------------
def prompts(n: int, length: int, seed: int, vocab: int = 151_000) -> list[list[int]]:
    """`n` prompts of `length` random token ids in [100, vocab), deterministic in `seed`."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def parse_batches(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; a clear error otherwise."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--counts-batches: not a comma-separated list of integers: {text!r}") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--counts-batches: need positive batch sizes, got {text!r}")
    return out


# ---------------------------------------------------------------------------------------------------
# Checks over a trace (pure: rows in, summary out — tested on CPU)
# ---------------------------------------------------------------------------------------------------
def check_rows(
    steps: list[dict[str, Any]], counts: dict[int, list[int]], num_layers: int, num_experts: int, top_k: int
) -> dict[str, Any]:
    """Every non-draft pass: per layer, sum of counts == num_tokens x top_k. Summary with violations,
    phases, step counts, GPU / host span medians (ms)."""
    bad: list[Any] = []
    missing = 0
    for r in steps:
        if r.get("is_draft"):
            continue
        c = counts.get(r["step"])
        if c is None:
            missing += 1
            if len(bad) < 5:
                bad.append([r["step"], "no counts"])
            continue
        want = r["num_tokens"] * top_k
        for layer in range(num_layers):
            total = sum(c[layer * num_experts : (layer + 1) * num_experts])
            if total != want:
                if len(bad) < 5:
                    bad.append([r["step"], r["phase"], layer, total, want])
                else:
                    bad.append(None)
                break
    phases: dict[str, int] = {}
    for r in steps:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    gpu = [(r["gpu_end_ns"] - r["gpu_start_ns"]) / 1e6 for r in steps if r.get("gpu_start_ns") is not None]
    host = [(r["t_end_ns"] - r["t_start_ns"]) / 1e6 for r in steps]
    by_phase_gpu = {}
    for ph in phases:
        v = [
            (r["gpu_end_ns"] - r["gpu_start_ns"]) / 1e6
            for r in steps
            if r["phase"] == ph and r.get("gpu_start_ns") is not None
        ]
        if v:
            by_phase_gpu[ph] = round(statistics.median(v), 3)
    return {
        "steps": len(steps),
        "experts_rows": len(counts),
        "missing_counts": missing,
        "phases": phases,
        "tokens": sum(r["num_tokens"] for r in steps),
        "max_step_tokens": max((r["num_tokens"] for r in steps), default=0),
        "chunked_prefill_steps": sum(
            1
            for r in steps
            if r["phase"] in ("prefill", "mixed") and any(p > 0 for p in r["req_prefix_lens"])
        ),
        "invariant_violations": len(bad),
        "first_violations": [b for b in bad if b is not None][:5],
        "gpu_spans": len(gpu),
        "gpu_span_ms_median": round(statistics.median(gpu), 3) if gpu else None,
        "gpu_span_ms_median_by_phase": by_phase_gpu,
        "host_ms_median": round(statistics.median(host), 3) if host else None,
    }


def check_trace(folder: Path) -> dict[str, Any]:
    """Read the trace back through moecap.schemas and run `check_rows` on it."""
    from moecap.schemas import read_trace_file

    steps_files = sorted(folder.glob("*.steps.arrow"))
    if len(steps_files) != 1:
        return {"error": f"expected one steps file in {folder}: {[p.name for p in folder.iterdir()]}"}
    s = read_trace_file(steps_files[0])
    experts_files = sorted(folder.glob("*.experts.arrow"))
    e = read_trace_file(experts_files[0]) if experts_files else None
    meta = s.run
    rows = s.table.to_pylist()
    counts = {r["step"]: r["counts"] for r in e.table.to_pylist()} if e is not None else {}
    out = check_rows(rows, counts, len(meta.moe.layer_ids), meta.moe.num_experts, meta.moe.top_k)
    out.update(
        files=[p.name for p in sorted(folder.glob("*.arrow"))],
        steps_complete=s.complete,
        experts_complete=e.complete if e is not None else None,
        layers=len(meta.moe.layer_ids),
        experts=meta.moe.num_experts,
        top_k=meta.moe.top_k,
        counts_available=meta.moe.counts_available,
        counts_unavailable_reason=meta.moe.counts_unavailable_reason,
        shared_expert_fused=meta.moe.shared_expert_fused,
        engine=f"{meta.engine.name} {meta.engine.version}",
        sglang_extra=meta.extra.get("sglang"),
        engine_args={
            k: meta.engine.args.get(k)
            for k in (
                "disable_cuda_graph",
                "cuda_graph_max_bs",
                "chunked_prefill_size",
                "disable_overlap_schedule",
                "expert_distribution_recorder_mode",
                "load_format",
            )
        },
    )
    return out


def summarize_throughput(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median tokens/s over repeats (each {'tokens': int, 'wall_s': float})."""
    tps = [r["tokens"] / r["wall_s"] for r in reps if r.get("wall_s")]
    return {
        "reps": [round(x, 1) for x in tps],
        "median_tokens_per_s": round(statistics.median(tps), 1) if tps else None,
    }


def overhead(stages: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Throughput loss (%) of `steps` and `experts` against `off` (positive = slower)."""
    tp = {m: (stages.get(m) or {}).get("median_tokens_per_s") for m in STAGES}
    if not tp.get("off"):
        return {}
    return {m: round(100 * (1 - tp[m] / tp["off"]), 2) for m in ("steps", "experts") if tp.get(m)}


# ---------------------------------------------------------------------------------------------------
# A stage (child process)
# ---------------------------------------------------------------------------------------------------
def model_dir(config: Path, scratch: Path) -> Path:
    """A folder holding only config.json (SGLang builds the architecture from it; dummy weights)."""
    folder = scratch / "model"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, folder / "config.json")
    return folder


def plugin_env(out: Path, mode: str, trace_dir: Path, stats_dir: Path) -> None:
    """Environment of this stage (inherited by SGLang's spawned processes)."""
    from moecap.collect.engines.sglang.adapter import write_plugin_dist_info

    plugin = out / "_plugin"
    write_plugin_dist_info(plugin)
    os.environ["PYTHONPATH"] = f"{plugin}:{os.environ.get('PYTHONPATH', '')}".rstrip(":")
    sys.path.insert(0, str(plugin))
    os.environ["SGLANG_PLUGINS"] = "moecap"
    for k in ("MOECAP_TRACE_DIR", "MOECAP_COUNTS", "MOECAP_STATS_DIR"):
        os.environ.pop(k, None)
    if mode != "off":
        trace_dir.mkdir(parents=True, exist_ok=True)
        os.environ["MOECAP_TRACE_DIR"] = str(trace_dir)
        os.environ["MOECAP_STATS_DIR"] = str(stats_dir)
        os.environ["MOECAP_MODEL_ID"] = "Qwen/Qwen1.5-MoE-A2.7B"
        os.environ["MOECAP_RUN_ID"] = (
            f"{os.environ.get('MOECAP_RUN_PREFIX', '')}sglang-validate-{mode}-{int(time.time())}"
        )
        if mode == "steps":
            os.environ["MOECAP_COUNTS"] = "0"


def generate(engine: Any, ids: list[list[int]], out_tokens: int) -> dict[str, Any]:
    # ignore_eos fixes the output length; SGLang refuses min_new_tokens without a tokenizer (it needs
    # the eos id), and random-weight models have none.
    params = {"max_new_tokens": out_tokens, "ignore_eos": True, "temperature": 0.0}
    t0 = time.perf_counter()
    res = engine.generate(input_ids=ids, sampling_params=[dict(params) for _ in ids])
    wall = time.perf_counter() - t0
    res = res if isinstance(res, list) else [res]
    tokens = 0
    for r in res:
        meta = r.get("meta_info", {}) if isinstance(r, dict) else {}
        n = meta.get("completion_tokens")
        tokens += int(n) if n is not None else len(r.get("output_ids", []) or [])
    return {"prompts": len(ids), "tokens": tokens, "wall_s": round(wall, 3)}


CLI = "import sys; sys.argv = ['moecap-collect', *sys.argv[1:]]; from moecap.collect.cli import main; main()"


def run_stage(args: argparse.Namespace) -> dict[str, Any]:
    """`moecap-collect run --engine sglang` through the real command line, then the trace checks."""
    out = Path(args.out)
    run_dir = out / "run"
    plugin_env(out, "off", run_dir, out / "stats_run")  # the entry point findable; `run` sets MOECAP_*
    cmd = [sys.executable, "-c", CLI, "run", "--engine", "sglang", "--model", args.model, "--random-weights",
           "--dataset", f"synthetic:{args.tp_in}x{args.tp_out}", "--num-prompts", str(args.run_prompts),
           "--batch-size", str(args.run_batch), "--ignore-eos", "--out", str(run_dir), "--no-progress",
           "--max-batch-tokens", str(args.chunked_prefill_size),
           "--engine-args", f"--mem-fraction-static {args.mem_fraction} --context-length {args.context_length}"]  # fmt: skip
    log(f"run: {' '.join(cmd[3:])}")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    result: dict[str, Any] = {
        "mode": "run",
        "argv": cmd[3:],
        "rc": p.returncode,
        "run_s": round(time.time() - t0, 1),
        "output_tail": (p.stdout + p.stderr)[-4000:],
    }
    if p.returncode != 0:
        raise RuntimeError(f"moecap-collect run exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    result["check"] = check_trace(run_dir)
    result.update(client_join(run_dir))
    return result


def client_join(folder: Path) -> dict[str, Any]:
    """Do the client's `requests` and the engine's `steps` name the same requests?"""
    from moecap.schemas import read_trace_file

    req_files = sorted(folder.glob("*.requests.arrow"))
    steps_files = sorted(folder.glob("*.steps.arrow"))
    if not (req_files and steps_files):
        return {"error": f"no requests or steps file in {folder}"}
    req = read_trace_file(req_files[0])
    ids = set(req.table.column("req_id").to_pylist())
    seen = {i for row in read_trace_file(steps_files[0]).table.column("req_ids").to_pylist() for i in row}
    return {
        "requests": len(ids),
        "requests_complete": req.complete,
        "step_req_ids_not_in_requests": len(seen - ids),
        "requests_never_in_steps": len(ids - seen),
    }


def word_level_tokenizer(folder: Path, vocab_size: int, eos_id: int) -> Path:
    """A fast tokenizer with one word per id ('t<id>'; id 0 is '<unk>', `eos_id` '<|endoftext|>'), so
    every id a random-weight model emits decodes to text. Written with the `tokenizers` on the machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    names = {0: "<unk>", eos_id: "<|endoftext|>"}
    for i, name in names.items():
        vocab.pop(f"t{i}")
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "eos_token": "<|endoftext|>",
                "model_max_length": 32768,
            }
        )
    )
    return folder


def _get(url: str, timeout_s: float = 5.0) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status
    except Exception:
        return 0


def serve_stage(args: argparse.Namespace) -> dict[str, Any]:
    """`moecap-collect serve --engine sglang` + `moecap-collect drive`, stopped with SIGINT."""
    out = Path(args.out)
    serve_dir = out / "serve"
    plugin_env(out, "off", serve_dir, out / "stats_serve")  # the entry point findable; serve sets MOECAP_*
    config = json.loads(Path(args.model).read_text())
    tok = word_level_tokenizer(out / "tokenizer", int(config["vocab_size"]), int(config["eos_token_id"]))
    run_id = f"sglang-serve-{int(time.time())}"
    port = args.serve_port
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", CLI, "serve", "--engine", "sglang", "--out", str(serve_dir), "--run-id", run_id,
           "--random-weights", args.model, "--tokenizer-path", str(tok), "--host", "127.0.0.1",
           "--port", str(port), "--mem-fraction-static", str(args.mem_fraction),
           "--context-length", str(args.context_length), "--chunked-prefill-size", str(args.chunked_prefill_size),
           "--random-seed", "0", "--log-level", "warning"]  # fmt: skip
    log(f"serve: {' '.join(cmd[3:])}")
    server_log = out / "serve_server.log"
    result: dict[str, Any] = {"mode": "serve", "argv": cmd[3:], "run_id": run_id}
    t0 = time.time()
    with open(server_log, "w") as logf:
        srv = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    server_pid = None
    try:
        while time.time() - t0 < args.serve_start_timeout_s:
            if srv.poll() is not None:
                raise RuntimeError(f"serve exited {srv.returncode}: {server_log.read_text()[-2000:]}")
            if _get(f"{url}/v1/models") == 200:
                break
            time.sleep(2)
        else:
            raise RuntimeError(
                f"server not up in {args.serve_start_timeout_s} s: {server_log.read_text()[-2000:]}"
            )
        result["server_start_s"] = round(time.time() - t0, 1)
        text = server_log.read_text()
        if "(server pid " in text:
            server_pid = int(text.split("(server pid ", 1)[1].split(")", 1)[0])
        log(f"serve: up in {result['server_start_s']} s (server pid {server_pid})")
        drive = [sys.executable, "-c", CLI, "drive", "--api-url", url, "--dataset",
                 f"synthetic:{args.tp_in}x{args.tp_out}", "--num-prompts", str(args.run_prompts),
                 "--batch-size", str(args.run_batch), "--ignore-eos", "--out", str(serve_dir), "--run-id", run_id,
                 "--no-progress"]  # fmt: skip
        t1 = time.time()
        p = subprocess.run(drive, capture_output=True, text=True, timeout=300)
        result.update(drive_rc=p.returncode, drive_s=round(time.time() - t1, 1),
                      drive_tail=(p.stdout + p.stderr)[-3000:])  # fmt: skip
        log(f"serve: drive rc {p.returncode} in {result['drive_s']} s")
        time.sleep(2.0)  # the idle flusher writes the last passes
        t2 = time.time()
        srv.send_signal(signal.SIGINT)  # a user's Ctrl-C
        try:
            result["serve_rc"] = srv.wait(timeout=120)
        except subprocess.TimeoutExpired:
            result["serve_rc"] = "timeout"
        result["stop_s"] = round(time.time() - t2, 1)
    finally:
        if srv.poll() is None:
            srv.kill()
        if server_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server_pid, signal.SIGKILL)  # the server runs in its own session
    text = server_log.read_text()
    result["server_log_tail"] = text[-3000:]
    result["supervisor_lines"] = [ln for ln in text.splitlines() if ln.startswith("moecap-collect:")][:20]
    result["check"] = check_trace(serve_dir)
    result.update(client_join(serve_dir))
    return result


def stage(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    mode = args.stage
    if mode == "run":
        return run_stage(args)
    if mode == "serve":
        return serve_stage(args)
    trace_dir = Path(args.trace_dir) if mode == "experts" else out / f"trace_{mode}"
    stats_dir = out / f"stats_{mode}"
    plugin_env(out, mode, trace_dir, stats_dir)
    scratch = Path(tempfile.mkdtemp(prefix="sgl-validate-"))
    folder = model_dir(Path(args.model), scratch)
    import sglang

    kwargs: dict[str, Any] = dict(
        model_path=str(folder),
        load_format="dummy",
        skip_tokenizer_init=True,
        mem_fraction_static=args.mem_fraction,
        chunked_prefill_size=args.chunked_prefill_size,
        context_length=args.context_length,
        random_seed=0,
        log_level="error",
    )
    if mode == "experts":
        kwargs.update(expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=1)
    result: dict[str, Any] = {
        "mode": mode,
        "sglang": getattr(sglang, "__version__", "?"),
        "engine_kwargs": kwargs,
    }
    t0 = time.time()
    log(f"{mode}: starting sglang.Engine {result['sglang']}")
    engine = sglang.Engine(**kwargs)
    result["engine_start_s"] = round(time.time() - t0, 1)
    log(f"{mode}: engine up in {result['engine_start_s']} s")
    try:
        if mode == "experts":
            counts_runs = []
            for i, b in enumerate(parse_batches(args.counts_batches)):
                counts_runs.append(
                    generate(engine, prompts(b, args.counts_in, seed=100 + i), args.counts_out)
                )
                log(f"{mode}: counts workload batch {b}: {counts_runs[-1]}")
            result["counts_workload"] = counts_runs
        generate(engine, prompts(8, args.tp_in, seed=7), 8)  # warm-up
        reps = []
        for rep in range(args.reps):
            reps.append(generate(engine, prompts(args.tp_prompts, args.tp_in, seed=1000 + rep), args.tp_out))
            log(f"{mode}: rep {rep}: {reps[-1]} -> {reps[-1]['tokens'] / reps[-1]['wall_s']:.0f} tok/s")
        result["throughput"] = reps
        result.update(summarize_throughput(reps))
        time.sleep(2.5)  # the tracer's idle flusher writes finished passes and stats within ~1 s
        if mode != "off":
            from moecap.collect.engines.sglang.adapter import request_close

            _, result["close_problems"] = request_close(stats_dir, 15.0)
    finally:
        try:
            engine.shutdown()
        except Exception as exc:  # pragma: no cover - GPU only
            result["shutdown_error"] = f"{type(exc).__name__}: {exc}"
    stats = []
    for p in sorted(stats_dir.glob("*.json")):
        with contextlib.suppress(ValueError):
            stats.append(json.loads(p.read_text()))
    result["tracer_stats"] = stats
    if mode == "experts":
        result["check"] = check_trace(trace_dir)
        result["analyze_check"] = analyze_check(trace_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def analyze_check(trace_dir: Path) -> dict[str, Any]:
    """`moecap-analyze check` on the trace, where the analyzer's dependencies import (optional)."""
    cmd = [sys.executable, "-c", "from moecap.analyze.cli import main; main()", "check", str(trace_dir)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"rc": p.returncode, "output": (p.stdout + p.stderr)[-3000:]}


def child(args: argparse.Namespace) -> None:
    try:
        result = stage(args)
        result["ok"] = True
    except BaseException as exc:
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-6000:],
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--trace-dir", default=None, help="trace of the experts stage (default OUT/trace)")
    ap.add_argument("--model", default=str(ROOT / "analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json"))
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--budget-s", type=float, default=470, help="skip stages that would end after this")
    ap.add_argument("--mem-fraction", type=float, default=0.8)
    ap.add_argument("--chunked-prefill-size", type=int, default=1024)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--counts-batches", default="1,3,4,16,27,48")  # 3, 27: padded decode graphs
    ap.add_argument("--counts-in", type=int, default=200)
    ap.add_argument("--counts-out", type=int, default=32)
    ap.add_argument("--tp-prompts", type=int, default=64)
    ap.add_argument("--tp-in", type=int, default=200)
    ap.add_argument("--tp-out", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--run-prompts", type=int, default=64, help="run stage: requests")
    ap.add_argument("--run-batch", type=int, default=16, help="run stage: requests in flight")
    ap.add_argument("--serve-port", type=int, default=30111, help="serve stage: the server's port")
    ap.add_argument("--serve-start-timeout-s", type=float, default=360)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.trace_dir is None:
        args.trace_dir = str(Path(args.out) / "trace")
    parse_batches(args.counts_batches)
    bad = [s for s in args.stages.split(",") if s and s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    return args


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    # SGLang's schedulers are the stage's grandchildren: end the whole process group, or they keep the GPU.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


def compact(summary: dict[str, Any]) -> dict[str, Any]:
    """The one-screen summary printed at the end."""
    st = summary.get("stages", {})
    ex = (st.get("experts") or {}).get("check") or {}
    return {
        "ok": {k: v.get("ok") for k, v in st.items()},
        "errors": {k: v.get("error") for k, v in st.items() if not v.get("ok")},
        "skipped": summary.get("skipped"),
        "invariant_violations": ex.get("invariant_violations"),
        "run_stage": {
            k: ((st.get("run") or {}).get("check") or {}).get(k)
            for k in ("invariant_violations", "steps", "phases", "steps_complete", "experts_complete")
        }
        | {k: (st.get("run") or {}).get(k) for k in ("requests", "step_req_ids_not_in_requests", "run_s")},
        "serve_stage": {
            k: ((st.get("serve") or {}).get("check") or {}).get(k)
            for k in ("invariant_violations", "steps", "phases", "steps_complete", "experts_complete")
        }
        | {
            k: (st.get("serve") or {}).get(k)
            for k in ("requests", "step_req_ids_not_in_requests", "drive_rc", "serve_rc", "server_start_s")
        },
        "experts_files_complete": [ex.get("steps_complete"), ex.get("experts_complete")],
        "first_violations": ex.get("first_violations"),
        "steps": ex.get("steps"),
        "phases": ex.get("phases"),
        "chunked_prefill_steps": ex.get("chunked_prefill_steps"),
        "gpu_span_ms_median": ex.get("gpu_span_ms_median"),
        "graph_eager_passes": [
            (s.get("graph_passes"), s.get("eager_passes"))
            for s in (st.get("experts") or {}).get("tracer_stats", [])
        ],
        "tokens_per_s": {k: v.get("median_tokens_per_s") for k, v in st.items()},
        "overhead_pct": summary.get("overhead_pct"),
        "engine_start_s": {k: v.get("engine_start_s") for k, v in st.items()},
        "total_s": summary.get("total_s"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage:
        child(args)
        return
    t_start = time.time()
    summary: dict[str, Any] = {"stages": {}, "skipped": []}
    for name in args.stages.split(","):
        left = args.budget_s - (time.time() - t_start)
        if left < ESTIMATES_S[name] * 0.7:
            summary["skipped"].append(name)
            log(f"skip {name}: {left:.0f} s left")
            continue
        log(f"stage {name} ({left:.0f} s left)")
        cmd = [
            sys.executable,
            __file__,
            "--stage",
            name,
            *_without_stages(sys.argv[1:] if argv is None else argv),
        ]
        t0 = time.time()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            proc.wait(timeout=max(60, left))
        except subprocess.TimeoutExpired:
            log(f"{name} timed out")
        _kill_group(proc)
        path = Path(args.out, f"stage_{name}.json")
        result = (
            json.loads(path.read_text())
            if path.exists()
            else {"ok": False, "error": "no result (timeout or crash)"}
        )
        result["stage_s"] = round(time.time() - t0, 1)
        summary["stages"][name] = result
        brief = {k: v for k, v in result.items() if k not in ("traceback", "tracer_stats", "engine_kwargs")}
        log(f"{name}: {json.dumps(brief, default=str)[:1500]}")
        path.unlink(missing_ok=True)
    summary["overhead_pct"] = overhead({k: v for k, v in summary["stages"].items() if v.get("ok")})
    summary["total_s"] = round(time.time() - t_start, 1)
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(compact(summary), default=str), flush=True)


if __name__ == "__main__":
    main()
