"""`moecap-collect drive` vs `vllm bench serve` on this host, no GPU: both against one emulated engine.

The server (`--serve PORT`, needs aiohttp) is a model of a continuous-batching engine, not an engine: one
scheduler loop (vLLM V1-like: running decodes first, then waiting prompts first come first served in
chunks, at most 2,048 tokens a step; a step takes 12 ms + 12 µs per token, so a 64-request decode step
≈ 12.8 ms and a full prefill step ≈ 36.6 ms, near the H100's 13 / 40 ms for Qwen1.5-MoE) that streams
OpenAI completions chunks. It stamps each request's arrival (the handler's entry) and first token, so
per round it reports what the SERVER saw: the spread of the burst's arrivals and its own mean TTFT.
Absolute figures mean nothing; the two clients' difference on the same server does (issue #20).

    python benchmarks/drive_vs_bench_cpu.py --bench-python ~/.cache/moecap/vllm-venv-*/bin/python \\
        --bench-path ~/.cache/moecap/vllm-venv-*/vllm-0.26.0 [--repeats 6] [--pin]
    python benchmarks/drive_vs_bench_cpu.py --bench sglang --bench-python ~/.cache/moecap/sglang-venv-*/bin/python

`--bench sglang`: SGLang's `python -m sglang.benchmark.serving` (OpenAI completions backend,
`--dataset-name random-ids`, as the GPU fidelity script runs it; drive then sends token ids too) in place
of `vllm bench serve`. It imports `datasets`, which the SGLang contract venv leaves out: install it
beside, not into, that venv (`pip install --target DIR datasets`, then `--bench-path DIR`). The emulated
server answers no engine-info endpoint, so drive keeps its connections alive here unless told
(`--drive-args=--no-connection-reuse`, what it does by default against a real SGLang server).

`--bench-python`: a Python where `vllm.benchmarks.serve` imports and aiohttp is installed (the vLLM
contract venv of `.ci/vllm-venv.sh`; `--bench-path` puts its vLLM 0.26.0 folder on PYTHONPATH); it also
runs the server. `--pin` puts the server on CPU 0 and the clients on CPU 1. Rounds: 64 prompts of 256
words (the word-level tokenizer written here: one word per token) × 128 output tokens, 64 at once, the
tools interleaved, each with one warm-up/test request; `--batch 1`: 4 prompts × 256 out, one at a time
(the GPU fidelity script's b1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE_S, PER_TOKEN_S, TOKEN_BUDGET = 0.012, 12e-6, 2048


# --------------------------------------------------------------------------------------------- server
def serve(port: int) -> None:
    from aiohttp import web

    waiting: list = []
    running: list = []
    seen: list = []
    wake = asyncio.Event()

    class Req:
        def __init__(self, n_in: int, n_out: int) -> None:
            self.n_in, self.n_out, self.done_in, self.out = n_in, n_out, 0, 0
            self.q: asyncio.Queue = asyncio.Queue()
            self.t_arr, self.t_first = time.monotonic(), None

    async def engine() -> None:
        while True:
            if not waiting and not running:
                wake.clear()
                await wake.wait()
            budget, batch = TOKEN_BUDGET, []
            for r in running:
                batch.append((r, 1))
                budget -= 1
            for r in list(waiting):
                if budget <= 0:
                    break
                take = min(budget, r.n_in - r.done_in)
                batch.append((r, take))
                budget -= take
            await asyncio.sleep(BASE_S + PER_TOKEN_S * sum(t for _, t in batch))
            now = time.monotonic()
            for r, t in batch:
                if r in waiting:
                    r.done_in += t
                    if r.done_in == r.n_in:
                        waiting.remove(r)
                        running.append(r)
                        r.out, r.t_first = 1, now
                        r.q.put_nowait(1)
                else:
                    r.out += 1
                    r.q.put_nowait(1)
                if r.out >= r.n_out and r in running:
                    running.remove(r)
                    r.q.put_nowait(None)

    def frame(doc: dict) -> bytes:
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        r = Req(
            len(prompt) if isinstance(prompt, list) else len(prompt.split()),
            int(body.get("max_tokens") or 16),
        )
        seen.append(r)
        waiting.append(r)
        wake.set()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = 0
        while (await r.q.get()) is not None:
            n += 1
            choice = {
                "index": 0,
                "text": " t1",  # a word of the tokenizer written here (benchmarks re-tokenize outputs)
                "logprobs": None,
                "finish_reason": "length" if n == r.n_out else None,
            }
            doc = {
                "id": "cmpl-emu",
                "object": "text_completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [choice],
            }
            if (body.get("stream_options") or {}).get("continuous_usage_stats"):
                doc["usage"] = {"prompt_tokens": r.n_in, "completion_tokens": n, "total_tokens": r.n_in + n}
            await resp.write(frame(doc))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": r.n_in, "completion_tokens": n, "total_tokens": r.n_in + n}
            await resp.write(
                frame(
                    {
                        "id": "cmpl-emu",
                        "object": "text_completion",
                        "created": 0,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "emu", "object": "model"}]})

    async def server_info(_: web.Request) -> web.Response:  # SGLang's bench asks; nothing to tell
        return web.json_response({})

    async def stats(_: web.Request) -> web.Response:
        done = [{"t_arr": r.t_arr, "ttft": r.t_first - r.t_arr} for r in seen if r.t_first is not None]
        seen.clear()
        return web.json_response(done)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        for path in ("/get_server_info", "/server_info"):
            app.router.add_get(path, server_info)
        app.router.add_get("/_stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        asyncio.get_running_loop().create_task(engine())
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ comparison
def server_view(url: str, n: int) -> tuple[float, float]:
    """(arrival spread ms, the server's mean TTFT ms) of the last `n` requests it finished."""
    with urllib.request.urlopen(url + "/_stats") as resp:
        done = sorted(json.loads(resp.read()), key=lambda x: x["t_arr"])[-n:]
    arrivals = [x["t_arr"] for x in done]
    return (max(arrivals) - min(arrivals)) * 1e3, statistics.mean(x["ttft"] for x in done) * 1e3


BENCH_WITH_GC_LOG = """
import argparse, gc, json, sys, time
import vllm.benchmarks.serve as serve
log, started = [], {}
def _on_gc(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        log.append((started.get("t", 0.0), time.perf_counter(), info["generation"]))
gc.callbacks.append(_on_gc)
_benchmark = serve.benchmark
async def _timed(*a, **k):
    t0 = time.perf_counter()
    try:
        return await _benchmark(*a, **k)
    finally:
        t1 = time.perf_counter()
        inside = [(round((s - t0) * 1e3, 1), round((e - s) * 1e3, 1), g) for s, e, g in log if t0 <= s < t1]
        print("MOECAP_GC " + json.dumps(inside), file=sys.stderr, flush=True)
serve.benchmark = _timed
p = argparse.ArgumentParser(); serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))
"""
"""`vllm bench serve` as its CLI runs it, with a log of the garbage collections its process makes while
`benchmark()` (the measured run) is running: (start ms after the run began, duration ms, generation) per
collection, printed to stderr. drive freezes its older objects for its measured requests (docs/decisions.md);
bench does not, and a full collection in the burst holds every request not yet sent."""


def bench_collections(stderr: str) -> str:
    """The collections `BENCH_WITH_GC_LOG` printed, summed: 'N (gen 2: K, X ms; first within 1 s: …)'."""
    line = next((x for x in stderr.splitlines() if x.startswith("MOECAP_GC ")), None)
    if line is None:
        return "not logged"
    log = json.loads(line.removeprefix("MOECAP_GC "))
    full = [c for c in log if c[2] == 2]
    burst = [c for c in log if c[0] < 1000]
    return (f"{len(log)} ({sum(c[1] for c in log):.1f} ms), gen 2: {len(full)} ({sum(c[1] for c in full):.1f} ms); "
            f"in its first second: {len(burst)} ({sum(c[1] for c in burst):.1f} ms, "
            f"longest {max((c[1] for c in burst), default=0):.1f} ms)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--bench-python", help="a Python with vllm.benchmarks.serve and aiohttp")
    ap.add_argument(
        "--bench-path", default="", help="PYTHONPATH for it (the contract venv's vllm-0.26.0 folder)"
    )
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--port", type=int, default=8231)
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, clients on CPU 1")
    ap.add_argument("--batch", type=int, choices=(1, 64), default=64)
    ap.add_argument("--drive-args", default="", help="more drive flags, e.g. --no-continuous-usage")
    ap.add_argument("--bench-args", default="", help="more bench flags, e.g. --ready-check-timeout-sec 60")
    ap.add_argument("--bench", choices=("vllm", "sglang"), default="vllm", help="whose serving benchmark")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if not args.bench_python:
        ap.error("--bench-python is required")
    sys.path.insert(0, str(HERE / "gpu"))
    from engine_fidelity import drive_metrics
    from sglang_validate import word_level_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="drive-vs-bench-")
    work = Path(tmp.name)
    tok = word_level_tokenizer(work / "tokenizer", 32000, 0)
    env = {**os.environ, "PYTHONPATH": args.bench_path}
    pin = (lambda cpu: ["taskset", "-c", str(cpu)]) if args.pin else (lambda cpu: [])
    url = f"http://127.0.0.1:{args.port}"
    n, n_out = (64, 128) if args.batch == 64 else (4, 256)
    prompt_format = "ids" if args.bench == "sglang" else "text"  # what each benchmark sends
    bench_code = BENCH_WITH_GC_LOG
    srv = subprocess.Popen([*pin(0), args.bench_python, __file__, "--serve", str(args.port)], env=env,
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        rows: dict[str, list[tuple[float, float, float]]] = {"drive": [], "bench": []}
        for rep in range(args.repeats):
            for tool in ("drive", "bench") if rep % 2 == 0 else ("bench", "drive"):
                seed = 6400 + rep
                if tool == "drive":
                    run_id = f"d{rep}"
                    subprocess.run([*pin(1), sys.executable, "-c", "from moecap.collect.cli import main; main()", "drive",
                                    "--api-url", url, "--dataset", f"synthetic:256x{n_out}", "--num-prompts", str(n),
                                    "--batch-size", str(args.batch), "--ignore-eos", "--tokenizer", str(tok), "--prompt-format",
                                    prompt_format, "--seed", str(seed), "--out", str(work), "--run-id", run_id, "--no-progress",
                                    *args.drive_args.split()],
                                   check=True, capture_output=True)  # fmt: skip
                    ttft = drive_metrics(work, run_id)["mean_ttft_ms"]
                elif args.bench == "sglang":
                    out = work / f"sglang-{rep}.jsonl"
                    subprocess.run([*pin(1), args.bench_python, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai",
                                    "--base-url", url, "--model", "emu", "--tokenizer", str(tok), "--dataset-name", "random-ids",
                                    "--random-input-len", "256", "--random-output-len", str(n_out), "--random-range-ratio", "1",
                                    "--num-prompts", str(n), "--max-concurrency", str(args.batch), "--seed", str(seed),
                                    "--output-file", str(out), "--disable-tqdm", *args.bench_args.split()],
                                   check=True, capture_output=True, env=env)  # fmt: skip
                    ttft = json.loads(out.read_text().strip().splitlines()[-1])["mean_ttft_ms"]
                else:
                    p = subprocess.run([*pin(1), args.bench_python, "-c", bench_code, "--backend", "vllm", "--base-url", url,
                                    "--model", "emu", "--tokenizer", str(tok), "--dataset-name", "random",
                                    "--random-input-len", "256", "--random-output-len", str(n_out), "--random-range-ratio", "0",
                                    "--num-prompts", str(n), "--max-concurrency", str(args.batch), "--ignore-eos", "--seed", str(seed),
                                    "--save-result", "--result-dir", str(work), "--result-filename", "bench.json",
                                    "--disable-tqdm", "--num-warmups", "0", *args.bench_args.split()],
                                   check=True, capture_output=True, env=env)  # fmt: skip
                    ttft = json.loads((work / "bench.json").read_text())["mean_ttft_ms"]
                    gcs = bench_collections(p.stderr.decode(errors="replace"))
                    print(f"rep {rep} bench: garbage collections inside its measured run: {gcs}", flush=True)
                spread, server_ttft = server_view(url, n)
                rows[tool].append((ttft, server_ttft, spread))
                print(f"rep {rep} {tool}: client TTFT {ttft:.1f} ms, server TTFT {server_ttft:.1f} ms, "
                      f"arrival spread {spread:.1f} ms", flush=True)  # fmt: skip
    finally:
        srv.kill()
        tmp.cleanup()
    print("\n| client | TTFT ms (its own, median) | the server's TTFT ms | arrival spread ms |")
    print("|---|---|---|---|")
    for tool, vals in rows.items():
        med = [statistics.median(v[i] for v in vals) for i in range(3)]
        print(f"| {tool} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} |")
    d, b = (statistics.median(v[0] for v in rows[t]) for t in ("drive", "bench"))
    print(f"\ndrive / bench TTFT: {d / b:.3f}")


if __name__ == "__main__":
    main()
