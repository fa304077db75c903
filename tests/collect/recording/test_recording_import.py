"""`moecap-collect import-moecap`: MoE-CAP output folders (three generations of its file layout) become
trace files that the analyzer reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from moecap.analyze.accuracy import score_outputs
from moecap.analyze.reference.records import load_reference_records
from moecap.collect.errors import CollectError
from moecap.collect.recording import import_moecap_dir
from moecap.schemas import open_traces

RECORDS = [
    {
        "batch_size": 2,
        "latency": 0.05,
        "seq_lens_sum": 120,
        "forward_mode": "prefill",
        "expert_activation": 12.5,
        "gpu_num": 1,
        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
        "per_req_info": [
            {"req_id": "a", "extend_len": 60, "total_len": 60, "prompt_len": 60, "is_last_chunk": True},
            {"req_id": "b", "extend_len": 60, "total_len": 60, "prompt_len": 60, "is_last_chunk": True},
        ],
    },
    {
        "batch_size": 2,
        "latency": 0.01,
        "seq_lens_sum": 2,
        "forward_mode": "decode",
        "req_ids": ["a", "b"],
        "expert_activation": 7.0,
        "gpu_num": 1,
        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
    },
]


def _write(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        p.write_text(json.dumps(obj))


def test_metrics_batch_data_and_inference_outputs(tmp_path):
    src = tmp_path / "run"
    metrics = {
        "prefill_smbu": 0.12,
        "decoding_smbu": 0.4,
        "ttft": 0.05,
        "tpot": 0.01,
        "exact_match": 0.5,
        "correct": 1,
        "total": 2,
        "model_name": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
        "method": "vllm",
        "precision": "bfloat16",
        "e2e_s": 1.2,
        "batch_size": 2,
        "gpu_type": "1xH100",
        "dataset": "gsm8k",
        "model_type": "instruct",
    }
    _write(src / "metrics.json", metrics)
    _write(src / "batch_data.json", RECORDS)
    _write(
        src / "inference_outputs.json",
        [
            {"index": 0, "prompt": "Q0", "output": "... #### 29", "reference": "29"},
            {"index": 1, "prompt": "Q1", "output": "... #### 5", "reference": "6"},
        ],
    )
    (run,) = import_moecap_dir(src, tmp_path / "out")
    traces = open_traces([tmp_path / "out"], strict=True)
    assert list(traces.runs) == [run.run_id] and not traces.errors
    files = {f.table_kind: f for f in traces.files}
    assert set(files) == {"steps", "requests", "outputs"}
    meta = files["steps"].run
    assert meta.model.id == "Qwen/Qwen1.5-MoE-A2.7B-Chat" and meta.engine.name == "vllm"
    assert meta.model.dtypes == {"weights": "bfloat16"}
    assert meta.extra["moecap_metrics"] == metrics  # the published numbers, verbatim
    assert meta.extra["moecap_reference"]["columns"]["expert_activation"] == [12.5, 7.0]
    assert [g.name for g in meta.gpus] == ["NVIDIA-H100-HBM3-80GB"]
    assert meta.workload["batch_size"] == 2 and meta.workload["dataset"] == "gsm8k"
    assert files["steps"].table.num_rows == 2
    # the records sidecar is what the analyzer's reference mode reads
    assert load_reference_records(tmp_path / "out" / f"{run.run_id}.batch_data.json") == RECORDS
    outputs = pl.from_arrow(files["outputs"].table)
    assert outputs["sample_id"].to_list() == [
        "gsm8k-test-0",
        "gsm8k-test-1",
    ]  # MoE-CAP takes the first rows in order
    summary, _ = score_outputs(outputs)
    assert (summary["correct"], summary["total"]) == (1, 2)
    # re-importing gives the same run id (derived from the files, not the clock)
    assert import_moecap_dir(src, tmp_path / "out2")[0].run_id == run.run_id


def test_current_runner_layout_with_timings(tmp_path):
    d = tmp_path / "outputs" / "vllm" / "Qwen" / "Qwen3-30B-A3B"
    key = "gsm8k_20251110_101010"
    _write(
        d / f"metrics_{key}.json",
        {"performance": {"ttft": 0.2, "tpot": 0.03}, "quality": {"acc": 0.5, "total": 2}},
    )
    _write(
        d / f"metadata_{key}.json",
        {
            "hardware": {"gpu_type": "H100", "num_gpus": 2},
            "model_config": {"model_name": "Qwen/Qwen3-30B-A3B", "precision": "bfloat16"},
            "system_environment": {
                "inference_engine": "vllm",
                "inference_engine_version": "0.11.0",
                "batch_size": 8,
            },
        },
    )
    _write(
        d / f"output_data_{key}.jsonl",
        [
            {
                "index": 0,
                "input_tokens": 57,
                "output_tokens": "The answer is 29.",
                "input_token_count": 57,
                "output_token_count": 6,
                "success": True,
                "latency_s": 0.5,
                "ttft_s": 0.2,
            },
            {
                "index": 1,
                "input_tokens": 40,
                "output_tokens": "",
                "input_token_count": 40,
                "output_token_count": 0,
                "success": False,
                "latency_s": 0.1,
                "ttft_s": 0.0,
                "error": "HTTP 400: too long",
            },
        ],
    )
    # per-pass detailed results: the pass time is ttft (prefill) or tpot (decode)
    _write(
        d / f"detailed_results_{key}.jsonl",
        [
            {
                "index": 0,
                "forward_mode": "prefill",
                "expert_activation": 30.0,
                "batch_size": 2,
                "seq_lens_sum": 97,
                "ttft": 0.04,
            },
            {
                "index": 1,
                "forward_mode": "decode",
                "expert_activation": 20.0,
                "batch_size": 1,
                "seq_lens_sum": 1,
                "tpot": 0.02,
            },
        ],
    )
    # a second run in the same folder must not pick these files up
    _write(d / "metrics_numinamath_20251111_090000.json", {"performance": {}})
    runs = import_moecap_dir(tmp_path / "outputs", tmp_path / "out")
    assert len(runs) == 2
    traces = open_traces([tmp_path / "out"], strict=True)
    gsm = next(r for rid, r in traces.runs.items() if "gsm8k" in rid)
    files = {f.table_kind: f for f in gsm.files}
    meta = files["requests"].run
    assert gsm.run_id.startswith("20251110T101010-moecap-import-Qwen3-30B-A3B-gsm8k-")
    assert (meta.engine.name, meta.engine.version, meta.model.id) == ("vllm", "0.11.0", "Qwen/Qwen3-30B-A3B")
    assert [g.name for g in meta.gpus] == ["H100", "H100"]
    assert meta.extra["moecap_import"]["request_clock"] == "relative"
    reqs = files["requests"].table.to_pylist()
    assert (reqs[0]["arrival_ns"], reqs[0]["first_token_ns"], reqs[0]["finish_ns"]) == (
        0,
        200_000_000,
        500_000_000,
    )
    assert (reqs[0]["prompt_tokens"], reqs[0]["output_tokens"]) == (57, 6)
    assert reqs[1]["error"] == "HTTP 400: too long" and reqs[1]["first_token_ns"] is None
    outs = files["outputs"].table.to_pylist()
    assert outs[0]["output"] == "The answer is 29." and outs[1]["output"] is None
    steps = files["steps"].table.to_pylist()
    assert [s["t_end_ns"] - s["t_start_ns"] for s in steps] == [40_000_000, 20_000_000]
    other = next(r for rid, r in traces.runs.items() if "numinamath" in rid)
    # metrics only: kept in the metadata of empty requests / outputs files
    assert sorted(f.table_kind for f in other.files) == ["outputs", "requests"]
    assert all(f.table.num_rows == 0 for f in other.files)
    assert other.files[0].run.extra["moecap_metrics"] == {"performance": {}}


def test_legacy_cap_metrics_with_per_request_itl(tmp_path):
    d = tmp_path / "legacy"
    _write(
        d / "cap_metrics_gsm8k_20250301_080000.json",
        {"model_name": "deepseek-ai/DeepSeek-V2-Lite-Chat", "method": "sglang", "dataset": "gsm8k"},
    )
    _write(
        d / "detailed_results_gsm8k.jsonl",
        [
            {
                "index": 0,
                "prompt_length": 30,
                "success": True,
                "output_len": 3,
                "ttft": 0.1,
                "latency": 0.16,
                "itl": [0.03, 0.03],
                "error": "",
            },
        ],
    )
    import_moecap_dir(d, tmp_path / "out")
    (req_file,) = [
        f for f in open_traces([tmp_path / "out"], strict=True).files if f.table_kind == "requests"
    ]
    (req,) = req_file.table.to_pylist()
    assert req["chunk_times_ns"] == [100_000_000, 130_000_000, 160_000_000] and req["chunk_tokens"] == [
        1,
        1,
        1,
    ]
    assert (req["prompt_tokens"], req["output_tokens"], req["error"]) == (30, 3, None)


def test_bad_folders(tmp_path):
    with pytest.raises(CollectError, match="no such file"):
        import_moecap_dir(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectError, match="no MoE-CAP results here"):
        import_moecap_dir(tmp_path / "empty", tmp_path / "out")
    _write(tmp_path / "bad" / "batch_data.jsonl", [{"forward_mode": "prefill"}])
    (tmp_path / "bad" / "batch_data.jsonl").write_text('{"forward_mode": "prefill"}\nnot json\n')
    with pytest.raises(CollectError, match="line 2 is not JSON"):
        import_moecap_dir(tmp_path / "bad", tmp_path / "out")


def test_cli(tmp_path):
    src = tmp_path / "run"
    _write(src / "metrics.json", {"model_name": "m", "dataset": "gsm8k"})
    _write(src / "batch_data.json", RECORDS)
    code = "from moecap.collect.cli import main; main()"
    ok = subprocess.run(
        [sys.executable, "-c", code, "import-moecap", str(src), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "2 passes, 0 requests, metrics yes" in ok.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code, "import-moecap", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == f"moecap-collect: error: {tmp_path / 'missing'}: no such file or directory"
    )
