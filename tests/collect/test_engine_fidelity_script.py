"""The non-GPU parts of benchmarks/gpu/engine_fidelity.py (run once in a scarce GPU lease: they must be right
before it): the serving metrics computed from `drive`'s requests table by the serving benchmarks'
definitions, the entry points it writes for a checkout that is not pip-installed, and its summary table."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from moecap.schemas import EngineInfo, ModelInfo, RunMetadata, TraceWriter, read_trace_file, trace_file_name

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("engine_fidelity", ROOT / "benchmarks/gpu/engine_fidelity.py")
assert _spec is not None and _spec.loader is not None
ef = importlib.util.module_from_spec(_spec)
sys.modules["engine_fidelity"] = ef
_spec.loader.exec_module(ef)

MS = 1_000_000


def _requests(folder: Path, run_id: str, rows: list[tuple[int, int | None, int | None, int]]) -> None:
    meta = RunMetadata(run_id=run_id, engine=EngineInfo(name="vllm"), model=ModelInfo(id="m"))
    w = TraceWriter(folder / trace_file_name(meta, "requests"), "requests", meta)
    for i, (arrival, first, finish, out) in enumerate(rows):
        w.write({"req_id": f"r{i}", "sample_id": str(i), "arrival_ns": arrival, "first_token_ns": first,
                 "finish_ns": finish, "prompt_tokens": 256, "output_tokens": out, "retries": 0})  # fmt: skip
    w.close()


def test_drive_metrics_use_the_serving_benchmarks_definitions(tmp_path):
    # Hand-derived: TTFT 10, 30 and 30 ms; TPOT (110-10)/(5-1) = 25 and (230-30)/(9-1) = 25 ms;
    # the 1-token request has a TTFT but no TPOT; throughput = (5 + 9 + 1) tokens / (250 - 0) ms = 60 tok/s.
    # A failed request (no first token) is left out.
    _requests(tmp_path, "run-a", [(0, 10 * MS, 110 * MS, 5), (0, 30 * MS, 230 * MS, 9),
                                  (200 * MS, 230 * MS, 250 * MS, 1), (5 * MS, None, None, 0)])  # fmt: skip
    m = ef.drive_metrics(tmp_path, "run-a")
    assert m["completed"] == 3
    assert m["mean_ttft_ms"] == pytest.approx((10 + 30 + 30) / 3, abs=1e-3)  # rounded to µs
    assert m["mean_tpot_ms"] == pytest.approx(25.0)
    assert m["output_throughput"] == pytest.approx(15 / 0.25)
    assert m["duration_s"] == pytest.approx(0.25)


def test_plugin_entry_points_are_found_without_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    folder = ef.plugin_path(tmp_path)
    assert str(folder) in __import__("os").environ["PYTHONPATH"].split(":")
    found = {
        (ep.group, ep.value)
        for dist in importlib.metadata.distributions(path=[str(folder)])
        for ep in dist.entry_points
        if ep.name == "moecap"
    }
    assert ("vllm.general_plugins", "moecap.collect.engines.vllm:register") in found
    assert ("sglang.srt.plugins", "moecap.collect.engines.sglang:register") in found


def test_summary_table_rows_ratios_and_overheads(tmp_path):
    def put(stage: str, own: float, run: float) -> None:
        data = {"ok": True, "engine": "vllm", "stage": stage, "gpu": "H100", "engine_own_median": own,
                "run_median": run, "run_over_engine_own": round(run / own, 4), "run_first_token_s": [0.1]}  # fmt: skip
        (tmp_path / f"fidelity-vllm-{stage}.json").write_text(json.dumps(data))

    put("off-64", 4884.0, 4800.0)
    put("experts-64", 4850.0, 4737.6)
    (tmp_path / "fidelity-vllm-steps-1.json").write_text(
        json.dumps(
            {"ok": False, "engine": "vllm", "stage": "steps-1", "error": "no result (timeout or crash)"}
        )
    )
    table = ef.summarize([str(tmp_path)])
    assert "| vllm | off-64 | H100 | 4884.0 | 4800.0 | 0.9828 | 0.1 |" in table
    # run with experts against the engine's own baseline: 1 - 4737.6/4884 = 3.00 %; LLM.generate with the
    # plugin against without: 1 - 4850/4884 = 0.70 %.
    assert "| vllm | experts-64 | 3.00 % | 0.70 % |" in table
    assert "| vllm | steps-1 | None | failed: no result (timeout or crash) | | | |" in table


def test_summary_keeps_repeated_stages_and_compares_with_the_median_baseline(tmp_path):
    """A stage run twice on one lease (a second engine) is two rows, and each plugin stage is compared with
    the median of that batch size's `off-` runs; the recorder control stage is listed and compared too."""

    def put(name: str, stage: str, own: float) -> None:
        data = {"ok": True, "engine": "sglang", "stage": stage, "gpu": "H100", "engine_own_median": own,
                "run_median": own, "run_over_engine_own": 1.0, "run_first_token_s": [0.02]}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    put("fidelity-sglang-off-1", "off-1", 300.0)
    put("fidelity-sglang-off-1-again", "off-1", 296.0)
    put("fidelity-sglang-off-1-third", "off-1", 310.0)  # median of 296, 300, 310 = 300
    put("fidelity-sglang-experts-1", "experts-1", 285.0)
    put("fidelity-sglang-recorder-1", "recorder-1", 303.0)
    table = ef.summarize([str(tmp_path)])
    assert table.count("| sglang | off-1 | H100 |") == 3
    # 1 - 285/300 = 5.00 %; 1 - 303/300 = -1.00 %
    assert "| sglang | experts-1 | 5.00 % | 5.00 % |" in table
    assert "| sglang | recorder-1 | -1.00 % | -1.00 % |" in table


def test_spans_of_every_decode_pass_tell_gpu_time_from_waiting(tmp_path):
    """`span_stats(folder, None)` (the SGLang stages: no per-repeat ranges): medians over every decode pass
    of the steps file. Hand-built passes: GPU 100 µs each, started every 150 µs (the GPU waits 50 µs for
    the host), 30 µs of host time inside each; a prefill pass is left out."""
    meta = RunMetadata(run_id="spans", engine=EngineInfo(name="sglang"), model=ModelInfo(id="m"))
    w = TraceWriter(tmp_path / trace_file_name(meta, "steps"), "steps", meta)
    us = 1_000
    for step in range(1, 7):
        t = step * 150 * us
        w.write({"step": step, "phase": "prefill" if step == 1 else "decode", "is_draft": False,
                 "num_reqs": 1, "num_tokens": 256 if step == 1 else 1, "t_start_ns": t, "t_end_ns": t + 30 * us,
                 "gpu_start_ns": t, "gpu_end_ns": t + (400 if step == 1 else 100) * us,
                 "req_ids": ["a"], "req_prefix_lens": [0], "req_new_tokens": [1]})  # fmt: skip
    w.close()
    spans = ef.span_stats(tmp_path, None)["all"]
    assert spans["decode_steps"] == 5
    assert spans["gpu_span_us"] == 100.0 and spans["host_in_step_us"] == 30.0
    assert spans["gpu_interval_us"] == 150.0, "start to start of consecutive decode passes"


def test_the_unfused_experts_stage_is_compared_and_its_spans_listed(tmp_path):
    def put(stage: str, own: float, **extra: object) -> None:
        data = {"ok": True, "engine": "sglang", "stage": stage, "gpu": "H100", "engine_own_median": own,
                "run_median": own, "run_over_engine_own": 1.0, "run_first_token_s": [0.02], **extra}  # fmt: skip
        (tmp_path / f"fidelity-sglang-{stage}.json").write_text(json.dumps(data))

    span = {"all": {"decode_steps": 10240, "gpu_span_us": 3100.0, "gpu_interval_us": 3350.0,
                    "host_in_step_us": 420.0}}  # fmt: skip
    put("off-1", 300.0)
    put("experts-1", 297.0, count_path="fused", spans=span)
    put("expertsunfused-1", 285.0, count_path="masked")
    table = ef.summarize([str(tmp_path)])
    assert "| sglang | experts-1 | 1.00 % | 1.00 % |" in table  # 1 - 297/300
    assert "| sglang | expertsunfused-1 | 5.00 % | 5.00 % |" in table  # 1 - 285/300
    assert "| sglang | experts-1 | fused | 10240 | 3100.0 | 3350.0 | 420.0 |" in table
    assert ef.offline_options("sglang", "expertsunfused", 1, tmp_path).counts is True
    assert ef.offline_options("sglang", "steps", 1, tmp_path).counts is False


def test_drive_sends_what_each_engines_own_benchmark_sends(scripted, tmp_path):
    """The serve stage's `drive` round, run for real against the loopback server with the stage's own
    word-level tokenizer: for vLLM the prompts go as text (what `vllm bench serve --dataset-name random`
    sends: random ids decoded with the tokenizer), for SGLang as token ids (its `random-ids`)."""
    from sglang_validate import word_level_tokenizer

    config = json.loads(ef.MODEL.read_text())
    tok = word_level_tokenizer(tmp_path / "tok", int(config["vocab_size"]), int(config["eos_token_id"]))
    n, n_in, _ = ef.WORKLOADS[1]
    m = ef.run_drive(ef.drive_argv("vllm", scripted.url, tok, 1, 0, tmp_path, "fid-b1"))
    assert m["completed"] == n, m
    req = read_trace_file(tmp_path / "fid-b1.client.requests.arrow")
    ids = set(req.table.column("req_id").to_pylist())
    prompts = [s["body"]["prompt"] for s in scripted.get("/_seen") if s["id"] in ids]
    assert len(prompts) == n
    assert all(isinstance(p, str) and len(p.split()) == n_in and p.startswith("t") for p in prompts)
    assert req.run.workload["prompt_format"] == "text"
    sglang = ef.drive_argv("sglang", scripted.url, tok, 1, 0, tmp_path, "x")
    assert sglang[sglang.index("--prompt-format") + 1] == "ids"


def test_a_drive_variant_round_sends_its_flags(scripted, tmp_path):
    """`--drive-variant=--no-continuous-usage`: the third tool's drive asks for usage only at the end, as
    `vllm bench serve` does; the default drive asks for it in every chunk. Both against the loopback server."""
    from sglang_validate import word_level_tokenizer

    config = json.loads(ef.MODEL.read_text())
    tok = word_level_tokenizer(tmp_path / "tok", int(config["vocab_size"]), int(config["eos_token_id"]))
    args = ef.parser().parse_args(["--drive-variant=--no-continuous-usage"])
    assert args.drive_variant.split() == ["--no-continuous-usage"]
    usage_opts = {}
    for run_id, extra in (("fid-default", ()), ("fid-variant", args.drive_variant.split())):
        m = ef.run_drive(ef.drive_argv("vllm", scripted.url, tok, 1, 0, tmp_path, run_id, extra))
        assert m["completed"] == ef.WORKLOADS[1][0], m
        ids = set(
            read_trace_file(tmp_path / f"{run_id}.client.requests.arrow").table.column("req_id").to_pylist()
        )
        usage_opts[run_id] = {
            json.dumps(s["body"].get("stream_options"), sort_keys=True)
            for s in scripted.get("/_seen")
            if s["id"] in ids
        }
    assert usage_opts["fid-default"] == {'{"continuous_usage_stats": true, "include_usage": true}'}
    assert usage_opts["fid-variant"] == {'{"include_usage": true}'}


def test_serve_stage_repeats_five_times_by_default():
    """Three repeats were too few: one of three b64 drive repeats had a 1 s TTFT outlier (H100)."""
    assert ef.parser().parse_args([]).serve_reps == 5


def test_a_stage_listed_twice_keeps_both_results(tmp_path):
    """`--stages off-1,experts-1,off-1` writes fidelity-sglang-off-1.json twice: the earlier one is moved
    aside before the second run, and the summary lists and uses both."""

    def run_stage(stage: str, own: float) -> None:  # what main() does around each stage's child
        path = tmp_path / f"fidelity-sglang-{stage}.json"
        ef.keep_earlier(path)
        path.write_text(json.dumps({"ok": True, "engine": "sglang", "stage": stage, "gpu": "H100",
                                    "engine_own_median": own, "run_median": own, "run_over_engine_own": 1.0,
                                    "run_first_token_s": [0.02]}))  # fmt: skip

    run_stage("off-1", 300.0)
    run_stage("experts-1", 294.0)
    run_stage("off-1", 290.0)
    run_stage("off-1", 310.0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fidelity-sglang-experts-1.json", "fidelity-sglang-off-1-2.json",
                     "fidelity-sglang-off-1-3.json", "fidelity-sglang-off-1.json"]  # fmt: skip
    table = ef.summarize([str(tmp_path)])
    assert table.count("| sglang | off-1 | H100 |") == 3
    assert "| sglang | experts-1 | 2.00 % | 2.00 % |" in table  # 1 - 294 / median(300, 290, 310)


def test_serve_rounds_never_reuse_a_seed():
    """Same seed, same synthetic prompts: a b1 round seeded like a b64 round would send prompts the engine
    has cached. Every (batch, rep, drive tool) of a 5-repeat stage gets its own seed, and drive's prompts
    differ."""
    from moecap.collect.datasets.synthetic import synthetic_samples

    seeds = [ef.serve_seed(b, r, t) for b in (64, 1) for r in range(5) for t in ("drive", "drivevar")]
    assert len(set(seeds)) == len(seeds)
    b64 = synthetic_samples("synthetic:256x128", 64, seed=ef.serve_seed(64, 0))
    b1 = synthetic_samples("synthetic:256x128", 4, seed=ef.serve_seed(1, 0))
    firsts = {tuple(s.prompt_token_ids[:16]) for s in b64}
    assert not any(tuple(s.prompt_token_ids[:16]) in firsts for s in b1)


def test_round_schedules_read_how_the_engine_prefilled_each_round(tmp_path):
    """Hand-built server steps: round A (a burst) prefills 2048 + 2048 prompt tokens in two steps beside
    decodes; round B (a trickle) 256, then 512, then 3328 after a pure decode step. Steps outside both
    windows are ignored; a one-token entry is a decode, not a prefill."""
    meta = RunMetadata(run_id="sched", engine=EngineInfo(name="vllm"), model=ModelInfo(id="m"))
    w = TraceWriter(tmp_path / trace_file_name(meta, "steps"), "steps", meta)
    ms = 1_000_000
    steps = [  # (t_start ms, t_end ms, req_new_tokens)
        (5, 8, [256]),  # before round A: left out
        (100, 130, [256] * 8),
        (130, 160, [1, 1] + [256] * 8),
        (160, 173, [1] * 16),
        (300, 310, [256]),
        (310, 325, [1, 256, 256]),
        (325, 338, [1, 1, 1]),
        (338, 390, [1, 1, 1] + [256] * 13),
    ]
    for i, (t0, t1, new) in enumerate(steps):
        w.write({"step": i, "phase": "mixed", "is_draft": False, "num_reqs": len(new), "num_tokens": sum(new),
                 "t_start_ns": t0 * ms, "t_end_ns": t1 * ms, "req_ids": [f"r{j}" for j in range(len(new))],
                 "req_prefix_lens": [0] * len(new), "req_new_tokens": new})  # fmt: skip
    w.close()
    windows = [{"key": "bench-b64", "t0_ns": 90 * ms, "t1_ns": 200 * ms},
               {"key": "drive-b64", "t0_ns": 290 * ms, "t1_ns": 400 * ms}]  # fmt: skip
    sched = ef.round_schedules(tmp_path, windows)
    assert sched["bench-b64"] == [{"prefill_steps": 2, "prefill_tokens": 4096,
                                   "first_prefill_tokens": [2048, 2048], "prefill_span_ms": 60.0,
                                   "longest_prefill": {"tokens": 2048, "ms": 30.0}}]  # fmt: skip
    assert sched["drive-b64"] == [{"prefill_steps": 3, "prefill_tokens": 4096,
                                   "first_prefill_tokens": [256, 512, 3328], "prefill_span_ms": 90.0,
                                   "longest_prefill": {"tokens": 3328, "ms": 52.0}}]  # fmt: skip
    serve = {"ok": True, "engine": "vllm", "stage": "serve", "gpu": "H100", "medians": {}, "schedule": sched}
    (tmp_path / "fidelity-vllm-serve.json").write_text(json.dumps(serve))
    table = ef.summarize([str(tmp_path)])
    assert "bench-b64: prefill steps per round [2], first steps' prompt tokens [2048, 2048]" in table
    assert "drive-b64: prefill steps per round [3], first steps' prompt tokens [256, 512, 3328]" in table
    assert "prefill span ms [90.0], longest prefill step (tokens, ms) [(3328, 52.0)]" in table


def test_b1_ttft_outside_the_engine_step_pairs_each_request_with_its_prefill(tmp_path):
    """Hand-built server steps, one request at a time: each request's client TTFT minus the duration of the
    step that first holds it. Drive's round starts with a marked warm-up, bench's with an unmarked one (SGLang's
    bench warms up with request 0 itself): both are left out, the last len(ttfts) requests are the measured
    ones. Decode steps after a prefill do not count; a b64 window is not paired (many requests per step)."""
    meta = RunMetadata(run_id="out", engine=EngineInfo(name="vllm"), model=ModelInfo(id="m"))
    w = TraceWriter(tmp_path / trace_file_name(meta, "steps"), "steps", meta)
    ms = 1_000_000
    steps = [  # (t_start ms, t_end ms, request ids)
        (100, 140, ["d-warmup-0"]), (140, 143, ["d-warmup-0"]),
        (200, 240, ["d-000000"]), (240, 243, ["d-000000"]),
        (300, 350, ["d-000001"]), (350, 353, ["d-000001"]),
        (400, 445, ["d-000002"]),
        (1000, 1044, ["b-w"]), (1100, 1141, ["b-0"]), (1141, 1144, ["b-0"]), (1200, 1255, ["b-1"]),
        (1300, 1342, ["b-2"]),
        (2000, 2100, [f"x-{i}" for i in range(64)]),
    ]  # fmt: skip
    for i, (t0, t1, ids) in enumerate(steps):
        w.write({"step": i, "phase": "mixed", "is_draft": False, "num_reqs": len(ids), "num_tokens": len(ids),
                 "t_start_ns": t0 * ms, "t_end_ns": t1 * ms, "req_ids": ids, "req_prefix_lens": [0] * len(ids),
                 "req_new_tokens": [1] * len(ids)})  # fmt: skip
    w.close()
    windows = [
        {"key": "drive-b1", "batch": 1, "t0_ns": 90 * ms, "t1_ns": 500 * ms, "ttfts_ms": [48.0, 59.0, 53.0]},
        {
            "key": "bench-b1",
            "batch": 1,
            "t0_ns": 990 * ms,
            "t1_ns": 1400 * ms,
            "ttfts_ms": [50.0, 64.0, 50.0],
        },
        {"key": "drive-b64", "batch": 64, "t0_ns": 1990 * ms, "t1_ns": 2200 * ms, "ttfts_ms": [150.0] * 64},
    ]
    out = ef.ttft_outside_step(tmp_path, windows)
    # drive: 48-40, 59-50, 53-45 -> mean 8.333; bench: 50-41, 64-55, 50-42 -> mean 8.667
    assert out == {"drive-b1": [8.333], "bench-b1": [8.667]}
    serve = {
        "ok": True,
        "engine": "vllm",
        "stage": "serve",
        "gpu": "H100",
        "medians": {},
        "ttft_outside_step": out,
    }
    (tmp_path / "fidelity-vllm-serve.json").write_text(json.dumps(serve))
    assert "/ bench {'bench-b1': 1.0, 'drive-b1': 0.9615}" in ef.summarize([str(tmp_path)])


def test_b64_ttft_split_separates_the_engines_batching_from_the_rest(tmp_path):
    """Hand-built server steps for two b64 rounds: each round's mean TTFT = `engine` (from the start of the
    step that first holds the round's first request to the end of the step that finishes each prompt,
    averaged) + `rest`. Bench's round starts with an unmarked warm-up 0.5 s before the others, drive's with a
    marked one; both are left out. A prompt split over two steps is finished by the second; the step's GPU
    end counts where recorded, its host end otherwise; decode steps (one new token) finish nothing."""
    meta = RunMetadata(run_id="out", engine=EngineInfo(name="sglang"), model=ModelInfo(id="m"))
    w = TraceWriter(tmp_path / trace_file_name(meta, "steps"), "steps", meta)
    ms = 1_000_000
    steps = [  # (t_start ms, t_end ms, gpu_end ms or None, {request id: new tokens})
        (100, 110, None, {"d-warmup-0": 256}),
        (200, 215, None, {"d-0": 256}),
        (215, 265, None, {"d-0": 1, "d-1": 256, "d-2": 256, "d-3": 128}),
        (265, 300, None, {"d-0": 1, "d-1": 1, "d-2": 1, "d-3": 128}),
        (300, 310, None, {"d-0": 1, "d-1": 1, "d-2": 1, "d-3": 1}),
        (1000, 1010, 1012, {"b-w": 256}),
        (1600, 1615, 1620, {"b-0": 256, "b-1": 256}),
        (1615, 1640, 1650, {"b-0": 1, "b-1": 1, "b-2": 256, "b-3": 256}),
        (1650, 1660, 1662, {"b-0": 1, "b-1": 1, "b-2": 1, "b-3": 1}),
    ]
    for i, (t0, t1, g1, reqs) in enumerate(steps):
        w.write({"step": i, "phase": "mixed", "is_draft": False, "num_reqs": len(reqs),
                 "num_tokens": sum(reqs.values()), "t_start_ns": t0 * ms, "t_end_ns": t1 * ms,
                 "gpu_end_ns": None if g1 is None else g1 * ms, "req_ids": list(reqs),
                 "req_prefix_lens": [0] * len(reqs), "req_new_tokens": list(reqs.values())})  # fmt: skip
    w.close()
    windows = [
        {"key": "drive-b64", "batch": 64, "t0_ns": 90 * ms, "t1_ns": 400 * ms, "ttfts_ms": [25.0, 75.0, 75.0, 110.0]},
        {"key": "bench-b64", "batch": 64, "t0_ns": 990 * ms, "t1_ns": 1700 * ms, "ttfts_ms": [30.0, 30.0, 60.0, 60.0]},
        {"key": "drive-b1", "batch": 1, "t0_ns": 90 * ms, "t1_ns": 400 * ms, "ttfts_ms": [25.0]},
    ]  # fmt: skip
    out = ef.b64_ttft_split(tmp_path, windows)
    # drive: prompts done at 215, 265, 265, 300 from a first step at 200 -> engine (15+65+65+100)/4 = 61.25,
    # mean TTFT 71.25 -> rest 10; bench: done at 1620, 1620, 1650, 1650 from 1600 -> engine 35, TTFT 45, rest 10
    assert out == {
        "drive-b64": [{"mean_ttft_ms": 71.25, "engine_ms": 61.25, "rest_ms": 10.0}],
        "bench-b64": [{"mean_ttft_ms": 45.0, "engine_ms": 35.0, "rest_ms": 10.0}],
    }
    serve = {
        "ok": True,
        "engine": "sglang",
        "stage": "serve",
        "gpu": "H100",
        "medians": {},
        "b64_ttft_split": out,
    }
    (tmp_path / "fidelity-sglang-serve.json").write_text(json.dumps(serve))
    table = ef.summarize([str(tmp_path)])
    assert '"bench-b64": {"engine_ms": 35.0, "rest_ms": 10.0}' in table
    assert '"drive-b64": {"engine_ms": 61.2, "rest_ms": 10.0}' in table


def test_ladder_formation_counts_groups_prefilled_in_one_step_of_their_count(tmp_path):
    """Hand-built vLLM server steps of drive's ladder (ids as vLLM names a batched request's prompts,
    `cmpl-<X-Request-Id>-<i>`): 16 tokens alone in one step (formed); 17 tokens as one prompt beside a
    1-token decode (its step holds 18: not formed); 40 tokens as two prompts split over two steps (not);
    41 tokens as two prompts in one step (formed). Steps outside the window and unrelated ids are ignored."""
    meta = RunMetadata(run_id="lad", engine=EngineInfo(name="vllm"), model=ModelInfo(id="m"))
    w = TraceWriter(tmp_path / trace_file_name(meta, "steps"), "steps", meta)
    pre = "cmpl-moecap-warmup-ab12-ladder-"
    steps = [  # (t_start ms, ids, new tokens)
        (1, [pre + "99"], [99]),  # before the window
        (10, [pre + "16"], [16]),
        (20, ["other", pre + "17"], [1, 17]),
        (30, [pre + "40-0"], [20]),
        (40, [pre + "40-1"], [20]),
        (50, [pre + "41-0", pre + "41-1"], [21, 20]),
        (60, ["r0"], [256]),
    ]
    for i, (t0, ids, new) in enumerate(steps):
        w.write({"step": i, "phase": "prefill", "is_draft": False, "num_reqs": len(new), "num_tokens": sum(new),
                 "t_start_ns": t0 * MS, "t_end_ns": (t0 + 5) * MS, "req_ids": ids,
                 "req_prefix_lens": [0] * len(new), "req_new_tokens": new})  # fmt: skip
    w.close()
    got = ef.ladder_formation(tmp_path, {"key": "warm", "t0_ns": 5 * MS, "t1_ns": 100 * MS})
    assert got == {"groups": 4, "one_step_of_its_count": 2, "missed": 2, "missed_counts": [17, 40]}
    assert ef.ladder_formation(tmp_path, {"key": "none", "t0_ns": 55 * MS, "t1_ns": 100 * MS}) is None
    serve = {"ok": True, "engine": "vllm", "stage": "serve", "gpu": "H100", "medians": {}, "ladder_steps": got,
             "warm_round": {"ladder": "warm-up: residue ladder of 4 steps up to 8192 tokens in 1.0 s"}}  # fmt: skip
    (tmp_path / "fidelity-vllm-serve.json").write_text(json.dumps(serve))
    table = ef.summarize([str(tmp_path)])
    assert "warm round: warm-up: residue ladder of 4 steps" in table
    assert "ladder groups prefilled in one step of their count: 2 of 4; not: [17, 40]" in table
